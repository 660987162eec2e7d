/// A byte range cut at a device's block boundaries: the whole blocks inside it, and the parts of at
/// most two blocks at its edges. Pure arithmetic, so that every layer splits the same way.
public struct BlockSplit: Equatable, Sendable {
    /// Bytes at the start that fill only part of their block (the whole range when it lies inside
    /// one block without covering it).
    public var head: Range<UInt64>?
    /// Whole blocks.
    public var middle: Range<UInt64>?
    /// Bytes at the end that fill only part of their block, in a block after the head's.
    public var tail: Range<UInt64>?

    /// - Parameters:
    ///   - offset: the first byte of the range.
    ///   - length: its length in bytes (may be 0: then every part is nil).
    ///   - blockBytes: the block size (a power of two or any positive size).
    public init(offset: UInt64, length: UInt64, blockBytes: UInt64) {
        precondition(blockBytes > 0, "a block has at least one byte")
        let end = offset + length
        let firstWhole = (offset + blockBytes - 1) / blockBytes * blockBytes
        let endWhole = end / blockBytes * blockBytes
        guard length > 0 else { return }
        if firstWhole >= endWhole {
            // No whole block: one partial block, or two partial neighbours.
            if offset < firstWhole && firstWhole < end {
                head = offset..<firstWhole
                tail = firstWhole..<end
            } else {
                head = offset..<end
            }
            return
        }
        if offset < firstWhole { head = offset..<firstWhole }
        middle = firstWhole..<endWhole
        if endWhole < end { tail = endWhole..<end }
    }

    /// The partial pieces, head first.
    public var edges: [Range<UInt64>] { [head, tail].compactMap { $0 } }
}

extension BlockDevice {
    public func discardBytes(offset: UInt64, length: UInt64) async throws {
        try validateByteRange(offset: offset, length: length, operation: "discard")
        try checkWritable(operation: "discard", offset: offset, length: length)
        // Discard is advisory: partial blocks are left, not read and rewritten.
        if let middle = BlockSplit(offset: offset, length: length, blockBytes: UInt64(logicalBlockBytes)).middle {
            try await discard(offset: middle.lowerBound, length: UInt64(middle.count))
        }
    }

    public func zeroBytes(offset: UInt64, length: UInt64) async throws {
        try validateByteRange(offset: offset, length: length, operation: "write-zeroes")
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        let split = BlockSplit(offset: offset, length: length, blockBytes: UInt64(logicalBlockBytes))
        if let middle = split.middle {
            try await writeZeroes(offset: middle.lowerBound, length: UInt64(middle.count))
        }
        for edge in split.edges { try await zeroWithinBlock(edge) }
    }

    /// Zeroes part of one block: reads the block, clears the bytes of `range`, writes the block back.
    func zeroWithinBlock(_ range: Range<UInt64>) async throws {
        let block = UInt64(logicalBlockBytes)
        let start = range.lowerBound / block * block
        precondition(range.upperBound <= start + block, "\(range) spans more than one block of \(block) bytes")
        let buffer = AlignedBuffer(count: Int(block), zeroed: false)
        try await read(into: buffer, at: start)
        buffer.slice(offset: Int(range.lowerBound - start), length: range.count).initializeMemory(
            as: UInt8.self, repeating: 0)
        try await write(from: buffer, at: start)
    }
}
