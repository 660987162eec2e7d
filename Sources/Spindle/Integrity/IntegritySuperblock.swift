/// The label of a device formatted for the integrity layer (``IntegrityDevice``), and the layout it
/// describes. Pure: bytes in, fields out; no I/O.
///
/// Layout of the underlying device (`docs/FORMATS.md`, "Integrity layer"):
/// ```
///      0  superblock (4 KiB)          4096  its copy (4 KiB)
///   8192  dirty-region bitmap (4 KiB: one bit per region of 2^regionShift data bytes)
///  65536  checksum area: one little-endian UInt32 per 4 KiB data block, 1024 to a 4 KiB block
///  dataOffset (1 MiB aligned)  data area: dataBytes bytes, exposed as the integrity device
/// ```
/// Superblock fields (little-endian):
/// ```
///   0  magic "SPNDINTG"      8  format version (1)     12  header bytes (4096)
///  16  device UUID (16)     32  data block bytes (4096) 36  crash policy (0 standalone, 1 redundant)
///  40  underlying bytes at format                     48  bitmap offset   56  bitmap bytes (4096)
///  60  region shift         64  checksum offset        72  checksum bytes
///  80  data offset          88  data bytes             96  self-checked bytes
/// 104  created (seconds since 1970)                  4092  CRC32C of bytes 0..<4092
/// ```
public struct IntegritySuperblock: Sendable, Equatable {
    public static let magic: UInt64 = 0x4754_4E49_444E_5053  // "SPNDINTG" little-endian
    public static let formatVersion: UInt32 = 1
    public static let headerBytes = 4096
    /// Where the two copies of the superblock lie.
    public static let copyOffsets: [UInt64] = [0, 4096]
    public static let bitmapOffset: UInt64 = 8192
    public static let bitmapBytes = 4096
    public static let checksumOffset: UInt64 = 65536
    /// The unit a checksum covers, and the integrity device's logical block.
    public static let blockBytes = 4096
    /// Checksums in one 4 KiB block of the checksum area.
    public static let checksumsPerBlock = 1024
    /// The smallest region a superblock may name (a region is the unit re-verified after a crash).
    public static let minimumRegionShift: UInt32 = 20
    /// The region a new device gets, at least: 64 MiB, as the RAID write-intent bitmap's. Smaller
    /// regions cost a FUA bitmap write for every few MiB a sequential load or a rebuild sweeps
    /// (1 MiB regions made a rebuild 30% slower); larger ones cost reading more after a crash.
    public static let defaultRegionShift: UInt32 = 26

    /// What a crash that leaves data and checksums apart is resolved with (see ``IntegrityDevice``).
    public enum CrashPolicy: UInt32, Sendable, Codable, CustomStringConvertible {
        /// No redundancy above: a block that a crash left apart from its checksum keeps its data (each
        /// block holds its old or its new contents by the device contract) and gets a new checksum.
        case standalone = 0
        /// A layer above (RAID) repairs from redundancy first: such blocks read as corrupted until the
        /// owner calls ``IntegrityDevice/resolveSuspects(acceptingRemaining:)``.
        case redundant = 1

        public var description: String { self == .standalone ? "standalone" : "redundant" }
    }

    public var uuid: SpindleUUID
    public var policy: CrashPolicy
    public var underlyingBytes: UInt64
    public var regionShift: UInt32
    public var checksumBytes: UInt64
    public var dataOffset: UInt64
    public var dataBytes: UInt64
    /// The first bytes of the data area that the owner checks itself (its own checksummed headers):
    /// after a crash they keep their data whatever the policy.
    public var selfCheckedBytes: UInt64
    public var createdSeconds: UInt64

    public var dataBlocks: UInt64 { dataBytes / UInt64(Self.blockBytes) }
    public var regionBytes: UInt64 { UInt64(1) << UInt64(regionShift) }
    public var regionCount: Int { Int((dataBytes + regionBytes - 1) / regionBytes) }

    /// Why a block is not a usable integrity superblock.
    public enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        case notFormatted
        case unsupportedVersion(UInt32)
        case checksumMismatch(stored: UInt32, computed: UInt32)
        case invalid(String)
        /// Neither copy could be read (read errors): whether the device has the layer is unknown.
        case unreadable(String)

        public var description: String {
            switch self {
            case .notFormatted: return "no Spindle integrity superblock"
            case let .unreadable(reason): return reason
            case let .unsupportedVersion(version):
                return
                    "integrity superblock format version \(version) is not supported (this Spindle reads version \(IntegritySuperblock.formatVersion))"
            case let .checksumMismatch(stored, computed):
                return "corrupt integrity superblock: checksum \(hex(stored)) stored, \(hex(computed)) computed"
            case let .invalid(reason): return "corrupt integrity superblock: \(reason)"
            }
        }
    }

    // MARK: Layout

    /// The layout for an underlying device of `underlyingBytes`: the most data blocks whose
    /// checksums and data fit, or nil when the device is too small (under 2 MiB).
    public static func layout(
        underlyingBytes: UInt64, uuid: SpindleUUID, policy: CrashPolicy, selfCheckedBytes: UInt64,
        createdSeconds: UInt64
    ) -> IntegritySuperblock? {
        let block = UInt64(blockBytes)
        func dataOffset(_ blocks: UInt64) -> UInt64 {
            let checksumBlocks = (blocks + UInt64(checksumsPerBlock) - 1) / UInt64(checksumsPerBlock)
            return alignUp(checksumOffset + checksumBlocks * block, to: 1 << 20)
        }
        guard underlyingBytes >= 2 << 20 else { return nil }
        // Each data block costs its 4 KiB and 4 bytes of checksum; then step down past the alignment.
        var blocks = (underlyingBytes - checksumOffset) / (block + 4)
        while blocks > 0 && dataOffset(blocks) + blocks * block > underlyingBytes { blocks -= 1 }
        guard blocks > 0 else { return nil }
        let dataBytes = blocks * block
        var shift = defaultRegionShift
        while (dataBytes + (UInt64(1) << UInt64(shift)) - 1) >> UInt64(shift) > UInt64(bitmapBytes * 8) { shift += 1 }
        let checksumBlocks = (blocks + UInt64(checksumsPerBlock) - 1) / UInt64(checksumsPerBlock)
        return IntegritySuperblock(
            uuid: uuid, policy: policy, underlyingBytes: underlyingBytes, regionShift: shift,
            checksumBytes: checksumBlocks * block, dataOffset: dataOffset(blocks), dataBytes: dataBytes,
            selfCheckedBytes: min(selfCheckedBytes, dataBytes), createdSeconds: createdSeconds)
    }

    /// The smallest underlying size (a multiple of 4 KiB) whose layout holds `dataBytes` of data.
    public static func underlyingBytes(forDataBytes dataBytes: UInt64) -> UInt64 {
        let block = UInt64(blockBytes)
        var size = max(2 << 20, alignUp(dataBytes + dataBytes / 1024 + (2 << 20), to: block))
        // Step down while a smaller size still fits (the estimate is generous by up to a MiB or so).
        while size > 2 << 20,
            let smaller = layout(
                underlyingBytes: size - block, uuid: .zero, policy: .standalone, selfCheckedBytes: 0, createdSeconds: 0),
            smaller.dataBytes >= dataBytes
        {
            size -= block
        }
        return size
    }

    static func alignUp(_ value: UInt64, to alignment: UInt64) -> UInt64 {
        (value + alignment - 1) / alignment * alignment
    }

    // MARK: Encoding

    /// The 4 KiB on-disk form.
    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.headerBytes)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) { bytes.putLittleEndian(value, at: offset) }
        put(Self.magic, at: 0)
        put(Self.formatVersion, at: 8)
        put(UInt32(Self.headerBytes), at: 12)
        put(uuid.high, at: 16)
        put(uuid.low, at: 24)
        put(UInt32(Self.blockBytes), at: 32)
        put(policy.rawValue, at: 36)
        put(underlyingBytes, at: 40)
        put(Self.bitmapOffset, at: 48)
        put(UInt32(Self.bitmapBytes), at: 56)
        put(regionShift, at: 60)
        put(Self.checksumOffset, at: 64)
        put(checksumBytes, at: 72)
        put(dataOffset, at: 80)
        put(dataBytes, at: 88)
        put(selfCheckedBytes, at: 96)
        put(createdSeconds, at: 104)
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        put(checksum, at: 4092)
        return bytes
    }

    /// Parses and validates a 4 KiB block read from the start of a device of `underlyingBytes`.
    public static func decode(_ bytes: UnsafeRawBufferPointer, underlyingBytes: UInt64) throws(Problem)
        -> IntegritySuperblock
    {
        guard bytes.count >= headerBytes else { throw .invalid("block is \(bytes.count) bytes, not \(headerBytes)") }
        func get<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T { bytes.littleEndian(type, at: offset) }
        guard get(UInt64.self, 0) == magic else { throw .notFormatted }
        let version = get(UInt32.self, 8)
        guard version == formatVersion else { throw .unsupportedVersion(version) }
        let stored = get(UInt32.self, 4092)
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<4092]))
        guard stored == computed else { throw .checksumMismatch(stored: stored, computed: computed) }
        guard get(UInt32.self, 12) == UInt32(headerBytes) else { throw .invalid("header size \(get(UInt32.self, 12))") }
        guard get(UInt32.self, 32) == UInt32(blockBytes) else {
            throw .invalid("data block size \(get(UInt32.self, 32)); this Spindle checks 4096-byte blocks")
        }
        guard let policy = CrashPolicy(rawValue: get(UInt32.self, 36)) else {
            throw .invalid("unknown crash policy \(get(UInt32.self, 36))")
        }
        guard get(UInt64.self, 48) == bitmapOffset, get(UInt32.self, 56) == UInt32(bitmapBytes),
            get(UInt64.self, 64) == checksumOffset
        else { throw .invalid("the bitmap or checksum area is not where format version 1 puts it") }
        let superblock = IntegritySuperblock(
            uuid: SpindleUUID(high: get(UInt64.self, 16), low: get(UInt64.self, 24)), policy: policy,
            underlyingBytes: get(UInt64.self, 40), regionShift: get(UInt32.self, 60),
            checksumBytes: get(UInt64.self, 72), dataOffset: get(UInt64.self, 80), dataBytes: get(UInt64.self, 88),
            selfCheckedBytes: get(UInt64.self, 96), createdSeconds: get(UInt64.self, 104))
        let block = UInt64(blockBytes)
        guard superblock.dataBytes > 0, superblock.dataBytes % block == 0 else {
            throw .invalid("data size \(superblock.dataBytes) is not a positive number of 4 KiB blocks")
        }
        let neededChecksumBytes =
            (superblock.dataBlocks + UInt64(checksumsPerBlock) - 1) / UInt64(checksumsPerBlock) * block
        guard superblock.checksumBytes == neededChecksumBytes,
            superblock.dataOffset >= checksumOffset + superblock.checksumBytes, superblock.dataOffset % block == 0
        else { throw .invalid("the checksum area (\(superblock.checksumBytes) bytes) does not cover the data") }
        guard superblock.regionShift >= minimumRegionShift, superblock.regionShift < 64,
            superblock.regionCount <= bitmapBytes * 8
        else { throw .invalid("region shift \(superblock.regionShift) does not fit the bitmap") }
        guard superblock.selfCheckedBytes <= superblock.dataBytes else {
            throw .invalid("self-checked size \(superblock.selfCheckedBytes) is past the data")
        }
        guard superblock.dataOffset + superblock.dataBytes <= underlyingBytes else {
            throw .invalid(
                "the data area ends at \(superblock.dataOffset + superblock.dataBytes) bytes, past the end of the device (\(underlyingBytes) bytes; was it truncated?)"
            )
        }
        return superblock
    }
}

/// The checksum of a data block as the integrity layer stores it. Pure.
///
/// CRC32C (ISA-L) of the device UUID, the block's index (little-endian UInt64) and its 4 KiB, so that
/// a block written to the wrong place, or copied from another device, fails its check; XORed with the
/// CRC32 (IEEE) of the 4 KiB. The second CRC is needed: a block that ends with the CRC32C of what
/// precedes it (every Spindle header, and many other formats' blocks) has a CRC32C that does not
/// depend on its contents (the CRC "residue"), so CRC32C alone could not tell an old version of such a
/// block from a new one; a CRC of another polynomial can. A block of zeros stores 0, so a checksum
/// area of zeros (a new, sparse device) describes a data area of zeros; any other block stores its
/// checksum, with 0 mapped to 1.
package struct BlockChecksum: Sendable {
    /// CRC32C of the device UUID: the start every block's checksum continues from.
    let deviceSeed: UInt32

    package init(uuid: SpindleUUID) {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.putLittleEndian(uuid.high, at: 0)
        bytes.putLittleEndian(uuid.low, at: 8)
        deviceSeed = CRC32C.checksum(bytes)
    }

    /// What block `index` holding `data` (4 KiB) stores.
    package func stored(for data: UnsafeRawBufferPointer, index: UInt64) -> UInt32 {
        if Self.isZero(data) { return 0 }
        return crc(data, index: index)
    }

    /// What each 4 KiB block of `data` stores, the first being block `firstIndex`.
    package func stored(forBlocksOf data: UnsafeRawBufferPointer, firstIndex: UInt64) -> [UInt32] {
        let blockBytes = IntegritySuperblock.blockBytes
        return (0..<(data.count / blockBytes)).map { index in
            stored(
                for: UnsafeRawBufferPointer(rebasing: data[(index * blockBytes)..<((index + 1) * blockBytes)]),
                index: firstIndex + UInt64(index))
        }
    }

    /// Whether `data` matches the stored value `stored` of block `index`.
    package func matches(_ data: UnsafeRawBufferPointer, index: UInt64, stored: UInt32) -> Bool {
        if stored == 0 { return Self.isZero(data) }
        return crc(data, index: index) == stored
    }

    private func crc(_ data: UnsafeRawBufferPointer, index: UInt64) -> UInt32 {
        var indexBytes = index.littleEndian
        let seeded = withUnsafeBytes(of: &indexBytes) { CRC32C.checksum($0, continuing: deviceSeed) }
        let value = CRC32C.checksum(data, continuing: seeded) ^ CRC32.checksum(data)
        return value == 0 ? 1 : value
    }

    /// Whether every byte is zero (64 at a time, stopping at the first that is not: data that is
    /// not zeros is told apart in its first bytes, almost always).
    package static func isZero(_ data: UnsafeRawBufferPointer) -> Bool {
        guard let base = data.baseAddress else { return true }
        let lines = data.count / 64
        for line in 0..<lines {
            var accumulated: UInt64 = 0
            for word in 0..<8 {
                accumulated |= base.loadUnaligned(fromByteOffset: line * 64 + word * 8, as: UInt64.self)
            }
            if accumulated != 0 { return false }
        }
        for byte in (lines * 64)..<data.count where data[byte] != 0 { return false }
        return true
    }
}
