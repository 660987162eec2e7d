import Testing

@_spi(Benchmarks) @testable import Spindle

/// An independent model: walk every byte of every member, in the order md documents for each level,
/// and record which logical byte (or parity) it holds.
private func bruteForceMap(_ geometry: RAIDGeometry) -> [UInt64: (member: Int, memberOffset: UInt64)] {
    var map: [UInt64: (Int, UInt64)] = [:]
    let n = geometry.memberCount
    let chunk = geometry.chunkBytes
    var logicalChunk: UInt64 = 0
    for stripe in 0..<geometry.stripeCount {
        switch geometry.level {
        case .raid0:
            for member in 0..<n {
                for byte in stride(from: UInt64(0), to: chunk, by: 512) {
                    map[logicalChunk * chunk + byte] = (member, stripe * chunk + byte)
                }
                logicalChunk += 1
            }
        case .raid5:
            let parity = (n - 1) - Int(stripe % UInt64(n))
            var member = (parity + 1) % n
            for _ in 0..<(n - 1) {
                for byte in stride(from: UInt64(0), to: chunk, by: 512) {
                    map[logicalChunk * chunk + byte] = (member, stripe * chunk + byte)
                }
                logicalChunk += 1
                member = (member + 1) % n
            }
        case .raid1:
            for byte in stride(from: UInt64(0), to: chunk, by: 512) {
                map[stripe * chunk + byte] = (0, stripe * chunk + byte)
            }
        }
    }
    return map
}

@Suite("RAID geometry")
struct RAIDGeometryTests {
    @Test(
        "every logical block maps where the brute-force model puts it, and back",
        arguments: [RAIDLevel.raid0, .raid1, .raid5])
    func againstBruteForce(level: RAIDLevel) {
        for members in level.minimumMembers...7 {
            for chunkBytes: UInt64 in [512, 4096, 16384] {
                let geometry = RAIDGeometry(
                    level: level, memberCount: members, chunkBytes: chunkBytes,
                    memberDataBytes: chunkBytes * 9)
                let model = bruteForceMap(geometry)
                #expect(UInt64(model.count) * 512 == geometry.capacityBytes)
                for (logical, place) in model {
                    let extents = geometry.extents(offset: logical, length: 512)
                    #expect(extents.count == 1)
                    #expect(
                        extents[0].member == place.member && extents[0].memberOffset == place.memberOffset,
                        "\(level) n=\(members) chunk=\(chunkBytes) logical \(logical)")
                    #expect(geometry.logicalOffset(member: place.member, memberOffset: place.memberOffset) == logical)
                }
                if level == .raid5 {
                    for stripe in 0..<geometry.stripeCount {
                        let parity = geometry.parityMember(stripe: stripe)
                        #expect(geometry.logicalOffset(member: parity, memberOffset: stripe * chunkBytes) == nil)
                        let dataMembers = (0..<(members - 1)).map { geometry.dataMember(stripe: stripe, index: $0) }
                        #expect(Set(dataMembers + [parity]).count == members)
                    }
                }
            }
        }
    }

    @Test("random ranges split into pieces that cover the range exactly, in order")
    func randomRanges() {
        var random = SeededRandom(seed: 77)
        for _ in 0..<300 {
            let level = [RAIDLevel.raid0, .raid1, .raid5][Int(random.below(3))]
            let members = level.minimumMembers + Int(random.below(5))
            let chunk = UInt64(512) << random.below(6)
            let geometry = RAIDGeometry(
                level: level, memberCount: members, chunkBytes: chunk,
                memberDataBytes: chunk * (1 + random.below(20)))
            let blocks = geometry.capacityBytes / 512
            let first = random.below(blocks)
            let count = 1 + random.below(blocks - first)
            let extents = geometry.extents(offset: first * 512, length: count * 512)
            var expectedOffset: UInt64 = 0
            for extent in extents {
                #expect(extent.requestOffset == expectedOffset)
                #expect(
                    extent.length > 0
                        && (extent.memberOffset % chunk) + extent.length <= (level == .raid1 ? .max : chunk))
                #expect(
                    geometry.logicalOffset(member: extent.member, memberOffset: extent.memberOffset) == first * 512
                        + extent.requestOffset)
                expectedOffset += extent.length
            }
            #expect(expectedOffset == count * 512)
        }
    }

    @Test("RAID5 left-symmetric parity rotates from the last member down, as md's default")
    func leftSymmetric() {
        let geometry = RAIDGeometry(level: .raid5, memberCount: 4, chunkBytes: 4096, memberDataBytes: 4096 * 8)
        #expect((0..<8).map { geometry.parityMember(stripe: UInt64($0)) } == [3, 2, 1, 0, 3, 2, 1, 0])
        // Stripe 1: parity on member 2, data continues on 3, 0, 1.
        #expect((0..<3).map { geometry.dataMember(stripe: 1, index: $0) } == [3, 0, 1])
        #expect(geometry.capacityBytes == 4096 * 8 * 3)
    }

    @Test("CRC32C and XOR parity come from ISA-L and agree with the definitions")
    func checksumsAndParity() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        let blocks = (0..<4).map { index -> AlignedBuffer in
            let buffer = AlignedBuffer(count: 4096)
            fillRandom(buffer.bytes, seed: UInt64(index))
            return buffer
        }
        let parity = AlignedBuffer(count: 4096)
        XORParity.generate(sources: blocks, into: parity, length: 4096)
        for byte in stride(from: 0, to: 4096, by: 97) {
            #expect(parity.bytes[byte] == blocks.reduce(0) { $0 ^ $1.bytes[byte] })
        }
        #expect(XORParity.check(blocks + [parity], length: 4096))
        // Regions inside larger buffers: the second half of each block.
        let halves = AlignedBuffer(count: 4096)
        XORParity.generate(sources: blocks, offset: 2048, into: halves, parityOffset: 1024, length: 2048)
        #expect(Array(halves.slice(offset: 1024, length: 2048)) == Array(parity.slice(offset: 2048, length: 2048)))
        parity.bytes[5] ^= 0x40
        #expect(!XORParity.check(blocks + [parity], length: 4096))
        #expect(XORParity.check(blocks + [parity], offset: 2048, length: 2048))
    }
}
