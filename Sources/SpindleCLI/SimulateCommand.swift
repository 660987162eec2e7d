import ArgumentParser
import Foundation
import Spindle

struct SimulateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract:
            "Run the seeded whole-stack simulation: thin volumes on a pool on RAID on fault-injecting in-memory disks, checked against a model.",
        discussion: """
            Each seed draws its stack: the member count (RAID0 2-8, RAID1 2-4, RAID5 3-8), the chunk size \
            (4 KiB-1 MiB), and thin volumes in a pool or the array itself (requests from 512 bytes to several \
            stripes at any 512-byte offset). It runs a random load with read and write errors, member failures and \
            rebuilds (some paused part way), power cuts with reassembly and, for one seed in four, a pool too \
            small for its volumes; it checks every read and every post-crash state against the flush contract. \
            A failing seed prints its last operations and those that bear on the block that went wrong; the \
            same seed replays the same run. Exits 1 when any seed fails.
            """)

    @Option(help: "First seed.")
    var seed: UInt64 = 1

    @Option(help: "Number of seeds to run (ignored with --minutes).")
    var seeds: Int = 10

    @Option(help: "Run seeds until this many minutes have passed.")
    var minutes: Double?

    @Option(help: "Operations per run.")
    var operations: Int = 400

    @Option(help: "RAID levels to alternate, comma-separated: 0, 1, 5.")
    var levels: String = "5,1,0"

    @Flag(
        help:
            "Put the integrity layer under every member and add silent faults (corrupt-read, corrupt-write, misdirect-write, lose-write, bit rot) on one member at a time: every read must still return the model's data, and a scrub with repair must leave the members right."
    )
    var integrity = false

    @Flag(help: "Print the totals as JSON.")
    var json = false

    struct Totals: Codable {
        var runs = 0
        var operations = 0
        var reads = 0
        var writes = 0
        var flushes = 0
        var discards = 0
        var snapshots = 0
        var volumeChanges = 0
        var injectedReadErrors = 0
        var memberFailures = 0
        var rebuilds = 0
        var injectedWriteErrors = 0
        var pausedRebuilds = 0
        var idleCleans = 0
        var poolFullErrors = 0
        var powerCuts = 0
        var mismatches = 0
        var unrecoverableReads = 0
        var failedSeeds: [String] = []
        var seconds = 0.0
        /// Configurations run: member counts by level, chunk sizes, runs with and without a pool.
        var memberCounts: [String: [Int]] = [:]
        var chunkSizes: [UInt64] = []
        var runsWithPool = 0
        var runsOnArray = 0
        /// With --integrity: silent fault episodes and the member requests they hit, by kind; blocks
        /// found failing their checksums, rewritten after that, and kept after a crash.
        var silentFaultEpisodes: [String: Int] = [:]
        var silentFaultsInjected: [String: Int] = [:]
        var corruptBlocksFound = 0
        var corruptBlocksRepaired = 0
        var blocksAcceptedAfterCrash = 0

        mutating func count(_ configuration: StackSimulation.Configuration) {
            let level = "raid\(configuration.level.rawValue)"
            if !(memberCounts[level] ?? []).contains(configuration.members) {
                memberCounts[level, default: []].append(configuration.members)
                memberCounts[level]!.sort()
            }
            if !chunkSizes.contains(configuration.chunkBytes) {
                chunkSizes.append(configuration.chunkBytes)
                chunkSizes.sort()
            }
            if configuration.withPool { runsWithPool += 1 } else { runsOnArray += 1 }
        }

        var coverage: String {
            let members = memberCounts.keys.sorted().map {
                "\($0) \(memberCounts[$0]!.map(String.init).joined(separator: ","))"
            }
            return
                "members: \(members.joined(separator: "; ")); chunks: \(chunkSizes.map { ByteSize.format($0) }.joined(separator: ", ")); runs with a pool \(runsWithPool), on the array itself \(runsOnArray)"
        }
    }

    func run() async throws {
        let levelList = try levels.split(separator: ",").map { text -> RAIDLevel in
            guard let level = RAIDLevel(rawValue: Int(text) ?? -1) else {
                throw ValidationError("--levels takes 0, 1 and 5, such as 5,1,0")
            }
            return level
        }
        var totals = Totals()
        let started = Date()
        var next = seed
        while minutes.map({ Date().timeIntervalSince(started) < $0 * 60 }) ?? (totals.runs < seeds * levelList.count) {
            for level in levelList {
                var options = StackSimulation.Options(seed: next, level: level)
                options.operations = operations
                options.integrity = integrity
                let report = await StackSimulation.run(options)
                for (kind, count) in report.silentFaultEpisodes {
                    totals.silentFaultEpisodes[kind, default: 0] += count
                }
                for (kind, count) in report.silentFaultsInjected {
                    totals.silentFaultsInjected[kind, default: 0] += count
                }
                totals.corruptBlocksFound += report.corruptBlocksFound
                totals.corruptBlocksRepaired += report.corruptBlocksRepaired
                totals.blocksAcceptedAfterCrash += report.blocksAcceptedAfterCrash
                totals.runs += 1
                totals.operations += report.operations
                totals.reads += report.reads
                totals.writes += report.writes
                totals.flushes += report.flushes
                totals.discards += report.discards
                totals.snapshots += report.snapshots
                totals.volumeChanges += report.volumeChanges
                totals.injectedReadErrors += report.injectedReadErrors
                totals.memberFailures += report.memberFailures
                totals.rebuilds += report.rebuilds
                totals.injectedWriteErrors += report.injectedWriteErrors
                totals.pausedRebuilds += report.pausedRebuilds
                totals.idleCleans += report.idleCleans
                totals.poolFullErrors += report.poolFullErrors
                totals.powerCuts += report.powerCuts
                totals.mismatches += report.mismatches
                totals.unrecoverableReads += report.unrecoverableReads
                if let configuration = report.configuration { totals.count(configuration) }
                if let failure = report.failure {
                    totals.failedSeeds.append("raid\(level.rawValue) seed \(next)")
                    Terminal.error(
                        "raid\(level.rawValue) seed \(next) (\(report.configuration.map { "\($0)" } ?? "")) failed: \(failure)"
                    )
                    FileHandle.standardError.write(
                        Data(
                            ("last operations:\n" + report.trace.map { "  \($0)" }.joined(separator: "\n") + "\n").utf8)
                    )
                    if !report.relevantTrace.isEmpty {
                        FileHandle.standardError.write(
                            Data(
                                ("operations that bear on it (#operation):\n"
                                    + report.relevantTrace.map { "  \($0)" }.joined(separator: "\n") + "\n").utf8))
                    }
                } else if Terminal.showsProgress && !json {
                    Terminal.progress(
                        "\(totals.runs) runs, \(totals.operations) operations, \(totals.powerCuts) power cuts, \(totals.failedSeeds.count) failed"
                    )
                }
            }
            next += 1
        }
        if Terminal.showsProgress && !json { Terminal.endProgress() }
        totals.seconds = Date().timeIntervalSince(started)
        if json {
            try Terminal.printJSON(totals)
        } else {
            print(
                """
                runs \(totals.runs) (seeds \(seed)–\(next - 1), raid \(levels)), operations \(totals.operations) in \(formatDecimal(totals.seconds, places: 1)) s
                  reads \(totals.reads), writes \(totals.writes), flushes \(totals.flushes), discards/zeroes \(totals.discards), snapshots \(totals.snapshots), volume creates/deletes/resizes \(totals.volumeChanges)
                  configurations: \(totals.coverage)
                  faults: read-error episodes \(totals.injectedReadErrors) (reads failed where no redundancy was left: \(totals.unrecoverableReads)), write errors \(totals.injectedWriteErrors), member failures \(totals.memberFailures) (rebuilds \(totals.rebuilds), paused part way \(totals.pausedRebuilds)), power cuts \(totals.powerCuts), idle cleans \(totals.idleCleans), writes refused by a full pool \(totals.poolFullErrors)
                \(integrity ? "  silent faults: " + totals.silentFaultEpisodes.keys.sorted().map { "\($0) \(totals.silentFaultEpisodes[$0]!) episodes (\(totals.silentFaultsInjected[$0] ?? 0) hits)" }.joined(separator: ", ") + "; blocks failing checksums \(totals.corruptBlocksFound), rewritten from redundancy \(totals.corruptBlocksRepaired), kept after a crash \(totals.blocksAcceptedAfterCrash)\n" : "")  mismatches (wrong data read) \(totals.mismatches), failed runs \(totals.failedSeeds.count)\(totals.failedSeeds.isEmpty ? "" : ": " + totals.failedSeeds.joined(separator: ", "))
                """)
        }
        if !totals.failedSeeds.isEmpty { throw ExitCode(1) }
    }
}
