import Testing
@testable import Spindle

@Suite("Whole-stack simulation")
struct StackSimulationTests {
    @Test("configurations drawn from the seed, on RAID0, RAID1 and RAID5 (member counts, chunks 4 KiB-1 MiB, with and without a pool), under read errors (also while degraded), failures down to the redundancy, rebuilds and power cuts, agree with the model",
          arguments: Array(UInt64(1)...8))
    func seeds(seed: UInt64) async throws {
        for level in [RAIDLevel.raid5, .raid1, .raid0] {
            let report = await StackSimulation.run(StackSimulation.Options(seed: seed, level: level))
            #expect(report.passed, "\(level) seed \(seed) (\(report.configuration.map { "\($0)" } ?? "")): \(report.failure ?? "")\n\(report.relevantTrace.joined(separator: "\n"))")
            #expect(report.reads > 0 && report.writes > 0)
        }
    }

    @Test("the configurations drawn cover every member count of each level, chunks from 4 KiB to 1 MiB, and both stacks")
    func configurationsCoverTheSpace() {
        var members: [RAIDLevel: Set<Int>] = [:]
        var chunks = Set<UInt64>()
        var stacks = Set<Bool>()
        for seed in UInt64(1)...400 {
            for level in RAIDLevel.allCases {
                let config = StackSimulation.Configuration.drawn(seed: seed, level: level, tight: seed % 4 == 3)
                members[level, default: []].insert(config.members)
                chunks.insert(config.chunkBytes)
                stacks.insert(config.withPool)
                #expect(config.memberBytes >= RAIDArray.dataOffset + config.chunkBytes)
            }
        }
        #expect(members[.raid0] == Set(2...8) && members[.raid1] == Set(2...4) && members[.raid5] == Set(3...8))
        #expect(chunks == Set((0...8).map { UInt64(4096) << $0 }))
        #expect(stacks == [true, false])
        #expect(Set((UInt64(1)...30).map { StackSimulation.Options(seed: $0).level }) == Set(RAIDLevel.allCases))
    }

    @Test("regressions found by the soak: RAID1 members replaced one after the other, then power cuts (a new member lacked the bitmap; resync repairs were not flushed)",
          arguments: [UInt64(1015), 1055, 1065])
    func soakRegressions(seed: UInt64) async throws {
        var options = StackSimulation.Options(seed: seed, level: .raid1)
        // These seeds were found before the extended faults: replay them as they ran then.
        options.extendedFaults = false
        let report = await StackSimulation.run(options)
        #expect(report.passed, "raid1 seed \(seed): \(report.failure ?? "")\n\(report.trace.joined(separator: "\n"))")
    }

    @Test("regression: a RAID1 rebuild paused, writes, power cuts, then the rebuild resumed (the new member kept regions the crash left different)",
          arguments: [UInt64(1065)])
    func pausedRebuildRegression(seed: UInt64) async throws {
        var options = StackSimulation.Options(seed: seed, level: .raid1)
        options.widened = false  // found before configurations were drawn from the seed
        let report = await StackSimulation.run(options)
        #expect(report.passed, "raid1 seed \(seed): \(report.failure ?? "")\n\(report.relevantTrace.joined(separator: "\n"))")
        #expect(report.pausedRebuilds > 0 && report.powerCuts > 0)
    }

    @Test("a pool too small for its volumes refuses writes with no space, each block left old or new", arguments: [UInt64(3), 7])
    func fullPool(seed: UInt64) async throws {
        var refused = 0
        for level in [RAIDLevel.raid5, .raid1, .raid0] {
            let report = await StackSimulation.run(StackSimulation.Options(seed: seed, level: level))
            #expect(report.passed, "\(level) seed \(seed) (\(report.configuration.map { "\($0)" } ?? "")): \(report.failure ?? "")\n\(report.relevantTrace.joined(separator: "\n"))")
            refused += report.poolFullErrors
        }
        #expect(refused > 0, "the tight pools filled up")
    }

    @Test("the trace of a failure keeps what bears on the block: its writes, its volume's other steps, its origin's before the snapshot, and the faults")
    func relevantTrace() {
        typealias Step = StackSimulation.Step
        let steps = [
            Step(index: 1, text: "write v0 blocks 0+4", volume: "v0", blocks: 0..<4),
            Step(index: 2, text: "write v0 blocks 10+2", volume: "v0", blocks: 10..<12),
            Step(index: 3, text: "write other blocks 2+1", volume: "other", blocks: 2..<3),
            Step(index: 4, text: "snapshot v0 as s4", volume: "s4", origin: "v0"),
            Step(index: 5, text: "write v0 blocks 2+1", volume: "v0", blocks: 2..<3),
            Step(index: 6, text: "power cut"),
            Step(index: 7, text: "write s4 blocks 3+1", volume: "s4", blocks: 3..<4),
            Step(index: 8, text: "flush s4", volume: "s4"),
        ]
        let kept = StackSimulation.relevant(steps, volume: "s4", block: 2).map(\.index)
        #expect(kept == [1, 4, 6, 8])
    }

    @Test("the same seed replays the same run")
    func replay() async throws {
        // The configuration of earlier versions (RAID5, 4 members, 16 KiB chunks, a pool): with drawn
        // configurations, fault decisions can follow the order concurrent member requests reach a
        // device, and a replay diverged once (see the issue notes).
        var options = StackSimulation.Options(seed: 42, level: .raid5)
        options.widened = false
        let first = await StackSimulation.run(options)
        let second = await StackSimulation.run(options)
        let difference = (0..<min(first.trace.count, second.trace.count)).first { first.trace[$0] != second.trace[$0] }
        #expect(difference == nil && first.trace.count == second.trace.count,
                "runs part at trace line \(difference ?? -1): \(difference.map { "\(first.trace[$0]) / \(second.trace[$0])" } ?? "")")
        #expect(first.operations == second.operations && first.powerCuts == second.powerCuts && first.reads == second.reads)
    }
}
