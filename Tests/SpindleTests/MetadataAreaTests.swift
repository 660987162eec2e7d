import Testing

@testable import Spindle

private func treeContents(_ area: MetadataArea, root: UInt64) async throws -> [UInt64: UInt64] {
    var result: [UInt64: UInt64] = [:]
    guard root != 0 else { return result }
    try await MetadataBTree.forEach(in: 0...UInt64.max, root: root, store: area) { key, value in
        result[key] = value
        return true
    }
    return result
}

@Suite("Metadata area")
struct MetadataAreaTests {
    @Test("committed trees survive reopening, and uncommitted changes vanish")
    func reopen() async throws {
        let device = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        let area = try await MetadataArea.format(device: device, offset: 0, blockCount: 1024)
        var root = try await MetadataBTree.create(in: area)
        var model: [UInt64: UInt64] = [:]
        for key in stride(from: UInt64(0), to: 3000, by: 1) {
            root = try await MetadataBTree.insert(key * 11, value: key, root: root, in: area)
            model[key * 11] = key
        }
        area.roots[0] = root
        try await area.commit()
        for key in stride(from: UInt64(0), to: 1000, by: 1) {
            root = try await MetadataBTree.remove(key * 11, root: root, in: area).root
        }
        area.roots[0] = root  // not committed
        let reopened = try await MetadataArea.open(device: device, offset: 0, blockCount: 1024)
        #expect(try await treeContents(reopened, root: reopened.roots[0]) == model)
        let reachable = try await MetadataBTree.blocks(root: reopened.roots[0], store: reopened)
        #expect(reopened.usedBlocks == reachable.count + 2, "exactly the tree and the two superblocks are in use")
    }

    @Test(
        "power cuts at any point of a commit leave the previous or the new transaction, whole",
        arguments: Array(UInt64(1)...8))
    func powerCuts(seed: UInt64) async throws {
        let inner = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let formatted = try await MetadataArea.format(device: inner, offset: 0, blockCount: 2048)
        _ = formatted
        var committed: [UInt64: UInt64] = [:]
        var random = SeededRandom(seed: seed)
        for round in 0..<6 {
            let faulty = FaultyDevice(wrapping: inner, seed: seed &* 31 &+ UInt64(round), volatileCache: true)
            let area = try await MetadataArea.open(device: faulty, offset: 0, blockCount: 2048)
            #expect(try await treeContents(area, root: area.roots[0]) == committed, "seed \(seed) round \(round)")
            var root = area.roots[0] == 0 ? try await MetadataBTree.create(in: area) : area.roots[0]
            var attempted = committed
            for _ in 0..<(200 + Int(random.below(800))) {
                let key = random.below(5000)
                if random.chance(0.7) {
                    let value = random.next()
                    root = try await MetadataBTree.insert(key, value: value, root: root, in: area)
                    attempted[key] = value
                } else {
                    root = try await MetadataBTree.remove(key, root: root, in: area).root
                    attempted[key] = nil
                }
            }
            area.roots[0] = root
            // Stop the commit after a random number of device operations, then cut the power.
            faulty.failAfter(operations: random.below(40), kinds: [.writes, .flushes])
            var finished = true
            do { try await area.commit() } catch { finished = false }
            try await faulty.powerCut(tearing: true)
            let reopened = try await MetadataArea.open(device: inner, offset: 0, blockCount: 2048)
            let after = try await treeContents(reopened, root: reopened.roots[0])
            #expect(after == committed || after == attempted, "seed \(seed) round \(round): a mix of transactions")
            if finished { #expect(after == attempted, "a commit that returned must survive") }
            committed = after
        }
    }

    @Test("a corrupt node is reported, never used")
    func corruptNode() async throws {
        let device = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        let area = try await MetadataArea.format(device: device, offset: 0, blockCount: 1024)
        var root = try await MetadataBTree.create(in: area)
        for key in 0..<UInt64(1000) { root = try await MetadataBTree.insert(key, value: key, root: root, in: area) }
        area.roots[0] = root
        try await area.commit()
        let victim = try await MetadataBTree.blocks(root: root, store: area).last!
        let block = AlignedBuffer(count: 4096)
        try await device.read(into: block, at: victim * 4096)
        block.bytes[100] ^= 0x10
        try await device.write(from: block, at: victim * 4096)
        // Opening reads internal nodes only; the damaged leaf is reported when it is read.
        let reopened = try await MetadataArea.open(device: device, offset: 0, blockCount: 1024)
        let error = await spindleError { _ = try await treeContents(reopened, root: reopened.roots[0]) }
        expectError(error, .corrupted, ["metadata block \(victim) is corrupt (checksum mismatch)"])
        // The typed problem is kept as the cause: bad metadata, not a bad disk.
        #expect(error?.cause as? MetadataNode.Problem == .checksumMismatch(block: victim))
        // Both superblocks gone: the area refuses to open.
        try await device.write(from: AlignedBuffer(count: 8192), at: 0)
        let unopened = await spindleError {
            _ = try await MetadataArea.open(device: device, offset: 0, blockCount: 1024)
        }
        expectError(unopened, .corrupted, ["no valid metadata superblock", "copy 0: no metadata superblock magic"])
        #expect(unopened?.cause as? MetadataArea.SuperblockProblem == .noMagic)
    }
}
