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
        /// Draw the configuration from the seed (``Configuration/drawn(seed:level:tight:)``): member
        /// count, chunk size, a stack with or without a pool, request shapes, failures down to the level's
        /// redundancy and read errors while degraded. Off (or without the extended faults), the run
        /// uses ``members`` members, 16 KiB chunks and a pool, as earlier versions did for the seed.
        public var widened = true

        /// A run on a level drawn from the seed (RAID0, RAID1 or RAID5).
        public init(seed: UInt64) {
            self.seed = seed
            var random = SeededRandom(seed: seed ^ 0x5EED_1E7E)
            level = [RAIDLevel.raid0, .raid1, .raid5][Int(random.below(3))]
            members = level == .raid5 ? 4 : 2
        }

        /// A run on `level` (without ``widened``, with the usual member count: 4 for RAID5, 2 for RAID1).
        public init(seed: UInt64, level: RAIDLevel) {
            self.seed = seed
            self.level = level
            members = level == .raid5 ? 4 : 2
        }
    }

    /// The stack a run builds.
    public struct Configuration: Sendable, Codable, Equatable, CustomStringConvertible {
        public var level: RAIDLevel
        public var members: Int
        public var chunkBytes: UInt64
        /// Thin volumes in a pool on the array; else the workload goes to the array itself, in
        /// requests from 512 bytes to several stripes at any 512-byte offset.
        public var withPool: Bool
        public var memberBytes: UInt64
        /// The members' logical block size (the smallest request).
        public var blockBytes: Int

        /// Member counts RAID1 2-4, RAID5 3-8, RAID0 2-8; chunks 4 KiB to 1 MiB; a pool in two runs
        /// of three. Members are sized so the array holds about 20 MiB with a pool (9 MiB, or 4 for
        /// RAID1, when the pool is to be too small) and 8 MiB without.
        public static func drawn(seed: UInt64, level: RAIDLevel, tight: Bool) -> Configuration {
            var random = SeededRandom(seed: seed ^ 0xC0F1_6000)
            let members: Int
            switch level {
            case .raid0: members = 2 + Int(random.below(7))
            case .raid1: members = 2 + Int(random.below(3))
            case .raid5: members = 3 + Int(random.below(6))
            }
            let chunk = UInt64(4096) << random.below(9)
            let withPool = tight || random.below(3) != 0
            let target: UInt64 = tight ? (level == .raid1 ? 4 << 20 : 9 << 20) : (withPool ? 20 << 20 : 8 << 20)
            let dataMembers = UInt64(level == .raid1 ? 1 : level == .raid5 ? members - 1 : members)
            let perMember = ((target / dataMembers) + chunk - 1) / chunk * chunk
            return Configuration(level: level, members: members, chunkBytes: chunk, withPool: withPool,
                                 memberBytes: RAIDArray.dataOffset + perMember, blockBytes: withPool ? 4096 : 512)
        }

        public var description: String {
            "raid\(level.rawValue), \(members) members, \(ByteSize.format(chunkBytes)) chunks, \(withPool ? "thin volumes in a pool" : "the array itself, \(blockBytes)-byte blocks")"
        }
    }

    public struct Report: Sendable, Codable {
        public var seed: UInt64
        public var configuration: Configuration?
        /// Reads that failed with an I/O error because a read error hit where no redundancy was left
        /// (allowed, and checked: no wrong data, no member failed for it).
        public var unrecoverableReads = 0
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
        let widened = extended && options.widened
        let config = widened
            ? Configuration.drawn(seed: options.seed, level: options.level, tight: tight)
            : Configuration(level: options.level, members: options.members, chunkBytes: 16384, withPool: true,
                            memberBytes: tight ? (options.level == .raid5 ? 4 << 20 : 5 << 20) : options.memberBytes, blockBytes: 4096)
        report.configuration = config
        let memberBytes = config.memberBytes
        let unit = config.blockBytes
        var memberCounter = 0
        func newMember() throws -> FaultyDevice {
            memberCounter += 1
            let memory = try MemoryDevice(capacityBytes: memberBytes, logicalBlockBytes: unit, name: "member\(memberCounter)")
            return FaultyDevice(wrapping: memory, seed: options.seed &+ UInt64(memberCounter), volatileCache: true, name: "member\(memberCounter)")
        }
        var members = try (0..<config.members).map { _ in try newMember() }
        var array = try await RAIDArray.create(name: "sim", level: config.level, chunkBytes: config.chunkBytes, members: members)
        // Wall-clock behaviour (marking an idle array clean) would make runs differ by timing; the
        // simulation makes its own idle moments.
        array.setIdleCleanDelay(nanoseconds: .max)
        var pool: ThinPool?
        var models: [String: VolumeModel]
        if config.withPool {
            let created = try await ThinPool.create(name: "sim", devices: [array])
            _ = try await created.createVolume(name: "v0", sizeBytes: options.volumeBytes)
            try await created.commit()
            pool = created
            models = ["v0": VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))]
        } else {
            // The workload goes to the array itself (which zeroed its data areas when it was created).
            models = ["array": VolumeModel([UInt8](repeating: 0, count: Int(array.capacityBytes)), blockBytes: unit)]
        }
        /// The device a model stands for: a thin volume, or the array.
        func device(_ name: String) async throws -> any BlockDevice {
            guard let pool else { return array }
            return try await pool.openVolume(name: name)
        }
        /// A request of `size`-unit volume: as before with a pool (1 to `most` blocks); on the array
        /// itself, shapes that select each write path (a few sectors in one chunk, a chunk or more
        /// across boundaries, whole stripes, several stripes) at any 512-byte offset.
        func extent(size: Int, most: Int) -> (first: Int, blocks: Int) {
            if config.withPool {
                let blocks = min(1 + Int(random.below(UInt64(most))), size)
                return (Int(random.below(UInt64(size - blocks + 1))), blocks)
            }
            let chunkUnits = Int(config.chunkBytes) / unit
            let stripeUnits = Int(array.geometry.stripeDataBytes) / unit
            var blocks: Int
            var first: Int
            switch random.below(5) {
            case 0: blocks = 1 + Int(random.below(16))
            case 1: blocks = 1 + Int(random.below(UInt64(chunkUnits * 2)))
            case 2: blocks = stripeUnits
            case 3: blocks = stripeUnits * (1 + Int(random.below(3))) + Int(random.below(UInt64(chunkUnits)))
            default: blocks = 1 + Int(random.below(UInt64(min(size, 4 * stripeUnits))))
            }
            blocks = min(blocks, size)
            first = random.chance(0.25)
                ? Int(random.below(UInt64(size / stripeUnits))) * stripeUnits
                : Int(random.below(UInt64(size - blocks + 1)))
            first = min(first, size - blocks)
            return (first, blocks)
        }
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
        /// Whether member faults may start now: never on RAID0, which has no redundancy for them.
        func mayFault() -> Bool { config.level != .raid0 && mayInject() }
        /// After a write the pool refused for want of space: each block must hold its old or its new
        /// contents; what it holds becomes the model's.
        func settleRefusedWrite(_ name: String, first: Int, data: [UInt8]) async throws {
            let old = models[name]!.current
            let buffer = AlignedBuffer(count: data.count, zeroed: false)
            try await device(name).read(into: buffer, at: UInt64(first * unit))
            let got = buffer.array
            for block in 0..<(data.count / unit) {
                let range = (block * unit)..<((block + 1) * unit)
                let bytes = Array(got[range])
                if bytes == Array(data[range]) {
                    models[name]!.apply(bytes, at: (first + block) * unit)
                } else if bytes != Array(old[((first + block) * unit)..<((first + block + 1) * unit)]) {
                    throw Mismatch(message: "seed \(options.seed): after a write refused for want of space, \(name) block \(first + block) holds neither its old nor its new contents",
                                   volume: name, block: first + block)
                }
            }
        }
        func write(fua: Bool) async throws {
            guard let name = pickVolume(writable: true) else { return }
            let size = models[name]!.current.count
            // A tight pool gets larger writes, to fill it.
            let (first, blocks) = extent(size: size / unit, most: tight ? 64 : 16)
            let data = AlignedBuffer(count: blocks * unit, zeroed: false)
            fillRandom(data.bytes, seed: options.seed << 24 ^ UInt64(counter))
            log("write \(name) blocks \(first)+\(blocks)\(fua ? " fua" : "")", volume: name, blocks: first..<(first + blocks))
            do {
                try await device(name).write(from: data, at: UInt64(first * unit), fua: fua)
            } catch let error as SpindleError where error.code == .noSpace && tight {
                log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
                report.poolFullErrors += 1
                try await settleRefusedWrite(name, first: first, data: data.array)
                return
            }
            models[name]!.apply(data.array, at: first * unit)
            if fua {
                if config.withPool {
                    commitAll()  // a thin volume's FUA write commits the pool, and with it every write before
                } else {
                    // On the array a FUA write makes itself durable, not the unflushed writes before it.
                    models[name]!.durable.replaceSubrange((first * unit)..<((first + blocks) * unit), with: data.bytes)
                }
            }
            report.writes += 1
        }
        /// Reads `count` units at `first` of `name` and compares them with the model; with
        /// `mayFail`, an I/O error is allowed (a read error where no redundancy is left).
        func check(_ name: String, first: Int, count: Int, mayFail: Bool = false) async throws {
            let buffer = AlignedBuffer(count: count * unit, zeroed: false)
            do {
                try await device(name).read(into: buffer, at: UInt64(first * unit))
            } catch let error as SpindleError where mayFail && error.code == .ioFailed {
                log("  failed: \(error.message)", volume: name, blocks: first..<(first + count))
                report.unrecoverableReads += 1
                return
            }
            let expected = Array(models[name]!.current[(first * unit)..<((first + count) * unit)])
            if buffer.array != expected {
                let got = buffer.array
                let index = (0..<got.count).first { got[$0] != expected[$0] }!
                throw Mismatch(message: "seed \(options.seed): \(name) byte \(first * unit + index) (block \(first + index / unit)) reads \(got[index]), the model says \(expected[index])",
                               volume: name, block: first + index / unit)
            }
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
                let stop = widened
                    ? max(1, random.below(array.geometry.memberDataBytes >> 20)) << 20
                    : (1 + random.below((memberBytes >> 20) - 2)) << 20
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
                let first: Int
                let count: Int
                if config.withPool {
                    let blocks = 1 + Int(random.below(32))
                    first = Int(random.below(UInt64(size / 4096 - min(blocks, size / 4096) + 1)))
                    count = min(blocks, size / 4096 - first)
                } else {
                    (first, count) = extent(size: size / unit, most: 0)
                }
                log("read \(name) blocks \(first)+\(count)", volume: name, blocks: first..<(first + count))
                try await check(name, first: first, count: count)
                report.reads += 1
            case 550..<630:
                guard let name = pickVolume(writable: false) else { continue }
                log("flush \(name)")
                try await device(name).flush()
                commitAll()
                report.flushes += 1
            case 630..<690:
                guard let name = pickVolume(writable: true) else { continue }
                let size = models[name]!.current.count
                let (first, blocks) = extent(size: size / unit, most: 40)
                // A RAID1 or RAID5 array keeps discarded data (discard is advisory): only write-zeroes
                // says what the range holds afterwards.
                let zeroes = random.chance(0.5) || !config.withPool
                log("\(zeroes ? "write-zeroes" : "discard") \(name) blocks \(first)+\(blocks)", volume: name, blocks: first..<(first + blocks))
                let volume = try await device(name)
                do {
                    if zeroes {
                        try await volume.writeZeroes(offset: UInt64(first * unit), length: UInt64(blocks * unit))
                    } else {
                        try await volume.discard(offset: UInt64(first * unit), length: UInt64(blocks * unit))
                    }
                } catch let error as SpindleError where error.code == .noSpace && tight {
                    // Zeroing part of a shared chunk copies it, which needs space.
                    log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
                    report.poolFullErrors += 1
                    try await settleRefusedWrite(name, first: first, data: [UInt8](repeating: 0, count: blocks * unit))
                    continue
                }
                models[name]!.apply([UInt8](repeating: 0, count: blocks * unit), at: first * unit)
                report.discards += 1
            case 690..<740:
                guard let pool, models.count < options.maximumVolumes, let name = pickVolume(writable: false) else { continue }
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
                guard let pool else { continue }
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
                guard let pool, let name = pickVolume(writable: true) else { continue }
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
                } else if mayFault() {
                    log("read errors on \(member.name)")
                    member.failReads(probability: 0.05)
                    readErrorsActive = 1
                    report.injectedReadErrors += 1
                } else if widened && config.level != .raid0 && !isWhole() && array.status.rebuildSlot == nil {
                    // Read errors while degraded: where no redundancy is left a read fails with an
                    // I/O error; it never returns wrong data, and no member is failed for it.
                    let active = array.status.slots.filter { $0.state == .active }.compactMap(\.device)
                    guard let victim = members.first(where: { $0.name == active[Int(random.below(UInt64(active.count)))] }) else { continue }
                    log("read errors on \(victim.name) while degraded")
                    victim.failReads(probability: 0.3)
                    report.injectedReadErrors += 1
                    let before = array.status.slots.map(\.state)
                    for _ in 0..<6 {
                        guard let name = pickVolume(writable: false) else { break }
                        let size = models[name]!.current.count / unit
                        let (first, count) = extent(size: size, most: 32)
                        log("read \(name) blocks \(first)+\(count)", volume: name, blocks: first..<(first + count))
                        try await check(name, first: first, count: count, mayFail: true)
                        report.reads += 1
                    }
                    victim.clearFaults()
                    log("read errors stop")
                    guard array.status.slots.map(\.state) == before else {
                        throw Mismatch(message: "seed \(options.seed): read errors while degraded changed the members' states from \(before) to \(array.status.slots.map(\.state))")
                    }
                }
            case 870..<900:
                guard config.level != .raid0, readErrorsActive == 0 else { continue }
                let lost = array.status.slots.filter { $0.state != .active }.count
                if widened && random.chance(0.5) {
                    // A member fails and stays failed: the array runs degraded, down to its redundancy
                    // (a mirror of four to one member), until a later step replaces them.
                    guard lost < array.geometry.redundancy, array.status.rebuildSlot == nil else { continue }
                    let active = array.status.slots.filter { $0.state == .active }.compactMap(\.device)
                    let victim = active[Int(random.below(UInt64(active.count)))]
                    log("fail \(victim); the array runs degraded")
                    try await array.fail(memberNamed: victim)
                    report.memberFailures += 1
                    continue
                }
                // A member fails under the load, is replaced and rebuilt.
                guard mayInject() else { continue }
                let victim = members[Int(random.below(UInt64(members.count)))]
                try await replaceAndRebuild(victim, reason: "fail \(victim.name)")
            case 900..<915 where extended:
                // Write errors on one member: the array fails it at the first one and goes on degraded.
                guard config.level != .raid0, isWhole(), readErrorsActive == 0 else { continue }
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
                    if config.level == .raid5 {
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
                if config.withPool {
                    let reopened = try await ThinPool.open(devices: [array])
                    pool = reopened
                    let present = Set(try await reopened.volumes().map(\.name))
                    guard present == Set(models.keys) else {
                        throw Mismatch(message: "seed \(options.seed): after a power cut the pool has volumes \(present.sorted()), the model \(models.keys.sorted())")
                    }
                }
                for (name, model) in models.sorted(by: { $0.key < $1.key }) {
                    let volume = try await device(name)
                    let buffer = AlignedBuffer(count: model.current.count, zeroed: false)
                    try await volume.read(into: buffer, at: 0)
                    let bytes = buffer.array
                    for block in 0..<(bytes.count / unit) {
                        let range = (block * unit)..<((block + 1) * unit)
                        let got = Array(bytes[range])
                        if got != Array(model.durable[range]) && !model.versions[block].contains(got) {
                            throw Mismatch(message: "seed \(options.seed): after a power cut \(name) block \(block) holds data the flush contract does not allow (neither its committed contents nor a version written since)",
                                           volume: name, block: block)
                        }
                    }
                    var settled = VolumeModel(bytes, blockBytes: unit)
                    settled.readOnly = model.readOnly
                    models[name] = settled
                }
                if let pool {
                    let check = try await pool.check()
                    guard check.isClean else {
                        throw Mismatch(message: "seed \(options.seed): pool check after a power cut: \(check.problems.prefix(3).joined(separator: "; "))")
                    }
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
            while let victim = brokenMember() {
                try await replaceAndRebuild(victim, reason: "degraded at the end")
                if array.status.rebuildSlot != nil { _ = try await array.rebuild() }
            }
        }
        if let pool {
            try await pool.commit()
            let check = try await pool.check()
            guard check.isClean else {
                throw Mismatch(message: "seed \(options.seed): pool check at the end: \(check.problems.prefix(3).joined(separator: "; "))")
            }
        }
        // Every byte reads back as the model says, then mirrors and parity agree.
        for (name, model) in models.sorted(by: { $0.key < $1.key }) {
            try await check(name, first: 0, count: model.current.count / unit)
        }
        if config.level != .raid0 {
            let scrub = try await array.scrub()
            guard scrub.mismatches == 0 else {
                throw Mismatch(message: "seed \(options.seed): scrub found \(scrub.mismatches) stripes whose parity disagrees with the data")
            }
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
