import Glibc

extension ThinPool {
    /// A volume's description.
    public struct VolumeInfo: Sendable, Codable, Equatable {
        public var id: UInt64
        public var name: String
        public var sizeBytes: UInt64
        /// Chunks the volume maps (its own and those it shares with snapshots or its origin).
        public var mappedChunks: UInt64
        /// The volume this one is a snapshot of, when it still exists.
        public var origin: String?
        public var readOnly: Bool
        /// Seconds since 1970 when the volume was created.
        public var createdSeconds: UInt64
    }

    /// How a volume's mapped chunks divide between its own and those shared with other volumes.
    public struct VolumeUsage: Sendable, Codable, Equatable {
        public var name: String
        public var mappedChunks: UInt64
        /// Chunks only this volume uses: what deleting it would free.
        public var exclusiveChunks: UInt64
        public var sharedChunks: UInt64 { mappedChunks - exclusiveChunks }
    }

    /// Creates a volume of `sizeBytes` (a multiple of 4 KiB); its space is allocated on first write.
    /// Over-provisioning is allowed (see ``warnings()``).
    public func createVolume(name volumeName: String, sizeBytes: UInt64) async throws -> ThinVolume {
        try checkName(volumeName)
        try checkSize(sizeBytes)
        let (record, mappings) = try await withState { state in
            try state.requireUnused(volumeName)
            let root = try await MetadataBTree.create(in: state.area)
            let record = VolumeRecord(
                id: state.nextVolumeID(), name: volumeName, sizeBytes: sizeBytes, root: root, mappedChunks: 0,
                origin: 0, readOnly: false, createdSeconds: Self.now())
            state.update(record)
            try await state.commit()
            return (record, state.mappings(opening: record))
        }
        return ThinVolume(
            pool: self, mappings: mappings, name: record.name, sizeBytes: record.sizeBytes, readOnly: record.readOnly)
    }

    /// Takes a snapshot of a volume (or of a snapshot): a new volume that shares every chunk of the
    /// origin as it is now. No data is copied and the time does not grow with the volume: the
    /// snapshot refers to the origin's mapping tree, and the two part node by node as either is
    /// written. Writes to the origin that completed before this call are in the snapshot; writes
    /// still in flight finish first.
    @discardableResult
    public func snapshot(volume originName: String, name snapshotName: String, readOnly: Bool = false) async throws
        -> VolumeInfo
    {
        try checkName(snapshotName)
        return try await withState { state in
            let origin = try state.requireVolume(originName)
            try state.requireUnused(snapshotName)
            // Writes in place to the origin's chunks must land before the chunks become shared: its
            // table forgets them first, so that later writes look them up again and copy them.
            state.openMappings(of: origin.id)?.forgetAll(holding: state)
            await state.inFlight.drain()
            state.area.addReference(to: origin.root)
            let record = VolumeRecord(
                id: state.nextVolumeID(), name: snapshotName, sizeBytes: origin.sizeBytes, root: origin.root,
                mappedChunks: origin.mappedChunks, origin: origin.id, readOnly: readOnly, createdSeconds: Self.now())
            state.update(record)
            try await state.commit()
            return state.info(record)
        }
    }

    /// Opens an existing volume.
    public func openVolume(name volumeName: String) async throws -> ThinVolume {
        let (record, mappings) = try await withState { state in
            let record = try state.requireVolume(volumeName)
            return (record, state.mappings(opening: record))
        }
        return ThinVolume(
            pool: self, mappings: mappings, name: record.name, sizeBytes: record.sizeBytes, readOnly: record.readOnly)
    }

    /// Every volume, by id.
    public func volumes() async throws -> [VolumeInfo] {
        await withState { state in state.records.values.sorted { $0.id < $1.id }.map(state.info) }
    }

    /// Exclusive and shared chunks of every volume: one walk of the reference-count tree and one of
    /// each volume's unshared metadata nodes, children read many at once. Time grows with the
    /// metadata (about a second per 10^7 mappings once cached), so this is for status, not for hot paths.
    public func volumeUsage() async throws -> [VolumeUsage] {
        try await withState { state in
            let exclusive = try await state.exclusiveChunks()
            return state.records.values.sorted(by: { $0.id < $1.id }).map { record in
                VolumeUsage(
                    name: record.name, mappedChunks: record.mappedChunks, exclusiveChunks: exclusive[record.id] ?? 0)
            }
        }
    }

    /// Changes a volume's size. Growing adds unwritten (zero) space; shrinking frees the chunks past
    /// the new end and zeroes the rest of the chunk the new end cuts, so a later grow reads zeros.
    /// Open ``ThinVolume`` objects keep the size they were opened with: open the volume again.
    public func resizeVolume(name volumeName: String, sizeBytes: UInt64) async throws {
        try checkSize(sizeBytes)
        let (record, mappings) = try await withState { state in
            let record = try state.requireVolume(volumeName)
            return (record, state.mappings(opening: record))
        }
        if sizeBytes < record.sizeBytes, sizeBytes % chunkBytes != 0 {
            // Through the write path, so a chunk shared with a snapshot is copied, not changed.
            let volume = ThinVolume(
                pool: self, mappings: mappings, name: record.name, sizeBytes: record.sizeBytes, readOnly: false)
            let end = min(record.sizeBytes, (sizeBytes / chunkBytes + 1) * chunkBytes)
            try await volume.writeZeroes(offset: sizeBytes, length: end - sizeBytes)
        }
        try await withState { state in
            if try sizeBytes < state.requireRecord(record.id, name: volumeName).sizeBytes {
                let firstWhole = (sizeBytes + chunkBytes - 1) / chunkBytes
                try await state.unmap(
                    volume: record.id, name: volumeName, chunks: firstWhole...(Self.maximumVolumeChunks - 1))
            }
            var current = try state.requireRecord(record.id, name: volumeName)
            current.sizeBytes = sizeBytes
            current.copyOf = nil  // its contents are no longer the copy's
            state.update(current)
            try await state.commit()
        }
    }

    /// Renames a volume.
    public func renameVolume(name volumeName: String, to newName: String) async throws {
        try checkName(newName)
        try await withState { state in
            var record = try state.requireVolume(volumeName)
            try state.requireUnused(newName)
            record.name = newName
            state.update(record)
            try await state.commit()
        }
    }

    /// Marks a volume read-only or writable (which forgets that it holds a copy of another volume,
    /// see ``contentIdentity(of:)``).
    public func setReadOnly(name volumeName: String, _ readOnly: Bool) async throws {
        try await withState { state in
            var record = try state.requireVolume(volumeName)
            record.readOnly = readOnly
            // A writable volume may change: it holds no copy any more.
            if !readOnly { record.copyOf = nil }
            state.update(record)
            try await state.commit()
        }
    }

    /// What a volume's contents are a copy of: the volume it was restored from
    /// (``importImage(at:into:sizeBytes:readOnly:engine:progress:)``, ``importDelta(at:into:base:engine:progress:)``), or for a
    /// read-only volume, itself; nil for a writable one (its contents may change).
    func contentIdentity(of volumeName: String) async throws -> VolumeIdentity? {
        try await withState { state in
            let record = try state.requireVolume(volumeName)
            guard record.readOnly else { return nil }
            return record.copyOf
                ?? VolumeIdentity(
                    poolUUID: uuid, volumeID: record.id, createdSeconds: record.createdSeconds,
                    name: "\(name)/\(record.name)")
        }
    }

    /// Records that read-only volume `volumeName` holds a copy of `identity`.
    func recordCopy(_ identity: VolumeIdentity, in volumeName: String) async throws {
        try await withState { state in
            var record = try state.requireVolume(volumeName)
            record.readOnly = true
            record.copyOf = identity
            state.update(record)
            try await state.commit()
        }
    }

    // MARK: Names and sizes

    static func now() -> UInt64 { UInt64(max(0, time(nil))) }

    private func checkName(_ volumeName: String) throws(SpindleError) {
        guard !volumeName.isEmpty, volumeName.utf8.count <= 64, !volumeName.contains("/"),
            !volumeName.contains(where: \.isWhitespace)
        else {
            throw SpindleError(
                .invalidArgument, "the volume name '\(volumeName)' must be 1 to 64 bytes without '/' or spaces")
        }
    }

    private func checkSize(_ sizeBytes: UInt64) throws(SpindleError) {
        guard sizeBytes > 0, sizeBytes % 4096 == 0, sizeBytes / chunkBytes < Self.maximumVolumeChunks else {
            throw SpindleError(.invalidArgument, "the volume size \(sizeBytes) must be a positive multiple of 4 KiB")
        }
    }
}

/// Volume records by name (callers have the state, so they hold the pool's lock).
extension PoolState {
    func info(_ record: VolumeRecord) -> ThinPool.VolumeInfo {
        ThinPool.VolumeInfo(
            id: record.id, name: record.name, sizeBytes: record.sizeBytes, mappedChunks: record.mappedChunks,
            origin: record.origin == 0 ? nil : records[record.origin]?.name, readOnly: record.readOnly,
            createdSeconds: record.createdSeconds)
    }

    func nextVolumeID() -> UInt64 {
        let id = area.parameters[ThinPool.Parameter.nextVolume.rawValue]
        area.parameters[ThinPool.Parameter.nextVolume.rawValue] = id + 1
        return id
    }

    func requireVolume(_ volumeName: String) throws(SpindleError) -> VolumeRecord {
        guard let record = records.values.first(where: { $0.name == volumeName }) else {
            let known = records.values.map(\.name).sorted()
            throw SpindleError(
                .notFound,
                "pool \(name) has no volume named '\(volumeName)'\(known.isEmpty ? " (it has no volumes)" : "; it has \(known.joined(separator: ", "))")"
            )
        }
        return record
    }

    func requireUnused(_ volumeName: String) throws(SpindleError) {
        if records.values.contains(where: { $0.name == volumeName }) {
            throw SpindleError(.alreadyExists, "pool \(name) has a volume named '\(volumeName)' already")
        }
    }

    /// The mapping table of an open volume: the one its other open objects use, or a new one.
    func mappings(opening record: VolumeRecord) -> VolumeMappings {
        if let open = openMappings(of: record.id) { return open }
        openMappingTables = openMappingTables.filter { $0.value.mappings != nil }
        let mappings = VolumeMappings(id: record.id, chunks: (record.sizeBytes + chunkBytes - 1) / chunkBytes)
        openMappingTables[record.id] = WeakMappings(mappings: mappings)
        return mappings
    }

    /// The mapping table of a volume, when the volume is open.
    func openMappings(of id: UInt64) -> VolumeMappings? {
        openMappingTables[id]?.mappings
    }

    /// Stores a changed record, to be written at the next commit.
    func update(_ record: VolumeRecord) {
        records[record.id] = record
        dirtyRecords.insert(record.id)
    }
}
