/// Reads of metadata nodes beyond one at a time: many at once for walks, and without the owner's
/// lock for requests that must not hold it while they wait for the device.
extension MetadataArea {
    /// Reads into the cache, many at once, the nodes of `blocks` it does not hold (runs of adjacent
    /// blocks in one read each): what a walk calls with an internal node's children before visiting
    /// them, so a walk of metadata on disk costs a read per run of children, not per node. Nodes of
    /// the open transaction and blocks outside the area are left to ``node(at:)``.
    package func prefetch(_ blocks: [UInt64]) async throws {
        let missing = cache.withLock { cache in
            blocks.filter { $0 >= 2 && $0 < blockCount && pending[$0] == nil && !cache.nodes.contains($0) }.sorted()
        }
        guard missing.count > 1 else { return }
        var runs: [(first: UInt64, count: Int)] = []
        for block in missing {
            if let last = runs.last, last.first + UInt64(last.count) == block, last.count < 64 {
                runs[runs.count - 1].count += 1
            } else if runs.last.map({ $0.first + UInt64($0.count) > block }) != true {
                runs.append((block, 1))
            }
        }
        let blockBytes = MetadataNode.blockBytes
        let buffer = AlignedBuffer(count: missing.count * blockBytes, zeroed: false)
        var starts: [Int] = []
        var position = 0
        for run in runs {
            starts.append(position)
            position += run.count * blockBytes
        }
        let device = self.device
        let reads = zip(runs, starts).map { run, start in
            (range: start..<(start + run.count * blockBytes), offset: byteOffset(run.first))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func addRead() {
                let read = reads[next]
                group.addTask { try await device.read(into: buffer, range: read.range, at: read.offset) }
                next += 1
            }
            while next < runs.count && next < 32 { addRead() }
            while try await group.next() != nil {
                if next < runs.count { addRead() }
            }
        }
        for (run, start) in zip(runs, starts) {
            for index in 0..<run.count {
                let block = run.first + UInt64(index)
                // A node that does not decode is left out: reading it on its own reports the error.
                guard pending[block] == nil, !cache.withLock({ $0.nodes.contains(block) }),
                    let node = try? MetadataNode.decode(
                        Array(buffer.slice(offset: start + index * blockBytes, length: blockBytes)),
                        expectedBlock: block)
                else { continue }
                remember(node)
            }
        }
    }

    // MARK: Reads outside the owner's lock

    /// The node at `block` if it is in memory (written in the open transaction, or cached).
    func nodeInMemory(at block: UInt64) -> MetadataNode? {
        pending[block] ?? cache.withLock { $0.nodes.node(at: block) }
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
        let cache: Locked<(nodes: NodeCache, epoch: UInt64)>
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
