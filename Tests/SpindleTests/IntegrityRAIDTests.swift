import Glibc
import Testing

@testable import Spindle

private let blockBytes = IntegritySuperblock.blockBytes

/// Memory disks with 4 KiB sectors, each under a fault injector (that a test can rot) and a
/// wrapper that keeps it open across reassembly.
private func disks(_ count: Int, bytes: UInt64 = 8 << 20, seed: UInt64 = 1, volatileCache: Bool = false) throws
    -> (memory: [MemoryDevice], faulty: [FaultyDevice])
{
    let memory = try (0..<count).map {
        try MemoryDevice(capacityBytes: bytes, logicalBlockBytes: 4096, name: "d\($0).img")
    }
    let faulty = memory.map {
        FaultyDevice(wrapping: Reopenable($0), seed: seed, volatileCache: volatileCache, name: $0.name)
    }
    return (memory, faulty)
}

/// The stored data area of member `slot`'s integrity layer, as a range of the disk underneath:
/// where the array's data lies on it.
private func dataArea(of array: RAIDArray, slot: Int) -> Range<UInt64> {
    let member = array.readableMembers()[slot]!.device as! IntegrityDevice
    let start = member.superblock.dataOffset + RAIDArray.dataOffset
    return start..<(start + array.geometry.memberDataBytes)
}

@Suite("RAID with integrity", .serialized)
struct IntegrityRAIDTests {
    @Test("md's failure case: RAID1 legs disagree after silent corruption; Spindle returns and keeps the good copy")
    func mirrorKeepsTheGoodCopy() async throws {
        // Without the integrity layer, as md: the scrub sees a mismatch and "repair" copies the
        // first leg over the second, corruption and all.
        let (plainMemory, plainFaulty) = try disks(2)
        let plain = try await RAIDArray.create(name: "plain", level: .raid1, chunkBytes: 65536, members: plainFaulty)
        let plainData = try await randomFill(plain, seed: 1)
        try await plain.flush()
        _ = plainMemory
        let rottedPlain = try await plainFaulty[0].corruptStoredBlocks(
            in: RAIDArray.dataOffset..<(RAIDArray.dataOffset + plain.geometry.memberDataBytes), count: 3)
        let plainReport = try await plain.scrub(repair: true)
        #expect(plainReport.mismatches == 3 && plainReport.repaired == 3)
        #expect(try await readAll(plain) != plainData, "without checksums the repair keeps the rotted first leg")
        _ = rottedPlain
        try await plain.close()

        // With it: the bad blocks fail their checksums, the good leg answers and is copied back.
        let (_, faulty) = try disks(2)
        let array = try await RAIDArray.create(
            name: "safe", level: .raid1, chunkBytes: 65536, members: faulty, integrity: true)
        #expect(array.usesIntegrity)
        #expect(array.logicalBlockBytes == 4096)
        let data = try await randomFill(array, seed: 1)
        try await array.flush()
        let rotted = try await faulty[0].corruptStoredBlocks(in: dataArea(of: array, slot: 0), count: 3)
        #expect(rotted.count == 3)
        // Reads (whichever leg each goes to) return the good data, and repair what they meet.
        #expect(try await readAll(array) == data)
        let report = try await array.scrub(repair: true)
        #expect(report.mismatches == 0, "\(report)")
        let first = report.integrity.first { $0.slot == 0 }!
        let status = array.status.slots[0].integrity!
        #expect(status.corruptBlocksFound == 3, "\(status)")
        #expect(status.corruptBlocksRewritten == 3, "\(status)")
        #expect(first.corruptBlocksFound + first.corruptBlocksRepaired <= 6)
        #expect(try await readAll(array) == data)
        // Both legs hold the good data again: each alone reads it right.
        try await array.fail(memberNamed: "d1.img")
        #expect(try await readAll(array) == data)
        try await array.close()
    }

    @Test(
        "RAID5 from 3 to 8 members, chunks from 4 KiB to 1 MiB: rotted data and parity blocks are caught, rebuilt and rewritten",
        arguments: [(3, 4096), (4, 65536), (5, 16384), (6, 1 << 20), (7, 8192), (8, 32768)] as [(Int, UInt64)])
    func parityWithChecksums(members: Int, chunkBytes: UInt64) async throws {
        let memberBytes = max(UInt64(8 << 20), 3 * chunkBytes + (3 << 20))
        let (_, faulty) = try disks(members, bytes: memberBytes, seed: UInt64(members))
        let array = try await RAIDArray.create(
            name: "p\(members)", level: .raid5, chunkBytes: chunkBytes, members: faulty, integrity: true)
        let data = try await randomFill(array, seed: UInt64(members) * 7)
        try await array.flush()
        // Rot on two members, in different stripes: the scrub finds each through its checksum and
        // rebuilds it from the others (parity is never recomputed from a bad block).
        var random = SeededRandom(seed: UInt64(members))
        let slots = [Int(random.next() % UInt64(members)), Int(random.next() % UInt64(members))]
        let firstHalf = dataArea(of: array, slot: slots[0])
        let secondHalf = dataArea(of: array, slot: slots[1])
        let middle = (firstHalf.lowerBound + firstHalf.upperBound) / 2 / UInt64(blockBytes) * UInt64(blockBytes)
        try await faulty[slots[0]].corruptStoredBlocks(in: firstHalf.lowerBound..<middle, count: 4)
        try await faulty[slots[1]].corruptStoredBlocks(in: middle..<secondHalf.upperBound, count: 4)
        let report = try await array.scrub(repair: false)
        #expect(report.mismatches == 0, "\(report)")
        #expect(report.unreadable.isEmpty, "\(report)")
        let found = report.integrity.reduce(0) { $0 + $1.corruptBlocksFound }
        let repaired = report.integrity.reduce(0) { $0 + $1.corruptBlocksRepaired }
        #expect(found == 8, "\(report.integrity)")
        #expect(repaired == 8, "\(report.integrity)")
        #expect(try await readAll(array) == data)
        let again = try await array.scrub(repair: false)
        #expect(again.integrity.allSatisfy { $0.corruptBlocksFound == 0 }, "\(again.integrity)")
        #expect(again.readErrorsRepaired == 0 && again.mismatches == 0)
        // Reads repair too: rot more, read everything, then every member reads clean.
        try await faulty[slots[1]].corruptStoredBlocks(in: dataArea(of: array, slot: slots[1]), count: 3)
        #expect(try await readAll(array) == data)
        let statistics = array.status.slots[slots[1]].integrity!
        #expect(statistics.corruptBlocksFound == statistics.corruptBlocksRewritten, "\(statistics)")
        try await array.close()
    }

    @Test(
        "a power cut on every member (torn writes), then reassembly: every block holds a version written to it, none fails, scrub finds nothing",
        arguments: [(RAIDLevel.raid1, 2, UInt64(11)), (.raid5, 3, 12), (.raid5, 5, 13), (.raid1, 3, 14)])
    func crashAndReassemble(level: RAIDLevel, members: Int, seed: UInt64) async throws {
        let (_, faulty) = try disks(members, seed: seed, volatileCache: true)
        let array = try await RAIDArray.create(
            name: "c", level: level, chunkBytes: 16384, members: faulty, integrity: true)
        array.setIdleCleanDelay(nanoseconds: 0)
        for member in array.readableMembers() {
            (member!.device as! IntegrityDevice).setIdleCleanDelay(nanoseconds: 0)
        }
        let flushed = try await randomFill(array, seed: seed)
        try await array.flush()
        // Unflushed writes of 4 KiB to several stripes, some overlapping.
        var random = SeededRandom(seed: seed)
        var versions: [Int: [[UInt8]]] = [:]
        let patch = AlignedBuffer(count: 3 * blockBytes)
        for round in 0..<40 {
            let block = Int(random.next() % UInt64(Int(array.capacityBytes) / blockBytes - 3))
            fillRandom(patch.bytes, seed: seed * 1000 + UInt64(round))
            try await array.write(from: patch, at: UInt64(block * blockBytes))
            for index in 0..<3 {
                versions[block + index, default: []].append(
                    Array(patch.array[(index * blockBytes)..<((index + 1) * blockBytes)]))
            }
        }
        for device in faulty { try await device.powerCut(tearing: true) }
        for device in faulty { device.restorePower() }
        for member in array.readableMembers() { (member!.device as! IntegrityDevice).abandon() }
        let report = try await RAIDArray.assemble(members: faulty.map { Reopenable($0) })
        let assembled = report.array
        for member in assembled.readableMembers() { #expect(!(member!.device as! IntegrityDevice).hasSuspects) }
        let buffer = AlignedBuffer(count: blockBytes)
        for block in 0..<(Int(assembled.capacityBytes) / blockBytes) {
            do {
                try await assembled.read(into: buffer, at: UInt64(block * blockBytes))
            } catch {
                Issue.record("block \(block) fails after the crash: \(error)")
                continue
            }
            let allowed = [Array(flushed[(block * blockBytes)..<((block + 1) * blockBytes)])] + (versions[block] ?? [])
            #expect(allowed.contains(buffer.array), "block \(block) holds no version written to it")
        }
        let scrub = try await assembled.scrub(repair: false)
        #expect(scrub.mismatches == 0 && scrub.readErrorsRepaired == 0, "\(scrub)")
        try await assembled.close()
    }

    @Test("a member whose integrity superblocks cannot be read is left out with a note; the array runs degraded")
    func unreadableIntegritySuperblock() async throws {
        let (_, faulty) = try disks(3)
        let array = try await RAIDArray.create(
            name: "u", level: .raid1, chunkBytes: 65536, members: faulty.map { Reopenable($0) }, integrity: true)
        let data = try await randomFill(array, seed: 4)
        try await array.close()
        faulty[1].failReads(in: 0..<8192)
        let report = try await RAIDArray.assemble(members: faulty.map { Reopenable($0) })
        #expect(report.array.status.state == .degraded, "\(report.array.status.slots)")
        #expect(report.notes.contains { $0.contains("d1.img") && $0.contains("cannot be read") }, "\(report.notes)")
        #expect(try await readAll(report.array) == data)
        try await report.array.close()
    }

    @Test("image files: create with integrity, find and assemble through discovery, replace a member and rebuild")
    func filesDiscoveryAndReplace() async throws {
        let folder = TemporaryFolder("integrity-raid")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let paths = (0..<4).map { folder.file("m\($0).img") }
        for path in paths + [folder.file("new.img")] {
            try await FileDevice.create(path: path, sizeBytes: 16 << 20, engine: engine).close()
        }
        let files = try paths.map { try FileDevice.open(path: $0, engine: engine) }
        let array = try await RAIDArray.create(name: "files", level: .raid5, members: files, integrity: true)
        let data = try await randomFill(array, seed: 21)
        try await array.close()
        let found = try await Discovery.scan(folder: folder.path, engine: engine)
        #expect(found.arrays.map(\.name) == ["files"], "\(found.arrays)")
        #expect(found.damaged.isEmpty, "\(found.damaged)")
        let opened = try await found.openArray(named: "files", engine: engine)
        #expect(opened.usesIntegrity)
        #expect(try await readAll(opened) == data)
        let probe = try FileDevice.open(
            path: folder.file("m0.img"), engine: engine, options: FileDevice.Options(readOnly: true))
        let signature = try await DeviceSignature.inspect(probe)
        try await probe.close()
        #expect(signature?.contains("integrity layer") == true && signature?.contains("array 'files'") == true)
        // A new plain image replaces a member: it gets the layer, and the rebuild fills it.
        try await opened.replace(
            memberNamed: paths[2], with: try FileDevice.open(path: folder.file("new.img"), engine: engine))
        try await opened.rebuild()
        #expect(opened.status.slots[2].integrity != nil)
        #expect(opened.status.slots[2].device == folder.file("new.img"))
        try await opened.close()
        let reassembled = try await Discovery.assembleArray(
            paths: [paths[0], paths[1], folder.file("new.img"), paths[3]], engine: engine)
        #expect(try await readAll(reassembled) == data)
        try await reassembled.fail(memberNamed: paths[0])
        #expect(try await readAll(reassembled) == data)
        try await reassembled.close()
    }
}
