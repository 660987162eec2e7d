import Testing

@testable import Spindle

/// Metadata blocks in memory with transactions: committed blocks are never overwritten (the test
/// fails if the tree tries), blocks released in a transaction are reused only after it commits, and
/// `crash()` drops everything since the last commit.
final class MemoryNodeStore: MetadataNodeStore {
    private(set) var transaction: UInt64 = 1
    private var committed: [UInt64: [UInt8]] = [:]
    private var pending: [UInt64: [UInt8]] = [:]
    private var free: [UInt64] = []
    private var releasedNow: [UInt64] = []
    private var allocatedNow: Set<UInt64> = []
    private var nextBlock: UInt64 = 10
    var overwroteCommitted = false
    /// Nodes read so far.
    private(set) var reads = 0

    func node(at block: UInt64) async throws -> MetadataNode {
        reads += 1
        guard let bytes = pending[block] ?? committed[block] else { throw MetadataNode.Problem.notANode }
        return try MetadataNode.decode(bytes, expectedBlock: block)
    }

    func store(_ node: MetadataNode) async throws {
        if !allocatedNow.contains(node.block) { overwroteCommitted = true }
        pending[node.block] = node.encoded()
    }

    func allocateBlock() throws -> UInt64 {
        let block: UInt64
        if let reused = free.popLast() {
            block = reused
        } else {
            block = nextBlock
            nextBlock += 1
        }
        allocatedNow.insert(block)
        references[block] = 1
        return block
    }

    private var references: [UInt64: UInt32] = [:]

    func referenceCount(of block: UInt64) -> UInt32 { references[block] ?? 0 }

    func addReference(to block: UInt64) { references[block, default: 0] += 1 }

    func releaseBlock(_ block: UInt64) {
        precondition(referenceCount(of: block) > 0, "block \(block) released more often than referenced")
        references[block]! -= 1
        guard references[block] == 0 else { return }
        references[block] = nil
        if allocatedNow.remove(block) != nil {
            pending[block] = nil
            free.append(block)  // never committed: reusable at once
        } else {
            releasedNow.append(block)
        }
    }

    func commit() {
        for (block, bytes) in pending { committed[block] = bytes }
        for block in releasedNow { committed[block] = nil }
        free.append(contentsOf: releasedNow)
        pending = [:]
        releasedNow = []
        allocatedNow = []
        committedReferences = references
        transaction += 1
    }

    private var committedReferences: [UInt64: UInt32] = [:]

    func crash() {
        free.append(contentsOf: allocatedNow)
        references = committedReferences
        pending = [:]
        releasedNow = []
        allocatedNow = []
        transaction += 1
    }

    var liveBlocks: Int { committed.count }
}

private func contents(root: UInt64, store: MemoryNodeStore) async throws -> [(UInt64, UInt64)] {
    var result: [(UInt64, UInt64)] = []
    try await MetadataBTree.forEach(in: 0...UInt64.max, root: root, store: store) { key, value in
        result.append((key, value))
        return true
    }
    return result
}

@Suite("Metadata B-tree")
struct MetadataBTreeTests {
    @Test("nodes round-trip and refuse corruption, misplacement and disorder")
    func nodeFormat() throws {
        let node = MetadataNode(level: 1, keys: [1, 5, 9], values: [100, 200, 300], block: 42, transaction: 7)
        let bytes = node.encoded()
        #expect(try MetadataNode.decode(bytes, expectedBlock: 42) == node)
        #expect(throws: MetadataNode.Problem.misplaced(expected: 43, found: 42)) {
            try MetadataNode.decode(bytes, expectedBlock: 43)
        }
        var flipped = bytes
        flipped[40] ^= 1
        #expect(throws: MetadataNode.Problem.checksumMismatch(block: 42)) {
            try MetadataNode.decode(flipped, expectedBlock: 42)
        }
        #expect(throws: MetadataNode.Problem.notANode) {
            try MetadataNode.decode([UInt8](repeating: 0, count: 4096), expectedBlock: 1)
        }
        let disordered = MetadataNode(level: 0, keys: [5, 1], values: [1, 2], block: 3, transaction: 1).encoded()
        #expect(throws: MetadataNode.Problem.invalid(block: 3, reason: "keys out of order at entry 1")) {
            try MetadataNode.decode(disordered, expectedBlock: 3)
        }
    }

    @Test("random inserts, updates and removes agree with a dictionary, across commits", arguments: [UInt64(1), 2, 3])
    func againstModel(seed: UInt64) async throws {
        let store = MemoryNodeStore()
        var root = try await MetadataBTree.create(in: store)
        store.commit()
        var model: [UInt64: UInt64] = [:]
        var random = SeededRandom(seed: seed)
        for step in 0..<10_000 {
            let key = random.below(3000) * 7 + (seed & 3)
            switch random.below(10) {
            case 0..<6:
                let value = random.next()
                root = try await MetadataBTree.insert(key, value: value, root: root, in: store)
                model[key] = value
            case 6..<9:
                let (newRoot, removed) = try await MetadataBTree.remove(key, root: root, in: store)
                root = newRoot
                #expect(removed == (model.removeValue(forKey: key) != nil))
            default:
                #expect(try await MetadataBTree.lookup(key, root: root, in: store) == model[key])
            }
            if step % 500 == 499 { store.commit() }
        }
        store.commit()
        #expect(!store.overwroteCommitted, "a committed node was modified in place")
        let listed = try await contents(root: root, store: store)
        #expect(listed.map(\.0) == model.keys.sorted())
        #expect(listed.allSatisfy { model[$0.0] == $0.1 })
        let reachable = try await MetadataBTree.blocks(root: root, store: store)
        #expect(Set(reachable).count == reachable.count)
        #expect(reachable.count == store.liveBlocks, "every live block is in the tree and no block leaked")
    }

    @Test("a crash before commit leaves the committed tree exactly as it was")
    func crashBeforeCommit() async throws {
        let store = MemoryNodeStore()
        var root = try await MetadataBTree.create(in: store)
        var model: [UInt64: UInt64] = [:]
        for key in stride(from: UInt64(0), to: 5000, by: 3) {
            root = try await MetadataBTree.insert(key, value: key * 2, root: root, in: store)
            model[key] = key * 2
        }
        store.commit()
        let committedRoot = root
        var random = SeededRandom(seed: 9)
        for _ in 0..<3000 {
            let key = random.below(6000)
            if random.chance(0.5) {
                root = try await MetadataBTree.insert(key, value: 1, root: root, in: store)
            } else {
                root = try await MetadataBTree.remove(key, root: root, in: store).root
            }
        }
        #expect(!store.overwroteCommitted)
        store.crash()
        let listed = try await contents(root: committedRoot, store: store)
        #expect(listed.map(\.0) == model.keys.sorted())
        #expect(listed.allSatisfy { model[$0.0] == $0.1 })
    }

    @Test("a large tree grows levels, ranges list in order, and removing everything leaves one empty leaf")
    func growAndShrink() async throws {
        let store = MemoryNodeStore()
        var root = try await MetadataBTree.create(in: store)
        let count: UInt64 = 70_000
        for index in 0..<count {
            let key = (index &* 2_654_435_761) % 1_000_003
            root = try await MetadataBTree.insert(key, value: index, root: root, in: store)
        }
        store.commit()
        #expect(try await store.node(at: root).level >= 2, "70,000 keys need at least three levels")
        var seen: [UInt64] = []
        try await MetadataBTree.forEach(in: 1000...5000, root: root, store: store) { key, _ in
            seen.append(key)
            return true
        }
        #expect(seen == seen.sorted() && seen.allSatisfy { (1000...5000).contains($0) } && !seen.isEmpty)
        var first: UInt64?
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: root, store: store) { key, _ in
            first = key
            return false
        }
        #expect(first != nil)
        for index in 0..<count {
            let key = (index &* 2_654_435_761) % 1_000_003
            root = try await MetadataBTree.remove(key, root: root, in: store).root
        }
        store.commit()
        let last = try await store.node(at: root)
        #expect(last.isLeaf && last.keys.isEmpty)
        #expect(store.liveBlocks == 1)
    }

    @Test("keys inserted in order fill their nodes; inserts in the middle still split in halves and read back")
    func appendsFillNodes() async throws {
        let store = MemoryNodeStore()
        var root = try await MetadataBTree.create(in: store)
        let count = 100 * MetadataNode.capacity
        for key in 0..<UInt64(count) {
            root = try await MetadataBTree.insert(key * 2, value: key, root: root, in: store)
        }
        var leaves = 0
        for block in try await MetadataBTree.blocks(root: root, store: store)
        where try await store.node(at: block).isLeaf {
            leaves += 1
        }
        // Half-full leaves (the split in halves) would make about 200.
        #expect(leaves <= 101, "\(leaves) leaves for \(count) keys appended")
        // Keys between the appended ones land in full nodes, which split in halves.
        for key in stride(from: UInt64(1), to: UInt64(count * 2), by: 10) {
            root = try await MetadataBTree.insert(key, value: key, root: root, in: store)
        }
        var expected: [(UInt64, UInt64)] = (0..<UInt64(count)).map { ($0 * 2, $0) }
        expected += stride(from: UInt64(1), to: UInt64(count * 2), by: 10).map { ($0, $0) }
        expected.sort { $0.0 < $1.0 }
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: root, store: store) { key, value in
            found.append((key, value))
            return true
        }
        #expect(found.map(\.0) == expected.map(\.0) && found.map(\.1) == expected.map(\.1))
    }
}
