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
        let record: VolumeRecord = try await lock.withLock {
            try requireUnused(volumeName)
            let root = try await MetadataBTree.create(in: area)
            let record = VolumeRecord(id: nextVolumeID(), name: volumeName, sizeBytes: sizeBytes, root: root, mappedChunks: 0,
                                      origin: 0, readOnly: false, createdSeconds: Self.now())
            records[record.id] = record
            dirtyRecords.insert(record.id)
            try await commitLocked()
            return record
        }
        return ThinVolume(pool: self, record: record)
    }

    /// Takes a snapshot of a volume (or of a snapshot): a new volume that shares every chunk of the
    /// origin as it is now. No data is copied and the time does not grow with the volume: the
    /// snapshot refers to the origin's mapping tree, and the two part node by node as either is
    /// written. Writes to the origin that completed before this call are in the snapshot; writes
    /// still in flight finish first.
    @discardableResult
    public func snapshot(volume originName: String, name snapshotName: String, readOnly: Bool = false) async throws -> VolumeInfo {
        try checkName(snapshotName)
        return try await lock.withLock {
            let origin = try requireVolume(originName)
            try requireUnused(snapshotName)
            // Writes in place to the origin's chunks must land before the chunks become shared.
            await inFlight.drain()
            area.addReference(to: origin.root)
            let record = VolumeRecord(id: nextVolumeID(), name: snapshotName, sizeBytes: origin.sizeBytes, root: origin.root,
                                      mappedChunks: origin.mappedChunks, origin: origin.id, readOnly: readOnly, createdSeconds: Self.now())
            records[record.id] = record
            dirtyRecords.insert(record.id)
            try await commitLocked()
            return info(record)
        }
    }

    /// Opens an existing volume.
    public func openVolume(name volumeName: String) async throws -> ThinVolume {
        let record = try await lock.withLock { try requireVolume(volumeName) }
        return ThinVolume(pool: self, record: record)
    }

    /// Every volume, by id.
    public func volumes() async throws -> [VolumeInfo] {
        await lock.withLock { records.values.sorted { $0.id < $1.id }.map(info) }
    }

    /// Exclusive and shared chunks of every volume. Walks every mapping tree: time grows with the
    /// metadata, so this is for status, not for hot paths.
    public func volumeUsage() async throws -> [VolumeUsage] {
        try await lock.withLock {
            var result: [VolumeUsage] = []
            for record in records.values.sorted(by: { $0.id < $1.id }) {
                var exclusive: UInt64 = 0
                try await forEachMapping(root: record.root) { _, physical, shared in
                    if !shared, try await referenceCount(of: physical) == 1 { exclusive += 1 }
                }
                result.append(VolumeUsage(name: record.name, mappedChunks: record.mappedChunks, exclusiveChunks: exclusive))
            }
            return result
        }
    }

    /// Deletes a volume or snapshot, in any order: chunks no other volume shares return to the pool
    /// when the deletion commits (it does, before this returns). Time grows with what the volume
    /// owned alone, not with what it shared.
    public func deleteVolume(name volumeName: String) async throws {
        try await lock.withLock {
            let record = try requireVolume(volumeName)
            if damagedVolumes[record.id] == nil {
                try await MetadataBTree.release(tree: record.root, in: area, values: dataReferences)
            }
            // A damaged tree cannot be walked: the volume goes, and `check` reports the chunks it
            // held as leaked rather than guessing which are free.
            damagedVolumes[record.id] = nil
            var root = area.roots[Root.volumes.rawValue]
            for field in 0..<Self.recordFields {
                root = try await MetadataBTree.remove(record.id << 8 | field, root: root, in: area).root
            }
            area.roots[Root.volumes.rawValue] = root
            records[record.id] = nil
            dirtyRecords.remove(record.id)
            try await commitLocked()
        }
    }

    /// Changes a volume's size. Growing adds unwritten (zero) space; shrinking frees the chunks past
    /// the new end and zeroes the rest of the chunk the new end cuts, so a later grow reads zeros.
    /// Open ``ThinVolume`` objects keep the size they were opened with: open the volume again.
    public func resizeVolume(name volumeName: String, sizeBytes: UInt64) async throws {
        try checkSize(sizeBytes)
        let record = try await lock.withLock { try requireVolume(volumeName) }
        if sizeBytes < record.sizeBytes, sizeBytes % chunkBytes != 0 {
            // Through the write path, so a chunk shared with a snapshot is copied, not changed.
            let volume = ThinVolume(pool: self, record: record, ignoreReadOnly: true)
            let end = min(record.sizeBytes, (sizeBytes / chunkBytes + 1) * chunkBytes)
            try await volume.writeZeroes(offset: sizeBytes, length: end - sizeBytes)
        }
        try await lock.withLock {
            guard var current = records[record.id] else { throw deletedError(volumeName) }
            if sizeBytes < current.sizeBytes {
                let firstWhole = (sizeBytes + chunkBytes - 1) / chunkBytes
                try await unmapLocked(&current, chunks: firstWhole...(Self.maximumVolumeChunks - 1))
            }
            current.sizeBytes = sizeBytes
            records[record.id] = current
            dirtyRecords.insert(record.id)
            try await commitLocked()
        }
    }

    /// Renames a volume.
    public func renameVolume(name volumeName: String, to newName: String) async throws {
        try checkName(newName)
        try await lock.withLock {
            var record = try requireVolume(volumeName)
            try requireUnused(newName)
            record.name = newName
            records[record.id] = record
            dirtyRecords.insert(record.id)
            try await commitLocked()
        }
    }

    /// Marks a volume read-only or writable.
    public func setReadOnly(name volumeName: String, _ readOnly: Bool) async throws {
        try await lock.withLock {
            var record = try requireVolume(volumeName)
            record.readOnly = readOnly
            records[record.id] = record
            dirtyRecords.insert(record.id)
            try await commitLocked()
        }
    }

    // MARK: Records (callers hold `lock`)

    func info(_ record: VolumeRecord) -> VolumeInfo {
        VolumeInfo(id: record.id, name: record.name, sizeBytes: record.sizeBytes, mappedChunks: record.mappedChunks,
                   origin: record.origin == 0 ? nil : records[record.origin]?.name, readOnly: record.readOnly,
                   createdSeconds: record.createdSeconds)
    }

    private func nextVolumeID() -> UInt64 {
        let id = area.parameters[Parameter.nextVolume.rawValue]
        area.parameters[Parameter.nextVolume.rawValue] = id + 1
        return id
    }

    static func now() -> UInt64 { UInt64(max(0, time(nil))) }

    func requireVolume(_ volumeName: String) throws(SpindleError) -> VolumeRecord {
        guard let record = records.values.first(where: { $0.name == volumeName }) else {
            let known = records.values.map(\.name).sorted()
            throw SpindleError(.notFound, "pool \(name) has no volume named '\(volumeName)'\(known.isEmpty ? " (it has no volumes)" : "; it has \(known.joined(separator: ", "))")")
        }
        return record
    }

    private func requireUnused(_ volumeName: String) throws(SpindleError) {
        if records.values.contains(where: { $0.name == volumeName }) {
            throw SpindleError(.alreadyExists, "pool \(name) has a volume named '\(volumeName)' already")
        }
    }

    func deletedError(_ volumeName: String) -> SpindleError {
        SpindleError(.notFound, "volume \(volumeName) of pool \(name) was deleted", path: "\(name)/\(volumeName)")
    }

    private func checkName(_ volumeName: String) throws(SpindleError) {
        guard !volumeName.isEmpty, volumeName.utf8.count <= 64, !volumeName.contains("/"), !volumeName.contains(where: \.isWhitespace) else {
            throw SpindleError(.invalidArgument, "the volume name '\(volumeName)' must be 1 to 64 bytes without '/' or spaces")
        }
    }

    private func checkSize(_ sizeBytes: UInt64) throws(SpindleError) {
        guard sizeBytes > 0, sizeBytes % 4096 == 0, sizeBytes / chunkBytes < Self.maximumVolumeChunks else {
            throw SpindleError(.invalidArgument, "the volume size \(sizeBytes) must be a positive multiple of 4 KiB")
        }
    }

    /// Writes a record as the fields of the volumes tree: 0 size, 1–8 name, 9 mapping root,
    /// 10 mapped chunks, 11 origin id, 12 flags (1 = read-only), 13 creation time.
    func storeRecord(_ record: VolumeRecord) async throws {
        var root = area.roots[Root.volumes.rawValue]
        var nameBytes = Array(record.name.utf8)
        nameBytes += [UInt8](repeating: 0, count: 64 - nameBytes.count)
        var fields: [UInt64] = [record.sizeBytes]
        for word in 0..<8 {
            fields.append(nameBytes[(word * 8)..<(word * 8 + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        }
        fields += [record.root, record.mappedChunks, record.origin, record.readOnly ? 1 : 0, record.createdSeconds]
        for (field, value) in fields.enumerated() {
            root = try await MetadataBTree.insert(record.id << 8 | UInt64(field), value: value, root: root, in: area)
        }
        area.roots[Root.volumes.rawValue] = root
    }

    /// The pool's own fields in the volumes tree, under id 0: field 0 counts chunks with more than
    /// one referrer (zero means no write needs to look up a chunk's reference count).
    func storePoolFields() async throws {
        area.roots[Root.volumes.rawValue] = try await MetadataBTree.insert(
            0, value: sharedChunks, root: area.roots[Root.volumes.rawValue], in: area)
    }

    func loadRecords() async throws {
        if let shared = try await MetadataBTree.lookup(0, root: area.roots[Root.volumes.rawValue], in: area) {
            sharedChunks = shared
        } else {
            try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.referenceCounts.rawValue], store: area) { _, count in
                if count >= 2 { sharedChunks += 1 }
                return true
            }
        }
        var fields: [UInt64: [UInt64]] = [:]
        try await MetadataBTree.forEach(in: (1 << 8)...UInt64.max, root: area.roots[Root.volumes.rawValue], store: area) { key, value in
            let field = Int(key & 0xFF)
            guard field < Self.recordFields else { return true }
            fields[key >> 8, default: [UInt64](repeating: 0, count: Int(Self.recordFields))][field] = value
            return true
        }
        for (id, values) in fields {
            var bytes: [UInt8] = []
            for word in values[1...8] { for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) } }
            let volumeName = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            guard values[9] >= 2, values[9] < area.blockCount, !volumeName.isEmpty else {
                throw SpindleError(.ioFailed, "pool \(name)'s record of volume \(id) is corrupt (name '\(volumeName)', mapping root \(values[9]))",
                                   operation: "open pool", path: devices[0].name)
            }
            records[id] = VolumeRecord(id: id, name: volumeName, sizeBytes: values[0], root: values[9], mappedChunks: values[10],
                                       origin: values[11], readOnly: values[12] & 1 != 0, createdSeconds: values[13])
        }
    }

    // MARK: Mappings and chunks (callers hold `lock`)

    /// Calls `body` with each (virtual chunk, pool chunk, whether a node on its path is shared).
    func forEachMapping(root: UInt64, _ body: (UInt64, UInt64, Bool) async throws -> Void) async throws {
        var pending: [(block: UInt64, shared: Bool)] = [(root, false)]
        while let (block, parentShared) = pending.popLast() {
            let shared = parentShared || area.referenceCount(of: block) > 1
            let node = try await area.node(at: block)
            if node.isLeaf {
                for (key, value) in zip(node.keys, node.values) { try await body(key, value, shared) }
            } else {
                for child in node.values.reversed() { pending.append((child, shared)) }
            }
        }
    }

    func referenceCount(of chunk: UInt64) async throws -> UInt64 {
        try await MetadataBTree.lookup(chunk, root: area.roots[Root.referenceCounts.rawValue], in: area) ?? 0
    }

    func adjustReferences(_ chunk: UInt64, by delta: Int) async throws {
        let root = area.roots[Root.referenceCounts.rawValue]
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
            area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.insert(chunk, value: count + UInt64(delta), root: root, in: area)
            return
        }
        precondition(count >= UInt64(-delta), "pool chunk \(chunk) released more often than referenced")
        if count == UInt64(-delta) {
            area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.remove(chunk, root: root, in: area).root
            usedChunks -= 1
            pendingFree.insert(chunk)
        } else {
            area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.insert(chunk, value: count - UInt64(-delta), root: root, in: area)
        }
    }

    /// A free chunk, reserved until ``mapLocked`` or ``returnChunk``, and whether it is clean (has
    /// held no data since it was zeroed). Never-used chunks come first; then free chunks that are
    /// not freed in this transaction (committed mappings may still name them) nor reserved.
    func allocateChunkLocked() async throws -> (chunk: UInt64, clean: Bool) {
        guard usedChunks + UInt64(pendingFree.count + reserved.count) < chunkCount else {
            let percent = chunkCount == 0 ? 100 : usedChunks * 100 / chunkCount
            let waiting = pendingFree.count
            throw SpindleError(
                .noSpace,
                "pool \(name) is full: \(usedChunks) of \(chunkCount) chunks used (\(percent)% of \(ByteSize.format(chunkCount * chunkBytes)))\(waiting == 0 ? "" : "; \(waiting) chunks freed since the last flush come back after it")",
                operation: "allocate", path: name)
        }
        if cleanNext < chunkCount {
            if cleanNext >= dirtyBelow {
                // Record first that the next batch may be written, so a crash leaves it counted dirty.
                dirtyBelow = min(chunkCount, cleanNext + max(1024, chunkCount / 64))
                try await commitLocked()
            }
            let chunk = cleanNext
            cleanNext += 1
            reserved.insert(chunk)
            return (chunk, true)
        }
        let root = area.roots[Root.referenceCounts.rawValue]
        func available(_ chunk: UInt64) -> Bool { !pendingFree.contains(chunk) && !reserved.contains(chunk) }
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

    /// Gives back a reserved chunk that ended up unused.
    func returnChunk(_ chunk: UInt64) {
        reserved.remove(chunk)
    }

    /// Maps `chunk` of a volume to the reserved `physical`, replacing `replacing` (the chunk a
    /// copy-on-write copied from). Returns false, leaving everything as it was, when the mapping is no
    /// longer `replacing` (a concurrent write changed it first): the caller retries.
    func mapLocked(volume id: UInt64, chunk: UInt64, to physical: UInt64, replacing: UInt64?) async throws -> Bool {
        guard var record = records[id] else { throw deletedError("\(id)") }
        let current = try await MetadataBTree.lookup(chunk, root: record.root, in: area)
        guard current == replacing else { return false }
        reserved.remove(physical)
        record.root = try await MetadataBTree.insert(chunk, value: physical, root: record.root, in: area, values: dataReferences)
        try await adjustReferences(physical, by: 1)
        if let replacing {
            try await adjustReferences(replacing, by: -1)
        } else {
            record.mappedChunks += 1
        }
        records[id] = record
        dirtyRecords.insert(id)
        if area.pendingNodes > Self.automaticCommitNodes { try await commitLocked() }
        return true
    }

    /// Unmaps a volume's chunks in `chunks`; chunks nobody else uses are reusable after the next commit.
    func unmapLocked(_ record: inout VolumeRecord, chunks: ClosedRange<UInt64>) async throws {
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(in: chunks, root: record.root, store: area) { key, value in
            found.append((key, value))
            return true
        }
        for (key, physical) in found {
            record.root = try await MetadataBTree.remove(key, root: record.root, in: area, values: dataReferences).root
            try await adjustReferences(physical, by: -1)
            record.mappedChunks -= 1
        }
        dirtyRecords.insert(record.id)
    }
}
