/// Which volume a copy holds: the pool's UUID, the volume's id in it and its creation time (ids are
/// never reused in a pool), with the name it had (for messages only: a rename keeps the identity).
/// Image files made by an export record it (docs/FORMATS.md, "Copies and deltas"), delta files name
/// their base and target by it, and a read-only volume restored from a copy keeps it in its record
/// (fields 14-17), so that changes are applied only onto the contents they were taken against.
struct VolumeIdentity: Equatable, Sendable, CustomStringConvertible {
    var poolUUID: SpindleUUID
    var volumeID: UInt64
    var createdSeconds: UInt64
    /// POOL/VOLUME when the identity was taken; empty when not known (a record keeps none).
    var name: String

    init(poolUUID: SpindleUUID, volumeID: UInt64, createdSeconds: UInt64, name: String) {
        self.poolUUID = poolUUID
        self.volumeID = volumeID
        self.createdSeconds = createdSeconds
        self.name = name
    }

    init(pool: ThinPool, volume: ThinPool.VolumeInfo) {
        self.init(
            poolUUID: pool.uuid, volumeID: volume.id, createdSeconds: volume.createdSeconds,
            name: "\(pool.name)/\(volume.name)")
    }

    var description: String {
        name.isEmpty ? "volume \(volumeID) of pool \(poolUUID)" : "\(name) (volume \(volumeID) of pool \(poolUUID))"
    }

    /// Whether two identities name the same volume (names may differ).
    func sameVolume(as other: VolumeIdentity) -> Bool {
        poolUUID == other.poolUUID && volumeID == other.volumeID && createdSeconds == other.createdSeconds
    }

    /// As text: version 1, the UUID, the id, the creation time, the name.
    var encoded: String { "1 \(poolUUID) \(volumeID) \(createdSeconds) \(name)" }

    init?(decoding text: String) {
        let fields = text.split(separator: " ", maxSplits: 4, omittingEmptySubsequences: false).map(String.init)
        guard fields.count == 5, fields[0] == "1", let uuid = SpindleUUID(text: fields[1]),
            let id = UInt64(fields[2]), let created = UInt64(fields[3])
        else { return nil }
        self.init(poolUUID: uuid, volumeID: id, createdSeconds: created, name: fields[4])
    }
}

extension SpindleUUID {
    /// Parses 32 hex digits, with or without dashes.
    init?(text: String) {
        let hex = text.replacingOccurrences(of: "-", with: "")
        guard hex.count == 32, let high = UInt64(hex.prefix(16), radix: 16), let low = UInt64(hex.suffix(16), radix: 16)
        else { return nil }
        self.init(high: high, low: low)
    }
}
