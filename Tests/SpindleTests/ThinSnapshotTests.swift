import Testing

@testable import Spindle

/// Writes `count` random 4 KiB blocks (some partial chunks, some whole) to a volume and to a model.
private func scribble(_ volume: ThinVolume, model: inout [UInt8], random: inout SeededRandom, count: Int) async throws {
    for _ in 0..<count {
        let blocks = 1 + Int(random.below(24))
        let first = Int(random.below(UInt64(model.count / 4096 - blocks)))
        let data = AlignedBuffer(count: blocks * 4096)
        fillRandom(data.bytes, seed: random.next())
        try await volume.write(from: data, at: UInt64(first * 4096))
        model.replaceSubrange((first * 4096)..<((first + blocks) * 4096), with: data.array)
    }
}

@Suite("Thin snapshots and pool devices")
struct ThinSnapshotTests {
    @Test("a snapshot keeps the origin's data while the origin changes, and the origin ignores writes to the snapshot")
    func isolation() async throws {
        let device = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "snap", devices: [device])
        let origin = try await pool.createVolume(name: "origin", sizeBytes: 8 << 20)
        var random = SeededRandom(seed: 11)
        var originModel = [UInt8](repeating: 0, count: 8 << 20)
        try await scribble(origin, model: &originModel, random: &random, count: 60)
        let usedBefore = await pool.usage.usedChunks
        let info = try await pool.snapshot(volume: "origin", name: "before")
        #expect(info.origin == "origin" && !info.readOnly && info.mappedChunks == usedBefore)
        #expect(await pool.usage.usedChunks == usedBefore, "a snapshot copies no data")
        let snapshotModel = originModel

        // Write the origin: the snapshot is unchanged, and only the written chunks were copied.
        try await scribble(origin, model: &originModel, random: &random, count: 5)
        let snapshot = try await pool.openVolume(name: "before")
        #expect(byteDifference(try await readAll(snapshot), snapshotModel) == nil)
        #expect(byteDifference(try await readAll(origin), originModel) == nil)
        #expect(await pool.usage.usedChunks <= usedBefore + 5 * 2, "only the written chunks were copied")

        // Write the snapshot: the origin is unchanged.
        var changedSnapshot = snapshotModel
        try await scribble(snapshot, model: &changedSnapshot, random: &random, count: 20)
        #expect(byteDifference(try await readAll(origin), originModel) == nil)
        #expect(byteDifference(try await readAll(snapshot), changedSnapshot) == nil)

        // Discard on the origin unmaps only the origin's view.
        try await origin.discard(offset: 0, length: 1 << 20)
        originModel.replaceSubrange(0..<(1 << 20), with: repeatElement(0, count: 1 << 20))
        #expect(byteDifference(try await readAll(snapshot), changedSnapshot) == nil)
        #expect(byteDifference(try await readAll(origin), originModel) == nil)

        // Everything survives reopening; the accounting adds up.
        try await pool.commit()
        let report = try await pool.check()
        #expect(report.isClean, "\(report.problems)")
        let reopened = try await ThinPool.open(devices: [device])
        #expect(byteDifference(try await readAll(try await reopened.openVolume(name: "origin")), originModel) == nil)
        #expect(
            byteDifference(try await readAll(try await reopened.openVolume(name: "before")), changedSnapshot) == nil)
        let usage = try await reopened.volumeUsage()
        let used = await reopened.usage.usedChunks
        let exclusive = usage.reduce(UInt64(0)) { $0 + $1.exclusiveChunks }
        let shared = usage.first { $0.name == "origin" }!.sharedChunks
        #expect(shared > 0 && shared == usage.first { $0.name == "before" }!.sharedChunks)
        #expect(exclusive + shared == used, "each chunk is either one volume's own or shared by the two")
    }

    @Test("a read-only snapshot refuses writes and discards, naming itself")
    func readOnly() async throws {
        let pool = try await ThinPool.create(
            name: "ro", devices: [try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)])
        _ = try await pool.createVolume(name: "v", sizeBytes: 1 << 20)
        try await pool.snapshot(volume: "v", name: "frozen", readOnly: true)
        let frozen = try await pool.openVolume(name: "frozen")
        #expect(frozen.isReadOnly)
        expectError(
            await spindleError { try await frozen.write(from: AlignedBuffer(count: 4096), at: 0) }, .readOnly,
            ["ro/frozen"])
        expectError(await spindleError { try await frozen.discard(offset: 0, length: 65536) }, .readOnly, ["ro/frozen"])
    }

    @Test(
        "chains of snapshots, written at every level, then deleted in every order, bring every count back to zero",
        arguments: [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 2, 1, 3], [3, 0, 2, 1]])
    func chainsAndDeletion(order: [Int]) async throws {
        let device = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "chain", devices: [device])
        var random = SeededRandom(seed: UInt64(order.reduce(0) { $0 * 4 + $1 }))
        let names = ["base", "s1", "s2", "s3"]
        var models: [[UInt8]] = []
        var model = [UInt8](repeating: 0, count: 4 << 20)
        var volume = try await pool.createVolume(name: names[0], sizeBytes: 4 << 20)
        try await scribble(volume, model: &model, random: &random, count: 40)
        models.append(model)
        // s1 of base, s2 of s1, s3 of s2 (a snapshot of a snapshot), each written after.
        for level in 1..<names.count {
            try await pool.snapshot(volume: names[level - 1], name: names[level])
            var snapshotModel = models[level - 1]
            try await scribble(volume, model: &models[level - 1], random: &random, count: 8)  // the older one changes
            volume = try await pool.openVolume(name: names[level])
            try await scribble(volume, model: &snapshotModel, random: &random, count: 8)
            models.append(snapshotModel)
        }
        for (index, name) in names.enumerated() {
            #expect(
                byteDifference(try await readAll(try await pool.openVolume(name: name)), models[index]) == nil,
                "\(name) before deletions")
        }
        var remaining = Set(0..<names.count)
        for index in order {
            try await pool.deleteVolume(name: names[index])
            remaining.remove(index)
            let report = try await pool.check()
            #expect(report.isClean, "after deleting \(names[index]) (order \(order)): \(report.problems)")
            for other in remaining.sorted() {
                #expect(
                    byteDifference(try await readAll(try await pool.openVolume(name: names[other])), models[other])
                        == nil,
                    "\(names[other]) after deleting \(names[index]) (order \(order))")
            }
        }
        #expect(await pool.usage.usedChunks == 0, "every chunk came back")
        let usage = await pool.usage
        let reopened = try await ThinPool.open(devices: [device])
        #expect(await reopened.usage.usedMetadataBlocks == usage.usedMetadataBlocks)
        #expect(await reopened.usage.usedMetadataBlocks == 2 + 3, "superblocks and the three empty pool trees remain")
    }

    @Test("taking a snapshot writes a bounded amount of metadata, whatever the volume's size")
    func snapshotCost() async throws {
        var written: [UInt64] = []
        for megabytes in [UInt64(4), 64] {
            let inner = try MemoryDevice(capacityBytes: 160 << 20, logicalBlockBytes: 4096)
            let counting = FaultyDevice(wrapping: inner, seed: 1)
            let pool = try await ThinPool.create(name: "cost", devices: [counting])
            let volume = try await pool.createVolume(name: "v", sizeBytes: megabytes << 20)
            let data = AlignedBuffer(count: 1 << 20)
            for offset in stride(from: UInt64(0), to: megabytes << 20, by: 1 << 20) {
                fillRandom(data.bytes, seed: offset)
                try await volume.write(from: data, at: offset)
            }
            try await pool.commit()
            let before = counting.statistics.writes
            try await pool.snapshot(volume: "v", name: "s")
            written.append(counting.statistics.writes - before)
        }
        #expect(written[1] == written[0], "snapshot writes \(written) for 4 MiB and 64 MiB volumes")
        #expect(written[0] <= 4, "\(written[0]) writes: the volume record and a superblock")
    }

    @Test("a pool spans several devices, reopens from them in any order, and refuses a missing, foreign or doubled one")
    func severalDevices() async throws {
        let devices = try (0..<3).map { _ in try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096) }
        let pool = try await ThinPool.create(name: "wide", devices: devices)
        let capacity = pool.chunkCount
        #expect(capacity > 2 * (8 << 20) / pool.chunkBytes, "chunks on every device")
        let volume = try await pool.createVolume(name: "v", sizeBytes: capacity * pool.chunkBytes)
        var model = [UInt8](repeating: 0, count: Int(volume.capacityBytes))
        let data = AlignedBuffer(count: Int(volume.capacityBytes))
        fillRandom(data.bytes, seed: 5)
        try await volume.write(from: data, at: 0)
        model = data.array
        try await volume.flush()
        #expect(await pool.usage.usedChunks == capacity, "every chunk of every device used")
        let reopened = try await ThinPool.open(devices: [devices[2], devices[0], devices[1]])
        #expect(byteDifference(try await readAll(try await reopened.openVolume(name: "v")), model) == nil)
        expectError(
            await spindleError { _ = try await ThinPool.open(devices: [devices[0], devices[2]]) },
            .notFound, ["pool wide has 3 devices; device 1 is missing"])
        expectError(
            await spindleError { _ = try await ThinPool.open(devices: [devices[0], devices[1], devices[1]]) },
            .invalidArgument, ["both claim to be device 1 of pool wide"])
        let other = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        _ = try await ThinPool.create(name: "other", devices: [other])
        expectError(
            await spindleError { _ = try await ThinPool.open(devices: [devices[0], other]) },
            .invalidArgument, ["belongs to pool other"])
        expectError(
            await spindleError { _ = try await ThinPool.create(name: "again", devices: [other]) },
            .alreadyExists, ["holds device 0 of pool 'other'", "refusing to overwrite it"])
        let blank = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        expectError(
            await spindleError { _ = try await ThinPool.open(devices: [blank]) }, .invalidArgument,
            ["no thin pool label"])
    }

    @Test("extending by a new device or by grown space adds chunks that hold data across reopening")
    func extend() async throws {
        let first = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "grow", devices: [first])
        let before = pool.chunkCount
        let volume = try await pool.createVolume(name: "v", sizeBytes: 64 << 20)
        let block = AlignedBuffer(count: Int(pool.chunkBytes))
        var written: UInt64 = 0
        while true {
            fillRandom(block.bytes, seed: written)
            do { try await volume.write(from: block, at: written * pool.chunkBytes) } catch { break }
            written += 1
        }
        #expect(written == before, "the pool filled")
        let second = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        let added = try await pool.extend(adding: [second])
        #expect(added == (4 << 20) / pool.chunkBytes - 1 && pool.chunkCount == before + added)
        for index in written..<(written + added) {
            fillRandom(block.bytes, seed: index)
            try await volume.write(from: block, at: index * pool.chunkBytes)
        }
        try await volume.flush()
        // The first device "grew" (a larger copy of it), and the pool takes the new space.
        let larger = try MemoryDevice(capacityBytes: 12 << 20, logicalBlockBytes: 4096)
        try await larger.write(from: try await readAllBuffer(first), at: 0)
        let regrown = try await ThinPool.open(devices: [larger, second])
        #expect(try await regrown.extend() == (4 << 20) / pool.chunkBytes)
        let all = try await regrown.openVolume(name: "v")
        for index in 0..<(written + added) {
            fillRandom(block.bytes, seed: index)
            let got = AlignedBuffer(count: Int(pool.chunkBytes))
            try await all.read(into: got, at: index * pool.chunkBytes)
            #expect(byteDifference(got.array, block.array) == nil, "chunk \(index)")
        }
        #expect(try await regrown.check().isClean)
        expectError(
            await spindleError { try await regrown.extend(adding: [second]) }, .invalidArgument,
            ["in pool grow already"])
    }
}

private func readAllBuffer(_ device: any BlockDevice) async throws -> AlignedBuffer {
    let buffer = AlignedBuffer(count: Int(device.capacityBytes))
    try await device.read(into: buffer, at: 0)
    return buffer
}
