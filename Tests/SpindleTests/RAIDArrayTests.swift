import Glibc
import Testing

@testable import Spindle

/// Memory members of a given size (data area = size - 1 MiB).
private func memoryMembers(_ count: Int, bytes: UInt64 = (1 << 20) + (2 << 20), prefix: String = "m") throws
    -> [MemoryDevice]
{
    try (0..<count).map { try MemoryDevice(capacityBytes: bytes, name: "\(prefix)\($0)") }
}

/// A wrapper that hides the inner device's close, so a test can close an array and reassemble it
/// from the same memory (an array closes its members).
class Reopenable: BlockDevice, @unchecked Sendable {
    // @unchecked: not final so that test devices can override a call; it holds only `inner`.
    let inner: any BlockDevice
    init(_ inner: any BlockDevice) { self.inner = inner }
    var logicalBlockBytes: Int { inner.logicalBlockBytes }
    var capacityBytes: UInt64 { inner.capacityBytes }
    var isReadOnly: Bool { false }
    var discardReadsZeroes: Bool { inner.discardReadsZeroes }
    var name: String { inner.name }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try await inner.read(into: buffer, at: offset)
    }
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try await inner.write(from: buffer, at: offset, fua: fua)
    }
    func flush() async throws { try await inner.flush() }
    func discard(offset: UInt64, length: UInt64) async throws {
        try await inner.discard(offset: offset, length: length)
    }
    func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await inner.writeZeroes(offset: offset, length: length)
    }
    func close() async throws {}
}

/// A device whose superblock writes (the first 8 KiB) wait while its gate is shut.
final class SuperblockGate: Reopenable, @unchecked Sendable {
    // @unchecked: `state` is only touched under its lock.
    private let state = Locked((shut: false, waiting: [CheckedContinuation<Void, Never>](), held: 0))
    /// Superblock writes waiting at the gate.
    var held: Int { state.withLock { $0.held } }
    func shut() { state.withLock { $0.shut = true } }
    func open() {
        let waiting = state.withLock { state in
            state.shut = false
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }
    override func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        if offset < 8192 {
            await withCheckedContinuation { continuation in
                let proceed = state.withLock { state -> Bool in
                    guard state.shut else { return true }
                    state.waiting.append(continuation)
                    state.held += 1
                    return false
                }
                if proceed { continuation.resume() }
            }
        }
        try await super.write(from: buffer, at: offset, fua: fua)
    }
}

func randomFill(_ array: RAIDArray, seed: UInt64) async throws -> [UInt8] {
    let data = AlignedBuffer(count: Int(array.capacityBytes))
    fillRandom(data.bytes, seed: seed)
    try await array.write(from: data, at: 0)
    return data.array
}

@Suite("RAID arrays", .serialized)
struct RAIDArrayTests {
    @Test(
        "data written concurrently reads back, and again after closing and reassembling in another order",
        arguments: [RAIDLevel.raid0, .raid1, .raid5])
    func roundTrip(level: RAIDLevel) async throws {
        let memory = try memoryMembers(level == .raid5 ? 4 : 3)
        let array = try await RAIDArray.create(
            name: "r\(level.rawValue)", level: level, chunkBytes: 4096,
            members: memory.map { Reopenable($0) })
        let expected = try await exerciseConcurrently(
            array, engine: nil, tasks: 8, operationsPerTask: 80, seed: UInt64(level.rawValue))
        #expect(byteDifference(try await readAll(array), expected) == nil)
        try await array.close()
        let report = try await RAIDArray.assemble(members: memory.reversed().map { Reopenable($0) })
        #expect(report.notes.isEmpty, "\(report.notes)")
        #expect(report.resyncedBytes == 0, "a cleanly closed array needs no resync")
        #expect(byteDifference(try await readAll(report.array), expected) == nil)
        #expect(report.array.status.state == .clean)
        if level != .raid0 {
            let scrub = try await report.array.scrub()
            #expect(scrub.mismatches == 0)
        }
        try await report.array.close()
    }

    @Test(
        "with any one member failed the data stays byte-identical; replace, rebuild and scrub restore it exactly",
        arguments: [RAIDLevel.raid1, .raid5])
    func failEachMember(level: RAIDLevel) async throws {
        let count = level == .raid5 ? 4 : 2
        for failed in 0..<count {
            let memory = try memoryMembers(count)
            let array = try await RAIDArray.create(
                name: "f", level: level, chunkBytes: 8192, members: memory.map { Reopenable($0) })
            let expected = try await randomFill(array, seed: UInt64(failed))
            try await array.flush()
            let before = memory[failed].snapshot()
            try await array.fail(memberNamed: "m\(failed)")
            #expect(array.status.state == .degraded)
            #expect(
                byteDifference(try await readAll(array), expected) == nil, "degraded read with slot \(failed) failed")
            // Writes while degraded go through parity.
            let patch = AlignedBuffer(count: 12288)
            fillRandom(patch.bytes, seed: 99)
            var updated = expected
            try await array.write(from: patch, at: 20480)
            updated.replaceSubrange(20480..<(20480 + 12288), with: patch.array)
            #expect(byteDifference(try await readAll(array), updated) == nil)

            let replacement = try MemoryDevice(capacityBytes: memory[0].capacityBytes, name: "new\(failed)")
            try await array.replace(memberNamed: "m\(failed)", with: Reopenable(replacement))
            #expect(array.status.state == .rebuilding)
            let rebuilt = try await array.rebuild()
            #expect(rebuilt == array.geometry.memberDataBytes)
            #expect(array.status.state == .clean || array.status.state == .active)
            #expect(byteDifference(try await readAll(array), updated) == nil)
            #expect(try await array.scrub().mismatches == 0)
            // Rewriting the same contents as before the failure makes the new member equal the old one.
            let original = AlignedBuffer(count: 12288)
            expected[20480..<(20480 + 12288)].withUnsafeBytes { original.bytes.copyMemory(from: $0) }
            try await array.write(from: original, at: 20480)
            try await array.flush()
            let dataStart = Int(RAIDArray.dataOffset)
            #expect(
                Array(replacement.snapshot()[dataStart...]) == Array(before[dataStart...]),
                "the rebuilt member holds exactly what the failed one held")
            try await array.close()
        }
    }

    @Test("a read error is answered from redundancy and the bad block rewritten", arguments: [RAIDLevel.raid1, .raid5])
    func readErrorRepaired(level: RAIDLevel) async throws {
        let memory = try memoryMembers(level == .raid5 ? 3 : 2)
        let faulty = memory.map { FaultyDevice(wrapping: $0, seed: 1) }
        let array = try await RAIDArray.create(name: "e", level: level, chunkBytes: 4096, members: faulty)
        let expected = try await randomFill(array, seed: 5)
        faulty[0].failReads(in: RAIDArray.dataOffset..<(RAIDArray.dataOffset + 65536))
        let head = AlignedBuffer(count: 65536)
        for _ in 0..<4 {
            try await array.read(into: head, at: 0)
            #expect(byteDifference(head.array, Array(expected[0..<65536])) == nil)
        }
        #expect(byteDifference(try await readAll(array), expected) == nil)
        #expect(array.status.slots.allSatisfy { $0.state == .active }, "a read error alone does not fail a member")
        let errors = faulty[0].statistics.injectedReadErrors
        #expect(errors > 0)
        faulty[0].clearFaults()
        #expect(try await array.scrub().mismatches == 0)
        try await array.close()
    }

    @Test("a write error fails the member and the array carries on degraded", arguments: [RAIDLevel.raid1, .raid5])
    func writeErrorFailsMember(level: RAIDLevel) async throws {
        let memory = try memoryMembers(level == .raid5 ? 3 : 2)
        let faulty = memory.map { FaultyDevice(wrapping: $0, seed: 2) }
        let array = try await RAIDArray.create(name: "w", level: level, chunkBytes: 4096, members: faulty)
        var expected = try await randomFill(array, seed: 6)
        faulty[0].failWrites()
        let patch = AlignedBuffer(count: 65536)
        fillRandom(patch.bytes, seed: 7)
        try await array.write(from: patch, at: 0)
        expected.replaceSubrange(0..<65536, with: patch.array)
        #expect(array.status.slots[0].state == .faulty)
        #expect(array.status.state == .degraded)
        #expect(byteDifference(try await readAll(array), expected) == nil)
        // A second failure loses the array: writes are refused with a clear error.
        faulty[1].failWrites()
        let error = await spindleError { try await array.write(from: patch, at: 0) }
        expectError(error, .ioFailed, ["lost more members than it can survive"])
        try await array.close()
    }

    @Test("a member that vanishes under partial-stripe writes is failed, and every write completes degraded")
    func memberVanishesDuringWrites() async throws {
        let memory = try memoryMembers(4)
        let faulty = memory.map { FaultyDevice(wrapping: $0, seed: 3) }
        let array = try await RAIDArray.create(name: "v", level: .raid5, chunkBytes: 4096, members: faulty)
        var expected = try await randomFill(array, seed: 8)
        faulty[2].vanish(afterOperations: 40)
        var random = SeededRandom(seed: 9)
        let patch = AlignedBuffer(count: 4096)
        for _ in 0..<200 {  // small writes: read-modify-writes that need the vanishing member's reads
            let block = Int(random.below(UInt64(expected.count / 4096)))
            fillRandom(patch.bytes, seed: random.next())
            try await array.write(from: patch, at: UInt64(block * 4096))
            expected.replaceSubrange((block * 4096)..<((block + 1) * 4096), with: patch.array)
        }
        #expect(array.status.slots[2].state == .faulty)
        #expect(byteDifference(try await readAll(array), expected) == nil)
        try await array.close()
    }

    @Test("a spare present when a member fails is used automatically")
    func spareTakesOver() async throws {
        let memory = try memoryMembers(4)
        let array = try await RAIDArray.create(
            name: "s", level: .raid5, chunkBytes: 4096, members: memory.prefix(3).map { Reopenable($0) })
        let expected = try await randomFill(array, seed: 8)
        try await array.add(Reopenable(memory[3]))
        #expect(array.status.spares == ["m3"])
        try await array.fail(memberNamed: "m1")
        #expect(array.status.slots[1].device == "m3" && array.status.slots[1].state == .rebuilding)
        try await array.rebuild()
        #expect(byteDifference(try await readAll(array), expected) == nil)
        #expect(try await array.scrub().mismatches == 0)
        try await array.close()
    }

    @Test("an interrupted rebuild resumes from its checkpoint after reassembly")
    func rebuildResumes() async throws {
        // 32 steps of 1 MiB, 8 in flight, each write delayed: the rebuild advances in visible waves.
        let memory = try memoryMembers(3, bytes: (1 << 20) + (32 << 20))
        let array = try await RAIDArray.create(
            name: "c", level: .raid5, chunkBytes: 65536, members: memory.map { Reopenable($0) })
        let expected = try await randomFill(array, seed: 9)
        try await array.fail(memberNamed: "m2")
        try await array.remove(memberNamed: "m2")
        let replacement = try MemoryDevice(capacityBytes: memory[0].capacityBytes, name: "spare")
        let slow = FaultyDevice(wrapping: Reopenable(replacement), name: "spare")
        slow.addLatency(nanoseconds: 40_000_000)
        try await array.add(slow)
        let task = Task { try await array.rebuild(checkpointBytes: 1 << 20) }
        while (array.status.rebuildDoneBytes ?? 0) < 3 << 20 { try await Task.sleep(nanoseconds: 5_000_000) }
        task.cancel()
        let outcome = await task.result
        #expect(throws: CancellationError.self) { try outcome.get() }
        array.setIdleCleanDelay(nanoseconds: 0)  // the process is about to "stop": no more background work
        let status = array.status
        #expect(status.rebuildDoneBytes ?? 0 >= 1 << 20)
        // The process "stops" here: no clean close, so the array is dirty as well as rebuilding, which
        // takes force to start. Reassemble from what the devices hold.
        let report = try await RAIDArray.assemble(
            members: [memory[0], memory[1], replacement].map { Reopenable($0) }, force: true)
        let resumed = report.array.status
        #expect(resumed.rebuildSlot == 2)
        let checkpoint = resumed.rebuildDoneBytes ?? 0
        #expect(checkpoint > 0, "the checkpoint survived")
        let rebuilt = try await report.array.rebuild()
        #expect(checkpoint < report.array.geometry.memberDataBytes)
        #expect(
            rebuilt == report.array.geometry.memberDataBytes - checkpoint, "resumed from the checkpoint, not from zero")
        #expect(byteDifference(try await readAll(report.array), expected) == nil)
        #expect(try await report.array.scrub().mismatches == 0)
        try await report.array.close()
    }

    @Test("assembly refuses wrong sets of devices and says why")
    func assemblyRefusals() async throws {
        let first = try memoryMembers(3, prefix: "a")
        let second = try memoryMembers(3, prefix: "b")
        let arrayA = try await RAIDArray.create(
            name: "alpha", level: .raid5, chunkBytes: 4096, members: first.map { Reopenable($0) })
        let arrayB = try await RAIDArray.create(
            name: "beta", level: .raid1, chunkBytes: 4096, members: second.map { Reopenable($0) })
        _ = try await randomFill(arrayA, seed: 1)
        try await arrayA.close()
        try await arrayB.close()

        expectError(
            await spindleError {
                _ = try await RAIDArray.assemble(members: [first[0], first[1], second[0]].map { Reopenable($0) })
            },
            .invalidArgument, ["belong to different arrays", "a0 (array 'alpha'", "b0 (array 'beta'"])
        let copy = try MemoryDevice(capacityBytes: first[0].capacityBytes, name: "a0-copy")
        let copyBytes = first[0].snapshot(offset: 0, length: 8192)
        let copyBuffer = AlignedBuffer(count: 8192)
        copyBytes.withUnsafeBytes { copyBuffer.bytes.copyMemory(from: $0) }
        try await copy.write(from: copyBuffer, at: 0)
        expectError(
            await spindleError {
                _ = try await RAIDArray.assemble(members: [first[0], copy, first[1]].map { Reopenable($0) })
            },
            .invalidArgument, ["a0 and a0-copy are the same member"])
        let blank = try MemoryDevice(capacityBytes: 4 << 20, name: "blank")
        expectError(
            await spindleError { _ = try await RAIDArray.assemble(members: [first[0], blank].map { Reopenable($0) }) },
            .invalidArgument, ["assemble", "blank", "not an array member"])
        expectError(
            await spindleError { _ = try await RAIDArray.assemble(members: [first[0]].map { Reopenable($0) }) },
            .ioFailed, ["too few members", "1 of 3 are usable"])

        // A corrupt superblock: flip a byte in both copies.
        let corrupt = AlignedBuffer(count: 8192)
        try await first[2].read(into: corrupt, at: 0)
        let events = (0..<2).map { copy in
            (try? RAIDSuperblock.decode(UnsafeRawBufferPointer(corrupt.slice(offset: copy * 4096, length: 4096))))?
                .events ?? 0
        }
        let older = events[0] < events[1] ? 0 : 1
        corrupt.bytes[200] ^= 0xFF
        corrupt.bytes[4096 + 200] ^= 0xFF
        try await first[2].write(from: corrupt, at: 0)
        let error = await spindleError { _ = try await RAIDArray.assemble(members: first.map { Reopenable($0) }) }
        expectError(error, .corrupted, ["a2", "corrupt superblock: checksum"])
        if case .checksumMismatch = error?.cause as? RAIDSuperblock.Problem {
        } else {
            Issue.record("the cause is the superblock's problem, got \(String(describing: error?.cause))")
        }
        // The newer copy alone is enough (a write torn in the older copy).
        corrupt.bytes[(1 - older) * 4096 + 200] ^= 0xFF
        try await first[2].write(from: corrupt, at: 0)
        let healed = try await RAIDArray.assemble(members: first.map { Reopenable($0) })
        #expect(healed.notes.isEmpty)
        try await healed.array.close()
    }

    @Test("a stale member and a truncated one are left out, and the array runs degraded saying which")
    func staleAndTruncated() async throws {
        let memory = try memoryMembers(3)
        let array = try await RAIDArray.create(
            name: "st", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        _ = try await randomFill(array, seed: 3)
        let staleImage = memory[1].snapshot()
        try await array.fail(memberNamed: "m1")
        let expected = try await randomFill(array, seed: 4)
        try await array.close()
        // m1 "comes back" with its old contents.
        let stale = try MemoryDevice(capacityBytes: memory[1].capacityBytes, name: "m1-back")
        let image = AlignedBuffer(count: staleImage.count)
        staleImage.withUnsafeBytes { image.bytes.copyMemory(from: $0) }
        try await stale.write(from: image, at: 0)
        let report = try await RAIDArray.assemble(members: [memory[0], stale, memory[2]].map { Reopenable($0) })
        #expect(report.notes.contains { $0.contains("m1-back is stale") }, "\(report.notes)")
        #expect(byteDifference(try await readAll(report.array), expected) == nil)
        try await report.array.close()

        let fresh = try memoryMembers(3, prefix: "t")
        let clean = try await RAIDArray.create(
            name: "tr", level: .raid5, chunkBytes: 4096, members: fresh.map { Reopenable($0) })
        let cleanData = try await randomFill(clean, seed: 5)
        try await clean.close()
        let short = try MemoryDevice(capacityBytes: 2 << 20, name: "t2-short")
        let head = AlignedBuffer(count: 2 << 20)
        try await fresh[2].read(into: head, at: 0)
        try await short.write(from: head, at: 0)
        let truncated = try await RAIDArray.assemble(members: [fresh[0], fresh[1], short].map { Reopenable($0) })
        #expect(truncated.notes.contains { $0.contains("t2-short is truncated") }, "\(truncated.notes)")
        #expect(truncated.array.status.state == .degraded)
        #expect(byteDifference(try await readAll(truncated.array), cleanData) == nil)
        try await truncated.array.close()
    }

    @Test("a write that skipped a just-failed member reports success only once the failure is in the superblocks")
    func failureRecordedBeforeSuccess() async throws {
        let memory = try memoryMembers(2)
        let gate = SuperblockGate(memory[0])
        let failing = FaultyDevice(wrapping: Reopenable(memory[1]), name: "m1")
        let array = try await RAIDArray.create(name: "rec", level: .raid1, chunkBytes: 4096, members: [gate, failing])
        let data = AlignedBuffer(count: 4096)
        data.fill(0x3C)
        try await array.write(from: data, at: 0)
        // m1 fails its next data write; the superblocks recording that cannot be written yet.
        failing.failWrites(in: RAIDArray.dataOffset..<(RAIDArray.dataOffset + (1 << 20)))
        gate.shut()
        let first = Task { try await array.write(from: data, at: 4096) }
        while gate.held == 0 { try await Task.sleep(nanoseconds: 1_000_000) }
        // A second write sees m1 faulty and writes m0 alone: it must not report success yet.
        let finished = Locked(false)
        let second = Task {
            try await array.write(from: data, at: 8192)
            finished.withLock { $0 = true }
        }
        try await Task.sleep(nanoseconds: 200_000_000)
        #expect(
            finished.withLock { $0 } == false,
            "the write reported success while the superblocks still counted m1 in sync")
        gate.open()
        try await first.value
        try await second.value
        #expect(finished.withLock { $0 })
        guard case let .success(block) = try await RAIDArray.readSuperblock(of: memory[0]) else {
            Issue.record("no superblock on m0")
            return
        }
        #expect(block.slots[1].state == .faulty)
        try await array.close()
    }

    @Test("a superblock update a crash cut short (on one member only) is outlived; two updates behind is stale")
    func superblockUpdateCutShort() async throws {
        let memory = try memoryMembers(4)
        let array = try await RAIDArray.create(
            name: "cut", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        let expected = try await randomFill(array, seed: 8)
        try await array.close()
        /// Writes member 0's next superblock update, as if the crash came before the others got it.
        func advanceFirstMember() async throws {
            guard case var .success(block) = try await RAIDArray.readSuperblock(of: memory[0]) else {
                Issue.record("member 0 has no superblock")
                return
            }
            block.events += 1
            let buffer = AlignedBuffer(count: RAIDSuperblock.blockBytes)
            block.encoded().withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
            try await memory[0].write(from: buffer, at: RAIDSuperblock.copyOffsets[Int(block.events % 2)], fua: true)
        }
        try await advanceFirstMember()
        let report = try await RAIDArray.assemble(members: memory.map { Reopenable($0) })
        #expect(
            report.notes.filter {
                $0.contains("one superblock update behind (a crash cut the update short); brought up to date")
            }.count == 3,
            "\(report.notes)")
        #expect(report.array.status.slots.allSatisfy { $0.state == .active })
        #expect(byteDifference(try await readAll(report.array), expected) == nil)
        try await report.array.close()

        try await advanceFirstMember()
        try await advanceFirstMember()
        let error = await spindleError { _ = try await RAIDArray.assemble(members: memory.map { Reopenable($0) }) }
        expectError(error, .ioFailed, ["too few members", "m1 is stale", "it missed changes"])
    }

    @Test("RAID10 is RAID0 over RAID1 arrays, and survives a member failure in each mirror")
    func raid10ByComposition() async throws {
        let memory = try memoryMembers(4)
        let mirrorA = try await RAIDArray.create(
            name: "mirror-a", level: .raid1, chunkBytes: 4096, members: [memory[0], memory[1]])
        let mirrorB = try await RAIDArray.create(
            name: "mirror-b", level: .raid1, chunkBytes: 4096, members: [memory[2], memory[3]])
        let stripe = try await RAIDArray.create(
            name: "raid10", level: .raid0, chunkBytes: 4096, members: [mirrorA, mirrorB])
        let expected = try await exerciseConcurrently(stripe, engine: nil, tasks: 4, operationsPerTask: 60, seed: 10)
        try await mirrorA.fail(memberNamed: "m0")
        try await mirrorB.fail(memberNamed: "m3")
        #expect(byteDifference(try await readAll(stripe), expected) == nil)
        try await stripe.close()
    }

    @Test(
        "power cuts in the middle of writes: after reassembly and resync every flushed byte is there, and parity agrees"
    )
    func powerCutsAndWriteHole() async throws {
        for seed in UInt64(1)...6 {
            let memory = try memoryMembers(4)
            let faulty = memory.map { FaultyDevice(wrapping: Reopenable($0), seed: seed &* 7, volatileCache: true) }
            let array = try await RAIDArray.create(name: "pc", level: .raid5, chunkBytes: 4096, members: faulty)
            try await array.flush()
            let block = array.logicalBlockBytes  // the contract: each logical block old or new
            let blocks = Int(array.capacityBytes) / block
            var flushed = [UInt8](repeating: 0, count: Int(array.capacityBytes))
            var current = flushed
            var candidates = [[UInt8]?](repeating: nil, count: blocks)  // versions written since the last flush, per block
            var random = SeededRandom(seed: seed)
            let operations = 40 + Int(random.below(40))
            for step in 0..<operations {
                let first = Int(random.below(UInt64(blocks - 64))) / 8 * 8
                let count = 8 * (1 + Int(random.below(8)))
                let data = AlignedBuffer(count: count * block)
                fillRandom(data.bytes, seed: seed * 1000 + UInt64(step))
                try await array.write(from: data, at: UInt64(first * block))
                current.replaceSubrange((first * block)..<((first + count) * block), with: data.array)
                for index in first..<(first + count) {
                    let version = Array(current[(index * block)..<((index + 1) * block)])
                    candidates[index] = (candidates[index] ?? []) + version
                }
                if random.chance(0.2) {
                    try await array.flush()
                    flushed = current
                    candidates = [[UInt8]?](repeating: nil, count: blocks)
                }
            }
            for device in faulty { try await device.powerCut(tearing: true) }
            // Reassemble from what reached the "disks".
            let report = try await RAIDArray.assemble(members: memory.map { Reopenable($0) })
            #expect(report.notes.contains { $0.contains("not shut down cleanly") })
            #expect(try await report.array.scrub().mismatches == 0, "seed \(seed): resync left parity disagreeing")
            let after = try await readAll(report.array)
            for index in 0..<blocks {
                let range = (index * block)..<((index + 1) * block)
                let got = Array(after[range])
                if got == Array(flushed[range]) { continue }
                let versions = candidates[index] ?? []
                let matches = stride(from: 0, to: versions.count, by: block).contains {
                    Array(versions[$0..<($0 + block)]) == got
                }
                #expect(matches, "seed \(seed): block \(index) holds neither its flushed nor a later written version")
            }
            // And a member failure now reconstructs exactly what the array read.
            try await report.array.fail(memberNamed: "m\(seed % 4)")
            #expect(
                byteDifference(try await readAll(report.array), after) == nil,
                "seed \(seed): reconstruction disagrees with the data")
            try await report.array.close()
        }
    }

    @Test("a dirty, degraded RAID5 is refused without force")
    func dirtyDegradedRefused() async throws {
        let memory = try memoryMembers(3)
        let array = try await RAIDArray.create(
            name: "dd", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        array.setIdleCleanDelay(nanoseconds: 0)
        _ = try await randomFill(array, seed: 12)
        // No close: the array is left dirty, as after a crash.
        let error = await spindleError {
            _ = try await RAIDArray.assemble(members: [memory[0], memory[2]].map { Reopenable($0) })
        }
        expectError(error, .ioFailed, ["not shut down cleanly and is degraded", "`force: true`"])
        let forced = try await RAIDArray.assemble(members: [memory[0], memory[2]].map { Reopenable($0) }, force: true)
        #expect(forced.array.status.state == .degraded || forced.array.status.state == .active)
        try await forced.array.close()
    }

    @Test(
        "an idle array marks itself clean, so a crash while idle needs no resync; the next write marks it dirty again")
    func idleClean() async throws {
        let memory = try memoryMembers(3)
        let array = try await RAIDArray.create(
            name: "idle", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        array.setIdleCleanDelay(nanoseconds: 50_000_000)
        let expected = try await randomFill(array, seed: 13)
        #expect(array.status.state == .active)
        var waited = 0
        while array.status.state != .clean && waited < 400 {
            try await Task.sleep(nanoseconds: 10_000_000)
            waited += 1
        }
        #expect(array.status.state == .clean)
        #expect(await RAIDArray.inspect(memory).dirty == false, "the superblocks on disk say clean")
        array.setIdleCleanDelay(nanoseconds: 0)
        // A crash now: reassembly needs no resync.
        let report = try await RAIDArray.assemble(members: memory.map { Reopenable($0) })
        #expect(report.resyncedBytes == 0 && report.notes.isEmpty, "\(report.notes)")
        #expect(byteDifference(try await readAll(report.array), expected) == nil)
        report.array.setIdleCleanDelay(nanoseconds: 0)
        let patch = AlignedBuffer(count: 4096)
        try await report.array.write(from: patch, at: 0)
        #expect(await RAIDArray.inspect(memory).dirty == true, "a write marks the array dirty on disk before it lands")
        try await report.array.close()
        #expect(await RAIDArray.inspect(memory).dirty == false)
    }

    @Test(
        "idle cleaning turned off right after assembly stays off: the cleaner's first round uses the delay as it is when it wakes, not as it was at assembly"
    )
    func idleCleanOffAfterAssembly() async throws {
        let memory = try memoryMembers(3)
        let array = try await RAIDArray.create(
            name: "stay", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        array.setIdleCleanDelay(nanoseconds: 0)
        _ = try await randomFill(array, seed: 14)
        try await array.flush()  // the bitmap clears: assembly has nothing to resync, so writes nothing
        // No close: dirty on disk, as after a crash. The assembled array is dirty and has written
        // nothing (its resync found nothing to repair), so an idle test with the delay its cleaner
        // started with (the default, 2 s) passes at once.
        let report = try await RAIDArray.assemble(members: memory.map { Reopenable($0) })
        try await Task.sleep(nanoseconds: 100_000_000)  // the cleaner's first round has begun
        report.array.setIdleCleanDelay(nanoseconds: 0)
        try await Task.sleep(nanoseconds: 700_000_000)  // past that round (a quarter of the default delay)
        #expect(await RAIDArray.inspect(memory).dirty == true, "the array marked itself clean with cleaning off")
        try await report.array.close()
    }

    @Test("creation checks its arguments")
    func createValidation() async throws {
        let memory = try memoryMembers(2)
        expectError(
            await spindleError { _ = try await RAIDArray.create(name: "x", level: .raid5, members: memory) },
            .invalidArgument, ["raid5 needs 3 to 64 members, not 2"])
        expectError(
            await spindleError {
                _ = try await RAIDArray.create(name: "x", level: .raid1, chunkBytes: 3000, members: memory)
            },
            .invalidArgument, ["chunk size 3000"])
        let tiny = try MemoryDevice(capacityBytes: 512 * 1024, name: "tiny")
        expectError(
            await spindleError {
                _ = try await RAIDArray.create(name: "x", level: .raid1, members: [memory[0], tiny])
            },
            .invalidArgument, ["tiny", "needs at least"])
        expectError(
            await spindleError {
                _ = try await RAIDArray.create(name: "x", level: .raid1, members: [memory[0], memory[0]])
            },
            .invalidArgument, ["given twice"])
    }
}
