/// A seeded simulation of the whole stack — thin volumes and snapshots in a pool on a RAID array on
/// fault-injecting in-memory disks — driven by a random workload and checked against a reference
/// model after every read, in the manner of FoundationDB's and TigerBeetle's simulators.
///
/// The same seed replays the same run. Faults come from the seed too: read errors on a member (the
/// array must answer from redundancy), a member failed, replaced and rebuilt under the load, and
/// power cuts that drop or tear every write no flush covered, followed by reassembly (resyncing
/// dirty regions) and reopening the pool. After a power cut the model accepts, block by block,
/// what the flush contract allows — the contents at the last commit or any version written since —
/// and nothing else; then that state becomes the model's.
public enum StackSimulation {
    public struct Options: Sendable {
        public var seed: UInt64
        public var operations: Int = 400
        public var level: RAIDLevel = .raid5
        public var members: Int = 4
        public var memberBytes: UInt64 = 24 << 20
        public var volumeBytes: UInt64 = 4 << 20
        public var maximumVolumes: Int = 5
        /// Keep every operation in the report's trace (else the last 30).
        public var fullTrace = false

        public init(seed: UInt64) { self.seed = seed }
    }

    public struct Report: Sendable, Codable {
        public var seed: UInt64
        public var operations = 0
        public var reads = 0
        public var writes = 0
        public var flushes = 0
        public var discards = 0
        public var snapshots = 0
        public var volumeChanges = 0
        public var injectedReadErrors = 0
        public var memberFailures = 0
        public var rebuilds = 0
        public var powerCuts = 0
        public var mismatches = 0
        /// What went wrong, when something did.
        public var failure: String?
        /// The last operations before the failure (or the end).
        public var trace: [String] = []
        public var passed: Bool { failure == nil }
    }

    /// A volume in the model: its bytes now, at the last commit, and the versions of each 4 KiB
    /// block written since that commit.
    struct VolumeModel {
        var current: [UInt8]
        var durable: [UInt8]
        var versions: [[[UInt8]]]
        var readOnly = false

        init(_ bytes: [UInt8]) {
            current = bytes
            durable = bytes
            versions = [[[UInt8]]](repeating: [], count: bytes.count / 4096)
        }

        mutating func committed() {
            durable = current
            versions = [[[UInt8]]](repeating: [], count: current.count / 4096)
        }

        mutating func apply(_ data: [UInt8], at offset: Int) {
            current.replaceSubrange(offset..<(offset + data.count), with: data)
            for block in (offset / 4096)..<((offset + data.count) / 4096) {
                versions[block].append(Array(current[(block * 4096)..<((block + 1) * 4096)]))
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

    private struct Mismatch: Error { var message: String }

    /// Runs one simulation; never throws: what went wrong is in the report.
    public static func run(_ options: Options) async -> Report {
        var report = Report(seed: options.seed)
        do {
            try await simulate(options, &report)
        } catch let mismatch as Mismatch {
            report.mismatches += 1
            report.failure = mismatch.message
        } catch {
            report.failure = "unexpected error: \(error)"
        }
        if options.fullTrace == false { report.trace = Array(report.trace.suffix(30)) }
        return report
    }

    private static func simulate(_ options: Options, _ report: inout Report) async throws {
        var random = SeededRandom(seed: options.seed)
        var memberCounter = 0
        func newMember() throws -> FaultyDevice {
            memberCounter += 1
            let memory = try MemoryDevice(capacityBytes: options.memberBytes, logicalBlockBytes: 4096, name: "member\(memberCounter)")
            return FaultyDevice(wrapping: memory, seed: options.seed &+ UInt64(memberCounter), volatileCache: true, name: "member\(memberCounter)")
        }
        var members = try (0..<options.members).map { _ in try newMember() }
        var array = try await RAIDArray.create(name: "sim", level: options.level, chunkBytes: 16384, members: members)
        // Wall-clock behaviour (marking an idle array clean) would make runs differ by timing.
        array.setIdleCleanDelay(nanoseconds: .max)
        var pool = try await ThinPool.create(name: "sim", devices: [array])
        _ = try await pool.createVolume(name: "v0", sizeBytes: options.volumeBytes)
        try await pool.commit()
        var models: [String: VolumeModel] = ["v0": VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))]
        var counter = 0
        var readErrorsActive = 0

        func log(_ line: String) {
            report.trace.append(line)
            if !options.fullTrace && report.trace.count > 200 { report.trace.removeFirst(100) }
        }
        func commitAll() { for name in models.keys { models[name]!.committed() } }
        func pickVolume(writable: Bool) -> String? {
            let names = models.keys.sorted().filter { !writable || !models[$0]!.readOnly }
            return names.isEmpty ? nil : names[Int(random.below(UInt64(names.count)))]
        }

        var lastState = array.status.state
        for _ in 0..<options.operations {
            let state = array.status.state
            if state != lastState {
                log("(array \(state): \(array.status.slots.map { "\($0.state)" }.joined(separator: " ")))")
                lastState = state
            }
            counter += 1
            report.operations += 1
            let dice = random.below(1000)
            switch dice {
            case 0..<300:
                guard let name = pickVolume(writable: true) else { continue }
                let size = models[name]!.current.count
                let blocks = min(1 + Int(random.below(16)), size / 4096)
                let first = Int(random.below(UInt64(size / 4096 - blocks + 1)))
                let data = AlignedBuffer(count: blocks * 4096, zeroed: false)
                fillRandom(data.bytes, seed: options.seed << 24 ^ UInt64(counter))
                let fua = random.chance(0.1)
                log("write \(name) blocks \(first)+\(blocks)\(fua ? " fua" : "")")
                models[name]!.apply(data.array, at: first * 4096)
                try await pool.openVolume(name: name).write(from: data, at: UInt64(first * 4096), fua: fua)
                if fua { commitAll() }
                report.writes += 1
            case 300..<550:
                guard let name = pickVolume(writable: false) else { continue }
                let size = models[name]!.current.count
                let blocks = 1 + Int(random.below(32))
                let first = Int(random.below(UInt64(size / 4096 - min(blocks, size / 4096) + 1)))
                let count = min(blocks, size / 4096 - first)
                let buffer = AlignedBuffer(count: count * 4096, zeroed: false)
                log("read \(name) blocks \(first)+\(count)")
                try await pool.openVolume(name: name).read(into: buffer, at: UInt64(first * 4096))
                let expected = Array(models[name]!.current[(first * 4096)..<((first + count) * 4096)])
                if buffer.array != expected {
                    let got = buffer.array
                    let index = (0..<got.count).first { got[$0] != expected[$0] }!
                    throw Mismatch(message: "seed \(options.seed): \(name) byte \(first * 4096 + index) (block \(first + index / 4096)) reads \(got[index]), the model says \(expected[index])")
                }
                report.reads += 1
            case 550..<630:
                guard let name = pickVolume(writable: false) else { continue }
                log("flush \(name)")
                try await pool.openVolume(name: name).flush()
                commitAll()
                report.flushes += 1
            case 630..<690:
                guard let name = pickVolume(writable: true) else { continue }
                let size = models[name]!.current.count
                let blocks = min(1 + Int(random.below(40)), size / 4096)
                let first = Int(random.below(UInt64(size / 4096 - blocks + 1)))
                let zeroes = random.chance(0.5)
                log("\(zeroes ? "write-zeroes" : "discard") \(name) blocks \(first)+\(blocks)")
                models[name]!.apply([UInt8](repeating: 0, count: blocks * 4096), at: first * 4096)
                let volume = try await pool.openVolume(name: name)
                if zeroes {
                    try await volume.writeZeroes(offset: UInt64(first * 4096), length: UInt64(blocks * 4096))
                } else {
                    try await volume.discard(offset: UInt64(first * 4096), length: UInt64(blocks * 4096))
                }
                report.discards += 1
            case 690..<740:
                guard models.count < options.maximumVolumes, let name = pickVolume(writable: false) else { continue }
                let snapshot = "s\(counter)"
                let readOnly = random.chance(0.3)
                log("snapshot \(name) as \(snapshot)\(readOnly ? " read-only" : "")")
                try await pool.snapshot(volume: name, name: snapshot, readOnly: readOnly)
                var model = VolumeModel(models[name]!.current)
                model.readOnly = readOnly
                models[snapshot] = model
                commitAll()
                report.snapshots += 1
            case 740..<780:
                if models.count > 1, random.chance(0.5), let name = pickVolume(writable: false) {
                    log("delete \(name)")
                    try await pool.deleteVolume(name: name)
                    models[name] = nil
                } else if models.count < options.maximumVolumes {
                    let name = "c\(counter)"
                    log("create \(name)")
                    _ = try await pool.createVolume(name: name, sizeBytes: options.volumeBytes)
                    models[name] = VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))
                } else {
                    continue
                }
                commitAll()
                report.volumeChanges += 1
            case 780..<820:
                guard let name = pickVolume(writable: true) else { continue }
                let size = Int(1 + random.below(options.volumeBytes / 65536 * 3 / 2)) * 65536 - (random.chance(0.5) ? 8192 : 0)
                log("resize \(name) to \(size)")
                try await pool.resizeVolume(name: name, sizeBytes: UInt64(size))
                models[name]!.resize(to: size)
                commitAll()
                report.volumeChanges += 1
            case 820..<870:
                // Read errors on one member: the array answers from redundancy and repairs.
                let member = members[Int(random.below(UInt64(members.count)))]
                if readErrorsActive > 0 {
                    log("read errors stop")
                    for device in members { device.clearFaults() }
                    readErrorsActive = 0
                } else if !array.status.state.contains("degraded") {
                    log("read errors on \(member.name)")
                    member.failReads(probability: 0.05)
                    readErrorsActive = 1
                    report.injectedReadErrors += 1
                }
            case 870..<900:
                // A member fails under the load, is replaced and rebuilt.
                guard !array.status.state.contains("degraded"), readErrorsActive == 0 else { continue }
                let victim = members[Int(random.below(UInt64(members.count)))]
                log("fail \(victim.name), replace and rebuild")
                try await array.fail(memberNamed: victim.name)
                let replacement = try newMember()
                try await array.replace(memberNamed: victim.name, with: replacement)
                _ = try await array.rebuild()
                members[members.firstIndex { $0 === victim }!] = replacement
                report.memberFailures += 1
                report.rebuilds += 1
            default:
                // Power cut: unflushed writes on every member dropped or torn; reassemble and reopen.
                guard !array.status.state.contains("degraded") else { continue }
                log("power cut")
                for device in members {
                    device.clearFaults()
                    try await device.powerCut(tearing: true)
                }
                readErrorsActive = 0
                for device in members { device.restorePower() }
                let assembly = try await RAIDArray.assemble(members: members)
                array = assembly.array
                array.setIdleCleanDelay(nanoseconds: .max)
                pool = try await ThinPool.open(devices: [array])
                let present = Set(try await pool.volumes().map(\.name))
                guard present == Set(models.keys) else {
                    throw Mismatch(message: "seed \(options.seed): after a power cut the pool has volumes \(present.sorted()), the model \(models.keys.sorted())")
                }
                for (name, model) in models.sorted(by: { $0.key < $1.key }) {
                    let volume = try await pool.openVolume(name: name)
                    let buffer = AlignedBuffer(count: model.current.count, zeroed: false)
                    try await volume.read(into: buffer, at: 0)
                    let bytes = buffer.array
                    for block in 0..<(bytes.count / 4096) {
                        let range = (block * 4096)..<((block + 1) * 4096)
                        let got = Array(bytes[range])
                        if got != Array(model.durable[range]) && !model.versions[block].contains(got) {
                            throw Mismatch(message: "seed \(options.seed): after a power cut \(name) block \(block) holds data the flush contract does not allow (neither its committed contents nor a version written since)")
                        }
                    }
                    var settled = VolumeModel(bytes)
                    settled.readOnly = model.readOnly
                    models[name] = settled
                }
                let check = try await pool.check()
                guard check.isClean else {
                    throw Mismatch(message: "seed \(options.seed): pool check after a power cut: \(check.problems.prefix(3).joined(separator: "; "))")
                }
                report.powerCuts += 1
            }
        }
        for device in members { device.clearFaults() }
        try await pool.commit()
        let check = try await pool.check()
        guard check.isClean else {
            throw Mismatch(message: "seed \(options.seed): pool check at the end: \(check.problems.prefix(3).joined(separator: "; "))")
        }
        let scrub = try await array.scrub()
        guard scrub.mismatches == 0 else {
            throw Mismatch(message: "seed \(options.seed): scrub found \(scrub.mismatches) stripes whose parity disagrees with the data")
        }
        try await array.close()
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
