import Testing

@testable import Spindle

private func leaf(_ block: UInt64) -> MetadataNode {
    MetadataNode(level: 0, keys: [block], values: [block * 2], block: block, transaction: 1)
}

@Suite("Metadata at scale: the node cache and walks over metadata larger than it")
struct MetadataScaleTests {
    @Test(
        "the node cache never holds more than its capacity, keeps nodes used since the hand passed, and forgets removed ones"
    )
    func clockCache() {
        var cache = NodeCache(capacity: 16)
        for block in UInt64(2)..<18 { cache.insert(leaf(block)) }
        #expect(cache.count == 16 && cache.evictions == 0)
        // Blocks 2...9 are used again: the next eight inserts evict 10...17, not them.
        for block in UInt64(2)..<10 { #expect(cache.node(at: block) == leaf(block)) }
        for block in UInt64(100)..<108 { cache.insert(leaf(block)) }
        #expect(cache.count == 16 && cache.evictions == 8)
        for block in UInt64(2)..<10 { #expect(cache.contains(block), "block \(block) was used again and must stay") }
        for block in UInt64(10)..<18 { #expect(!cache.contains(block), "block \(block) was not used again") }
        // A removed node leaves a slot that the next insert fills without evicting anything.
        cache.remove(5)
        #expect(cache.node(at: 5) == nil && cache.count == 15)
        cache.insert(leaf(200))
        #expect(cache.count == 16 && cache.evictions == 8)
        // Replacing a kept node changes it in place.
        let changed = MetadataNode(level: 0, keys: [1, 2], values: [3, 4], block: 200, transaction: 2)
        cache.insert(changed)
        #expect(cache.node(at: 200) == changed && cache.count == 16)
        // Many more inserts than the capacity: the bound holds.
        for block in UInt64(1000)..<5000 { cache.insert(leaf(block)) }
        #expect(cache.count == 16 && cache.capacity == 16)
        #expect(NodeCache(budgetBytes: 256 << 20).capacity == (256 << 20) / NodeCache.bytesPerNode)
    }

    @Test("a pool whose metadata is many times its cache reads back every byte, checks clean and counts usage right")
    func metadataLargerThanTheCache() async throws {
        let device = try MemoryDevice(capacityBytes: 1 << 30, logicalBlockBytes: 4096)
        // 64 KiB of cache: 16 nodes, against some 120 nodes of mappings and reference counts.
        let pool = try await ThinPool.create(name: "tiny", devices: [device], metadataCacheBytes: 64 << 10)
        let volumeBytes: UInt64 = 4 << 30
        let origin = try await pool.createVolume(name: "origin", sizeBytes: volumeBytes)
        var random = SeededRandom(seed: 29)
        var model: [UInt64: UInt64] = [:]  // 4 KiB block -> seed of its contents
        let block = AlignedBuffer(count: 4096)
        func write(_ volume: ThinVolume, _ index: UInt64, into model: inout [UInt64: UInt64]) async throws {
            let seed = random.next()
            fillRandom(block.bytes, seed: seed)
            try await volume.write(from: block, at: index * 4096)
            model[index] = seed
        }
        for _ in 0..<6000 { try await write(origin, random.below(volumeBytes / 4096), into: &model) }
        try await pool.snapshot(volume: "origin", name: "snap")
        let snapshotModel = model
        for _ in 0..<1500 { try await write(origin, random.below(volumeBytes / 4096), into: &model) }
        try await pool.commit()

        let reopened = try await ThinPool.open(devices: [device], metadataCacheBytes: 64 << 10)
        for (name, expected) in [("origin", model), ("snap", snapshotModel)] {
            let volume = try await reopened.openVolume(name: name)
            for (index, seed) in expected.sorted(by: { $0.key < $1.key }) {
                try await volume.read(into: block, at: index * 4096)
                let wanted = AlignedBuffer(count: 4096)
                fillRandom(wanted.bytes, seed: seed)
                #expect(block.array == wanted.array, "\(name) block \(index) reads back what was written")
            }
        }
        let report = try await reopened.check()
        #expect(report.isClean, "\(report.problems)")
        let cached = await reopened.withState { $0.area.cachedNodes }
        #expect(cached <= 16)
        let evictions = await reopened.withState { $0.area.cacheEvictions }
        #expect(evictions > 100, "the metadata did not fit the cache, as this test needs")

        // Usage against a count mapping by mapping: a chunk is a volume's own when no node on its
        // path is shared and it has one referrer.
        let usage = try await reopened.volumeUsage()
        for volume in try await reopened.volumes() {
            let expected: UInt64 = try await reopened.withState { state in
                let root = state.records[volume.id]!.root
                var keys: [UInt64] = []
                try await MetadataBTree.forEach(in: 0...UInt64.max, root: root, store: state.area) { key, _ in
                    keys.append(key)
                    return true
                }
                var exclusive: UInt64 = 0
                for key in keys {
                    let found = try await MetadataBTree.lookupSharing(key, root: root, in: state.area)!
                    if !found.shared, try await state.referenceCount(of: found.value) == 1 { exclusive += 1 }
                }
                return exclusive
            }
            let counted = usage.first { $0.name == volume.name }!
            #expect(counted.exclusiveChunks == expected, "\(volume.name)")
            #expect(counted.mappedChunks == volume.mappedChunks)
        }
        #expect(usage.allSatisfy { $0.exclusiveChunks > 0 && $0.sharedChunks > 0 })
    }

    @Test(
        "concurrent first writes and flushes with metadata many times the cache: every write reads back, the pool checks clean"
    )
    func concurrentWritesReadingMetadataOutsideTheLock() async throws {
        let memory = try MemoryDevice(capacityBytes: 1 << 30, logicalBlockBytes: 4096)
        // Reads and writes that take time, so reads made outside the lock overlap commits.
        let device = FaultyDevice(wrapping: memory, seed: 5)
        device.addLatency(nanoseconds: 50_000, jitterNanoseconds: 200_000)
        let pool = try await ThinPool.create(name: "busy", devices: [device], metadataCacheBytes: 64 << 10)
        let volumeBytes: UInt64 = 2 << 30
        let volumes = [
            try await pool.createVolume(name: "a", sizeBytes: volumeBytes),
            try await pool.createVolume(name: "b", sizeBytes: volumeBytes),
        ]
        // 16 writers, each its own blocks (block % 16 == writer), so every block has one last write.
        let written = try await withThrowingTaskGroup(of: [(Int, UInt64, UInt64)].self) { group in
            for writer in 0..<16 {
                group.addTask {
                    var random = SeededRandom(seed: UInt64(100 + writer))
                    let buffer = AlignedBuffer(count: 4096)
                    var done: [(Int, UInt64, UInt64)] = []
                    for step in 0..<250 {
                        let volume = writer % 2
                        let index = random.below(volumeBytes / 4096 / 16) * 16 + UInt64(writer)
                        let seed = random.next()
                        fillRandom(buffer.bytes, seed: seed)
                        try await volumes[volume].write(from: buffer, at: index * 4096)
                        done.append((volume, index, seed))
                        if step % 50 == 49 { try await volumes[volume].flush() }
                        if writer == 0 && step == 120 { try await pool.snapshot(volume: "a", name: "a-snap") }
                    }
                    return done
                }
            }
            var all: [(Int, UInt64, UInt64)] = []
            for try await part in group { all += part }
            return all
        }
        var last: [String: UInt64] = [:]
        for (volume, index, seed) in written { last["\(volume):\(index)"] = seed }
        try await pool.commit()
        let evictions = await pool.withState { $0.area.cacheEvictions }
        #expect(evictions > 100, "the metadata did not fit the cache, as this test needs")
        device.clearFaults()
        let reopened = try await ThinPool.open(devices: [device], metadataCacheBytes: 64 << 10)
        let buffer = AlignedBuffer(count: 4096)
        let wanted = AlignedBuffer(count: 4096)
        for (key, seed) in last {
            let parts = key.split(separator: ":")
            let volume = try await reopened.openVolume(name: parts[0] == "0" ? "a" : "b")
            try await volume.read(into: buffer, at: UInt64(parts[1])! * 4096)
            fillRandom(wanted.bytes, seed: seed)
            #expect(buffer.array == wanted.array, "volume \(parts[0]) block \(parts[1])")
        }
        let report = try await reopened.check()
        #expect(report.isClean, "\(report.problems)")
    }

    @Test("a node read outside the lock is kept when no commit came between, and dropped when one did")
    func readsAcrossACommitAreDropped() async throws {
        let device = HoldingDevice(wrapping: try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096))
        let cacheBytes = UInt64(64 * NodeCache.bytesPerNode)
        let area = try await MetadataArea.format(device: device, offset: 0, blockCount: 2048, cacheBytes: cacheBytes)
        var root = try await MetadataBTree.create(in: area)
        for key in UInt64(0)..<20_000 {
            root = try await MetadataBTree.insert(key * 4, value: key, root: root, in: area)
        }
        area.roots[0] = root
        try await area.commit()
        // Opening reads the internal nodes only: the leaves are missing.
        let opened = try await MetadataArea.open(device: device, offset: 0, blockCount: 2048, cacheBytes: cacheBytes)
        let first = try #require(opened.missingNode(onPathTo: 0, root: opened.roots[0]))
        let second = try #require(opened.missingNode(onPathTo: 79_000, root: opened.roots[0]))
        #expect(first.block != second.block)

        // No commit meanwhile: kept, and the path is then in memory.
        await first.load()
        #expect(opened.nodeInMemory(at: first.block) != nil)
        #expect(opened.missingNode(onPathTo: 0, root: opened.roots[0]) == nil)

        // A commit while the read is in flight: the read is held until the commit is done.
        let held = second.block * UInt64(MetadataNode.blockBytes)
        device.hold(held..<(held + UInt64(MetadataNode.blockBytes)))
        async let loading: Void = second.load()
        await device.waitUntilParked()
        opened.roots[0] = try await MetadataBTree.insert(41_001, value: 1, root: opened.roots[0], in: opened)
        try await opened.commit()
        device.release()
        await loading
        #expect(opened.nodeInMemory(at: second.block) == nil, "a node read across a commit must not be kept")
        #expect(try await MetadataBTree.lookup(79_000, root: opened.roots[0], in: opened) == 19_750)
    }

    @Test("requests go on while a commit is written, and a flush covers what completed before it")
    func requestsDuringACommit() async throws {
        let memory = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let device = HoldingDevice(wrapping: memory)
        let pool = try await ThinPool.create(name: "busy", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 16 << 20)
        let first = AlignedBuffer(count: 4096)
        fillRandom(first.bytes, seed: 1)
        try await volume.write(from: first, at: 0)
        let superblocks = await pool.withState { $0.area.offset }
        device.hold(superblocks..<(superblocks + 2 * UInt64(MetadataNode.blockBytes)))
        async let committing: Void = pool.commit()
        await device.waitUntilParked()
        // The commit is stuck writing its superblock: the pool's lock is free, so a first write
        // into a new chunk and a read complete meanwhile (waited for 20 s at most, then the
        // commit is let go so that a failure here does not hang).
        let second = AlignedBuffer(count: 4096)
        fillRandom(second.bytes, seed: 2)
        let read = AlignedBuffer(count: 4096)
        let done = Locked(false)
        let requests = Task {
            try await volume.write(from: second, at: 5 * pool.chunkBytes)
            try await volume.read(into: read, at: 0)
            done.withLock { $0 = true }
        }
        let deadline = monotonicNanos() + 20_000_000_000
        while !done.withLock({ $0 }) && monotonicNanos() < deadline { try await Task.sleep(nanoseconds: 5_000_000) }
        #expect(done.withLock { $0 }, "a write and a read waited for the commit being written")
        device.release()
        try await requests.value
        #expect(read.array == first.array)
        try await committing
        try await volume.flush()
        let reopened = try await ThinPool.open(devices: [memory])
        let again = try await reopened.openVolume(name: "v")
        try await again.read(into: read, at: 0)
        #expect(read.array == first.array)
        try await again.read(into: read, at: 5 * pool.chunkBytes)
        #expect(read.array == second.array, "the write made during the commit is durable after the flush")
        #expect(try await reopened.check().isClean)
    }

    @Test(
        "a metadata commit that cannot be written fails every later commit, naming why; reopening returns to the last durable one"
    )
    func failedCommitFailsThePool() async throws {
        let memory = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let device = FaultyDevice(wrapping: memory)
        let pool = try await ThinPool.create(name: "fail", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 16 << 20)
        let block = AlignedBuffer(count: 4096)
        fillRandom(block.bytes, seed: 3)
        try await volume.write(from: block, at: 0)
        try await volume.flush()
        let superblocks = await pool.withState { $0.area.offset }
        device.failWrites(in: superblocks..<(superblocks + 2 * UInt64(MetadataNode.blockBytes)))
        let other = AlignedBuffer(count: 4096)
        fillRandom(other.bytes, seed: 4)
        try await volume.write(from: other, at: 3 * pool.chunkBytes)
        await #expect(throws: SpindleError.self) { try await volume.flush() }
        device.clearFaults()
        try await volume.write(from: other, at: 4 * pool.chunkBytes)
        let later = await spindleError { try await volume.flush() }
        expectError(later, .ioFailed, ["metadata commit failed", "open the pool again"])
        let reopened = try await ThinPool.open(devices: [memory])
        let again = try await reopened.openVolume(name: "v")
        let read = AlignedBuffer(count: 4096)
        try await again.read(into: read, at: 0)
        #expect(read.array == block.array, "the last durable commit is there")
        for chunk: UInt64 in [3, 4] {
            try await again.read(into: read, at: chunk * pool.chunkBytes)
            #expect(read.array == [UInt8](repeating: 0, count: 4096), "chunk \(chunk) was never committed")
        }
        #expect(try await reopened.check().isClean)
    }
}
