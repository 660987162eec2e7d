extension StackSimulation {
    /// A volume in the model: its bytes now, at the last commit, and the versions of each 4 KiB
    /// block written since that commit.
    struct VolumeModel {
        var current: [UInt8]
        var durable: [UInt8]
        var versions: [[[UInt8]]]
        var readOnly = false
        /// The unit a power cut keeps or loses whole.
        var blockBytes: Int

        init(_ bytes: [UInt8], blockBytes: Int = 4096) {
            current = bytes
            durable = bytes
            self.blockBytes = blockBytes
            versions = [[[UInt8]]](repeating: [], count: bytes.count / blockBytes)
        }

        mutating func committed() {
            durable = current
            versions = [[[UInt8]]](repeating: [], count: current.count / blockBytes)
        }

        mutating func apply(_ data: [UInt8], at offset: Int) {
            current.replaceSubrange(offset..<(offset + data.count), with: data)
            for block in (offset / blockBytes)..<((offset + data.count + blockBytes - 1) / blockBytes) {
                versions[block].append(Array(current[(block * blockBytes)..<((block + 1) * blockBytes)]))
            }
        }

        /// Shrinks or grows (new space reads zeros); the caller commits right after, as a resize does.
        mutating func resize(to bytes: Int) {
            if bytes < current.count {
                current.removeSubrange(bytes...)
            } else {
                current += [UInt8](repeating: 0, count: bytes - current.count)
            }
        }
    }

    struct Mismatch: Error {
        var message: String
        var volume: String? = nil
        var block: Int? = nil
    }

    /// One operation of the run, with what it touched (for the relevant trace).
    struct Step {
        var index: Int
        var text: String
        var volume: String?
        var blocks: Range<Int>?
        /// For a snapshot: the volume it was taken of.
        var origin: String?
    }

    /// The steps that bear on `block` of `volume`: steps without a volume (faults, power cuts),
    /// steps on the volume that name no blocks or name this one, and the same for the volume a
    /// snapshot was taken of, up to the snapshot.
    static func relevant(_ steps: [Step], volume: String, block: Int?) -> [Step] {
        var watched: Set<String> = [volume]
        var kept: [Step] = []
        for step in steps.reversed() {
            guard let name = step.volume else {
                kept.append(step)
                continue
            }
            guard watched.contains(name) else { continue }
            if let blocks = step.blocks, let block, !blocks.contains(block) { continue }
            kept.append(step)
            if let origin = step.origin {
                // Before the snapshot the volume did not exist: its history is its origin's.
                watched.remove(name)
                watched.insert(origin)
            }
        }
        return kept.reversed()
    }

    /// What a run records as it goes: the report's counts, every step (for the trace) and every
    /// member it made (for the faults they injected).
    final class Record {
        var report: Report
        var steps: [Step] = []
        var devices: [FaultyDevice] = []

        init(seed: UInt64) { report = Report(seed: seed) }

        /// The report, with the members' fault counts and the trace (every step, or the last 30).
        func finalReport(fullTrace: Bool) -> Report {
            var report = report
            for device in devices {
                let statistics = device.statistics
                report.memberReadsFailed += Int(statistics.injectedReadErrors)
                report.memberWritesFailed += Int(statistics.injectedWriteErrors)
                report.powerCutBlocksDropped += Int(statistics.droppedBlocks)
                report.powerCutBlocksWritten += Int(statistics.tornBlocksWritten)
                for (kind, count) in [
                    ("corrupt-read", statistics.corruptedReads), ("corrupt-write", statistics.corruptedWrites),
                    ("misdirect-write", statistics.misdirectedWrites), ("lose-write", statistics.lostWrites),
                    ("rot", statistics.rottedBlocks),
                ] where count > 0 {
                    report.silentFaultsInjected[kind, default: 0] += Int(count)
                }
            }
            report.trace = (fullTrace ? steps[...] : steps.suffix(30)).map(\.text)
            return report
        }
    }

    /// Fills `buffer` with bytes derived from `seed`.
    static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer, seed: UInt64) {
        var random = SeededRandom(seed: seed)
        var offset = 0
        while offset + 8 <= buffer.count {
            buffer.storeBytes(of: random.next(), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
    }
}
