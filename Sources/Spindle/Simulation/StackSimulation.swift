/// A seeded simulation of the whole stack — thin volumes and snapshots in a pool on a RAID array on
/// fault-injecting in-memory disks — driven by a random workload and checked against a reference
/// model after every read, in the manner of FoundationDB's and TigerBeetle's simulators.
///
/// The same seed replays the same run. Faults come from the seed too: read errors on a member (the
/// array must answer from redundancy), write errors on a member (the array fails it and goes on
/// degraded until it is replaced), a member failed, replaced and rebuilt under the load, rebuilds
/// paused part way (then resumed, possibly after a crash), idle moments in which the array marks
/// itself clean, a pool too small for its volumes (writes fail with "no space" and must leave each
/// block old or new), and power cuts that drop or tear every write no flush covered, followed by
/// reassembly (resyncing dirty regions) and reopening the pool. After a power cut the model
/// accepts, block by block, what the flush contract allows — the contents at the last commit or
/// any version written since — and nothing else; then that state becomes the model's.
///
/// A failing run reports its seed, its last operations, and the operations that bear on the block
/// that went wrong: the writes that covered it, everything else done to its volume and to the
/// volumes it was snapshotted from, and the faults.
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
        /// Write errors, paused rebuilds, idle moments, power cuts while degraded and, for one seed
        /// in four, a pool too small for its volumes. Off, the run is the one earlier versions made
        /// from the same seed (the regression seeds found before these faults existed).
        public var extendedFaults = true

        public init(seed: UInt64) { self.seed = seed }

        /// A run on `level` with the usual member count for it (4 for RAID5, 2 for RAID1).
        public init(seed: UInt64, level: RAIDLevel) {
            self.seed = seed
            self.level = level
            members = level == .raid5 ? 4 : 2
        }
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
        public var injectedWriteErrors = 0
        public var pausedRebuilds = 0
        public var idleCleans = 0
        public var poolFullErrors = 0
        public var powerCuts = 0
        public var mismatches = 0
        /// What went wrong, when something did.
        public var failure: String?
        /// The last operations before the failure (or the end).
        public var trace: [String] = []
        /// On failure: the operations that bear on the block that went wrong (see the type's notes).
        public var relevantTrace: [String] = []
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

    private struct Mismatch: Error {
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

    /// Runs one simulation; never throws: what went wrong is in the report.
    public static func run(_ options: Options) async -> Report {
        var report = Report(seed: options.seed)
        var steps: [Step] = []
        do {
            try await simulate(options, &report, &steps)
        } catch let mismatch as Mismatch {
            report.mismatches += 1
            report.failure = mismatch.message
            if let volume = mismatch.volume {
                report.relevantTrace = relevant(steps, volume: volume, block: mismatch.block).map { "#\($0.index) \($0.text)" }
            }
        } catch {
            report.failure = "unexpected error: \(error)"
            report.relevantTrace = steps.suffix(30).map { "#\($0.index) \($0.text)" }
        }
        report.trace = (options.fullTrace ? steps[...] : steps.suffix(30)).map(\.text)
        return report
    }

    private static func simulate(_ options: Options, _ report: inout Report, _ steps: inout [Step]) async throws {
        var random = SeededRandom(seed: options.seed)
        let extended = options.extendedFaults
        // One seed in four (with the extended faults) gets a pool too small for its volumes.
        let tight = extended && options.seed % 4 == 3
        let memberBytes = tight ? (options.level == .raid5 ? 4 << 20 : 5 << 20) : options.memberBytes
        var memberCounter = 0
        func newMember() throws -> FaultyDevice {
            memberCounter += 1
            let memory = try MemoryDevice(capacityBytes: memberBytes, logicalBlockBytes: 4096, name: "member\(memberCounter)")
            return FaultyDevice(wrapping: memory, seed: options.seed &+ UInt64(memberCounter), volatileCache: true, name: "member\(memberCounter)")
        }
        var members = try (0..<options.members).map { _ in try newMember() }
        var array = try await RAIDArray.create(name: "sim", level: options.level, chunkBytes: 16384, members: members)
        // Wall-clock behaviour (marking an idle array clean) would make runs differ by timing; the
        // simulation makes its own idle moments.
        array.setIdleCleanDelay(nanoseconds: .max)
        var pool = try await ThinPool.create(name: "sim", devices: [array])
        _ = try await pool.createVolume(name: "v0", sizeBytes: options.volumeBytes)
        try await pool.commit()
        var models: [String: VolumeModel] = ["v0": VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))]
        var counter = 0
        var readErrorsActive = 0

        func log(_ line: String, volume: String? = nil, blocks: Range<Int>? = nil, origin: String? = nil) {
            steps.append(Step(index: counter, text: line, volume: volume, blocks: blocks, origin: origin))
        }
        func commitAll() { for name in models.keys { models[name]!.committed() } }
        func pickVolume(writable: Bool) -> String? {
            let names = models.keys.sorted().filter { !writable || !models[$0]!.readOnly }
            return names.isEmpty ? nil : names[Int(random.below(UInt64(names.count)))]
        }
        /// Every slot active and no rebuild pending.
        func isWhole() -> Bool {
            let status = array.status
            return status.rebuildSlot == nil && status.slots.allSatisfy { $0.state == .active }
        }
        /// Whether a fault that needs every member may start now (without the extended faults, as
        /// the earlier generator decided it).
        func mayInject() -> Bool { extended ? isWhole() : !array.status.state.contains("degraded") }
        /// After a write the pool refused for want of space: each block must hold its old or its new
        /// contents; what it holds becomes the model's.
        func settleRefusedWrite(_ name: String, first: Int, data: [UInt8]) async throws {
            let old = models[name]!.current
            let buffer = AlignedBuffer(count: data.count, zeroed: false)
            try await pool.openVolume(name: name).read(into: buffer, at: UInt64(first * 4096))
            let got = buffer.array
            for block in 0..<(data.count / 4096) {
                let range = (block * 4096)..<((block + 1) * 4096)
                let bytes = Array(got[range])
                if bytes == Array(data[range]) {
                    models[name]!.apply(bytes, at: (first + block) * 4096)
                } else if bytes != Array(old[((first + block) * 4096)..<((first + block + 1) * 4096)]) {
                    throw Mismatch(message: "seed \(options.seed): after a write refused for want of space, \(name) block \(first + block) holds neither its old nor its new contents",
                                   volume: name, block: first + block)
                }
            }
        }
        func write(fua: Bool) async throws {
            guard let name = pickVolume(writable: true) else { return }
            let size = models[name]!.current.count
            // A tight pool gets larger writes, to fill it.
            let blocks = min(1 + Int(random.below(tight ? 64 : 16)), size / 4096)
            let first = Int(random.below(UInt64(size / 4096 - blocks + 1)))
            let data = AlignedBuffer(count: blocks * 4096, zeroed: false)
            fillRandom(data.bytes, seed: options.seed << 24 ^ UInt64(counter))
            log("write \(name) blocks \(first)+\(blocks)\(fua ? " fua" : "")", volume: name, blocks: first..<(first + blocks))
            do {
                try await pool.openVolume(name: name).write(from: data, at: UInt64(first * 4096), fua: fua)
            } catch let error as SpindleError where error.code == .noSpace && tight {
                log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
                report.poolFullErrors += 1
                try await settleRefusedWrite(name, first: first, data: data.array)
                return
            }
            models[name]!.apply(data.array, at: first * 4096)
            if fua { commitAll() }
            report.writes += 1
        }
        /// Replaces the member that is not active (failed by write errors, or left out) and
        /// rebuilds onto the new one; with the extended faults the rebuild may pause part way.
        func replaceAndRebuild(_ victim: FaultyDevice, reason: String) async throws {
            log("\(reason): replace \(victim.name) and rebuild")
            if array.status.slots.contains(where: { $0.device == victim.name && $0.state == .active }) {
                try await array.fail(memberNamed: victim.name)
            }
            let replacement = try newMember()
            try await array.replace(memberNamed: victim.name, with: replacement)
            members[members.firstIndex { $0 === victim }!] = replacement
            report.memberFailures += 1
            if extended && random.chance(0.4) {
                let stop = (1 + random.below((memberBytes >> 20) - 2)) << 20
                _ = try await array.rebuild(checkpointBytes: 1 << 20, stopAtBytes: stop)
                log("  rebuild paused at \(stop >> 20) MiB")
                report.pausedRebuilds += 1
            } else {
                _ = try await array.rebuild()
                report.rebuilds += 1
            }
        }
        /// The member whose slot is not active, when there is one.
        func brokenMember() -> FaultyDevice? {
            let active = Set(array.status.slots.filter { $0.state == .active }.compactMap(\.device))
            return members.first { !active.contains($0.name) }
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
            if extended && !isWhole() && readErrorsActive == 0 && random.chance(0.1) {
                if array.status.rebuildSlot != nil {
                    log("resume the rebuild")
                    _ = try await array.rebuild()
                    report.rebuilds += 1
                } else if let victim = brokenMember() {
                    try await replaceAndRebuild(victim, reason: "degraded")
                }
                continue
            }
            let dice = random.below(1000)
            switch dice {
            case 0..<300:
                try await write(fua: random.chance(0.1))
            case 300..<550:
                guard let name = pickVolume(writable: false) else { continue }
                let size = models[name]!.current.count
                let blocks = 1 + Int(random.below(32))
                let first = Int(random.below(UInt64(size / 4096 - min(blocks, size / 4096) + 1)))
                let count = min(blocks, size / 4096 - first)
                let buffer = AlignedBuffer(count: count * 4096, zeroed: false)
                log("read \(name) blocks \(first)+\(count)", volume: name, blocks: first..<(first + count))
                try await pool.openVolume(name: name).read(into: buffer, at: UInt64(first * 4096))
                let expected = Array(models[name]!.current[(first * 4096)..<((first + count) * 4096)])
                if buffer.array != expected {
                    let got = buffer.array
                    let index = (0..<got.count).first { got[$0] != expected[$0] }!
                    throw Mismatch(message: "seed \(options.seed): \(name) byte \(first * 4096 + index) (block \(first + index / 4096)) reads \(got[index]), the model says \(expected[index])",
                                   volume: name, block: first + index / 4096)
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
                log("\(zeroes ? "write-zeroes" : "discard") \(name) blocks \(first)+\(blocks)", volume: name, blocks: first..<(first + blocks))
                let volume = try await pool.openVolume(name: name)
                do {
                    if zeroes {
                        try await volume.writeZeroes(offset: UInt64(first * 4096), length: UInt64(blocks * 4096))
                    } else {
                        try await volume.discard(offset: UInt64(first * 4096), length: UInt64(blocks * 4096))
                    }
                } catch let error as SpindleError where error.code == .noSpace && tight {
                    // Zeroing part of a shared chunk copies it, which needs space.
                    log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
                    report.poolFullErrors += 1
                    try await settleRefusedWrite(name, first: first, data: [UInt8](repeating: 0, count: blocks * 4096))
                    continue
                }
                models[name]!.apply([UInt8](repeating: 0, count: blocks * 4096), at: first * 4096)
                report.discards += 1
            case 690..<740:
                guard models.count < options.maximumVolumes, let name = pickVolume(writable: false) else { continue }
                let snapshot = "s\(counter)"
                let readOnly = random.chance(0.3)
                log("snapshot \(name) as \(snapshot)\(readOnly ? " read-only" : "")", volume: snapshot, origin: name)
                try await pool.snapshot(volume: name, name: snapshot, readOnly: readOnly)
                var model = VolumeModel(models[name]!.current)
                model.readOnly = readOnly
                models[snapshot] = model
                commitAll()
                report.snapshots += 1
            case 740..<780:
                if models.count > 1, random.chance(0.5), let name = pickVolume(writable: false) {
                    log("delete \(name)", volume: name)
                    try await pool.deleteVolume(name: name)
                    models[name] = nil
                } else if models.count < options.maximumVolumes {
                    let name = "c\(counter)"
                    log("create \(name)", volume: name)
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
                log("resize \(name) to \(size)", volume: name)
                do {
                    try await pool.resizeVolume(name: name, sizeBytes: UInt64(size))
                } catch let error as SpindleError where error.code == .noSpace && tight {
                    // Cutting inside a shared chunk copies it first, which needs space.
                    log("  refused: the pool is full", volume: name)
                    report.poolFullErrors += 1
                    let now = try await pool.volumes().first { $0.name == name }?.sizeBytes
                    guard now == UInt64(models[name]!.current.count) else {
                        throw Mismatch(message: "seed \(options.seed): a resize of \(name) refused for want of space left it \(now.map(String.init) ?? "missing"), not \(models[name]!.current.count) bytes",
                                       volume: name)
                    }
                    continue
                }
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
                } else if mayInject() {
                    log("read errors on \(member.name)")
                    member.failReads(probability: 0.05)
                    readErrorsActive = 1
                    report.injectedReadErrors += 1
                }
            case 870..<900:
                // A member fails under the load, is replaced and rebuilt.
                guard mayInject(), readErrorsActive == 0 else { continue }
                let victim = members[Int(random.below(UInt64(members.count)))]
                try await replaceAndRebuild(victim, reason: "fail \(victim.name)")
            case 900..<915 where extended:
                // Write errors on one member: the array fails it at the first one and goes on degraded.
                guard isWhole(), readErrorsActive == 0 else { continue }
                let member = members[Int(random.below(UInt64(members.count)))]
                log("write errors on \(member.name)")
                member.failWrites(probability: 1)
                report.injectedWriteErrors += 1
                try await write(fua: false)
                member.clearFaults()
            case 915..<930 where extended:
                // An idle moment: the array flushes its members and marks itself clean.
                log("idle: the array marks itself clean")
                await array.markCleanIfIdle(idleNanos: 0)
                report.idleCleans += 1
            default:
                // Power cut: unflushed writes on every member dropped or torn; reassemble and reopen.
                if !mayInject() {
                    // Dirty and degraded is RAID5's write hole, which assembly refuses (as md does):
                    // let the cut come after the array has been idle long enough to be clean.
                    guard extended else { continue }
                    if options.level == .raid5 {
                        log("idle: the array marks itself clean")
                        await array.markCleanIfIdle(idleNanos: 0)
                        report.idleCleans += 1
                    }
                }
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
                            throw Mismatch(message: "seed \(options.seed): after a power cut \(name) block \(block) holds data the flush contract does not allow (neither its committed contents nor a version written since)",
                                           volume: name, block: block)
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
        if extended && !isWhole() {
            // Finish what is pending so the scrub below sees every member.
            if array.status.rebuildSlot != nil {
                log("resume the rebuild")
                _ = try await array.rebuild()
                report.rebuilds += 1
            }
            if let victim = brokenMember() { try await replaceAndRebuild(victim, reason: "degraded at the end") }
            if array.status.rebuildSlot != nil { _ = try await array.rebuild() }
        }
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
