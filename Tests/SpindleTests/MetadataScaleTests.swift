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
}
