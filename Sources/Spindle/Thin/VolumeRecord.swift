/// A volume's record, kept in memory and written to the volumes tree at each commit.
struct VolumeRecord: Sendable {
    var id: UInt64
    var name: String
    var sizeBytes: UInt64
    var root: UInt64
    var mappedChunks: UInt64
    var origin: UInt64
    var readOnly: Bool
    var createdSeconds: UInt64
    /// Deleted, its mappings being freed in steps (flag 2): not a volume any more, only chunks to
    /// give back (see ``ThinPool/deleteVolume(name:)``).
    var deleting = false
    /// For a read-only volume restored from a copy (an image file or a delta), the volume that copy
    /// was of: what changes taken since that volume may be applied onto (fields 14-17; nil: none).
    var copyOf: VolumeIdentity?

    /// Fields per record in the volumes tree (keys `id << 8 | field`).
    static let fields: UInt64 = 18
}

/// The record codec: volume records and the pool's own fields, as entries of the volumes tree.
extension PoolState {
    /// Writes a record as the fields of the volumes tree: 0 size, 1–8 name, 9 mapping root,
    /// 10 mapped chunks, 11 origin id, 12 flags (1 = read-only, 2 = deleted, being freed), 13 creation
    /// time, 14–17 the volume it is a copy of (pool UUID high and low, volume id, creation time; all
    /// zero for none).
    func storeRecord(_ record: VolumeRecord) async throws {
        var root = area.roots[ThinPool.Root.volumes.rawValue]
        var nameBytes = Array(record.name.utf8)
        nameBytes += [UInt8](repeating: 0, count: 64 - nameBytes.count)
        var fields: [UInt64] = [record.sizeBytes]
        for word in 0..<8 {
            fields.append(nameBytes[(word * 8)..<(word * 8 + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        }
        fields += [
            record.root, record.mappedChunks, record.origin, (record.readOnly ? 1 : 0) | (record.deleting ? 2 : 0),
            record.createdSeconds, record.copyOf?.poolUUID.high ?? 0, record.copyOf?.poolUUID.low ?? 0,
            record.copyOf?.volumeID ?? 0, record.copyOf?.createdSeconds ?? 0,
        ]
        for (field, value) in fields.enumerated() {
            root = try await MetadataBTree.insert(record.id << 8 | UInt64(field), value: value, root: root, in: area)
        }
        area.roots[ThinPool.Root.volumes.rawValue] = root
    }

    /// Removes a record's fields from the volumes tree.
    func removeRecord(_ id: UInt64) async throws {
        var root = area.roots[ThinPool.Root.volumes.rawValue]
        for field in 0..<VolumeRecord.fields {
            root = try await MetadataBTree.remove(id << 8 | field, root: root, in: area).root
        }
        area.roots[ThinPool.Root.volumes.rawValue] = root
    }

    /// The pool's own fields in the volumes tree, under id 0: field 0 counts chunks with more than
    /// one referrer (zero means no write needs to look up a chunk's reference count).
    func storePoolFields() async throws {
        area.roots[ThinPool.Root.volumes.rawValue] = try await MetadataBTree.insert(
            0, value: sharedChunks, root: area.roots[ThinPool.Root.volumes.rawValue], in: area)
    }

    /// Reads the pool's fields and every record (on open).
    func loadRecords() async throws {
        if let shared = try await MetadataBTree.lookup(0, root: area.roots[ThinPool.Root.volumes.rawValue], in: area) {
            sharedChunks = shared
        } else {
            try await MetadataBTree.forEach(
                in: 0...UInt64.max, root: area.roots[ThinPool.Root.referenceCounts.rawValue], store: area
            ) { _, count in
                if count >= 2 { sharedChunks += 1 }
                return true
            }
        }
        var fields: [UInt64: [UInt64]] = [:]
        try await MetadataBTree.forEach(
            in: (1 << 8)...UInt64.max, root: area.roots[ThinPool.Root.volumes.rawValue], store: area
        ) { key, value in
            let field = Int(key & 0xFF)
            guard field < VolumeRecord.fields else { return true }
            fields[key >> 8, default: [UInt64](repeating: 0, count: Int(VolumeRecord.fields))][field] = value
            return true
        }
        for (id, values) in fields {
            var bytes: [UInt8] = []
            for word in values[1...8] {
                for shift in stride(from: 0, to: 64, by: 8) {
                    bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift)))
                }
            }
            let volumeName = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            guard values[9] >= 2, values[9] < area.blockCount, !volumeName.isEmpty else {
                throw SpindleError(
                    .corrupted,
                    "pool \(name)'s record of volume \(id) is corrupt (name '\(volumeName)', mapping root \(values[9]))",
                    operation: "open pool", path: layout.devices[0].name)
            }
            // Records written before fields 14-17 existed read them as zeros: no copy.
            let copyUUID = SpindleUUID(high: values[14], low: values[15])
            let record = VolumeRecord(
                id: id, name: volumeName, sizeBytes: values[0], root: values[9], mappedChunks: values[10],
                origin: values[11], readOnly: values[12] & 1 != 0, createdSeconds: values[13],
                deleting: values[12] & 2 != 0,
                copyOf: copyUUID == .zero
                    ? nil
                    : VolumeIdentity(poolUUID: copyUUID, volumeID: values[16], createdSeconds: values[17], name: ""))
            if record.deleting { deleting[id] = record } else { records[id] = record }
        }
    }
}
