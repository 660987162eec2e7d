/// The 4 KiB label at the start of every device of a thin pool: which pool the device belongs to and
/// its place in it. Pure encoding and decoding; the format is in docs/FORMATS.md.
///
/// Layout (little-endian): magic `SPNDLPOL` (8), format version (4), CRC32C of bytes 0..<4092 at
/// 4092, pool UUID (16) at 16, device index (4) at 32, chunk bytes (8) at 40, metadata area offset (8) at 48 and blocks (8) at 56 (device 0 only; 0 elsewhere),
/// name length (2) at 64 and name (up to 64 bytes) at 72.
public struct ThinPoolLabel: Sendable, Equatable {
    public static let bytes = 4096
    static let magic: UInt64 = 0x4C4F_504C_444E_5053  // "SPNDLPOL" little-endian
    static let formatVersion: UInt32 = 1

    public var poolUUID: SpindleUUID
    public var poolName: String
    public var deviceIndex: Int
    public var chunkBytes: UInt64
    /// Where the metadata area is: only on device 0.
    public var metadataOffset: UInt64
    public var metadataBlocks: UInt64

    public func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.bytes)
        bytes.putLittleEndian(Self.magic, at: 0)
        bytes.putLittleEndian(Self.formatVersion, at: 8)
        bytes.putLittleEndian(poolUUID.high, at: 16)
        bytes.putLittleEndian(poolUUID.low, at: 24)
        bytes.putLittleEndian(UInt32(deviceIndex), at: 32)
        bytes.putLittleEndian(chunkBytes, at: 40)
        bytes.putLittleEndian(metadataOffset, at: 48)
        bytes.putLittleEndian(metadataBlocks, at: 56)
        let name = Array(poolName.utf8.prefix(64))
        bytes.putLittleEndian(UInt16(name.count), at: 64)
        bytes.replaceSubrange(72..<(72 + name.count), with: name)
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        bytes.putLittleEndian(checksum, at: 4092)
        return bytes
    }

    /// Why bytes are not a pool label.
    public enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        case notALabel
        case unsupportedVersion(UInt32)
        case checksumMismatch
        case invalid(String)

        public var description: String {
            switch self {
            case .notALabel: return "no thin pool label (magic SPNDLPOL) at offset 0"
            case let .unsupportedVersion(version):
                return
                    "thin pool label format version \(version) is not supported (this Spindle reads version \(ThinPoolLabel.formatVersion))"
            case .checksumMismatch: return "the thin pool label at offset 0 is corrupt (checksum mismatch)"
            case let .invalid(reason): return "the thin pool label is invalid: \(reason)"
            }
        }
    }

    public static func decode(_ bytes: [UInt8]) throws(Problem) -> ThinPoolLabel {
        guard bytes.count >= Self.bytes, bytes.littleEndian(UInt64.self, at: 0) == magic else { throw .notALabel }
        let version = bytes.littleEndian(UInt32.self, at: 8)
        guard version == formatVersion else { throw .unsupportedVersion(version) }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        guard bytes.littleEndian(UInt32.self, at: 4092) == computed else { throw .checksumMismatch }
        let nameLength = Int(bytes.littleEndian(UInt16.self, at: 64))
        guard nameLength >= 1, nameLength <= 64 else { throw .invalid("name length \(nameLength)") }
        let chunkBytes = bytes.littleEndian(UInt64.self, at: 40)
        guard chunkBytes >= 64 * 1024, chunkBytes <= 1 << 20, chunkBytes & (chunkBytes - 1) == 0 else {
            throw .invalid("chunk size \(chunkBytes)")
        }
        return ThinPoolLabel(
            poolUUID: SpindleUUID(
                high: bytes.littleEndian(UInt64.self, at: 16), low: bytes.littleEndian(UInt64.self, at: 24)),
            poolName: String(decoding: bytes[72..<(72 + nameLength)], as: UTF8.self),
            deviceIndex: Int(bytes.littleEndian(UInt32.self, at: 32)),
            chunkBytes: chunkBytes,
            metadataOffset: bytes.littleEndian(UInt64.self, at: 48),
            metadataBlocks: bytes.littleEndian(UInt64.self, at: 56))
    }

    /// Reads the label of a device, or nil when it has none (any problem other than a missing label
    /// is thrown: a corrupt label is reported, never ignored).
    public static func read(from device: any BlockDevice) async throws -> ThinPoolLabel? {
        guard device.capacityBytes >= UInt64(Self.bytes) else { return nil }
        let buffer = AlignedBuffer(count: Self.bytes, zeroed: false)
        try await device.read(into: buffer, at: 0)
        do {
            return try decode(buffer.array)
        } catch .notALabel {
            return nil
        } catch {
            throw SpindleError(
                .corrupted, error.description, operation: "read pool label", path: device.name, offset: 0,
                length: UInt64(Self.bytes),
                cause: error)
        }
    }

    func write(to device: any BlockDevice) async throws {
        let buffer = AlignedBuffer(count: Self.bytes, zeroed: false)
        encoded().withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
        try await device.write(from: buffer, at: 0, fua: true)
    }
}
