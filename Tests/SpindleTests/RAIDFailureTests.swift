import Testing

@testable import Spindle

private func members(_ count: Int, bytes: UInt64 = (1 << 20) + (2 << 20)) throws -> [MemoryDevice] {
    try (0..<count).map { try MemoryDevice(capacityBytes: bytes, name: "d\($0).img") }
}

/// Failures at the edges of what each level survives: mirrors down to one member, read errors
/// with no redundancy left, unreadable superblocks, removing a failed member after reassembly.
@Suite("RAID failures", .serialized)
struct RAIDFailureTests {
    @Test("a mirror of 3 or 4 survives all but one member: failing, assembling and vanishing", arguments: [3, 4])
    func mirrorSurvivesToOneMember(count: Int) async throws {
        let memory = try members(count)
        let faulty = memory.map { FaultyDevice(wrapping: Reopenable($0), name: $0.name) }
        let array = try await RAIDArray.create(name: "m", level: .raid1, chunkBytes: 65536, members: faulty)
        var expected = try await randomFill(array, seed: 1)
        #expect(array.geometry.redundancy == count - 1)
        for slot in 1..<(count - 1) { try await array.fail(memberNamed: "d\(slot).img") }
        // The last but one vanishes under I/O: the mirror carries on with one member.
        faulty[count - 1].vanish()
        let patch = AlignedBuffer(count: 65536)
        fillRandom(patch.bytes, seed: 2)
        try await array.write(from: patch, at: 65536)
        expected.replaceSubrange(65536..<131072, with: patch.array)
        #expect(array.status.state == .degraded)
        #expect(array.status.slots.filter { $0.state == .active }.count == 1)
        #expect(try await readAll(array) == expected)
        // Failing the last one is refused.
        let error = await spindleError { try await array.fail(memberNamed: "d0.img") }
        expectError(error, .unsupported, ["without enough members"])
        try await array.close()
        // The one in-sync member alone assembles, serves and takes writes.
        let report = try await RAIDArray.assemble(members: [Reopenable(memory[0])])
        #expect(report.array.status.state == .degraded)
        #expect(try await readAll(report.array) == expected)
        try await report.array.write(from: patch, at: 0)
        try await report.array.close()
    }

    @Test("a read error on a degraded RAID5 fails that request only: no member is failed, and the rest reads")
    func degradedReadErrorFailsTheRequestOnly() async throws {
        let memory = try members(3)
        let faulty = memory.map { FaultyDevice(wrapping: Reopenable($0), name: $0.name) }
        let array = try await RAIDArray.create(name: "r", level: .raid5, chunkBytes: 4096, members: faulty)
        let expected = try await randomFill(array, seed: 3)
        try await array.fail(memberNamed: "d0.img")
        // Member offsets 1 MiB ..< 1 MiB + 100 KiB of d1 (its data area's first 100 KiB) read badly.
        faulty[1].failReads(in: RAIDArray.dataOffset..<(RAIDArray.dataOffset + 100 * 1024))
        var failedReads = 0
        let block = AlignedBuffer(count: 4096)
        for offset in stride(from: 0, to: Int(array.capacityBytes), by: 4096) {
            do {
                try await array.read(into: block, at: UInt64(offset))
                #expect(block.array == Array(expected[offset..<(offset + 4096)]), "offset \(offset)")
            } catch let error as SpindleError {
                failedReads += 1
                #expect(error.code == .ioFailed)
                #expect("\(error)".contains("cannot be read or rebuilt from redundancy"), "\(error)")
            }
        }
        // d1's bad range holds 25 chunks; each stripe there has one chunk of d0 (rebuilt from d1 and
        // d2, so unreadable) or of d1 itself (unreadable), unless d1 holds its parity.
        #expect(failedReads > 0 && failedReads <= 50)
        #expect(array.status.unrecoverableReads == failedReads)
        #expect(array.status.slots[1].state == .active && array.status.slots[2].state == .active)
        #expect(array.status.state == .degraded)
        // Writes to the bad range fail the same way, without failing a member.
        let error = await spindleError { try await array.write(from: block, at: 0) }
        #expect(error != nil)
        #expect(array.status.slots[1].state == .active && array.status.state == .degraded)
        try await array.close()
        // Reassembles without force: nothing was marked failed.
        let report = try await RAIDArray.assemble(members: memory.dropFirst().map { Reopenable($0) })
        #expect(report.array.status.state == .degraded)
        try await report.array.close()
    }

    @Test(
        "scrub rebuilds chunks a member cannot read from redundancy, and reports those it cannot",
        arguments: [RAIDLevel.raid1, .raid5])
    func scrubRepairsReadErrors(level: RAIDLevel) async throws {
        let memory = try members(3)
        let faulty = memory.map { FaultyDevice(wrapping: Reopenable($0), name: $0.name) }
        let array = try await RAIDArray.create(name: "s", level: level, chunkBytes: 4096, members: faulty)
        let expected = try await randomFill(array, seed: 4)
        faulty[1].failReads(in: (RAIDArray.dataOffset + 8192)..<(RAIDArray.dataOffset + 16384))
        let report = try await array.scrub()
        #expect(report.readErrorsRepaired == 2 && report.unreadable.isEmpty && report.mismatches == 0)
        #expect(array.status.slots.allSatisfy { $0.state == .active })
        faulty[1].clearFaults()
        #expect(try await array.scrub().mismatches == 0)
        #expect(try await readAll(array) == expected)
        // The same bad blocks on two members: for RAID5 nothing is left to rebuild them from.
        faulty[1].failReads(in: (RAIDArray.dataOffset + 8192)..<(RAIDArray.dataOffset + 12288))
        faulty[2].failReads(in: (RAIDArray.dataOffset + 8192)..<(RAIDArray.dataOffset + 12288))
        let second = try await array.scrub()
        if level == .raid5 {
            #expect(
                second.unreadable.map(\.slot) == [1, 2] && second.unreadable.allSatisfy { $0.memberOffset == 8192 })
        } else {
            #expect(second.readErrorsRepaired == 2 && second.unreadable.isEmpty)
        }
        #expect(array.status.slots.allSatisfy { $0.state == .active })
        try await array.close()
    }

    @Test(
        "a rebuild whose source cannot read stops with its place kept and no member failed; a mirror tries the next source",
        arguments: [RAIDLevel.raid1, .raid5])
    func rebuildSourceReadError(level: RAIDLevel) async throws {
        let memory = try members(3, bytes: (1 << 20) + (4 << 20))
        let faulty = memory.map { FaultyDevice(wrapping: Reopenable($0), name: $0.name) }
        let array = try await RAIDArray.create(name: "b", level: level, chunkBytes: 65536, members: faulty)
        let expected = try await randomFill(array, seed: 5)
        try await array.fail(memberNamed: "d2.img")
        try await array.remove(memberNamed: "d2.img")
        let replacement = try MemoryDevice(capacityBytes: (1 << 20) + (4 << 20), name: "new.img")
        try await array.add(Reopenable(replacement))
        faulty[0].failReads(in: (RAIDArray.dataOffset + (2 << 20))..<(RAIDArray.dataOffset + (2 << 20) + 4096))
        if level == .raid1 {
            // d1 has the block d0 cannot read.
            try await array.rebuild()
            #expect(array.status.state == .clean || array.status.state == .active)
        } else {
            let error = await spindleError { try await array.rebuild() }
            expectError(error, .ioFailed, ["stopped at member offset 2097152", "d0.img"])
            #expect(array.status.slots[0].state == .active && array.status.slots[1].state == .active)
            #expect((array.status.rebuildDoneBytes ?? .max) <= 2 << 20, "the place reached is kept")
            #expect(array.status.state == .rebuilding)
            faulty[0].clearFaults()
            try await array.rebuild()
        }
        #expect(try await array.scrub().mismatches == 0)
        #expect(try await readAll(array) == expected)
        try await array.close()
    }

    @Test("a member whose superblock area cannot be read is left out with a note, and the array runs degraded")
    func unreadableSuperblockLeftOut() async throws {
        let memory = try members(3)
        let array = try await RAIDArray.create(
            name: "u", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        let expected = try await randomFill(array, seed: 6)
        try await array.close()
        // One copy unreadable: the other is used, nothing is left out.
        let oneCopy = FaultyDevice(wrapping: Reopenable(memory[1]), name: "d1.img")
        oneCopy.failReads(in: 0..<4096)
        let first = try await RAIDArray.assemble(members: [Reopenable(memory[0]), oneCopy, Reopenable(memory[2])])
        #expect(first.array.status.state == .clean)
        try await first.array.close()
        // Both copies unreadable: left out, degraded, data intact.
        let bothCopies = FaultyDevice(wrapping: Reopenable(memory[1]), name: "d1.img")
        bothCopies.failReads(in: 0..<8192)
        let second = try await RAIDArray.assemble(members: [Reopenable(memory[0]), bothCopies, Reopenable(memory[2])])
        #expect(
            second.notes.contains { $0.contains("d1.img is left out") && $0.contains("cannot be read") },
            "\(second.notes)")
        #expect(
            second.notes.contains { $0.contains("slot 1 (d1.img, member") && $0.contains("is missing") },
            "\(second.notes)")
        #expect(second.array.status.state == .degraded)
        #expect(second.array.status.slots[1].lastKnownName == "d1.img" && second.array.status.slots[1].device == nil)
        #expect(try await readAll(second.array) == expected)
        try await second.array.close()
    }

    @Test("a failed member, given at the next assembly, stays in its slot as faulty and can be removed and replaced")
    func removeFailedMemberAfterReassembly() async throws {
        let memory = try members(4)
        let array = try await RAIDArray.create(
            name: "f", level: .raid5, chunkBytes: 4096, members: memory.map { Reopenable($0) })
        let expected = try await randomFill(array, seed: 7)
        try await array.fail(memberNamed: "d1.img")
        try await array.close()
        let report = try await RAIDArray.assemble(members: memory.map { Reopenable($0) })
        let reassembled = report.array
        #expect(reassembled.status.slots[1].device == "d1.img" && reassembled.status.slots[1].state == .faulty)
        // A faulty member serves no I/O.
        #expect(try await readAll(reassembled) == expected)
        try await reassembled.remove(memberNamed: "d1.img")
        #expect(reassembled.status.slots[1].state == .missing && reassembled.status.slots[1].device == nil)
        #expect(reassembled.status.slots[1].memberUUID == nil, "a removed member is forgotten")
        let probe = AlignedBuffer(count: 8192)
        try await memory[1].read(into: probe, at: 0)
        #expect(probe.array.allSatisfy { $0 == 0 }, "the removed member's superblocks are wiped")
        try await reassembled.add(Reopenable(try MemoryDevice(capacityBytes: memory[1].capacityBytes, name: "n.img")))
        try await reassembled.rebuild()
        #expect(try await reassembled.scrub().mismatches == 0)
        try await reassembled.close()
    }
}
