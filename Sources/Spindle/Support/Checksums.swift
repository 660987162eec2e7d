internal import CISAL

/// CRC32C (Castagnoli, as iSCSI, ext4 and Btrfs use it), computed by ISA-L. Every on-disk
/// structure Spindle writes carries one.
public enum CRC32C {
    /// The standard CRC32C of `bytes` (initial value and final XOR 0xFFFFFFFF): "123456789" gives 0xE3069283.
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        precondition(bytes.count <= Int(Int32.max))
        let raw = crc32_iscsi(UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: UInt8.self)),
                              Int32(bytes.count), 0xFFFF_FFFF)
        return UInt32(raw) ^ 0xFFFF_FFFF
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
}

/// XOR parity over equal-length blocks, computed by ISA-L (`xor_gen`, `xor_check`).
public enum XORParity {
    /// Writes the XOR of `sources` into `parity`. All buffers must have the same length, a multiple of
    /// 32 bytes, and start at 32-byte aligned addresses (``AlignedBuffer`` always does).
    public static func generate(sources: [UnsafeRawPointer], parity: UnsafeMutableRawPointer, length: Int) {
        precondition(length % 32 == 0 && length <= Int(Int32.max), "parity length must be a multiple of 32 bytes")
        if sources.count == 1 {
            parity.copyMemory(from: sources[0], byteCount: length)
            return
        }
        var pointers: [UnsafeMutableRawPointer?] = sources.map { UnsafeMutableRawPointer(mutating: $0) }
        pointers.append(parity)
        let result = pointers.withUnsafeMutableBufferPointer {
            xor_gen(Int32($0.count), Int32(length), $0.baseAddress)
        }
        precondition(result == 0, "xor_gen failed")
    }

    /// True when the XOR of all `blocks` is zero: data and parity agree.
    public static func check(_ blocks: [UnsafeRawPointer], length: Int) -> Bool {
        precondition(length % 32 == 0 && blocks.count >= 2)
        var pointers: [UnsafeMutableRawPointer?] = blocks.map { UnsafeMutableRawPointer(mutating: $0) }
        return pointers.withUnsafeMutableBufferPointer {
            xor_check(Int32($0.count), Int32(length), $0.baseAddress)
        } == 0
    }
}
