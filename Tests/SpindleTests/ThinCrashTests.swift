import Testing

@testable import Spindle

/// What a volume may hold after a crash: the simulator's model (contents at the last commit, plus
/// every version of a 4 KiB block written since).
private typealias VolumeModel = StackSimulation.VolumeModel

@Suite("Thin pool crash consistency")
struct ThinCrashTests {
    @Test(
        "power cut at a random point of writes, flushes, discards, snapshots, deletes, resizes and creates: flushed data is there, check is clean, no volume shows another's data",
        arguments: Array(UInt64(1)...10))
    func mixedLoad(seed: UInt64) async throws {
        let inner = try MemoryDevice(capacityBytes: 40 << 20, logicalBlockBytes: 4096)
        let setup = try await ThinPool.create(name: "crash", devices: [inner])
        _ = try await setup.createVolume(name: "v0", sizeBytes: 4 << 20)
        var models = ["v0": VolumeModel([UInt8](repeating: 0, count: 4 << 20))]
        let faulty = FaultyDevice(wrapping: inner, seed: seed, volatileCache: true)
        let pool = try await ThinPool.open(devices: [faulty])
        var random = SeededRandom(seed: seed)
        faulty.vanish(afterOperations: 100 + random.below(1500))
        var trace: [String] = []
        var ambiguous: String?  // a volume whose existence or size the crash may have left either way
        var counter = 0

        func commitAll() { for name in models.keys { models[name]!.committed() } }

        operations: for _ in 0..<400 {
            let names = models.keys.sorted()
            let name = names[Int(random.below(UInt64(names.count)))]
            let dice = random.below(100)
            counter += 1
            do {
                switch dice {
                case 0..<55, 55..<65:
                    let volume = try await pool.openVolume(name: name)
                    let blocks = 1 + Int(random.below(20))
                    let totalBlocks = models[name]!.current.count / 4096
                    guard totalBlocks > blocks else { continue }
                    let first = Int(random.below(UInt64(totalBlocks - blocks)))
                    if dice < 55 {
                        let data = AlignedBuffer(count: blocks * 4096)
                        fillRandom(data.bytes, seed: seed << 32 | UInt64(counter))
                        trace.append("write \(name) \(first)+\(blocks)")
                        models[name]!.apply(data.array, at: first * 4096)
                        try await volume.write(from: data, at: UInt64(first * 4096))
                    } else {
                        trace.append("discard \(name) \(first)+\(blocks)")
                        models[name]!.apply([UInt8](repeating: 0, count: blocks * 4096), at: first * 4096)
                        try await volume.discard(offset: UInt64(first * 4096), length: UInt64(blocks * 4096))
                    }
                case 65..<78:
                    trace.append("flush \(name)")
                    try await pool.openVolume(name: name).flush()
                    commitAll()
                case 78..<86:
                    guard models.count < 6 else { continue }
                    let snapshotName = "s\(counter)"
                    trace.append("snapshot \(name) as \(snapshotName)")
                    ambiguous = snapshotName
                    try await pool.snapshot(volume: name, name: snapshotName)
                    models[snapshotName] = VolumeModel(models[name]!.current)
                    commitAll()
                case 86..<91:
                    guard models.count > 1 else { continue }
                    trace.append("delete \(name)")
                    ambiguous = name
                    try await pool.deleteVolume(name: name)
                    models[name] = nil
                    commitAll()
                case 91..<96:
                    let size = Int(1 + random.below(48)) * 128 * 1024 + (random.chance(0.5) ? 8192 : 0)
                    trace.append("resize \(name) to \(size)")
                    ambiguous = name
                    try await pool.resizeVolume(name: name, sizeBytes: UInt64(size))
                    models[name]!.resize(to: size)
                    commitAll()
                default:
                    guard models.count < 6 else { continue }
                    let newName = "c\(counter)"
                    trace.append("create \(newName)")
                    ambiguous = newName
                    _ = try await pool.createVolume(name: newName, sizeBytes: 2 << 20)
                    models[newName] = VolumeModel([UInt8](repeating: 0, count: 2 << 20))
                    commitAll()
                }
                ambiguous = nil
            } catch let error as SpindleError where error.code == .deviceGone {
                trace.append("(device gone)")
                break operations
            }
        }
        try await faulty.powerCut(tearing: true)

        let reopened = try await ThinPool.open(devices: [inner])
        let report = try await reopened.check()
        #expect(report.isClean, "seed \(seed): \(report.problems)\n\(trace.suffix(12).joined(separator: "\n"))")
        let present = try await reopened.volumes()
        for info in present where info.name != ambiguous {
            guard let model = models[info.name] else {
                Issue.record("seed \(seed): volume \(info.name) exists but was never created")
                continue
            }
            let bytes = try await readAll(try await reopened.openVolume(name: info.name))
            #expect(
                bytes.count == model.current.count,
                "seed \(seed): \(info.name) has \(bytes.count) bytes, expected \(model.current.count)")
            for block in 0..<(min(bytes.count, model.current.count) / 4096) {
                let range = (block * 4096)..<((block + 1) * 4096)
                let got = Array(bytes[range])
                let allowed = [Array(model.durable[range])] + model.versions[block]
                if !allowed.contains(got) {
                    Issue.record(
                        "seed \(seed): \(info.name) block \(block) holds data it never held (flushed or written since)\n\(trace.suffix(12).joined(separator: "\n"))"
                    )
                    break
                }
            }
        }
        for name in models.keys where name != ambiguous {
            #expect(present.contains { $0.name == name }, "seed \(seed): committed volume \(name) is gone")
        }
    }

    @Test(
        "power cut during a large delete, done in steps: the pool checks clean, the other volumes and the snapshot keep their data, and the next open finishes the deletion",
        arguments: Array(UInt64(1)...6))
    func largeDeleteInterrupted(seed: UInt64) async throws {
        let inner = try MemoryDevice(capacityBytes: 96 << 20, logicalBlockBytes: 4096)
        let setup = try await ThinPool.create(name: "del", devices: [inner])
        let chunk = Int(setup.chunkBytes)
        var random = SeededRandom(seed: seed)
        // "big": a block in each of 700 chunks; "snap" shares the first 300 of them; "keep" is apart.
        let big = try await setup.createVolume(name: "big", sizeBytes: UInt64(700 * chunk))
        let keep = try await setup.createVolume(name: "keep", sizeBytes: UInt64(64 * chunk))
        let block = AlignedBuffer(count: 4096)
        for index in 0..<300 {
            fillRandom(block.bytes, seed: seed << 20 | UInt64(index))
            try await big.write(from: block, at: UInt64(index * chunk))
        }
        try await setup.snapshot(volume: "big", name: "snap", readOnly: true)
        for index in 300..<700 {
            fillRandom(block.bytes, seed: seed << 20 | UInt64(index))
            try await big.write(from: block, at: UInt64(index * chunk))
        }
        var keepModel = [UInt8](repeating: 0, count: 64 * chunk)
        for index in 0..<64 {
            fillRandom(block.bytes, seed: random.next())
            try await keep.write(from: block, at: UInt64(index * chunk + 8192))
            keepModel.replaceSubrange((index * chunk + 8192)..<(index * chunk + 12288), with: block.array)
        }
        let snapModel = try await readAll(try await setup.openVolume(name: "snap"))
        try await setup.commit()

        let faulty = FaultyDevice(wrapping: inner, seed: seed, volatileCache: true)
        let pool = try await ThinPool.open(devices: [faulty])
        pool.deletionStep.store(64, ordering: .relaxed)
        // The deletion takes some 90 operations (11 steps of reads, node writes, flushes and a
        // superblock each): the cut falls inside it.
        faulty.vanish(afterOperations: 5 + random.below(75))
        var finished = false
        do {
            try await pool.deleteVolume(name: "big")
            finished = true
        } catch let error as SpindleError where error.code == .deviceGone {}
        try await faulty.powerCut(tearing: true)

        let reopened = try await ThinPool.open(devices: [inner])
        let names = try await reopened.volumes().map(\.name).sorted()
        #expect(
            names == ["keep", "snap"] || (!finished && names == ["big", "keep", "snap"]), "seed \(seed): \(names)")
        let report = try await reopened.check()
        #expect(report.isClean, "seed \(seed): \(report.problems)")
        #expect(try await readAll(try await reopened.openVolume(name: "keep")) == keepModel, "seed \(seed)")
        #expect(try await readAll(try await reopened.openVolume(name: "snap")) == snapModel, "seed \(seed)")
        if names.contains("big") { try await reopened.deleteVolume(name: "big") }
        await reopened.waitForInterruptedDeletions()
        let after = try await reopened.check()
        #expect(after.isClean, "seed \(seed): \(after.problems)")
        let usage = try await reopened.volumeUsage()
        let used = await reopened.usage.usedChunks
        #expect(
            used == usage.reduce(0) { $0 + $1.exclusiveChunks }
                + (usage.first { $0.name == "snap" }?.sharedChunks ?? 0),
            "seed \(seed): every chunk left belongs to keep or snap")
        #expect(used == 64 + 300, "seed \(seed): \(used) chunks used")
    }
}
