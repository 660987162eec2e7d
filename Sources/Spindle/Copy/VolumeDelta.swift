/// A delta file: the changes of one volume since another, to be applied onto a copy of the older
/// (``ThinPool/exportDelta(of:since:toFileAt:engine:progress:)``,
/// ``ThinPool/importDelta(at:into:base:engine:progress:)``). Pure encoding and decoding; the layout is
/// in docs/FORMATS.md ("Delta files").
///
/// A 4 KiB header names the base and the target by ``VolumeIdentity`` (so a delta is applied only
/// onto a copy of its base) and gives the target's size; a table of extents follows, each either
/// data (stored in the file, 4 KiB aligned, with its CRC32C) or zeros; then the data. The header is
/// written last, so a file cut short has none and is refused.
struct VolumeDelta: Equatable {
    static let magic: UInt64 = 0x544C_444C_444E_5053  // "SPNDLDLT" little-endian
    static let version: UInt32 = 1
    static let blockBytes = 4096
    static let extentBytes = 32
    /// The most bytes one data extent holds (longer changed ranges are cut).
    static let maximumDataExtentBytes: UInt64 = 1 << 20

    struct Extent: Equatable {
        enum Kind: UInt32 { case data = 1, zeros = 2 }
        var offset: UInt64
        var length: UInt64
        var kind: Kind
        /// CRC32C of the data (0 for zeros).
        var checksum: UInt32 = 0
        /// Where the data is in the file (0 for zeros).
        var position: UInt64 = 0
    }

    var base: VolumeIdentity
    var target: VolumeIdentity
    var targetBytes: UInt64
    var chunkBytes: UInt64
    var extents: [Extent]

    /// Blocks the extent table takes.
    var tableBlocks: UInt64 {
        UInt64((extents.count * Self.extentBytes + Self.blockBytes - 1) / Self.blockBytes)
    }
    /// Where the data starts.
    var dataOffset: UInt64 { UInt64(Self.blockBytes) * (1 + tableBlocks) }
    /// The file's size.
    var fileBytes: UInt64 {
        extents.filter { $0.kind == .data }.map { $0.position + $0.length }.max() ?? dataOffset
    }

    /// Gives each data extent its place in the file, in order from ``dataOffset``.
    mutating func placeData() {
        var position = dataOffset
        for index in extents.indices where extents[index].kind == .data {
            extents[index].position = position
            position += extents[index].length
        }
    }

    /// The header block and the table, as written to the file (header at 0, table from 4096).
    func encoded() -> (header: [UInt8], table: [UInt8]) {
        var table = [UInt8](repeating: 0, count: Int(tableBlocks) * Self.blockBytes)
        for (index, extent) in extents.enumerated() {
            let at = index * Self.extentBytes
            table.putLittleEndian(extent.offset, at: at)
            table.putLittleEndian(extent.length, at: at + 8)
            table.putLittleEndian(extent.kind.rawValue, at: at + 16)
            table.putLittleEndian(extent.checksum, at: at + 20)
            table.putLittleEndian(extent.position, at: at + 24)
        }
        var header = [UInt8](repeating: 0, count: Self.blockBytes)
        header.putLittleEndian(Self.magic, at: 0)
        header.putLittleEndian(Self.version, at: 12)
        for (identity, at) in [(base, 16), (target, 48)] {
            header.putLittleEndian(identity.poolUUID.high, at: at)
            header.putLittleEndian(identity.poolUUID.low, at: at + 8)
            header.putLittleEndian(identity.volumeID, at: at + 16)
            header.putLittleEndian(identity.createdSeconds, at: at + 24)
        }
        header.putLittleEndian(targetBytes, at: 80)
        header.putLittleEndian(chunkBytes, at: 88)
        header.putLittleEndian(UInt64(extents.count), at: 96)
        header.putLittleEndian(tableBlocks, at: 104)
        header.putLittleEndian(dataOffset, at: 112)
        header.putLittleEndian(fileBytes, at: 120)
        for (name, at) in [(base.name, 128), (target.name, 258)] {
            let bytes = Array(name.utf8.prefix(128))
            header.putLittleEndian(UInt16(bytes.count), at: at)
            header.replaceSubrange((at + 2)..<(at + 2 + bytes.count), with: bytes)
        }
        header.putLittleEndian(CRC32C.checksum(table), at: 388)
        let checksum = header.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[12...])) }
        header.putLittleEndian(checksum, at: 8)
        return (header, table)
    }

    /// Why a file is not a delta that can be applied.
    enum Problem: Error, Equatable, CustomStringConvertible {
        case notADelta
        case unsupportedVersion(UInt32)
        case checksumMismatch(String)
        case invalid(String)

        var description: String {
            switch self {
            case .notADelta: return "not a Spindle delta file (no SPNDLDLT header; an export cut short has none)"
            case .unsupportedVersion(let version): return "delta format version \(version) is not supported (1 is)"
            case .checksumMismatch(let what): return "the delta's \(what) is corrupt (checksum mismatch)"
            case .invalid(let reason): return "the delta is corrupt: \(reason)"
            }
        }
    }

    /// The header's table length in bytes, to read before ``decode(header:table:fileBytes:)``.
    static func tableBytes(header: [UInt8]) throws(Problem) -> Int {
        guard header.count == blockBytes, header.littleEndian(UInt64.self, at: 0) == magic else { throw .notADelta }
        let blocks = header.littleEndian(UInt64.self, at: 104)
        guard blocks <= 1 << 20 else { throw .invalid("a table of \(blocks) blocks") }
        return Int(blocks) * blockBytes
    }

    /// Parses and checks a delta's header and table against the file's size.
    static func decode(header: [UInt8], table: [UInt8], fileBytes: UInt64) throws(Problem) -> VolumeDelta {
        guard try tableBytes(header: header) == table.count else { throw .invalid("the table is cut short") }
        let version = header.littleEndian(UInt32.self, at: 12)
        guard version == Self.version else { throw .unsupportedVersion(version) }
        let computed = header.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[12...])) }
        guard header.littleEndian(UInt32.self, at: 8) == computed else { throw .checksumMismatch("header") }
        guard header.littleEndian(UInt32.self, at: 388) == CRC32C.checksum(table) else {
            throw .checksumMismatch("extent table")
        }
        func identity(_ at: Int, nameAt: Int) -> VolumeIdentity {
            let length = min(Int(header.littleEndian(UInt16.self, at: nameAt)), 128)
            return VolumeIdentity(
                poolUUID: SpindleUUID(
                    high: header.littleEndian(UInt64.self, at: at), low: header.littleEndian(UInt64.self, at: at + 8)),
                volumeID: header.littleEndian(UInt64.self, at: at + 16),
                createdSeconds: header.littleEndian(UInt64.self, at: at + 24),
                name: String(decoding: header[(nameAt + 2)..<(nameAt + 2 + length)], as: UTF8.self))
        }
        let count = header.littleEndian(UInt64.self, at: 96)
        guard count <= UInt64(table.count / extentBytes) else { throw .invalid("\(count) extents in a smaller table") }
        var delta = VolumeDelta(
            base: identity(16, nameAt: 128), target: identity(48, nameAt: 258),
            targetBytes: header.littleEndian(UInt64.self, at: 80), chunkBytes: header.littleEndian(UInt64.self, at: 88),
            extents: [])
        guard header.littleEndian(UInt64.self, at: 120) == fileBytes else {
            throw .invalid(
                "the file is \(fileBytes) bytes, the header says \(header.littleEndian(UInt64.self, at: 120))")
        }
        var end: UInt64 = 0
        for index in 0..<Int(count) {
            let at = index * extentBytes
            guard let kind = Extent.Kind(rawValue: table.littleEndian(UInt32.self, at: at + 16)) else {
                throw .invalid("extent \(index) has an unknown kind")
            }
            let extent = Extent(
                offset: table.littleEndian(UInt64.self, at: at), length: table.littleEndian(UInt64.self, at: at + 8),
                kind: kind, checksum: table.littleEndian(UInt32.self, at: at + 20),
                position: table.littleEndian(UInt64.self, at: at + 24))
            guard extent.length > 0, extent.offset >= end,
                extent.length <= delta.targetBytes - min(extent.offset, delta.targetBytes),
                extent.offset % 4096 == 0, extent.length % 4096 == 0
            else {
                throw .invalid(
                    "extent \(index) (\(extent.length) bytes at \(extent.offset)) is out of order or out of range")
            }
            if kind == .data {
                guard extent.length <= maximumDataExtentBytes, extent.position >= delta.dataOffset,
                    extent.position % 4096 == 0, extent.position <= fileBytes,
                    extent.length <= fileBytes - extent.position
                else { throw .invalid("extent \(index)'s data lies outside the file") }
            }
            end = extent.offset + extent.length
            delta.extents.append(extent)
        }
        return delta
    }
}
