import Testing

@testable import Spindle

@Suite("Byte ranges on block devices")
struct ByteRangeTests {
    @Test("BlockSplit cuts every range into partial edges and whole blocks, as a byte-by-byte model does")
    func splitMatchesModel() {
        for blockBytes: UInt64 in [1, 2, 4, 8] {
            for offset: UInt64 in 0..<24 {
                for length: UInt64 in 0..<24 {
                    let split = BlockSplit(offset: offset, length: length, blockBytes: blockBytes)
                    let parts = [split.head, split.middle, split.tail].compactMap { $0 }
                    // The parts, in order, are the range.
                    #expect(
                        Array(parts.joined()) == Array(offset..<(offset + length)),
                        "\(offset)+\(length) in \(blockBytes)")
                    // Every byte of a whole block is in the middle, and only those.
                    for byte in offset..<(offset + length) {
                        let blockStart = byte / blockBytes * blockBytes
                        let whole = blockStart >= offset && blockStart + blockBytes <= offset + length
                        #expect((split.middle?.contains(byte) ?? false) == whole)
                    }
                    for edge in split.edges {
                        #expect(
                            (edge.lowerBound / blockBytes) == ((edge.upperBound - 1) / blockBytes),
                            "an edge lies in one block")
                        #expect(UInt64(edge.count) < blockBytes)
                    }
                    #expect(
                        split.middle != nil || split.tail == nil || split.head != nil,
                        "a lone partial piece is the head")
                }
            }
        }
    }

    @Test("zeroBytes zeroes exactly its bytes and discardBytes only the whole blocks inside, at any alignment")
    func defaultByteCalls() async throws {
        let device = try MemoryDevice(capacityBytes: 64 << 10, logicalBlockBytes: 4096)
        let data = AlignedBuffer(count: Int(device.capacityBytes))
        fillRandom(data.bytes, seed: 30)
        try await device.write(from: data, at: 0)
        var model = data.array
        var random = SeededRandom(seed: 31)
        for step in 0..<200 {
            let offset = random.below(device.capacityBytes - 1)
            let length = 1 + random.below(min(device.capacityBytes - offset, 20_000))
            if step % 2 == 0 {
                try await device.zeroBytes(offset: offset, length: length)
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
            } else {
                try await device.discardBytes(offset: offset, length: length)
                let start = (offset + 4095) / 4096 * 4096
                let end = (offset + length) / 4096 * 4096
                if start < end {
                    model.replaceSubrange(Int(start)..<Int(end), with: repeatElement(0, count: Int(end - start)))
                }
            }
            #expect(
                byteDifference(try await readAll(device), model) == nil, "step \(step): \(length) bytes at \(offset)")
        }
        expectError(
            await spindleError { try await device.zeroBytes(offset: 100, length: 0) }, .invalidArgument, ["empty"])
        expectError(
            await spindleError { try await device.discardBytes(offset: (64 << 10) - 10, length: 11) }, .outOfRange,
            ["past the end"])
    }
}
