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

/// A member that holds each data-area request over a few scheduler turns, so that concurrent
/// stripes interleave, and checks that the bytes a write was handed stay the same until the write
/// returns (a stripe buffer given back to the pool while the write still held it, and taken by
/// another stripe, would change them). With `failsFirstReads`, its first data-area read at each
/// offset fails with a read error (the member stays in the array).
private final class HoldingMember: Reopenable, @unchecked Sendable {
    // @unchecked: as Reopenable; what it saw is kept under its lock.
    let failsFirstReads: Bool
    let seen = Locked((changedWrites: 0, failedReadOffsets: Set<UInt64>()))

    init(_ inner: any BlockDevice, failsFirstReads: Bool) {
        self.failsFirstReads = failsFirstReads
        super.init(inner)
    }

    private func hold(_ offset: UInt64) async {
        for _ in 0...(Int(offset >> 9) % 7) { await Task.yield() }
    }

    override func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        guard offset >= RAIDArray.dataOffset else { return try await super.read(into: buffer, at: offset) }
        await hold(offset)
        if failsFirstReads, seen.withLock({ $0.failedReadOffsets.insert(offset).inserted }) {
            throw SpindleError(.ioFailed, "injected read error", operation: "read", path: name, offset: offset)
        }
        try await super.read(into: buffer, at: offset)
    }

    override func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        guard offset >= RAIDArray.dataOffset else { return try await super.write(from: buffer, at: offset, fua: fua) }
        let handed = Array(buffer)
        await hold(offset)
        if !handed.elementsEqual(buffer) { seen.withLock { $0.changedWrites += 1 } }
        try await super.write(from: buffer, at: offset, fua: fua)
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
    static func modelMembers(logical: [UInt8], memberCount n: Int, chunk: Int, stripes: Int = Int(stripes)) -> [[UInt8]]
    {
        var members = [[UInt8]](repeating: [UInt8](repeating: 0, count: stripes * chunk), count: n)
        for stripe in 0..<stripes {
            let parity = n - 1 - stripe % n
            var xor = [UInt64](repeating: 0, count: chunk / 8)
            for index in 0..<(n - 1) {
                let member = (parity + 1 + index) % n
                let start = (stripe * (n - 1) + index) * chunk
                members[member].replaceSubrange(
                    (stripe * chunk)..<((stripe + 1) * chunk), with: logical[start..<(start + chunk)])
                logical.withUnsafeBytes { bytes in
                    for word in 0..<(chunk / 8) {
                        xor[word] ^= bytes.loadUnaligned(fromByteOffset: start + word * 8, as: UInt64.self)
                    }
                }
            }
            xor.withUnsafeBytes { members[parity].replaceSubrange((stripe * chunk)..<((stripe + 1) * chunk), with: $0) }
        }
        return members
    }

    /// A random request: small pieces inside a chunk, pieces crossing chunk and stripe boundaries,
    /// whole stripes, and runs of several stripes, at 512-byte-aligned offsets.
    static func randomExtent(_ random: inout SeededRandom, capacity: Int, chunk: Int, stripeBytes: Int) -> (
        offset: Int, length: Int
    ) {
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
            let members = try (0..<memberCount).map {
                try MemoryDevice(capacityBytes: memberBytes, name: "a\(index)m\($0)")
            }
            let array = try await RAIDArray.create(
                name: "paths\(index)", level: .raid5, chunkBytes: UInt64(chunk), members: members.map { Reopenable($0) }
            )
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
            let (offset, length) = Self.randomExtent(
                &random, capacity: capacity, chunk: chunk, stripeBytes: stripeBytes)
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
                        let equal = model[slot].withUnsafeBytes {
                            memcmp($0.baseAddress!, bytes.bytes.baseAddress!, $0.count) == 0
                        }
                        #expect(
                            equal,
                            "array \(index) (\(methods[index].map { "\($0)" } ?? "chosen")), slot \(slot), after write \(number) at \(offset)+\(length): member bytes differ from the model"
                        )
                        if !equal { return }
                    }
                }
            }
        }
        for (index, array) in arrays.enumerated() {
            let report = try await array.scrub()
            #expect(
                report.mismatches == 0,
                "array \(index): \(report.mismatches) mismatched stripes at \(report.mismatchOffsets.prefix(5))")
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
            let members = try (0..<5).map {
                CountingMember(try MemoryDevice(capacityBytes: (1 << 20) + 65536, name: "c\($0)"))
            }
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

    /// Stripe writes take their buffers from the array's pool: many concurrent writes (full stripes,
    /// read-modify-write, reconstruct-write, and retries without a member whose read failed) must
    /// leave exactly the model's bytes on the members, and no write may see its bytes change while
    /// it holds them. Reads back through the pooled degraded-read path too.
    @Test func pooledStripeBuffersOutliveTheirRequests() async throws {
        let chunk = 8192
        let memberCount = 5
        let stripes = 64
        let memberBytes = RAIDArray.dataOffset + UInt64(stripes * chunk)
        let members = try (0..<memberCount).map {
            HoldingMember(try MemoryDevice(capacityBytes: memberBytes, name: "h\($0)"), failsFirstReads: $0 == 1)
        }
        // (`overwrite`: the look for an earlier signature would meet the injected read errors.)
        let array = try await RAIDArray.create(
            name: "held", level: .raid5, chunkBytes: UInt64(chunk), members: members, overwrite: true)
        array.setIdleCleanDelay(nanoseconds: 0)
        let capacity = Int(array.capacityBytes)
        let stripeBytes = chunk * (memberCount - 1)
        var logical = [UInt8](repeating: 0, count: capacity)
        var random = SeededRandom(seed: 20_251_202)
        // Two rounds of concurrent writes to disjoint regions (so the result does not depend on the
        // order they run in): one region per stripe, then regions of a stripe and a half.
        for region in [stripeBytes, stripeBytes * 3 / 2] {
            var writes: [(offset: Int, data: AlignedBuffer)] = []
            for start in stride(from: 0, to: capacity - region + 1, by: region) {
                let length = random.next() % 4 == 0 ? region : 512 * Int(1 + random.next() % UInt64(region / 512))
                let offset = start + 512 * Int(random.next() % UInt64((region - length) / 512 + 1))
                let data = AlignedBuffer(count: length)
                fillRandom(data.bytes, seed: random.next())
                logical.replaceSubrange(offset..<(offset + length), with: data.bytes)
                writes.append((offset, data))
            }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for write in writes {
                    group.addTask { try await array.write(from: write.data, at: UInt64(write.offset)) }
                }
                try await group.waitForAll()
            }
        }
        #expect(
            members.map { $0.seen.withLock { $0.changedWrites } } == [Int](repeating: 0, count: memberCount),
            "a member write saw its bytes change while it held them")
        #expect(!members[1].seen.withLock { $0.failedReadOffsets.isEmpty }, "no stripe write met a read error")
        let model = Self.modelMembers(logical: logical, memberCount: memberCount, chunk: chunk, stripes: stripes)
        for (slot, member) in members.enumerated() {
            let bytes = AlignedBuffer(count: model[slot].count)
            try await member.inner.read(into: bytes, at: RAIDArray.dataOffset)
            let difference = byteDifference(bytes.array, model[slot])
            #expect(difference == nil, "slot \(slot): member bytes differ from the model: \(difference ?? "")")
        }
        let back = byteDifference(try await readAll(array), logical)
        #expect(back == nil, "read back: \(back ?? "")")
        let status = array.status
        #expect(status.slots.allSatisfy { $0.state == .active } && status.unrecoverableReads == 0)
        #expect(try await array.scrub().mismatches == 0)
        try await array.close()
    }
}
