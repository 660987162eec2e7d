internal import CISAL

/// XOR parity over equal-length blocks, computed by ISA-L (`xor_gen`, `xor_check`).
///
/// The calls take the owning ``AlignedBuffer``s, never raw pointers: the buffers are arguments, so
/// they live until the XOR has run. (Raw pointers mapped out of buffers outlived them once, and the
/// XOR read freed memory: wrong parity, or a crash for buffers large enough to be unmapped.)
@_spi(Benchmarks) public enum XORParity {
    /// Writes the XOR of `sources[i][offset ..< offset + length]` into
    /// `parity[parityOffset ..< parityOffset + length]`. `length` must be a multiple of 32 bytes and
    /// every region must start 32-byte aligned (offsets that are multiples of 32 in ``AlignedBuffer``s).
    /// `parity` must not be one of the sources.
    public static func generate(
        sources: [AlignedBuffer], offset: Int = 0, into parity: AlignedBuffer, parityOffset: Int = 0, length: Int
    ) {
        precondition(!sources.contains { $0 === parity }, "the parity buffer cannot also be a source")
        precondition(parityOffset >= 0 && parityOffset + length <= parity.count, "parity region out of the buffer")
        generate(sources: sources, offset: offset, into: parity.slice(offset: parityOffset, length: length))
        withExtendedLifetime(parity) {}
    }

    /// Writes the XOR of `sources[i][offset ..< offset + destination.count]` into `destination`, a
    /// region the caller owns for the duration of the call (for example a request's buffer).
    public static func generate(
        sources: [AlignedBuffer], offset: Int = 0, into destination: UnsafeMutableRawBufferPointer
    ) {
        let length = destination.count
        precondition(!sources.isEmpty, "parity needs at least one source")
        precondition(length % 32 == 0 && length <= Int(Int32.max), "parity length must be a multiple of 32 bytes")
        precondition(
            offset >= 0 && sources.allSatisfy { offset + length <= $0.count }, "source region out of the buffer")
        guard length > 0 else { return }
        withExtendedLifetime(sources) {
            if sources.count == 1 {
                destination.baseAddress!.copyMemory(from: sources[0].bytes.baseAddress! + offset, byteCount: length)
                return
            }
            var pointers: [UnsafeMutableRawPointer?] = sources.map { $0.bytes.baseAddress! + offset }
            pointers.append(destination.baseAddress!)
            let result = pointers.withUnsafeMutableBufferPointer {
                xor_gen(Int32($0.count), Int32(length), $0.baseAddress)
            }
            precondition(result == 0, "xor_gen failed")
        }
    }

    /// True when the XOR of `blocks[i][offset ..< offset + length]` is zero: data and parity agree.
    public static func check(_ blocks: [AlignedBuffer], offset: Int = 0, length: Int) -> Bool {
        precondition(length % 32 == 0 && blocks.count >= 2)
        precondition(offset >= 0 && blocks.allSatisfy { offset + length <= $0.count }, "region out of the buffer")
        return withExtendedLifetime(blocks) {
            var pointers: [UnsafeMutableRawPointer?] = blocks.map { $0.bytes.baseAddress! + offset }
            return pointers.withUnsafeMutableBufferPointer {
                xor_check(Int32($0.count), Int32(length), $0.baseAddress)
            } == 0
        }
    }
}
