import Glibc
import Testing
@testable import Spindle

/// A member that counts the data-area reads it serves (superblock and bitmap reads are not counted).
private final class CountingMember: Reopenable, @unchecked Sendable {
    // @unchecked: as Reopenable; the count is kept under its lock.
    let reads = Locked(0)
    override func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        if offset >= RAIDArray.dataOffset { reads.withLock { $0 += 1 } }
        try await super.read(into: buffer, at: offset)
    }
}

/// The RAID5 write paths (full stripe, read-modify-write, reconstruct-write, and the choice
/// between them), over every member count from 3 to 8 and chunks of 4 KiB, 64 KiB and 512 KiB.
/// Each configuration gets the same seeded writes through three arrays: one that chooses its path,
/// one forced to read-modify-write and one forced to reconstruct-write. Their members must hold
/// identical bytes, equal to a brute-force model of the layout (data chunks rotated after a parity
/// chunk that is the XOR of the stripe's data); scrub must find nothing; and with a member failed,
/// every byte must read back from parity.
@Suite struct RAID5WritePathTests {
    static let stripes: UInt64 = 6

    /// Member data areas computed from the logical contents alone: stripe `s` has parity on member
    /// `n - 1 - s % n` and data chunk `i` on member `(parity + 1 + i) % n` (left-symmetric).
    static func modelMembers(logical: [UInt8], memberCount n: Int, chunk: Int) -> [[UInt8]] {
        var members = [[UInt8]](repeating: [UInt8](repeating: 0, count: Int(stripes) * chunk), count: n)
        for stripe in 0..<Int(stripes) {
            let parity = n - 1 - stripe % n
            var xor = [UInt64](repeating: 0, count: chunk / 8)
            for index in 0..<(n - 1) {
                let member = (parity + 1 + index) % n
                let start = (stripe * (n - 1) + index) * chunk
                members[member].replaceSubrange((stripe * chunk)..<((stripe + 1) * chunk), with: logical[start..<(start + chunk)])
                logical.withUnsafeBytes { bytes in
                    for word in 0..<(chunk / 8) { xor[word] ^= bytes.loadUnaligned(fromByteOffset: start + word * 8, as: UInt64.self) }
                }
            }
            xor.withUnsafeBytes { members[parity].replaceSubrange((stripe * chunk)..<((stripe + 1) * chunk), with: $0) }
        }
        return members
    }

    /// A random request: small pieces inside a chunk, pieces crossing chunk and stripe boundaries,
    /// whole stripes, and runs of several stripes, at 512-byte-aligned offsets.
    static func randomExtent(_ random: inout SeededRandom, capacity: Int, chunk: Int, stripeBytes: Int) -> (offset: Int, length: Int) {
        let sectors = capacity / 512
        let length: Int
        switch random.next() % 6 {
        case 0: length = 512 * Int(1 + random.next() % 8)
        case 1: length = 512 * Int(1 + random.next() % UInt64(chunk / 512))
        case 2: length = chunk + 512 * Int(random.next() % UInt64(chunk / 512))
        case 3: length = stripeBytes
        case 4: length = stripeBytes * Int(1 + random.next() % 2) + 512 * Int(random.next() % UInt64(chunk / 512))
        default: length = 512 * Int(1 + random.next() % UInt64(min(sectors, 3 * stripeBytes / 512)))
        }
        let clamped = min(length, capacity)
        var offset: Int
        if random.next() % 4 == 0 {
            offset = Int(random.next() % UInt64(capacity / stripeBytes)) * stripeBytes  // stripe-aligned
        } else {
            offset = 512 * Int(random.next() % UInt64(sectors))
        }
        offset = min(offset, capacity - clamped)
        return (offset, clamped)
    }

    static let configurations: [(members: Int, chunk: Int)] =
        (3...8).flatMap { members in [4096, 65536, 524_288].map { (members, $0) } }

    @Test(arguments: configurations)
    func writePathsAgreeWithTheModel(members memberCount: Int, chunk: Int) async throws {
        let memberBytes = RAIDArray.dataOffset + Self.stripes * UInt64(chunk)
        let methods: [RAIDArray.PartialStripeWrite?] = [nil, .readModifyWrite, .reconstructWrite]
        var devices: [[MemoryDevice]] = []
        var arrays: [RAIDArray] = []
        for (index, method) in methods.enumerated() {
            let members = try (0..<memberCount).map { try MemoryDevice(capacityBytes: memberBytes, name: "a\(index)m\($0)") }
            let array = try await RAIDArray.create(
                name: "paths\(index)", level: .raid5, chunkBytes: UInt64(chunk), members: members.map { Reopenable($0) })
            array.partialStripeWriteOverride.withLock { $0 = method }
            devices.append(members)
            arrays.append(array)
        }
        let capacity = Int(arrays[0].capacityBytes)
        let stripeBytes = chunk * (memberCount - 1)
        #expect(capacity == stripeBytes * Int(Self.stripes))
        var logical = [UInt8](repeating: 0, count: capacity)
        var random = SeededRandom(seed: UInt64(memberCount * 1_000_003 + chunk))
        let writes = chunk >= 524_288 ? 10 : 24
        for number in 0..<writes {
            let (offset, length) = Self.randomExtent(&random, capacity: capacity, chunk: chunk, stripeBytes: stripeBytes)
            let data = AlignedBuffer(count: length)
            fillRandom(data.bytes, seed: random.next())
            logical.replaceSubrange(offset..<(offset + length), with: data.bytes)
            for array in arrays {
                try await array.write(from: data, at: UInt64(offset))
            }
            // Check all three arrays after every few writes, so a failure names the write that caused it.
            if number % 6 == 5 || number == writes - 1 {
                let model = Self.modelMembers(logical: logical, memberCount: memberCount, chunk: chunk)
                for (index, members) in devices.enumerated() {
                    for (slot, member) in members.enumerated() {
                        let bytes = AlignedBuffer(count: model[slot].count)
                        try await member.read(into: bytes, at: RAIDArray.dataOffset)
                        let equal = model[slot].withUnsafeBytes { memcmp($0.baseAddress!, bytes.bytes.baseAddress!, $0.count) == 0 }
                        #expect(equal, "array \(index) (\(methods[index].map { "\($0)" } ?? "chosen")), slot \(slot), after write \(number) at \(offset)+\(length): member bytes differ from the model")
                        if !equal { return }
                    }
                }
            }
        }
        for (index, array) in arrays.enumerated() {
            let report = try await array.scrub()
            #expect(report.mismatches == 0, "array \(index): \(report.mismatches) mismatched stripes at \(report.mismatchOffsets.prefix(5))")
            // Every byte must come back with any one member gone (reconstruct-reads from parity).
            let failed = Int(random.next() % UInt64(memberCount))
            try await array.fail(memberNamed: "a\(index)m\(failed)")
            let back = try await readAll(array)
            #expect(back == logical, "array \(index) read back wrong with slot \(failed) failed")
            try await array.close()
        }
    }

    /// The forced paths really are the paths named: a one-chunk write to a 5-member array reads the
    /// old data and parity (2 reads) for read-modify-write, and the 3 untouched data chunks for
    /// reconstruct-write; a full-stripe write reads nothing.
    @Test func forcedPathsReadWhatTheyShould() async throws {
        for (method, expected) in [(RAIDArray.PartialStripeWrite.readModifyWrite, 2), (.reconstructWrite, 3)] {
            let members = try (0..<5).map { CountingMember(try MemoryDevice(capacityBytes: (1 << 20) + 65536, name: "c\($0)")) }
            let array = try await RAIDArray.create(name: "count", level: .raid5, chunkBytes: 4096, members: members)
            array.partialStripeWriteOverride.withLock { $0 = method }
            for member in members { member.reads.withLock { $0 = 0 } }  // creating reads signatures
            let data = AlignedBuffer(count: 4096)
            data.fill(0x5A)
            try await array.write(from: data, at: 0)
            #expect(members.reduce(0) { $0 + $1.reads.withLock { $0 } } == expected, "\(method)")
            let stripe = AlignedBuffer(count: 4 * 4096)
            stripe.fill(0xA5)
            try await array.write(from: stripe, at: 4 * 4096)
            #expect(members.reduce(0) { $0 + $1.reads.withLock { $0 } } == expected, "a full stripe reads nothing")
            try await array.close()
        }
    }
}
