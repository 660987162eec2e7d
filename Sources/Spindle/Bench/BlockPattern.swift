import Glibc

/// The self-describing contents the bench writes when it verifies: each block says which offset and
/// which write it holds, so a mismatch tells what landed instead of what was expected.
///
/// Layout of a block: bytes 0..<8 the magic `SPNDLBNC`, 8..<16 the block's byte offset, 16..<24 the
/// write's serial number (0 for the layout pass), 24..<32 the seed, then a pseudo-random stream
/// derived from all three. Integers are little-endian.
public enum BlockPattern {
    static let magic: UInt64 = 0x434E_424C_444E_5053  // "SPNDLBNC" read as little-endian

    /// Fills `block` with the contents for (`seed`, `offset`, `serial`).
    public static func fill(_ block: UnsafeMutableRawBufferPointer, seed: UInt64, offset: UInt64, serial: UInt64) {
        precondition(block.count >= 32 && block.count % 8 == 0, "pattern blocks are multiples of 8 bytes, at least 32")
        let words = block.bindMemory(to: UInt64.self)
        words[0] = magic.littleEndian
        words[1] = offset.littleEndian
        words[2] = serial.littleEndian
        words[3] = seed.littleEndian
        var state = mix(seed ^ mix(offset ^ mix(serial)))
        for index in 4..<words.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            words[index] = state.littleEndian
        }
    }

    /// Checks `block` against the contents for (`seed`, `offset`, `serial`); nil when it matches,
    /// otherwise a description of what the block holds instead.
    public static func mismatch(
        _ block: UnsafeRawBufferPointer, seed: UInt64, offset: UInt64, serial: UInt64,
        scratch: UnsafeMutableRawBufferPointer
    ) -> String? {
        fill(scratch, seed: seed, offset: offset, serial: serial)
        if memcmp(block.baseAddress!, scratch.baseAddress!, block.count) == 0 { return nil }
        let words = block.bindMemory(to: UInt64.self)
        let expected = serial == 0 ? "the layout pass" : "write #\(serial)"
        if UInt64(littleEndian: words[0]) != magic {
            let zeros = block.allSatisfy { $0 == 0 }
            return "expected \(expected) but the block holds \(zeros ? "zeros" : "data the bench did not write")"
        }
        let foundOffset = UInt64(littleEndian: words[1])
        let foundSerial = UInt64(littleEndian: words[2])
        let foundSeed = UInt64(littleEndian: words[3])
        if foundSeed != seed {
            return "expected \(expected) of seed \(seed) but the block holds data of seed \(foundSeed)"
        }
        if foundOffset != offset {
            return
                "expected \(expected) but the block holds the block written for offset \(foundOffset) (misdirected write)"
        }
        if foundSerial != serial {
            return
                "expected \(expected) but the block holds \(foundSerial == 0 ? "the layout pass" : "write #\(foundSerial)") (lost or stale write)"
        }
        return "expected \(expected); the header matches but the contents differ (corrupted data)"
    }

    /// Checks that `block` holds, whole and uncorrupted, some write of `seed` for `offset` (the layout
    /// pass or any later write, whichever its header names); nil when it does.
    public static func mismatchAnyWrite(
        _ block: UnsafeRawBufferPointer, seed: UInt64, offset: UInt64, scratch: UnsafeMutableRawBufferPointer
    ) -> String? {
        let words = block.bindMemory(to: UInt64.self)
        let serial = UInt64(littleEndian: words[0]) == magic ? UInt64(littleEndian: words[2]) : 0
        guard let problem = mismatch(block, seed: seed, offset: offset, serial: serial, scratch: scratch) else {
            return nil
        }
        let layout = "expected the layout pass"
        return problem.hasPrefix(layout)
            ? "expected a block the bench wrote" + problem.dropFirst(layout.count) : problem
    }

    @inline(__always)
    static func mix(_ value: UInt64) -> UInt64 {
        var mixed = value &+ 0x9E37_79B9_7F4A_7C15
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        mixed ^= mixed >> 31
        return mixed == 0 ? 1 : mixed
    }
}
