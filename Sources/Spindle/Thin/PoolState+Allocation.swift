/// Allocation: the space map (which chunks are free, reserved, or freed in the open transaction)
/// and the data chunks' reference counts (the reference-count tree).
extension PoolState {
    func referenceCount(of chunk: UInt64) async throws -> UInt64 {
        try await MetadataBTree.lookup(chunk, root: area.roots[ThinPool.Root.referenceCounts.rawValue], in: area) ?? 0
    }

    func adjustReferences(_ chunk: UInt64, by delta: Int) async throws {
        let root = area.roots[ThinPool.Root.referenceCounts.rawValue]
        let count = try await referenceCount(of: chunk)
        let after = UInt64(Int(count) + delta)
        // A chunk that was shared when the transaction began stays shared for writes until it
        // commits: the committed mappings still give it to the other volume, which a crash would
        // bring back, so writing it in place would leak this volume's writes into that one.
        if delta < 0 && count >= 2 { unsharedSinceCommit.insert(chunk) }
        if count < 2 && after >= 2 { sharedChunks += 1 }
        if count >= 2 && after < 2 { sharedChunks -= 1 }
        if delta > 0 {
            if count == 0 { usedChunks += 1 }
            area.roots[ThinPool.Root.referenceCounts.rawValue] = try await MetadataBTree.insert(
                chunk, value: count + UInt64(delta), root: root, in: area)
            return
        }
        precondition(count >= UInt64(-delta), "pool chunk \(chunk) released more often than referenced")
        if count == UInt64(-delta) {
            area.roots[ThinPool.Root.referenceCounts.rawValue] = try await MetadataBTree.remove(
                chunk, root: root, in: area
            ).root
            usedChunks -= 1
            pendingFree.insert(chunk)
        } else {
            area.roots[ThinPool.Root.referenceCounts.rawValue] = try await MetadataBTree.insert(
                chunk, value: count - UInt64(-delta), root: root, in: area)
        }
    }

    /// A free chunk, reserved until it is mapped or given back with ``returnChunk(_:)``, and whether
    /// it is clean (has held no data since it was zeroed). Never-used chunks come first; then free
    /// chunks that are not freed in this transaction (committed mappings may still name them) nor
    /// reserved.
    func allocateChunk() async throws -> (chunk: UInt64, clean: Bool) {
        let chunkCount = self.chunkCount
        guard usedChunks + UInt64(freedSinceCommitCount + reserved.count) < chunkCount else {
            let percent = chunkCount == 0 ? 100 : usedChunks * 100 / chunkCount
            let waiting = freedSinceCommitCount
            throw SpindleError(
                .noSpace,
                "pool \(name) is full: \(usedChunks) of \(chunkCount) chunks used (\(percent)% of \(ByteSize.format(chunkCount * chunkBytes)))\(waiting == 0 ? "" : "; \(waiting) chunks freed since the last flush come back after it")",
                operation: "allocate", path: name)
        }
        if cleanNext < chunkCount {
            let batch = max(1024, chunkCount / 64)
            if cleanNext >= committedDirtyBelow {
                // Record first that the next batch may be written, so a crash leaves it counted dirty.
                if dirtyBelow <= cleanNext { dirtyBelow = min(chunkCount, cleanNext + batch) }
                try await commit()
            } else if committedDirtyBelow - cleanNext <= batch / 2 && dirtyBelow == committedDirtyBelow {
                // Half a batch ahead, raise it and have the caller commit after letting the lock go
                // (see ThinPool.commit()), so writes rarely wait for the commit above.
                dirtyBelow = min(chunkCount, committedDirtyBelow + batch)
                commitDue = true
            }
            let chunk = cleanNext
            cleanNext += 1
            reserved.insert(chunk)
            return (chunk, true)
        }
        let root = area.roots[ThinPool.Root.referenceCounts.rawValue]
        func available(_ chunk: UInt64) -> Bool { !freedSinceCommit(chunk) && !reserved.contains(chunk) }
        // The first gap in the reference-count keys from the cursor on, then from the start.
        let limit = cleanNext
        for start in [min(cursor, limit), 0] {
            var candidate = start
            var found: UInt64?
            try await MetadataBTree.forEach(in: start...UInt64.max, root: root, store: area) { key, _ in
                while candidate < key && candidate < limit {
                    if available(candidate) {
                        found = candidate
                        return false
                    }
                    candidate += 1
                }
                candidate = max(candidate, key + 1)
                return candidate < limit
            }
            if found == nil {
                while candidate < limit {
                    if available(candidate) {
                        found = candidate
                        break
                    }
                    candidate += 1
                }
            }
            if let found {
                reserved.insert(found)
                cursor = found + 1 >= limit ? 0 : found + 1
                return (found, false)
            }
        }
        throw SpindleError(.noSpace, "pool \(name) has no free chunk", operation: "allocate", path: name)
    }

    /// Chunks each volume uses alone, by volume id: mapped through no node shared with another
    /// volume, and with one referrer. Chunks with one referrer come from one ordered walk of the
    /// reference-count tree (as a bitmap over the pool's chunks); then each volume's tree is walked
    /// skipping shared nodes, which hold none of the volume's own chunks.
    func exclusiveChunks() async throws -> [UInt64: UInt64] {
        let chunkCount = self.chunkCount
        var single = [UInt64](repeating: 0, count: Int((chunkCount + 63) / 64))
        try await MetadataBTree.forEach(
            in: 0...UInt64.max, root: area.roots[ThinPool.Root.referenceCounts.rawValue], store: area, prefetch: true
        ) { chunk, count in
            if count == 1 && chunk < chunkCount { single[Int(chunk / 64)] |= 1 << (chunk % 64) }
            return true
        }
        var result: [UInt64: UInt64] = [:]
        for record in records.values {
            var exclusive: UInt64 = 0
            var pending = [record.root]
            while let block = pending.popLast() {
                guard area.referenceCount(of: block) <= 1 else { continue }
                let node = try await area.node(at: block)
                if node.isLeaf {
                    for chunk in node.values
                    where chunk < chunkCount && single[Int(chunk / 64)] & (1 << (chunk % 64)) != 0 {
                        exclusive += 1
                    }
                } else {
                    let unshared = node.values.filter { area.referenceCount(of: $0) <= 1 }
                    try await area.prefetch(unshared)
                    pending.append(contentsOf: unshared)
                }
            }
            result[record.id] = exclusive
        }
        return result
    }

    /// Gives back a reserved chunk that ended up unused.
    func returnChunk(_ chunk: UInt64) {
        reserved.remove(chunk)
    }
}

/// Data chunks' reference counts, as the mapping trees' leaves see them: a copied shared leaf adds a
/// referrer to each chunk it names, a released leaf drops one, and a chunk nobody refers to becomes
/// free once the transaction commits.
extension PoolState: MetadataValueReferences {
    func retain(_ values: [UInt64]) async throws {
        for chunk in values { try await adjustReferences(chunk, by: 1) }
    }

    func release(_ values: [UInt64]) async throws {
        for chunk in values { try await adjustReferences(chunk, by: -1) }
    }
}
