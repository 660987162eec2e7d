internal import CISAL

/// CRC32C (Castagnoli, as iSCSI, ext4 and Btrfs use it), computed by ISA-L. Every on-disk
/// structure Spindle writes carries one.
package enum CRC32C {
    /// The standard CRC32C of `bytes` (initial value and final XOR 0xFFFFFFFF): "123456789" gives 0xE3069283.
    package static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        precondition(bytes.count <= Int(Int32.max))
        let raw = crc32_iscsi(
            UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: UInt8.self)),
            Int32(bytes.count), 0xFFFF_FFFF)
        return UInt32(raw) ^ 0xFFFF_FFFF
    }

    /// The CRC32C of the bytes that gave `previous` followed by `bytes` (chaining, as for one buffer).
    package static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return previous }
        precondition(bytes.count <= Int(Int32.max))
        let raw = crc32_iscsi(
            UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: UInt8.self)),
            Int32(bytes.count), previous ^ 0xFFFF_FFFF)
        return UInt32(raw) ^ 0xFFFF_FFFF
    }

    package static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
}

/// CRC32 (IEEE 802.3, reflected: zlib's, gzip's and PNG's), computed by ISA-L. The integrity layer
/// mixes it into its block checksums (see ``BlockChecksum``).
package enum CRC32 {
    /// zlib's `crc32(0, bytes, count)`: "123456789" gives 0xCBF43926.
    package static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        return UInt32(crc32_gzip_refl(0, base.assumingMemoryBound(to: UInt8.self), UInt64(bytes.count)))
    }
}

/// A checksum as 0x and eight hex digits, for messages.
func hex(_ value: UInt32) -> String {
    let text = String(value, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 8 - text.count)) + text
}
