/// Volumes' mappings (virtual chunk → pool chunk) in their trees: look up, insert, remove.
extension PoolState {
    /// Metadata nodes changed in one transaction above which the pool commits on its own (bounding
    /// the memory of a workload that never flushes; committing early is always allowed): the write
    /// that crosses it commits after its mapping, outside the lock (see ``ThinPool/commit()``).
    static let automaticCommitNodes = 2048

    func requireRecord(_ id: UInt64, name volumeName: String) throws(SpindleError) -> VolumeRecord {
        guard let record = records[id] else { throw deletedError(volumeName) }
        return record
    }

    /// The pool chunk a volume's chunk maps to, and whether a write must copy it: a node on its
    /// path is shared with another volume, the chunk has another referrer, or it had one when the
    /// open transaction began. Nil when the chunk is not mapped.
    func lookup(volume id: UInt64, name volumeName: String, chunk: UInt64) async throws -> (
        physical: UInt64, shared: Bool
    )? {
        let record = try requireRecord(id, name: volumeName)
        guard let found = try await MetadataBTree.lookupSharing(chunk, root: record.root, in: area) else { return nil }
        // With no chunk shared anywhere, a chunk on an unshared path is this volume's alone.
        let alone = try await sharedChunks == 0 ? true : referenceCount(of: found.value) == 1
        return (found.value, found.shared || !alone || unsharedSinceCommitted(found.value))
    }

    /// The first metadata node that looking up `chunk` of a volume for a write (or mapping it to
    /// the pool chunks `poolChunks`) would read from the device, or nil when all are in memory:
    /// the path in the volume's tree, then the reference-count tree's paths to the pool chunk it
    /// maps (when chunks are shared anywhere, a write asks its count) and to `poolChunks`.
    func missingMetadata(volume id: UInt64, chunk: UInt64, writing: Bool, poolChunks: [UInt64] = [])
        -> MetadataArea.MissingNode?
    {
        guard let record = records[id] else { return nil }
        if let missing = area.missingNode(onPathTo: chunk, root: record.root) { return missing }
        let counts = area.roots[ThinPool.Root.referenceCounts.rawValue]
        var chunks = poolChunks
        if writing && sharedChunks != 0, let mapped = area.valueInMemory(for: chunk, root: record.root) {
            chunks.append(mapped)
        }
        for poolChunk in chunks {
            if let missing = area.missingNode(onPathTo: poolChunk, root: counts) { return missing }
        }
        return nil
    }

    /// Looks up a volume's chunk for its I/O: where it is and, for a write, whether it must be
    /// copied (a read does not ask, and gets `shared`). Enters the in-flight epoch that keeps the
    /// chunk from reuse until the caller leaves it.
    func findChunk(volume: ThinVolume, chunk: UInt64, writing: Bool) async throws -> (
        mapped: ThinPool.MappedChunk, epoch: Int
    )? {
        let found: (physical: UInt64, shared: Bool)?
        if writing {
            found = try await lookup(volume: volume.id, name: volume.volumeName, chunk: chunk)
        } else {
            let root = try requireRecord(volume.id, name: volume.volumeName).root
            found = try await MetadataBTree.lookup(chunk, root: root, in: area).map { ($0, true) }
        }
        guard let found else { return nil }
        volume.mappings.remember(chunk, as: found.physical, shared: found.shared, holding: self)
        let location = layout.location(of: found.physical)
        // Entered last, so that a lookup that throws leaves no epoch behind.
        let epoch = inFlight.enter()
        return (
            ThinPool.MappedChunk(
                chunk: found.physical, device: location.device, offset: location.offset, shared: found.shared), epoch
        )
    }

    /// Maps `chunk` of a volume to the reserved `physical`, replacing `replacing` (the chunk a
    /// copy-on-write copied from). Returns false, leaving everything as it was, when the mapping is no
    /// longer `replacing` (a concurrent write changed it first): the caller retries.
    func map(volume id: UInt64, name volumeName: String, chunk: UInt64, to physical: UInt64, replacing: UInt64?)
        async throws -> Bool
    {
        var record = try requireRecord(id, name: volumeName)
        let current = try await MetadataBTree.lookup(chunk, root: record.root, in: area)
        guard current == replacing else { return false }
        reserved.remove(physical)
        record.root = try await MetadataBTree.insert(chunk, value: physical, root: record.root, in: area, values: self)
        try await adjustReferences(physical, by: 1)
        if let replacing {
            try await adjustReferences(replacing, by: -1)
        } else {
            record.mappedChunks += 1
        }
        records[id] = record
        dirtyRecords.insert(id)
        // A new chunk on a path this transaction copied: the volume's alone.
        openMappings(of: id)?.remember(chunk, as: physical, shared: false, holding: self)
        if area.pendingNodes > Self.automaticCommitNodes && !commitDue { commitDue = true }
        return true
    }

    /// Unmaps a volume's chunks in `chunks`; chunks nobody else uses are reusable after the next commit.
    func unmap(volume id: UInt64, name volumeName: String, chunks: ClosedRange<UInt64>) async throws {
        var record = try requireRecord(id, name: volumeName)
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(in: chunks, root: record.root, store: area) { key, value in
            found.append((key, value))
            return true
        }
        let mappings = openMappings(of: id)
        for (key, physical) in found {
            mappings?.forget(key, holding: self)
            record.root = try await MetadataBTree.remove(key, root: record.root, in: area, values: self).root
            try await adjustReferences(physical, by: -1)
            record.mappedChunks -= 1
        }
        records[id] = record
        dirtyRecords.insert(id)
    }

    /// The mapped chunks of a volume in `chunks`, in order.
    func mappedChunks(volume id: UInt64, name volumeName: String, in chunks: ClosedRange<UInt64>) async throws
        -> [UInt64]
    {
        let record = try requireRecord(id, name: volumeName)
        var result: [UInt64] = []
        try await MetadataBTree.forEach(in: chunks, root: record.root, store: area) { key, _ in
            result.append(key)
            return true
        }
        return result
    }
}
