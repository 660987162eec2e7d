import Testing

@testable import Spindle

/// A 4 KiB block that names itself: its owner's block number and a version in the first 16 bytes,
/// then bytes drawn from both. All zeros is "never written or discarded".
private func taggedBlock(_ block: UInt64, version: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 4096)
    bytes.putLittleEndian(block, at: 0)
    bytes.putLittleEndian(version, at: 8)
    var random = SeededRandom(seed: block &* 0x9E37_79B9_7F4A_7C15 ^ version)
    for index in stride(from: 16, to: 4096, by: 8) { bytes.putLittleEndian(random.next(), at: index) }
    return bytes
}

/// What a 4 KiB block holds: nil for zeros, the (block, version) of a tagged block, or a problem.
private func tag(of bytes: ArraySlice<UInt8>) -> Result<(block: UInt64, version: UInt64)?, TagProblem> {
    if bytes.allSatisfy({ $0 == 0 }) { return .success(nil) }
    let block = Array(bytes).littleEndian(UInt64.self, at: 0)
    let version = Array(bytes).littleEndian(UInt64.self, at: 8)
    guard Array(bytes) == taggedBlock(block, version: version) else {
        return .failure(TagProblem(description: "torn or foreign data"))
    }
    return .success((block, version))
}

private struct TagProblem: Error, CustomStringConvertible {
    var description: String
}

/// Writes version `version` of `blocks` consecutive tagged blocks at block `first`.
private func writeTagged(_ volume: ThinVolume, first: UInt64, blocks: Int, version: UInt64, owner: UInt64 = 0)
    async throws
{
    let buffer = AlignedBuffer(count: blocks * 4096)
    for index in 0..<blocks {
        let bytes = taggedBlock(owner | (first + UInt64(index)), version: version)
        bytes.withUnsafeBytes { buffer.slice(offset: index * 4096, length: 4096).copyMemory(from: $0) }
    }
    try await volume.write(from: buffer, at: first * 4096)
}

/// Versions of each block: begun (the write was issued) and completed (it returned).
private struct Versions: Sendable {
    var begun: [UInt64]
    var completed: [UInt64]
}

/// A pool whose metadata (and a few chunks) is on a memory device and whose data is mostly on a
/// second one that can be made slow: data requests then stay in flight long after a metadata change
/// (a snapshot, a discard and its commit) completes, which is when a request that used an old
/// mapping could do harm.
private func slowDataPool(name: String, seed: UInt64, dataBytes: UInt64) async throws -> (
    pool: ThinPool, devices: [any BlockDevice], slow: FaultyDevice
) {
    let fast = try MemoryDevice(capacityBytes: 2 << 20, logicalBlockBytes: 4096)
    let slow = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: dataBytes, logicalBlockBytes: 4096), seed: seed)
    let pool = try await ThinPool.create(name: name, devices: [fast, slow])
    return (pool, [fast, slow], slow)
}

@Suite("Thin volumes under concurrent I/O")
struct ThinConcurrencyTests {
    @Test(
        "reads and in-place writes of mapped chunks complete while the pool's lock is held",
        .timeLimit(.minutes(1)))
    func mappedChunksNeedNoPoolLock() async throws {
        let device = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "free", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 1 << 20)
        try await writeTagged(volume, first: 0, blocks: 256, version: 1)
        let buffer = AlignedBuffer(count: 4096)
        // Inside the lock: the lock is not reentrant, so either call would wait forever if it took it.
        try await pool.withState { _ in
            try await volume.read(into: buffer, at: 17 * 4096)
            #expect(buffer.array == taggedBlock(17, version: 1))
            try await writeTagged(volume, first: 40, blocks: 1, version: 2)
        }
        try await volume.read(into: buffer, at: 40 * 4096)
        #expect(buffer.array == taggedBlock(40, version: 2))
        try await volume.flush()
        #expect(try await pool.check().isClean)
    }

    @Test(
        "the mapping table follows every change: writes after a snapshot copy, discards and shrinks read zeros, a deleted volume's open objects fail, objects of one volume see each other's writes"
    )
    func tableFollowsChanges() async throws {
        let device = try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "follow", devices: [device])
        let first = try await pool.createVolume(name: "v", sizeBytes: 2 << 20)
        try await writeTagged(first, first: 0, blocks: 512, version: 1)
        let second = try await pool.openVolume(name: "v")
        var expected = (0..<512).flatMap { taggedBlock(UInt64($0), version: 1) }
        // Both objects read everything (filling the table).
        #expect(byteDifference(try await readAll(first), expected) == nil)
        #expect(byteDifference(try await readAll(second), expected) == nil)

        // After a snapshot, a write through either object copies its chunk: the snapshot keeps the old data.
        try await pool.snapshot(volume: "v", name: "s")
        let used = await pool.usage.usedChunks
        try await writeTagged(first, first: 0, blocks: 64, version: 2)
        try await writeTagged(second, first: 100, blocks: 1, version: 2)
        #expect(await pool.usage.usedChunks == used + 5, "four whole chunks and one partial one copied")
        let snapshot = try await pool.openVolume(name: "s")
        let before = expected
        #expect(byteDifference(try await readAll(snapshot), before) == nil)
        for block in Array(0..<64) + [100] {
            expected.replaceSubrange(
                (block * 4096)..<((block + 1) * 4096), with: taggedBlock(UInt64(block), version: 2))
        }
        #expect(byteDifference(try await readAll(first), expected) == nil)
        #expect(byteDifference(try await readAll(second), expected) == nil)
        // Written again after the copy: in place, no more chunks.
        try await writeTagged(first, first: 1, blocks: 1, version: 3)
        expected.replaceSubrange(4096..<8192, with: taggedBlock(1, version: 3))
        #expect(await pool.usage.usedChunks == used + 5)
        #expect(byteDifference(try await readAll(second), expected) == nil)

        // Discarded through one object, zeros through the other.
        try await second.discard(offset: 5 * 65536, length: 65536)
        expected.replaceSubrange((5 * 65536)..<(6 * 65536), with: repeatElement(0, count: 65536))
        #expect(byteDifference(try await readAll(first), expected) == nil)

        // Shrunk and grown again: the old objects read zeros past the cut, as a new one does.
        try await pool.resizeVolume(name: "v", sizeBytes: 1 << 20)
        try await pool.resizeVolume(name: "v", sizeBytes: 2 << 20)
        expected.replaceSubrange((1 << 20)..<(2 << 20), with: repeatElement(0, count: 1 << 20))
        #expect(byteDifference(try await readAll(first), expected) == nil)
        #expect(byteDifference(try await readAll(try await pool.openVolume(name: "v")), expected) == nil)

        // A deleted snapshot's open object fails instead of reading chunks that are no longer its own.
        try await pool.deleteVolume(name: "s")
        expectError(
            await spindleError { try await snapshot.read(into: AlignedBuffer(count: 4096), at: 0) }, .notFound,
            ["s", "was deleted"])
        expectError(
            await spindleError { try await writeTagged(snapshot, first: 3, blocks: 1, version: 9) }, .notFound,
            ["was deleted"])

        try await pool.commit()
        let report = try await pool.check()
        #expect(report.isClean, "\(report.problems)")
        let reopened = try await ThinPool.open(devices: [device])
        #expect(byteDifference(try await readAll(try await reopened.openVolume(name: "v")), expected) == nil)
    }

    @Test(
        "reads and in-place writes racing snapshots: each snapshot holds every write completed before it and none begun after, also after reopening",
        arguments: [UInt64(1), 2])
    func snapshotsUnderLoad(seed: UInt64) async throws {
        let (pool, devices, device) = try await slowDataPool(name: "busy", seed: seed, dataBytes: 32 << 20)
        // Few chunks, many writers: writes in flight on a chunk are the rule when a snapshot shares it,
        // and the first write after it copies the chunk while others still land.
        let blocks = 64
        let volume = try await pool.createVolume(name: "v", sizeBytes: UInt64(blocks) * 4096)
        try await writeTagged(volume, first: 0, blocks: blocks, version: 1)
        try await volume.flush()
        device.addLatency(nanoseconds: 20_000, jitterNanoseconds: 1_000_000)
        let versions = Locked(
            Versions(begun: [UInt64](repeating: 1, count: blocks), completed: [UInt64](repeating: 1, count: blocks)))
        let snapshots = Locked<[(name: String, low: [UInt64], high: [UInt64])]>([])
        let problems = Locked<[String]>([])
        let writers = 8
        try await withThrowingTaskGroup(of: Void.self) { group in
            for writer in 0..<writers {
                group.addTask {
                    var random = SeededRandom(seed: seed << 8 | UInt64(writer))
                    for _ in 0..<150 {
                        let block = Int(random.below(UInt64(blocks / writers))) * writers + writer
                        let version = versions.withLock { versions in
                            versions.begun[block] += 1
                            return versions.begun[block]
                        }
                        try await writeTagged(volume, first: UInt64(block), blocks: 1, version: version)
                        versions.withLock { $0.completed[block] = version }
                    }
                }
            }
            for reader in 0..<2 {
                group.addTask {
                    var random = SeededRandom(seed: seed << 8 | 0x80 | UInt64(reader))
                    let buffer = AlignedBuffer(count: 4096)
                    for _ in 0..<400 {
                        let block = Int(random.below(UInt64(blocks)))
                        let low = versions.withLock { $0.completed[block] }
                        try await volume.read(into: buffer, at: UInt64(block) * 4096)
                        let high = versions.withLock { $0.begun[block] }
                        if case let .success(found?) = tag(of: buffer.array[...]), found.block == UInt64(block),
                            (low...high).contains(found.version)
                        {
                            continue
                        }
                        problems.withLock {
                            $0.append(
                                "read of block \(block) found \(tag(of: buffer.array[...])), expected a version in \(low)...\(high)"
                            )
                        }
                    }
                }
            }
            group.addTask {
                for index in 0..<10 {
                    try await Task.sleep(nanoseconds: 2_000_000)
                    let low = versions.withLock { $0.completed }
                    try await pool.snapshot(volume: "v", name: "s\(index)")
                    let high = versions.withLock { $0.begun }
                    snapshots.withLock { $0.append(("s\(index)", low, high)) }
                }
            }
            try await group.waitForAll()
        }
        #expect(problems.withLock { $0 }.isEmpty, "\(problems.withLock { $0.prefix(5) })")
        try await volume.flush()
        device.clearFaults()

        func verify(_ pool: ThinPool) async throws {
            let final = versions.withLock { $0.completed }
            let origin = try await readAll(try await pool.openVolume(name: "v"))
            #expect(
                byteDifference(origin, final.indices.flatMap { taggedBlock(UInt64($0), version: final[$0]) }) == nil,
                "the origin holds every write")
            for (name, low, high) in snapshots.withLock({ $0 }) {
                let bytes = try await readAll(try await pool.openVolume(name: name))
                let wrong = (0..<blocks).first { block in
                    guard case let .success(found?) = tag(of: bytes[(block * 4096)..<((block + 1) * 4096)]),
                        found.block == UInt64(block)
                    else { return true }
                    return !(low[block]...high[block]).contains(found.version)
                }
                #expect(
                    wrong == nil,
                    "snapshot \(name), block \(wrong ?? 0): expected a version in \(low[wrong ?? 0])...\(high[wrong ?? 0])"
                )
            }
            let report = try await pool.check()
            #expect(report.isClean, "\(report.problems)")
        }
        try await verify(pool)
        try await verify(try await ThinPool.open(devices: devices))
    }

    @Test(
        "a snapshot waits for an in-place write in flight on its origin, and keeps it",
        .timeLimit(.minutes(1)))
    func snapshotWaitsForWriteInFlight() async throws {
        let (pool, device, volume, held) = try await poolWithHeldChunk(name: "wait")
        let writer = Task { try await writeTagged(volume, first: 17, blocks: 1, version: 2) }
        await device.waitUntilParked()
        let done = Locked(false)
        let snapshotter = Task {
            try await pool.snapshot(volume: "v", name: "s")
            done.withLock { $0 = true }
        }
        await waitUntil { pool.inFlight.isDraining || done.withLock { $0 } }
        #expect(
            !done.withLock { $0 }, "the snapshot completed while a write to its origin's chunk \(held) was in flight")
        device.release()
        try await writer.value
        try await snapshotter.value
        // The write landed before the chunk was shared: both have it; later writes copy the chunk.
        let snapshot = try await pool.openVolume(name: "s")
        try await writeTagged(volume, first: 18, blocks: 1, version: 3)
        var expected = (0..<256).flatMap { taggedBlock(UInt64($0), version: 1) }
        expected.replaceSubrange((17 * 4096)..<(18 * 4096), with: taggedBlock(17, version: 2))
        #expect(byteDifference(try await readAll(snapshot), expected) == nil)
        expected.replaceSubrange((18 * 4096)..<(19 * 4096), with: taggedBlock(18, version: 3))
        #expect(byteDifference(try await readAll(volume), expected) == nil)
        try await pool.commit()
        #expect(try await pool.check().isClean)
    }

    @Test(
        "a discarded chunk is not handed out again while a read or in-place write that found it is in flight",
        .timeLimit(.minutes(1)), arguments: [false, true])
    func discardWaitsForRequestInFlight(reading: Bool) async throws {
        let (pool, device, volume, held) = try await poolWithHeldChunk(name: "reuse")
        let request = Task {
            if reading {
                let buffer = AlignedBuffer(count: 4096)
                try await volume.read(into: buffer, at: 17 * 4096)
                return buffer.array
            }
            try await writeTagged(volume, first: 17, blocks: 1, version: 2)
            return taggedBlock(17, version: 2)
        }
        await device.waitUntilParked()
        let done = Locked(false)
        let discarder = Task {
            try await volume.discard(offset: 16 * 4096, length: 16 * 4096)
            try await pool.commit()
            done.withLock { $0 = true }
        }
        await waitUntil { pool.inFlight.isDraining || done.withLock { $0 } }
        #expect(
            !done.withLock { $0 },
            "the discard of chunk \(held) committed (freeing it) while a request that found it was in flight")
        device.release()
        let got = try await request.value
        #expect(got == taggedBlock(17, version: reading ? 1 : 2), "the request saw the chunk as it was mapped")
        try await discarder.value
        // The volume reads zeros where it was discarded; another volume's writes land elsewhere.
        let other = try await pool.createVolume(name: "w", sizeBytes: 1 << 20)
        try await writeTagged(other, first: 0, blocks: 256, version: 7)
        var expected = (0..<256).flatMap { taggedBlock(UInt64($0), version: 1) }
        expected.replaceSubrange((16 * 4096)..<(32 * 4096), with: repeatElement(0, count: 16 * 4096))
        #expect(byteDifference(try await readAll(volume), expected) == nil)
        #expect(
            byteDifference(try await readAll(other), (0..<256).flatMap { taggedBlock(UInt64($0), version: 7) }) == nil)
        try await pool.commit()
        #expect(try await pool.check().isClean)
    }

    @Test(
        "reads and writes racing discards and flushes that free and reuse their chunks: every block holds its own data or zeros, also after reopening",
        arguments: [UInt64(1), 2])
    func discardsUnderLoad(seed: UInt64) async throws {
        let (pool, devices, device) = try await slowDataPool(name: "churn", seed: seed, dataBytes: 16 << 20)
        let chunkBlocks = Int(pool.chunkBytes / 4096)
        // The volume fills all but a few chunks of the pool; its first chunks are hot (written, read
        // and discarded at once), so first writes into them reuse the chunks the discards free.
        let chunks = Int(pool.chunkCount) - 4
        let hotChunks = 8
        let volume = try await pool.createVolume(name: "a", sizeBytes: UInt64(chunks) * pool.chunkBytes)
        for chunk in 0..<chunks {
            try await writeTagged(volume, first: UInt64(chunk * chunkBlocks), blocks: chunkBlocks, version: 1)
        }
        try await volume.flush()
        device.addLatency(nanoseconds: 20_000, jitterNanoseconds: 1_000_000)
        let problems = Locked<[String]>([])
        let writersLeft = Locked(3)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for writer in 0..<3 {
                group.addTask {
                    defer { writersLeft.withLock { $0 -= 1 } }
                    var random = SeededRandom(seed: seed << 8 | UInt64(writer))
                    for version in UInt64(2)..<300 {
                        let block = random.below(UInt64(hotChunks * chunkBlocks))
                        do {
                            try await writeTagged(volume, first: block, blocks: 1, version: version)
                        } catch let error as SpindleError where error.code == .noSpace {
                            // Full until the next discard commits.
                        }
                    }
                }
            }
            group.addTask {
                var random = SeededRandom(seed: seed << 8 | 0x40)
                while writersLeft.withLock({ $0 > 0 }) {
                    let chunk = random.below(UInt64(hotChunks))
                    if random.below(2) == 0 {
                        try await volume.discard(offset: chunk * pool.chunkBytes, length: pool.chunkBytes)
                    } else {
                        let first = random.below(UInt64(chunkBlocks - 4))
                        try await volume.discardBytes(offset: chunk * pool.chunkBytes + first * 4096, length: 4 * 4096)
                    }
                    try await pool.commit()
                }
            }
            for reader in 0..<2 {
                group.addTask {
                    var random = SeededRandom(seed: seed << 8 | 0x80 | UInt64(reader))
                    let buffer = AlignedBuffer(count: 4096)
                    while writersLeft.withLock({ $0 > 0 }) {
                        let block = random.below(UInt64(hotChunks * chunkBlocks))
                        try await volume.read(into: buffer, at: block * 4096)
                        switch tag(of: buffer.array[...]) {
                        case .success(nil):
                            continue
                        case let .success(found?) where found.block == block:
                            continue
                        case let found:
                            problems.withLock { $0.append("read of block \(block) found \(found)") }
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(problems.withLock { $0 }.isEmpty, "\(problems.withLock { $0.prefix(5) })")
        try await pool.commit()
        device.clearFaults()

        func verify(_ pool: ThinPool) async throws {
            let bytes = try await readAll(try await pool.openVolume(name: "a"))
            let wrong = (0..<(chunks * chunkBlocks)).first { block in
                let hot = block < hotChunks * chunkBlocks
                switch tag(of: bytes[(block * 4096)..<((block + 1) * 4096)]) {
                case .success(nil): return !hot
                case let .success(found?): return found.block != UInt64(block) || (!hot && found.version != 1)
                case .failure: return true
                }
            }
            #expect(wrong == nil, "block \(wrong ?? 0) holds data that is not its own (or an untouched block changed)")
            let report = try await pool.check()
            #expect(report.isClean, "\(report.problems)")
        }
        try await verify(pool)
        try await verify(try await ThinPool.open(devices: devices))
    }
}

/// A pool with a 1 MiB volume written whole (version 1 of each block), on a device that can hold
/// requests to the pool chunk behind the volume's chunk 1 (blocks 16-31), holding them from now on.
private func poolWithHeldChunk(name: String) async throws -> (ThinPool, HoldingDevice, ThinVolume, UInt64) {
    let device = HoldingDevice(wrapping: try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096))
    let pool = try await ThinPool.create(name: name, devices: [device])
    let volume = try await pool.createVolume(name: "v", sizeBytes: 1 << 20)
    try await writeTagged(volume, first: 0, blocks: 256, version: 1)
    try await volume.flush()
    let (physical, offset) = try await pool.withState { state in
        let physical = try await state.lookup(volume: volume.id, name: "v", chunk: 1)!.physical
        return (physical, state.layout.location(of: physical).offset)
    }
    device.hold(offset..<(offset + pool.chunkBytes))
    return (pool, device, volume, physical)
}

/// Yields until `condition` holds.
private func waitUntil(_ condition: () -> Bool) async {
    while !condition() { await Task.yield() }
}
