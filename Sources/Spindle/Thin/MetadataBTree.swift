/// A node of a copy-on-write B-tree of 64-bit keys and values, stored in one 4 KiB metadata block.
///
/// Leaves hold (key, value) pairs; internal nodes hold (lowest key of the child, child block). Every
/// node records its own block number and the transaction that wrote it, and a CRC32C, so a block
/// that was torn, misdirected or left stale is recognised when read.
///
/// Layout (little-endian): magic `SPNDLBTN` (8), CRC32C of bytes 12..<4096 (4), level (2, 0 = leaf),
/// entry count (2), block number (8), transaction (8), reserved to byte 32, then `count` entries of
/// key (8) and value or child (8).
package struct MetadataNode: Sendable, Equatable {
    package static let blockBytes = 4096
    static let magic: UInt64 = 0x4E54_424C_444E_5053  // "SPNDLBTN" little-endian
    static let headerBytes = 32
    /// Entries a node holds.
    package static let capacity = (blockBytes - headerBytes) / 16

    package var level: Int
    package var keys: [UInt64]
    /// Values in a leaf, child block numbers in an internal node.
    package var values: [UInt64]
    package var block: UInt64
    package var transaction: UInt64

    package var isLeaf: Bool { level == 0 }

    package init(level: Int, keys: [UInt64] = [], values: [UInt64] = [], block: UInt64, transaction: UInt64) {
        self.level = level
        self.keys = keys
        self.values = values
        self.block = block
        self.transaction = transaction
    }

    package func encoded() -> [UInt8] {
        precondition(keys.count == values.count && keys.count <= Self.capacity)
        var bytes = [UInt8](repeating: 0, count: Self.blockBytes)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) { bytes.putLittleEndian(value, at: offset) }
        put(Self.magic, at: 0)
        put(UInt16(level), at: 12)
        put(UInt16(keys.count), at: 14)
        put(block, at: 16)
        put(transaction, at: 24)
        for index in keys.indices {
            put(keys[index], at: Self.headerBytes + index * 16)
            put(values[index], at: Self.headerBytes + index * 16 + 8)
        }
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[12...])) }
        put(checksum, at: 8)
        return bytes
    }

    /// Why a block is not the node expected.
    package enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        case notANode
        case checksumMismatch(block: UInt64)
        case misplaced(expected: UInt64, found: UInt64)
        case invalid(block: UInt64, reason: String)

        package var description: String {
            switch self {
            case .notANode: return "not a metadata node (no magic)"
            case let .checksumMismatch(block): return "metadata block \(block) is corrupt (checksum mismatch)"
            case let .misplaced(expected, found):
                return
                    "metadata block \(expected) holds the node written for block \(found) (misdirected or stale write)"
            case let .invalid(block, reason): return "metadata block \(block) is corrupt: \(reason)"
            }
        }
    }

    /// Parses and checks the node stored at `block`.
    package static func decode(_ bytes: [UInt8], expectedBlock block: UInt64) throws(Problem) -> MetadataNode {
        guard bytes.count == blockBytes else { throw .invalid(block: block, reason: "\(bytes.count) bytes") }
        func get<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T { bytes.littleEndian(type, at: offset) }
        guard get(UInt64.self, 0) == magic else { throw .notANode }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[12...])) }
        guard get(UInt32.self, 8) == computed else { throw .checksumMismatch(block: block) }
        let found = get(UInt64.self, 16)
        guard found == block else { throw .misplaced(expected: block, found: found) }
        let count = Int(get(UInt16.self, 14))
        guard count <= capacity else { throw .invalid(block: block, reason: "\(count) entries, more than \(capacity)") }
        var keys: [UInt64] = []
        var values: [UInt64] = []
        keys.reserveCapacity(count)
        values.reserveCapacity(count)
        for index in 0..<count {
            keys.append(get(UInt64.self, headerBytes + index * 16))
            values.append(get(UInt64.self, headerBytes + index * 16 + 8))
        }
        for index in keys.indices.dropFirst() where keys[index - 1] >= keys[index] {
            throw .invalid(block: block, reason: "keys out of order at entry \(index)")
        }
        return MetadataNode(
            level: Int(get(UInt16.self, 12)), keys: keys, values: values, block: block,
            transaction: get(UInt64.self, 24))
    }
}

/// Where a copy-on-write B-tree keeps its nodes during one transaction.
///
/// Nodes reachable from the last committed root are never modified: the tree *shadows* a node
/// (copies it to a block allocated in this transaction) before changing it, and releases the old
/// block, which the store may reuse only after the transaction commits. So a crash before the commit
/// leaves the committed tree intact, and committing is a matter of writing the new nodes, flushing,
/// and then recording the new root.
package protocol MetadataNodeStore: AnyObject {
    /// The transaction being built.
    var transaction: UInt64 { get }
    /// Reads a node.
    func node(at block: UInt64) async throws -> MetadataNode
    /// Reads ahead the nodes of `blocks`, which are about to be read (a store without a cache
    /// ignores it).
    func prefetch(_ blocks: [UInt64]) async throws
    /// Stores a node written in this transaction, at `node.block`.
    func store(_ node: MetadataNode) async throws
    /// A block for a new node in this transaction, with one reference.
    func allocateBlock() throws -> UInt64
    /// How many parents (or roots) refer to the block; above one, the node is shared between trees
    /// (a snapshot and its origin) and must be copied before either changes it.
    func referenceCount(of block: UInt64) -> UInt32
    /// One more parent refers to the block.
    func addReference(to block: UInt64)
    /// Drops one reference; at zero the block is unused, reusable once the transaction commits.
    func releaseBlock(_ block: UInt64)
}

extension MetadataNodeStore {
    package func prefetch(_ blocks: [UInt64]) async throws {}
}

/// What the values in a tree's leaves refer to, when they are references (a thin volume's mappings
/// point at data chunks with their own reference counts). Told when a shared leaf is copied (each
/// value gains a referrer) and when a leaf is released for good (each value loses one).
package protocol MetadataValueReferences {
    func retain(_ values: [UInt64]) async throws
    func release(_ values: [UInt64]) async throws
}

/// Copy-on-write B-tree operations over a ``MetadataNodeStore``. Each change returns the new root.
package enum MetadataBTree {
    /// An empty tree: one empty leaf.
    package static func create(in store: some MetadataNodeStore) async throws -> UInt64 {
        let block = try store.allocateBlock()
        try await store.store(MetadataNode(level: 0, block: block, transaction: store.transaction))
        return block
    }

    /// The value for `key`, or nil.
    package static func lookup(_ key: UInt64, root: UInt64, in store: some MetadataNodeStore) async throws -> UInt64? {
        var node = try await store.node(at: root)
        while !node.isLeaf {
            guard let index = childIndex(for: key, in: node) else { return nil }
            node = try await store.node(at: node.values[index])
        }
        guard let index = position(of: key, in: node.keys), index < node.keys.count, node.keys[index] == key else {
            return nil
        }
        return node.values[index]
    }

    /// Sets `key` to `value`; returns the new root.
    package static func insert(
        _ key: UInt64, value: UInt64, root: UInt64, in store: some MetadataNodeStore,
        values: (any MetadataValueReferences)? = nil
    ) async throws -> UInt64 {
        var top = try await shadow(root, in: store, values: values)
        if let split = try await insert(key, value, into: &top, rightmost: true, store: store, values: values) {
            // The root split: a new root above the two halves.
            let block = try store.allocateBlock()
            let newRoot = MetadataNode(
                level: top.level + 1, keys: [top.keys.first ?? 0, split.key], values: [top.block, split.block],
                block: block, transaction: store.transaction)
            try await store.store(top)
            try await store.store(newRoot)
            return block
        }
        try await store.store(top)
        return top.block
    }

    /// Removes `key`; returns the new root and whether the key was there. Empty nodes are removed;
    /// nodes are not merged (space, not correctness).
    package static func remove(
        _ key: UInt64, root: UInt64, in store: some MetadataNodeStore, values: (any MetadataValueReferences)? = nil
    ) async throws -> (root: UInt64, removed: Bool) {
        guard try await lookup(key, root: root, in: store) != nil else { return (root, false) }
        var top = try await shadow(root, in: store, values: values)
        _ = try await remove(key, from: &top, store: store, values: values)
        // Collapse internal roots with a single child; the child (perhaps committed or shared, so
        // not to be rewritten) inherits the root's reference.
        if !top.isLeaf && top.keys.count == 1 {
            try await store.store(top)
            while !top.isLeaf && top.keys.count == 1 {
                let child = try await store.node(at: top.values[0])
                if store.referenceCount(of: top.block) > 1 { store.addReference(to: child.block) }
                store.releaseBlock(top.block)
                top = child
            }
            return (top.block, true)
        }
        if !top.isLeaf && top.keys.isEmpty {
            store.releaseBlock(top.block)
            return (try await create(in: store), true)
        }
        try await store.store(top)
        return (top.block, true)
    }

    /// Calls `body` with every (key, value) whose key is in `range`, in key order; `body` returns
    /// false to stop. With `prefetch`, each internal node's children in the range are read at once
    /// before they are visited (for walks that visit most of them).
    package static func forEach(
        in range: ClosedRange<UInt64>, root: UInt64, store: some MetadataNodeStore, prefetch: Bool = false,
        _ body: (UInt64, UInt64) async throws -> Bool
    ) async throws {
        _ = try await visit(range, block: root, store: store, prefetch: prefetch, body)
    }

    /// The value for `key` and whether any node on the way to it is shared with another tree.
    package static func lookupSharing(_ key: UInt64, root: UInt64, in store: some MetadataNodeStore) async throws -> (
        value: UInt64, shared: Bool
    )? {
        var node = try await store.node(at: root)
        var shared = store.referenceCount(of: root) > 1
        while !node.isLeaf {
            guard let index = childIndex(for: key, in: node) else { return nil }
            let child = node.values[index]
            shared = shared || store.referenceCount(of: child) > 1
            node = try await store.node(at: child)
        }
        guard let index = position(of: key, in: node.keys), index < node.keys.count, node.keys[index] == key else {
            return nil
        }
        return (node.values[index], shared)
    }

    /// Drops the tree's reference to its root; every node no other tree shares is released, and the
    /// values of released leaves are released through `values`. Time is proportional to the part of
    /// the tree the caller owned alone.
    package static func release(
        tree root: UInt64, in store: some MetadataNodeStore, values: (any MetadataValueReferences)? = nil
    ) async throws {
        var pending = [root]
        while let block = pending.popLast() {
            guard store.referenceCount(of: block) == 1 else {
                store.releaseBlock(block)
                continue
            }
            let node = try await store.node(at: block)
            store.releaseBlock(block)
            if node.isLeaf {
                if !node.values.isEmpty { try await values?.release(node.values) }
            } else {
                pending.append(contentsOf: node.values)
            }
        }
    }

    /// Every block of the tree (for space accounting and checks).
    package static func blocks(root: UInt64, store: some MetadataNodeStore) async throws -> [UInt64] {
        var result: [UInt64] = []
        var pending = [root]
        while let block = pending.popLast() {
            result.append(block)
            let node = try await store.node(at: block)
            if !node.isLeaf { pending.append(contentsOf: node.values) }
        }
        return result
    }

    // MARK: Internals

    /// First index whose key is >= `key`.
    static func position(of key: UInt64, in keys: [UInt64]) -> Int? {
        var low = 0
        var high = keys.count
        while low < high {
            let middle = (low + high) / 2
            if keys[middle] < key { low = middle + 1 } else { high = middle }
        }
        return low
    }

    /// The child of an internal node that covers `key` (the last whose lowest key is <= key).
    static func childIndex(for key: UInt64, in node: MetadataNode) -> Int? {
        guard !node.keys.isEmpty else { return nil }
        let index = position(of: key, in: node.keys)!
        if index < node.keys.count && node.keys[index] == key { return index }
        return max(index - 1, 0)
    }

    /// A copy of the node that this transaction may change: the node itself when it was written in
    /// this transaction, else a copy at a new block (the old block released).
    /// A shared node is copied: its children (or, for a leaf, its values) gain the copy as a second
    /// referrer, and the original keeps its other referrers.
    static func shadow(_ block: UInt64, in store: some MetadataNodeStore, values: (any MetadataValueReferences)?)
        async throws -> MetadataNode
    {
        var node = try await store.node(at: block)
        let references = store.referenceCount(of: block)
        if node.transaction == store.transaction && references == 1 { return node }
        if references > 1 {
            if node.isLeaf {
                if !node.values.isEmpty { try await values?.retain(node.values) }
            } else {
                for child in node.values { store.addReference(to: child) }
            }
        }
        store.releaseBlock(block)
        node.block = try store.allocateBlock()
        node.transaction = store.transaction
        return node
    }

    /// Inserts below `node` (already shadowed); returns the right half if `node` had to split.
    /// `rightmost`: the node is the last of its level (the root, or the last child of a rightmost
    /// node). An entry added at the end of such a node is an append (keys handed out in order, as
    /// chunk numbers are): its split leaves the left node full and starts the right one with the
    /// new entry, so trees that grow by appending are full, not half full. Other splits halve.
    private static func insert(
        _ key: UInt64, _ value: UInt64, into node: inout MetadataNode, rightmost: Bool, store: some MetadataNodeStore,
        values: (any MetadataValueReferences)?
    ) async throws -> (key: UInt64, block: UInt64)? {
        let appended: Bool
        if node.isLeaf {
            let index = position(of: key, in: node.keys)!
            if index < node.keys.count && node.keys[index] == key {
                node.values[index] = value
                return nil
            }
            node.keys.insert(key, at: index)
            node.values.insert(value, at: index)
            appended = index == node.keys.count - 1
        } else {
            let index = childIndex(for: key, in: node)!
            var child = try await shadow(node.values[index], in: store, values: values)
            let split = try await insert(
                key, value, into: &child, rightmost: rightmost && index == node.keys.count - 1, store: store,
                values: values)
            try await store.store(child)
            node.values[index] = child.block
            node.keys[index] = min(node.keys[index], child.keys.first ?? node.keys[index])
            if let split {
                node.keys.insert(split.key, at: index + 1)
                node.values.insert(split.block, at: index + 1)
            }
            appended = split != nil && index + 1 == node.keys.count - 1
        }
        guard node.keys.count > MetadataNode.capacity else { return nil }
        let half = rightmost && appended ? node.keys.count - 1 : node.keys.count / 2
        let right = MetadataNode(
            level: node.level, keys: Array(node.keys[half...]), values: Array(node.values[half...]),
            block: try store.allocateBlock(), transaction: store.transaction)
        node.keys.removeSubrange(half...)
        node.values.removeSubrange(half...)
        try await store.store(right)
        return (right.keys[0], right.block)
    }

    /// Removes below `node` (already shadowed); returns whether `node` is now empty.
    private static func remove(
        _ key: UInt64, from node: inout MetadataNode, store: some MetadataNodeStore,
        values: (any MetadataValueReferences)?
    ) async throws -> Bool {
        if node.isLeaf {
            if let index = position(of: key, in: node.keys), index < node.keys.count, node.keys[index] == key {
                node.keys.remove(at: index)
                node.values.remove(at: index)
            }
            return node.keys.isEmpty
        }
        let index = childIndex(for: key, in: node)!
        var child = try await shadow(node.values[index], in: store, values: values)
        if try await remove(key, from: &child, store: store, values: values) {
            store.releaseBlock(child.block)
            node.keys.remove(at: index)
            node.values.remove(at: index)
        } else {
            try await store.store(child)
            node.values[index] = child.block
            node.keys[index] = child.keys[0]
        }
        return node.keys.isEmpty
    }

    private static func visit(
        _ range: ClosedRange<UInt64>, block: UInt64, store: some MetadataNodeStore, prefetch: Bool,
        _ body: (UInt64, UInt64) async throws -> Bool
    ) async throws -> Bool {
        let node = try await store.node(at: block)
        if node.isLeaf {
            for (key, value) in zip(node.keys, node.values) where range.contains(key) {
                if try await !body(key, value) { return false }
            }
            return true
        }
        var children: [UInt64] = []
        for index in node.keys.indices {
            let low = node.keys[index]
            let next = index + 1 < node.keys.count ? node.keys[index + 1] : nil
            if let next, next <= range.lowerBound { continue }
            if low > range.upperBound && index > 0 { break }
            children.append(node.values[index])
        }
        if prefetch { try await store.prefetch(children) }
        for child in children {
            if try await !visit(range, block: child, store: store, prefetch: prefetch, body) { return false }
        }
        return true
    }
}
