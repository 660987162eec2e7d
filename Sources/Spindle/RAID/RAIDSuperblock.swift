extension String {
    /// Nil for the empty string.
    var nonEmpty: String? { isEmpty ? nil : self }

    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        split(separator: Character(target), omittingEmptySubsequences: false).joined(separator: replacement)
    }
}

/// The state of one member slot, as the array records it.
public enum RAIDMemberState: UInt32, Codable, Sendable, CustomStringConvertible {
    /// No device in this slot.
    case missing = 0
    /// In sync and serving I/O.
    case active = 1
    /// Failed or marked failed; not used.
    case faulty = 2
    /// Being rebuilt; serves writes, and reads below the rebuild checkpoint.
    case rebuilding = 3

    public var description: String {
        switch self {
        case .missing: return "missing"
        case .active: return "active"
        case .faulty: return "faulty"
        case .rebuilding: return "rebuilding"
        }
    }
}

/// The on-disk description of an array, kept on every member (format version 1).
///
/// Each member holds two 4 KiB copies, at byte 0 and byte 4096. Every update bumps ``events`` and is
/// written to the copy numbered `events % 2` of each member (with FUA), so a write torn by a crash
/// spoils at most one copy and the other still holds the previous state. Reading takes the valid copy
/// with the higher event count.
///
/// Layout (little-endian), see docs/FORMATS.md:
/// ```
///   0  magic "SPNDLRAI"        8   format version (1)       12  header bytes (4096)
///  16  array UUID             32   member UUID              48  array name (64 bytes, UTF-8, zero-padded)
/// 112  level                 116   layout (0 = left-symmetric)
/// 120  chunk bytes           124   member count             128  role (slot, or -1 for a spare)
/// 132  flags (1 = dirty)     136   events                   144  data offset (bytes)
/// 152  member data bytes     160   created (Unix seconds)
/// 168  rebuild slot (-1 = none)                             176  rebuild checkpoint (member data bytes)
/// 184  bitmap offset         192   bitmap bytes             196  bitmap chunk shift (member bytes per bit = 1 << shift)
/// 256  slot table: 64 entries of 32 bytes: member UUID (16), state (4), reserved (12)
/// 2304 last known member file names: 64 entries of 24 bytes (UTF-8, zero-padded; zeros when unknown)
/// 4092 CRC32C of bytes 0 ..< 4092
/// ```
public struct RAIDSuperblock: Sendable, Equatable {
    public static let blockBytes = 4096
    public static let magic: UInt64 = 0x4941_524C_444E_5053  // "SPNDLRAI" little-endian
    public static let formatVersion: UInt32 = 1
    public static let maximumMembers = 64
    /// Byte offsets of the two copies.
    public static let copyOffsets: [UInt64] = [0, 4096]

    public struct Slot: Sendable, Equatable {
        public var member: SpindleUUID
        public var state: RAIDMemberState
        /// The file name (last path component) the member last had, at most ``nameBytes`` bytes;
        /// empty when unknown. Lets a missing member be named after its file is gone.
        public var lastKnownName: String
        public init(member: SpindleUUID, state: RAIDMemberState, lastKnownName: String = "") {
            self.member = member
            self.state = state
            self.lastKnownName = Self.shortened(lastKnownName)
        }

        /// Bytes kept of a last known name.
        public static let nameBytes = 24
        /// Offset of the name table (64 entries of ``nameBytes``).
        static let nameTableOffset = 2304

        /// The last path component of `name`, cut to ``nameBytes`` bytes on a character boundary.
        static func shortened(_ name: String) -> String {
            var short = Substring(name.split(separator: "/").last ?? "")
            while short.utf8.count > nameBytes { short = short.dropLast() }
            return String(short)
        }
    }

    public var arrayUUID: SpindleUUID
    public var memberUUID: SpindleUUID
    public var name: String
    public var level: RAIDLevel
    public var chunkBytes: UInt32
    public var memberCount: Int
    /// Slot this member fills, or -1 for a spare.
    public var role: Int
    public var dirty: Bool
    public var events: UInt64
    public var dataOffset: UInt64
    public var memberDataBytes: UInt64
    public var createdSeconds: UInt64
    /// Slot being rebuilt, or -1.
    public var rebuildSlot: Int
    /// Member data bytes rebuilt so far on ``rebuildSlot``.
    public var rebuildCheckpointBytes: UInt64
    public var bitmapOffset: UInt64
    public var bitmapBytes: UInt32
    public var bitmapChunkShift: UInt32
    public var slots: [Slot]

    /// Why a block is not a usable superblock.
    public enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        /// No Spindle array magic: not a member of any array.
        case notAMember
        case unsupportedVersion(UInt32)
        case checksumMismatch(stored: UInt32, computed: UInt32)
        case invalid(String)
        /// A read error: the device answered, but a superblock copy could not be read.
        case unreadable(String)

        public var description: String {
            switch self {
            case let .unreadable(reason): return reason
            case .notAMember: return "no Spindle array superblock (not an array member)"
            case let .unsupportedVersion(version):
                return
                    "superblock format version \(version) is not supported (this Spindle reads version \(RAIDSuperblock.formatVersion))"
            case let .checksumMismatch(stored, computed):
                return "corrupt superblock: checksum \(hex(stored)) stored, \(hex(computed)) computed"
            case let .invalid(reason): return "corrupt superblock: \(reason)"
            }
        }
    }

    public var geometry: RAIDGeometry {
        RAIDGeometry(
            level: level, memberCount: memberCount, chunkBytes: UInt64(chunkBytes), memberDataBytes: memberDataBytes)
    }

    /// The 4 KiB on-disk form.
    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.blockBytes)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) { bytes.putLittleEndian(value, at: offset) }
        func put(_ uuid: SpindleUUID, at offset: Int) {
            put(uuid.high, at: offset)
            put(uuid.low, at: offset + 8)
        }
        put(Self.magic, at: 0)
        put(Self.formatVersion, at: 8)
        put(UInt32(Self.blockBytes), at: 12)
        put(arrayUUID, at: 16)
        put(memberUUID, at: 32)
        let nameBytes = Array(name.utf8.prefix(63))
        bytes.replaceSubrange(48..<(48 + nameBytes.count), with: nameBytes)
        put(UInt32(level.rawValue), at: 112)
        put(UInt32(0), at: 116)
        put(chunkBytes, at: 120)
        put(UInt32(memberCount), at: 124)
        put(Int32(role), at: 128)
        put(UInt32(dirty ? 1 : 0), at: 132)
        put(events, at: 136)
        put(dataOffset, at: 144)
        put(memberDataBytes, at: 152)
        put(createdSeconds, at: 160)
        put(Int32(rebuildSlot), at: 168)
        put(rebuildCheckpointBytes, at: 176)
        put(bitmapOffset, at: 184)
        put(bitmapBytes, at: 192)
        put(bitmapChunkShift, at: 196)
        for (index, slot) in slots.enumerated() {
            put(slot.member, at: 256 + index * 32)
            put(slot.state.rawValue, at: 256 + index * 32 + 16)
            let name = Array(slot.lastKnownName.utf8.prefix(Slot.nameBytes))
            bytes.replaceSubrange(
                (Slot.nameTableOffset + index * Slot.nameBytes)..<(Slot.nameTableOffset + index * Slot.nameBytes
                    + name.count), with: name)
        }
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        put(checksum, at: 4092)
        return bytes
    }

    /// Parses and validates a 4 KiB block.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(Problem) -> RAIDSuperblock {
        guard bytes.count >= blockBytes else { throw .invalid("block is \(bytes.count) bytes, not \(blockBytes)") }
        func get<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T { bytes.littleEndian(type, at: offset) }
        func uuid(_ offset: Int) -> SpindleUUID {
            SpindleUUID(high: get(UInt64.self, offset), low: get(UInt64.self, offset + 8))
        }
        guard get(UInt64.self, 0) == magic else { throw .notAMember }
        let version = get(UInt32.self, 8)
        guard version == formatVersion else { throw .unsupportedVersion(version) }
        let stored = get(UInt32.self, 4092)
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<4092]))
        guard stored == computed else { throw .checksumMismatch(stored: stored, computed: computed) }
        guard get(UInt32.self, 12) == UInt32(blockBytes) else { throw .invalid("header size \(get(UInt32.self, 12))") }
        guard let level = RAIDLevel(rawValue: Int(get(UInt32.self, 112))) else {
            throw .invalid("unknown RAID level \(get(UInt32.self, 112))")
        }
        guard get(UInt32.self, 116) == 0 else { throw .invalid("unknown layout \(get(UInt32.self, 116))") }
        let chunk = get(UInt32.self, 120)
        guard chunk >= 512, chunk & (chunk - 1) == 0 else {
            throw .invalid("chunk size \(chunk) is not a power of two of at least 512")
        }
        let members = Int(get(UInt32.self, 124))
        guard members >= level.minimumMembers, members <= maximumMembers else {
            throw .invalid("\(members) members for \(level)")
        }
        let role = Int(get(Int32.self, 128))
        guard role >= -1, role < members else { throw .invalid("role \(role) of \(members) members") }
        let dataBytes = get(UInt64.self, 152)
        guard dataBytes % UInt64(chunk) == 0, dataBytes > 0 else {
            throw .invalid("member data size \(dataBytes) is not a whole number of chunks")
        }
        let rebuildSlot = Int(get(Int32.self, 168))
        guard rebuildSlot >= -1, rebuildSlot < members else { throw .invalid("rebuild slot \(rebuildSlot)") }
        var slots: [Slot] = []
        for index in 0..<members {
            guard let state = RAIDMemberState(rawValue: get(UInt32.self, 256 + index * 32 + 16)) else {
                throw .invalid("slot \(index) has an unknown state")
            }
            let nameStart = Slot.nameTableOffset + index * Slot.nameBytes
            let name = Array(
                UnsafeRawBufferPointer(rebasing: bytes[nameStart..<(nameStart + Slot.nameBytes)]).prefix { $0 != 0 })
            slots.append(
                Slot(member: uuid(256 + index * 32), state: state, lastKnownName: String(decoding: name, as: UTF8.self))
            )
        }
        let nameBytes = Array(UnsafeRawBufferPointer(rebasing: bytes[48..<112]).prefix { $0 != 0 })
        return RAIDSuperblock(
            arrayUUID: uuid(16), memberUUID: uuid(32), name: String(decoding: nameBytes, as: UTF8.self), level: level,
            chunkBytes: chunk, memberCount: members, role: role, dirty: get(UInt32.self, 132) & 1 != 0,
            events: get(UInt64.self, 136), dataOffset: get(UInt64.self, 144), memberDataBytes: dataBytes,
            createdSeconds: get(UInt64.self, 160), rebuildSlot: rebuildSlot,
            rebuildCheckpointBytes: get(UInt64.self, 176), bitmapOffset: get(UInt64.self, 184),
            bitmapBytes: get(UInt32.self, 192), bitmapChunkShift: get(UInt32.self, 196), slots: slots)
    }
}
