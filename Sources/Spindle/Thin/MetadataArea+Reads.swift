/// Reads of metadata nodes beyond one at a time: many at once for walks, and without the owner's
/// lock for requests that must not hold it while they wait for the device.
extension MetadataArea {
    /// Reads into the cache, many at once, the nodes of `blocks` it does not hold (runs of adjacent
    /// blocks in one read each): what a walk calls with an internal node's children before visiting
    /// them, so a walk of metadata on disk costs a read per run of children, not per node. Nodes of
    /// the open transaction and blocks outside the area are left to ``node(at:)``.
    package func prefetch(_ blocks: [UInt64]) async throws {
        let missing = cache.withLock { cache in
            Array(
                Set(
                    blocks.filter {
                        $0 >= 2 && $0 < blockCount && pending[$0] == nil && cache.sealed[$0] == nil
                            && !cache.nodes.contains($0)
                    })
            ).sorted()
        }
        guard missing.count > 1 else { return }
        let blockBytes = MetadataNode.blockBytes
        let buffer = AlignedBuffer(count: missing.count * blockBytes, zeroed: false)
        try await transferRuns(of: missing) { device, range, offset in
            try await device.read(into: buffer, range: range, at: offset)
        }
        for (index, block) in missing.enumerated() {
            // A node that does not decode is left out: reading it on its own reports the error.
            guard pending[block] == nil, !cache.withLock({ $0.sealed[block] != nil || $0.nodes.contains(block) }),
                let node = try? MetadataNode.decode(
                    Array(buffer.slice(offset: index * blockBytes, length: blockBytes)), expectedBlock: block)
            else { continue }
            remember(node)
        }
    }

    /// Moves the blocks `sorted` (distinct, in order) between the device and a buffer holding them
    /// in that order: one request per run of adjacent blocks (up to 64 blocks, 256 KiB), up to 32
    /// requests in flight. How walks read children and commits write nodes.
    func transferRuns(
        of sorted: [UInt64],
        _ transfer: @escaping @Sendable (any BlockDevice, Range<Int>, UInt64) async throws -> Void
    ) async throws {
        try await Self.transferRuns(of: sorted, device: device, offset: offset, transfer)
    }

    static func transferRuns(
        of sorted: [UInt64], device: any BlockDevice, offset areaOffset: UInt64,
        _ transfer: @escaping @Sendable (any BlockDevice, Range<Int>, UInt64) async throws -> Void
    ) async throws {
        let blockBytes = MetadataNode.blockBytes
        var runs: [(range: Range<Int>, offset: UInt64)] = []
        var runFirst = 0
        for index in sorted.indices {
            let next = index + 1
            let runEnds =
                next == sorted.count || sorted[next] != sorted[index] + 1 || next - runFirst == 64
            if runEnds {
                runs.append(
                    (runFirst * blockBytes..<next * blockBytes, areaOffset + sorted[runFirst] * UInt64(blockBytes)))
                runFirst = next
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func start() {
                let run = runs[next]
                group.addTask { try await transfer(device, run.range, run.offset) }
                next += 1
            }
            while next < runs.count && next < 32 { start() }
            while try await group.next() != nil {
                if next < runs.count { start() }
            }
        }
    }

    // MARK: Reads outside the owner's lock

    /// The node at `block` if it is in memory (written in the open transaction, or cached).
    func nodeInMemory(at block: UInt64) -> MetadataNode? {
        pending[block] ?? cache.withLock { $0.sealed[block] ?? $0.nodes.node(at: block) }
    }

    /// The first node on the path from `root` to `key` that is not in memory, as a read that can be
    /// made without the owner's lock; nil when the whole path is in memory (a lookup or insert of
    /// `key` then reads nothing from the device).
    package func missingNode(onPathTo key: UInt64, root: UInt64) -> MissingNode? {
        var block = root
        while let node = nodeInMemory(at: block) {
            guard !node.isLeaf, let index = MetadataBTree.childIndex(for: key, in: node) else { return nil }
            block = node.values[index]
        }
        guard block >= 2 && block < blockCount else { return nil }  // reading it under the lock reports it
        return MissingNode(
            block: block, key: key, device: device, offset: offset, blockCount: blockCount, cache: cache,
            epoch: cache.withLock { $0.epoch })
    }

    /// The value of `key` in the tree at `root` when its whole path is in memory.
    func valueInMemory(for key: UInt64, root: UInt64) -> UInt64? {
        var block = root
        while let node = nodeInMemory(at: block) {
            if node.isLeaf {
                guard let index = MetadataBTree.position(of: key, in: node.keys), index < node.keys.count,
                    node.keys[index] == key
                else { return nil }
                return node.values[index]
            }
            guard let index = MetadataBTree.childIndex(for: key, in: node) else { return nil }
            block = node.values[index]
        }
        return nil
    }

    /// A committed node to read without the owner's lock, and the rest of its path to a key: the
    /// owner lets go of its lock, calls ``load()``, and takes the lock again to find the nodes in
    /// memory. The nodes go into the cache only if no transaction committed meanwhile (a commit
    /// lets released blocks be reused, so a block read across one may hold another node by then);
    /// blocks of the open transaction are never read this way (they are in memory).
    package struct MissingNode: Sendable {
        let block: UInt64
        let key: UInt64
        let device: any BlockDevice
        let offset: UInt64
        let blockCount: UInt64
        let cache: Locked<SharedNodes>
        let epoch: UInt64

        /// Reads the node and those below it on the path to the key, keeping them while no commit
        /// intervenes. Errors are left for the read under the lock to report.
        package func load() async {
            var block = self.block
            let buffer = AlignedBuffer(count: MetadataNode.blockBytes, zeroed: false)
            while block >= 2 && block < blockCount {
                let known = cache.withLock { $0.epoch == epoch ? $0.nodes.node(at: block) : nil }
                let node: MetadataNode
                if let known {
                    node = known
                } else {
                    guard
                        (try? await device.read(into: buffer, at: offset + block * UInt64(MetadataNode.blockBytes)))
                            != nil,
                        let read = try? MetadataNode.decode(buffer.array, expectedBlock: block)
                    else { return }
                    let kept = cache.withLock { cache in
                        guard cache.epoch == epoch else { return false }
                        if !cache.nodes.contains(block) { cache.nodes.insert(read) }
                        return true
                    }
                    guard kept else { return }
                    node = read
                }
                guard !node.isLeaf, let index = MetadataBTree.childIndex(for: key, in: node) else { return }
                block = node.values[index]
            }
        }
    }
    /// Nodes written in the open transaction, not yet committed.
    package var pendingNodes: Int { pending.count }
}
