/// A seeded simulation of the whole stack — thin volumes and snapshots in a pool on a RAID array on
/// fault-injecting in-memory disks — driven by a random workload and checked against a reference
/// model after every read, in the manner of FoundationDB's and TigerBeetle's simulators.
///
/// The same seed replays the same run, to the last fault: each member decides its faults from the
/// request at hand, not from the order in which an array's concurrent requests reach it (see
/// ``FaultyDevice``), and the simulation starts a new fault epoch before each operation. Faults
/// come from the seed too: read errors on a member (the array must answer from redundancy), write
/// errors on a member (the array fails it and goes on degraded until it is replaced), a member
/// failed, replaced and rebuilt under the load, rebuilds paused part way (then resumed, possibly
/// after a crash), idle moments in which the array marks itself clean, a pool too small for its
/// volumes (writes fail with "no space" and must leave each block old or new), and power cuts that
/// drop or tear every write no flush covered, followed by reassembly (resyncing dirty regions) and
/// reopening the pool. After a power cut the model accepts, block by block, what the flush contract
/// allows — the contents at the last commit or any version written since — and nothing else; then
/// that state becomes the model's.
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
        /// in four, a pool too small for its volumes. Off, the run makes the operations and faults
        /// earlier versions made from the same seed (the regression seeds found before these faults
        /// existed); which member requests the faults hit is drawn per request since.
        public var extendedFaults = true
        /// Draw the configuration from the seed (``Configuration/drawn(seed:level:tight:)``): member
        /// count, chunk size, a stack with or without a pool, request shapes, failures down to the level's
        /// redundancy and read errors while degraded. Off (or without the extended faults), the run
        /// uses ``members`` members, 16 KiB chunks and a pool, as earlier versions did for the seed.
        public var widened = true
        /// The integrity layer under every member (``RAIDArray/create(name:level:chunkBytes:members:overwrite:integrity:)``),
        /// and silent faults among the member faults: corruption at rest and on reads, misdirected
        /// and lost writes, bit rot. Each read must then return the model's data: the array rebuilds
        /// what a member returns wrong. An episode of faults ends with a scrub that repairs, after
        /// which the members agree again.
        public var integrity = false

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
        /// The integrity layer under every member.
        public var integrity = false

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
            return Configuration(
                level: level, members: members, chunkBytes: chunk, withPool: withPool,
                memberBytes: RAIDArray.dataOffset + perMember, blockBytes: withPool ? 4096 : 512)
        }

        public var description: String {
            "raid\(level.rawValue), \(members) members, \(ByteSize.format(chunkBytes)) chunks\(integrity ? ", checksummed members" : ""), \(withPool ? "thin volumes in a pool" : "the array itself, \(blockBytes)-byte blocks")"
        }
    }

    /// What a run did and found. Two runs of the same options give equal reports (see
    /// ``FaultyDevice`` on why the members' faults do not depend on the order of their requests).
    public struct Report: Sendable, Codable, Equatable {
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
        /// Member reads that met an injected read error, over every member the run made.
        public var memberReadsFailed = 0
        /// Member writes that met an injected write error.
        public var memberWritesFailed = 0
        /// Blocks of unflushed member writes that power cuts dropped.
        public var powerCutBlocksDropped = 0
        /// Blocks of unflushed member writes that power cuts let through (torn writes).
        public var powerCutBlocksWritten = 0
        /// With ``Options/integrity``: silent fault episodes started, by kind (`corrupt-read`,
        /// `corrupt-write`, `misdirect-write`, `lose-write`, `rot`).
        public var silentFaultEpisodes: [String: Int] = [:]
        /// Member requests the silent faults hit, by kind, over every member (blocks for `rot`).
        public var silentFaultsInjected: [String: Int] = [:]
        /// Blocks that failed their checksums on a member, and blocks rewritten after that.
        public var corruptBlocksFound = 0
        public var corruptBlocksRepaired = 0
        /// Blocks that a crash left apart from their checksums and that kept their contents.
        public var blocksAcceptedAfterCrash = 0
        /// What went wrong, when something did.
        public var failure: String?
        /// The last operations before the failure (or the end).
        public var trace: [String] = []
        /// On failure: the operations that bear on the block that went wrong (see the type's notes).
        public var relevantTrace: [String] = []
        public var passed: Bool { failure == nil }
    }

    /// Runs one simulation; never throws: what went wrong is in the report.
    public static func run(_ options: Options) async -> Report {
        let record = Record(seed: options.seed)
        do {
            let run = try await Run(options, record: record)
            try await run.simulate()
        } catch let mismatch as Mismatch {
            record.report.mismatches += 1
            record.report.failure = mismatch.message
            if let volume = mismatch.volume {
                record.report.relevantTrace = relevant(record.steps, volume: volume, block: mismatch.block).map {
                    "#\($0.index) \($0.text)"
                }
            }
        } catch {
            record.report.failure = "unexpected error: \(error)"
            record.report.relevantTrace = record.steps.suffix(30).map { "#\($0.index) \($0.text)" }
        }
        return record.finalReport(fullTrace: options.fullTrace)
    }
}
