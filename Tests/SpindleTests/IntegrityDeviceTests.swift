import Glibc
import Testing

@testable import Spindle

private let blockBytes = IntegritySuperblock.blockBytes

/// What each 4 KiB block of a device reads as: its bytes, or the error its read threw.
private func readBlocks(_ device: any BlockDevice) async -> [Result<[UInt8], SpindleError>] {
    let buffer = AlignedBuffer(count: blockBytes)
    var results: [Result<[UInt8], SpindleError>] = []
    for offset in stride(from: UInt64(0), to: device.capacityBytes, by: blockBytes) {
        do {
            try await device.read(into: buffer, at: offset)
            results.append(.success(buffer.array))
        } catch let error as SpindleError {
            results.append(.failure(error))
        } catch {
            results.append(.failure(SpindleError(.ioFailed, "\(error)")))
        }
    }
    return results
}

/// The writes of ``writeRuns``: where each went and what it wrote.
private struct Runs {
    var writes: [(range: Range<Int>, bytes: [UInt8])] = []

    /// What each write that covered `block` (a 4 KiB range) put there.
    func versions(of block: Range<Int>) -> [[UInt8]] {
        writes.filter { $0.range.contains(block.lowerBound) }.map { write in
            Array(
                write.bytes[(block.lowerBound - write.range.lowerBound)..<(block.upperBound - write.range.lowerBound)])
        }
    }
}

/// Writes `count` random runs (1 to 64 blocks each, at seeded block offsets) and applies them to `model`.
@discardableResult
private func writeRuns(
    _ device: any BlockDevice, model: inout [UInt8], count: Int, seed: UInt64, fua: Bool = false,
    within range: Range<UInt64>? = nil, keepingVersions: Bool = false
) async throws -> Runs {
    var random = SeededRandom(seed: seed)
    let range = range ?? 0..<device.capacityBytes
    let blocks = Int((range.upperBound - range.lowerBound) / UInt64(blockBytes))
    var written = Runs()
    for run in 0..<count {
        let length = Int(random.next() % 64) + 1
        let first = Int(random.next() % UInt64(max(1, blocks - length)))
        let offset = Int(range.lowerBound) + first * blockBytes
        let buffer = AlignedBuffer(count: length * blockBytes)
        fillRandom(buffer.bytes, seed: seed &* 1000 &+ UInt64(run))
        try await device.write(from: buffer, at: UInt64(offset), fua: fua)
        model.replaceSubrange(offset..<(offset + buffer.count), with: buffer.array)
        if keepingVersions { written.writes.append((offset..<(offset + buffer.count), buffer.array)) }
    }
    return written
}

@Suite("Integrity layer", .serialized)
struct IntegrityDeviceTests {
    @Test("data written in runs of 1 to 64 blocks reads back, and again after closing and reopening")
    func roundTrip() async throws {
        let memory = try MemoryDevice(capacityBytes: 32 << 20, name: "disk.img")
        let device = try await IntegrityDevice.format(Reopenable(memory))
        #expect(device.name == "disk.img")
        #expect(device.logicalBlockBytes == 4096)
        #expect(device.capacityBytes < 32 << 20 && device.capacityBytes >= 30 << 20)
        #expect(device.superblock.dataOffset >= IntegritySuperblock.checksumOffset + device.superblock.checksumBytes)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 60, seed: 1)
        #expect(try await readAll(device) == model)
        let statistics = device.statistics
        #expect(statistics.corruptBlocksFound == 0 && statistics.blocksVerified > 0)
        try await device.close()
        let reopened = try await IntegrityDevice.open(Reopenable(memory))
        #expect(reopened.superblock == device.superblock)
        #expect(!reopened.hasSuspects)
        #expect(try await readAll(reopened) == model)
        try await reopened.close()
    }

    @Test("bits rotted at rest are caught, block by block, naming the offset; the rest reads right")
    func rotAtRest() async throws {
        let memory = try MemoryDevice(capacityBytes: 8 << 20, name: "rot.img")
        let faulty = FaultyDevice(wrapping: memory, seed: 11, name: "rot.img")
        let device = try await IntegrityDevice.format(faulty)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 40, seed: 2)
        try await device.flush()
        let dataArea = device.superblock.dataOffset..<(device.superblock.dataOffset + device.capacityBytes)
        let rotted = try await faulty.corruptStoredBlocks(in: dataArea, count: 7)
        #expect(rotted.count == 7)
        let expectedBad = Set(rotted.map { Int(($0 - device.superblock.dataOffset) / UInt64(blockBytes)) })
        for (index, result) in await readBlocks(device).enumerated() {
            switch result {
            case let .success(bytes):
                #expect(!expectedBad.contains(index), "block \(index) was rotted but read without an error")
                #expect(bytes == Array(model[(index * blockBytes)..<((index + 1) * blockBytes)]), "block \(index)")
            case let .failure(error):
                #expect(expectedBad.contains(index), "block \(index): \(error)")
                expectError(
                    error, .corrupted, ["offset \(index * blockBytes)", "rot.img", "do not match their checksums"])
            }
        }
        #expect(device.statistics.corruptBlocksFound == 7)
        // Rewriting a bad block repairs it and is counted.
        let first = expectedBad.min()!
        let patch = AlignedBuffer(count: blockBytes)
        fillRandom(patch.bytes, seed: 99)
        try await device.write(from: patch, at: UInt64(first * blockBytes))
        #expect(device.statistics.corruptBlocksRewritten == 1)
        let back = AlignedBuffer(count: blockBytes)
        try await device.read(into: back, at: UInt64(first * blockBytes))
        #expect(back.array == patch.array)
        try await device.close()
    }

    @Test(
        "every silent fault is caught: each read returns what was written or fails as corrupted",
        arguments: FaultyDevice.Silent.allCases)
    func silentFaultsAreCaught(kind: FaultyDevice.Silent) async throws {
        let memory = try MemoryDevice(capacityBytes: 8 << 20, name: "silent.img")
        let faulty = FaultyDevice(wrapping: memory, seed: 5, name: "silent.img")
        let device = try await IntegrityDevice.format(faulty)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 30, seed: 3)
        try await device.flush()
        let dataArea = device.superblock.dataOffset..<(device.superblock.dataOffset + device.capacityBytes)
        faulty.inject(FaultyDevice.Fault(kind, range: dataArea, probability: 0.3))
        if kind != .corruptOnRead {
            // Each write of one block meets the fault or not; the model says what was asked.
            var random = SeededRandom(seed: 8)
            let patch = AlignedBuffer(count: blockBytes)
            for round in 0..<80 {
                let block = Int(random.next() % UInt64(model.count / blockBytes))
                fillRandom(patch.bytes, seed: 500 + UInt64(round))
                try await device.write(from: patch, at: UInt64(block * blockBytes))
                model.replaceSubrange((block * blockBytes)..<((block + 1) * blockBytes), with: patch.array)
            }
            faulty.clearFaults()
        }
        var failures = 0
        for (index, result) in await readBlocks(device).enumerated() {
            switch result {
            case let .success(bytes):
                #expect(
                    bytes == Array(model[(index * blockBytes)..<((index + 1) * blockBytes)]),
                    "block \(index) read back wrong data without an error (\(kind))")
            case let .failure(error):
                #expect(error.code == .corrupted, "\(error)")
                failures += 1
            }
        }
        let statistics = faulty.statistics
        switch kind {
        case .corruptOnRead:
            #expect(statistics.corruptedReads > 0)
            #expect(failures == Int(statistics.corruptedReads))
        case .corruptAtRest:
            #expect(statistics.corruptedWrites > 0 && failures > 0)
        case .misdirect:
            #expect(statistics.misdirectedWrites > 0 && failures > 0)
        case .lose:
            #expect(statistics.lostWrites > 0 && failures > 0)
        }
        try await device.close()
    }

    @Test("a lost write of a block that ends with its own CRC32C (as every Spindle header does) is caught")
    func selfChecksummedBlocks() async throws {
        #expect(Array("123456789".utf8).withUnsafeBytes { CRC32.checksum($0) } == 0xCBF4_3926)
        let memory = try MemoryDevice(capacityBytes: 4 << 20, name: "headers.img")
        let faulty = FaultyDevice(wrapping: memory, seed: 2, name: "headers.img")
        let device = try await IntegrityDevice.format(faulty)
        func header(_ sequence: UInt8) -> AlignedBuffer {
            let block = AlignedBuffer(count: 4096)
            block.bytes[0] = 0x53
            block.bytes[16] = sequence
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block.bytes[0..<4092]))
            block.bytes.storeBytes(of: crc.littleEndian, toByteOffset: 4092, as: UInt32.self)
            return block
        }
        // Two versions of a self-checked block have the same CRC32C over their 4 KiB (the residue).
        let first = header(1)
        let second = header(2)
        #expect(CRC32C.checksum(first.readOnlyBytes) == CRC32C.checksum(second.readOnlyBytes))
        try await device.write(from: first, at: 8192)
        try await device.flush()
        faulty.inject(FaultyDevice.Fault(.lose))
        try await device.write(from: second, at: 8192)
        faulty.clearFaults()
        #expect(faulty.statistics.lostWrites == 1)
        let back = AlignedBuffer(count: 4096)
        expectError(await spindleError { try await device.read(into: back, at: 8192) }, .corrupted, ["offset 8192"])
        try await device.close()
    }

    @Test("a block copied from another integrity device, at the same offset, fails its check")
    func blocksCarryTheirDevice() async throws {
        let first = try MemoryDevice(capacityBytes: 4 << 20, name: "a.img")
        let second = try MemoryDevice(capacityBytes: 4 << 20, name: "b.img")
        let a = try await IntegrityDevice.format(Reopenable(first))
        let b = try await IntegrityDevice.format(Reopenable(second))
        let data = AlignedBuffer(count: blockBytes)
        fillRandom(data.bytes, seed: 4)
        try await a.write(from: data, at: 8192)
        try await b.write(from: data, at: 8192)
        try await a.flush()
        try await b.flush()
        // The same data at the same place on both: their stored checksums differ.
        #expect(a.superblock.dataOffset == b.superblock.dataOffset)
        let other = AlignedBuffer(count: blockBytes)
        fillRandom(other.bytes, seed: 5)
        try await a.write(from: other, at: 8192)
        try await a.flush()
        // Copy a's block under b (as a misdirected or stale copy would arrive).
        try await first.read(into: other, at: a.superblock.dataOffset + 8192)
        try await second.write(from: other, at: b.superblock.dataOffset + 8192)
        let error = await spindleError { try await b.read(into: data, at: 8192) }
        expectError(error, .corrupted, ["offset 8192"])
        try await a.close()
        try await b.close()
    }

    @Test(
        "a power cut (torn writes) leaves flushed blocks right and unflushed ones old or new, never corrupted (standalone)",
        arguments: [1, 2, 3, 4] as [UInt64])
    func crashStandalone(seed: UInt64) async throws {
        let memory = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096, name: "crash.img")
        let faulty = FaultyDevice(wrapping: memory, seed: seed, volatileCache: true, name: "crash.img")
        let device = try await IntegrityDevice.format(faulty)
        device.setIdleCleanDelay(nanoseconds: 0)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 30, seed: seed)
        try await device.flush()
        let flushed = model
        var newer = model
        let runs = try await writeRuns(device, model: &newer, count: 30, seed: seed + 100, keepingVersions: true)
        try await faulty.powerCut(tearing: true)
        faulty.restorePower()
        device.abandon()
        let reopened = try await IntegrityDevice.open(Reopenable(faulty))
        let accepted = reopened.statistics.blocksAcceptedAfterCrash
        #expect(accepted > 0, "a torn power cut should leave some blocks apart from their checksums")
        #expect(!reopened.hasSuspects)
        for (index, result) in await readBlocks(reopened).enumerated() {
            let range = (index * blockBytes)..<((index + 1) * blockBytes)
            switch result {
            case let .success(bytes):
                // Any version: the flushed one, or one of the unflushed writes of the block.
                let versions = [Array(flushed[range])] + runs.versions(of: range)
                #expect(versions.contains(bytes), "block \(index) holds no version written to it")
            case let .failure(error):
                Issue.record("block \(index) fails after a crash: \(error)")
            }
        }
        try await reopened.close()
        // Clean now: a second open finds nothing suspect.
        let again = try await IntegrityDevice.open(Reopenable(faulty))
        #expect(!again.hasSuspects)
        #expect(again.statistics.blocksAcceptedAfterCrash == 0)
        try await again.close()
    }

    @Test("under the redundant policy, blocks a crash left apart read as corrupted until the owner resolves them")
    func crashRedundant() async throws {
        let memory = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096, name: "leg.img")
        let faulty = FaultyDevice(wrapping: memory, seed: 9, volatileCache: true, name: "leg.img")
        let device = try await IntegrityDevice.format(faulty, policy: .redundant, selfCheckedBytes: 1 << 20)
        device.setIdleCleanDelay(nanoseconds: 0)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 20, seed: 6)
        try await device.flush()
        let flushed = model
        var newer = model
        // Unflushed writes in the owner's own headers (the first MiB) and in the data.
        try await writeRuns(device, model: &newer, count: 10, seed: 7, within: 0..<(1 << 20))
        try await writeRuns(device, model: &newer, count: 30, seed: 8)
        try await faulty.powerCut(tearing: false)
        // Without tearing every unflushed write is dropped; tear some by hand instead: new data
        // under old checksums, as a cut between the data and the checksum writes leaves it.
        faulty.restorePower()
        device.abandon()
        let torn = stride(from: 0, to: model.count, by: blockBytes * 9).filter { newer[$0] != flushed[$0] }
        #expect(!torn.isEmpty)
        let tornBuffer = AlignedBuffer(count: blockBytes)
        for offset in torn {
            newer.withUnsafeBytes {
                tornBuffer.copy(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + blockBytes)]), at: 0)
            }
            try await memory.write(from: tornBuffer, at: device.superblock.dataOffset + UInt64(offset))
        }
        // The bitmap marks the regions written before the cut (FUA): they are suspect.
        let reopened = try await IntegrityDevice.open(Reopenable(faulty))
        #expect(reopened.hasSuspects)
        var corrupted = 0
        for (index, result) in await readBlocks(reopened).enumerated() {
            let offset = index * blockBytes
            let range = offset..<(offset + blockBytes)
            switch result {
            case let .success(bytes):
                #expect(bytes == Array(flushed[range]) || bytes == Array(newer[range]), "block \(index)")
            case let .failure(error):
                // Only torn blocks past the self-checked first MiB fail; they say why.
                #expect(torn.contains(offset) && offset >= 1 << 20, "block \(index): \(error)")
                expectError(error, .corrupted, ["stopped uncleanly"])
                corrupted += 1
            }
        }
        #expect(corrupted == torn.filter { $0 >= 1 << 20 }.count)
        let resolution = try await reopened.resolveSuspects(acceptingRemaining: true)
        #expect(resolution.blocksAccepted == UInt64(corrupted))
        #expect(!reopened.hasSuspects)
        for (index, result) in await readBlocks(reopened).enumerated() {
            let range = (index * blockBytes)..<((index + 1) * blockBytes)
            guard case let .success(bytes) = result else {
                Issue.record("block \(index) fails after resolution")
                continue
            }
            #expect(bytes == Array(flushed[range]) || bytes == Array(newer[range]), "block \(index)")
        }
        try await reopened.close()
    }

    @Test("write-zeroes and discard read as zeros; a FUA write survives a power cut; flushed ones too")
    func zeroesDiscardAndFUA() async throws {
        let memory = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096, name: "z.img")
        let faulty = FaultyDevice(wrapping: memory, seed: 3, volatileCache: true, name: "z.img")
        let device = try await IntegrityDevice.format(faulty)
        var model = [UInt8](repeating: 0, count: Int(device.capacityBytes))
        try await writeRuns(device, model: &model, count: 40, seed: 12)
        try await device.writeZeroes(offset: 1 << 20, length: 3 << 20)
        model.replaceSubrange((1 << 20)..<(4 << 20), with: repeatElement(0, count: 3 << 20))
        try await device.discard(offset: 8 << 20, length: 1 << 20)
        model.replaceSubrange((8 << 20)..<(9 << 20), with: repeatElement(0, count: 1 << 20))
        #expect(try await readAll(device) == model)
        try await device.flush()
        let fua = AlignedBuffer(count: 2 * blockBytes)
        fillRandom(fua.bytes, seed: 77)
        try await device.write(from: fua, at: 5 << 20, fua: true)
        model.replaceSubrange((5 << 20)..<((5 << 20) + fua.count), with: fua.array)
        try await faulty.powerCut()
        faulty.restorePower()
        device.abandon()
        let reopened = try await IntegrityDevice.open(Reopenable(faulty))
        #expect(try await readAll(reopened) == model)
        try await reopened.close()
    }

    @Test("a checksum cache far smaller than the checksums: eviction, write-back and reload keep every block right")
    func smallChecksumCache() async throws {
        let memory = try MemoryDevice(capacityBytes: 80 << 20, logicalBlockBytes: 4096, name: "big.img")
        let device = try await IntegrityDevice.format(Reopenable(memory), checksumCacheBytes: 16 * 4096)
        let model = Locked([UInt8](repeating: 0, count: Int(device.capacityBytes)))
        let blocks = Int(device.capacityBytes) / blockBytes
        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<6 {
                group.addTask {
                    var random = SeededRandom(seed: UInt64(task) + 40)
                    let buffer = AlignedBuffer(count: 2 * blockBytes)
                    let check = AlignedBuffer(count: 2 * blockBytes)
                    for round in 0..<150 {
                        // Each task owns the blocks equal to its number modulo 6 (pairs start there).
                        let block = (Int(random.next() % UInt64(blocks / 6 - 1))) * 6 + task
                        let offset = block * blockBytes
                        guard offset + buffer.count <= Int(device.capacityBytes) else { continue }
                        fillRandom(buffer.slice(offset: 0, length: blockBytes), seed: UInt64(task * 10_000 + round))
                        try await device.write(from: buffer, range: 0..<blockBytes, at: UInt64(offset))
                        model.withLock {
                            $0.replaceSubrange(offset..<(offset + blockBytes), with: buffer.array[0..<blockBytes])
                        }
                        try await device.read(into: check, range: 0..<blockBytes, at: UInt64(offset))
                        #expect(check.array[0..<blockBytes] == buffer.array[0..<blockBytes])
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(device.statistics.cachedChecksumBlocks <= 16 + 8)
        #expect(try await readAll(device) == model.withLock { $0 })
        try await device.close()
        let reopened = try await IntegrityDevice.open(Reopenable(memory), checksumCacheBytes: 16 * 4096)
        #expect(try await readAll(reopened) == model.withLock { $0 })
        try await reopened.close()
    }

    @Test("reads racing writes of the same blocks never fail: they return the old or the new data")
    func readsRaceWrites() async throws {
        let memory = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096, name: "race.img")
        let device = try await IntegrityDevice.format(Reopenable(memory))
        let versions = (0..<4).map { version -> [UInt8] in
            let buffer = AlignedBuffer(count: 16 * blockBytes)
            fillRandom(buffer.bytes, seed: 300 + UInt64(version))
            return buffer.array
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                let buffer = AlignedBuffer(count: 16 * blockBytes)
                for round in 0..<200 {
                    versions[round % 4].withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
                    try await device.write(from: buffer, at: 65536)
                }
            }
            for _ in 0..<3 {
                group.addTask {
                    let buffer = AlignedBuffer(count: blockBytes)
                    for round in 0..<400 {
                        let block = round % 16
                        try await device.read(into: buffer, at: 65536 + UInt64(block * blockBytes))
                        let slice = Array(buffer.array)
                        let known = versions.contains {
                            Array($0[(block * blockBytes)..<((block + 1) * blockBytes)]) == slice
                        }
                        #expect(known || slice.allSatisfy { $0 == 0 }, "block \(block) read as no version written")
                    }
                }
            }
            try await group.waitForAll()
        }
        try await device.close()
    }

    @Test("bad input: a device too small, one holding data, damaged superblocks (one copy, then both)")
    func badInput() async throws {
        let tiny = try MemoryDevice(capacityBytes: 1 << 20, name: "tiny.img")
        expectError(
            await spindleError { _ = try await IntegrityDevice.format(tiny) }, .invalidArgument,
            ["tiny.img", "at least 2 MiB"])
        let used = try MemoryDevice(capacityBytes: 4 << 20, name: "used.img")
        let junk = AlignedBuffer(count: 4096)
        junk.fill(0x5A)
        try await used.write(from: junk, at: 65536)
        expectError(
            await spindleError { _ = try await IntegrityDevice.format(used) }, .alreadyExists,
            ["used.img", "refusing to overwrite"])
        let memory = try MemoryDevice(capacityBytes: 4 << 20, name: "label.img")
        let device = try await IntegrityDevice.format(Reopenable(memory))
        try await device.write(from: junk, at: 0)
        try await device.close()
        // The first copy damaged: the second serves.
        let header = AlignedBuffer(count: 4096)
        try await memory.read(into: header, at: 0)
        header.bytes[200] ^= 0xFF
        try await memory.write(from: header, at: 0)
        let second = try await IntegrityDevice.open(Reopenable(memory))
        let back = AlignedBuffer(count: 4096)
        try await second.read(into: back, at: 0)
        #expect(back.array == junk.array)
        try await second.close()
        // Both damaged: refused, saying so.
        try await memory.write(from: header, at: 4096)
        expectError(
            await spindleError { _ = try await IntegrityDevice.open(Reopenable(memory)) }, .corrupted,
            ["label.img", "corrupt integrity superblock"])
        // Signatures see the layer, and what it holds.
        let fresh = try MemoryDevice(capacityBytes: 4 << 20, name: "sig.img")
        let signed = try await IntegrityDevice.format(Reopenable(fresh))
        _ = try await RAIDArray.readSuperblock(of: signed)
        try await signed.close()
        let found = try await DeviceSignature.inspect(fresh)
        #expect(found?.contains("Spindle integrity layer") == true, "\(found ?? "nothing")")
    }
}
