import Testing

@testable import Spindle

@Suite("Thin pools (first slice)")
struct ThinPoolTests {
    @Test("volumes read zeros until written, keep data across reopening, and use space only where written")
    func readBackAndReopen() async throws {
        let device = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "tank", devices: [device])
        let volume = try await pool.createVolume(name: "data", sizeBytes: 256 << 20)  // over-provisioned
        let zeros = AlignedBuffer(count: 8192)
        zeros.fill(0xAA)
        try await volume.read(into: zeros, at: 100 << 20)
        #expect(zeros.array.allSatisfy { $0 == 0 })
        let expected = try await exerciseConcurrently(volume, engine: nil, tasks: 4, operationsPerTask: 40, seed: 4)
        #expect(byteDifference(try await readAll(volume), expected) == nil)
        try await volume.flush()
        let used = await pool.usage.usedChunks
        #expect(used > 0 && used < 256 << 20 / pool.chunkBytes)

        let reopened = try await ThinPool.open(devices: [device])
        #expect(await reopened.usage.usedChunks == used)
        let again = try await reopened.openVolume(name: "data")
        #expect(byteDifference(try await readAll(again), expected) == nil)
        #expect(try await reopened.volumes().map(\.name) == ["data"])
    }

    @Test("a partial first write leaves the rest of its chunk reading as zeros")
    func partialFirstWrite() async throws {
        let device = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)
        // Dirty the device first, so zeros must come from the pool, not from the memory.
        let junk = AlignedBuffer(count: 16 << 20)
        junk.fill(0x5C)
        try await device.write(from: junk, at: 0)
        let pool = try await ThinPool.create(name: "p", devices: [device], overwrite: true)
        let volume = try await pool.createVolume(name: "v", sizeBytes: 1 << 20)
        let data = AlignedBuffer(count: 4096)
        data.fill(0x11)
        try await volume.write(from: data, at: 8192)
        let chunk = AlignedBuffer(count: Int(pool.chunkBytes))
        try await volume.read(into: chunk, at: 0)
        var expected = [UInt8](repeating: 0, count: Int(pool.chunkBytes))
        expected.replaceSubrange(8192..<12288, with: data.array)
        #expect(byteDifference(chunk.array, expected) == nil)
    }

    @Test("a chunk used before, freed and reused by a partial first write reads zeros around the write")
    func reusedChunkReadsZeros() async throws {
        let device = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "reuse", devices: [device])
        let first = try await pool.createVolume(name: "a", sizeBytes: pool.chunkCount * pool.chunkBytes)
        let junk = AlignedBuffer(count: Int(first.capacityBytes))
        junk.fill(0xEE)
        try await first.write(from: junk, at: 0)
        try await pool.deleteVolume(name: "a")
        #expect(await pool.usage.usedChunks == 0)
        let second = try await pool.createVolume(name: "b", sizeBytes: pool.chunkCount * pool.chunkBytes)
        let data = AlignedBuffer(count: 4096)
        data.fill(0x11)
        for chunk in 0..<pool.chunkCount {
            try await second.write(from: data, at: chunk * pool.chunkBytes + 8192)
        }
        var expected = [UInt8](repeating: 0, count: Int(pool.chunkBytes))
        expected.replaceSubrange(8192..<12288, with: data.array)
        let chunk = AlignedBuffer(count: Int(pool.chunkBytes))
        for index in 0..<pool.chunkCount {
            try await second.read(into: chunk, at: index * pool.chunkBytes)
            #expect(byteDifference(chunk.array, expected) == nil, "chunk \(index) shows data of a deleted volume")
        }
    }

    @Test("a full pool refuses writes that need space, names itself, and works again after a discard and flush")
    func poolFull() async throws {
        let device = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "small", devices: [device])
        let chunks = pool.chunkCount
        let first = try await pool.createVolume(name: "a", sizeBytes: 64 << 20)
        let second = try await pool.createVolume(name: "b", sizeBytes: 64 << 20)
        let block = AlignedBuffer(count: Int(pool.chunkBytes))
        block.fill(0x42)
        try await second.write(from: block, at: 0)
        var written: UInt64 = 0
        var failure: SpindleError?
        while written < chunks + 2 {
            do {
                try await first.write(from: block, at: written * pool.chunkBytes)
                written += 1
            } catch let error as SpindleError {
                failure = error
                break
            }
        }
        expectError(failure, .noSpace, ["pool small is full", "\(chunks) of \(chunks) chunks used"])
        let warnings = try await pool.warnings()
        #expect(
            warnings.contains { $0.contains("pool small is over-provisioned: its volumes total 128 MiB") },
            "\(warnings)")
        #expect(warnings.contains { $0.contains("pool small is 100% full") }, "\(warnings)")
        let check = AlignedBuffer(count: Int(pool.chunkBytes))
        try await second.read(into: check, at: 0)
        #expect(byteDifference(check.array, block.array) == nil, "the other volume's data is untouched")
        try await first.discard(offset: 0, length: 4 * pool.chunkBytes)
        try await first.flush()
        try await first.write(from: block, at: written * pool.chunkBytes)
        try await pool.deleteVolume(name: "a")
        #expect(await pool.usage.usedChunks == 1)
    }

    @Test(
        "after a power cut every flushed write reads back and other blocks hold old or new data",
        arguments: [UInt64(1), 2, 3, 4])
    func powerCut(seed: UInt64) async throws {
        let inner = try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)
        _ = try await ThinPool.create(name: "pc", devices: [inner]).createVolume(name: "v", sizeBytes: 16 << 20)
        let faulty = FaultyDevice(wrapping: inner, seed: seed, volatileCache: true)
        let pool = try await ThinPool.open(devices: [faulty])
        let volume = try await pool.openVolume(name: "v")
        let block = 4096
        let blocks = Int(volume.capacityBytes) / block
        var flushed = [UInt8](repeating: 0, count: Int(volume.capacityBytes))
        var current = flushed
        var versions = [[[UInt8]]](repeating: [], count: blocks)
        var random = SeededRandom(seed: seed)
        for step in 0..<150 {
            let first = Int(random.below(UInt64(blocks - 16)))
            let count = 1 + Int(random.below(16))
            if random.chance(0.15) {
                try await volume.discard(offset: UInt64(first * block), length: UInt64(count * block))
                current.replaceSubrange(
                    (first * block)..<((first + count) * block), with: repeatElement(0, count: count * block))
            } else {
                let data = AlignedBuffer(count: count * block)
                fillRandom(data.bytes, seed: seed * 10_000 + UInt64(step))
                try await volume.write(from: data, at: UInt64(first * block))
                current.replaceSubrange((first * block)..<((first + count) * block), with: data.array)
            }
            for index in first..<(first + count) {
                versions[index].append(Array(current[(index * block)..<((index + 1) * block)]))
            }
            if random.chance(0.2) {
                try await volume.flush()
                flushed = current
                versions = [[[UInt8]]](repeating: [], count: blocks)
            }
        }
        try await faulty.powerCut(tearing: true)
        let reopened = try await ThinPool.open(devices: [inner])
        let checked = try await reopened.check()
        #expect(checked.isClean, "seed \(seed): \(checked.problems)")
        let after = try await readAll(try await reopened.openVolume(name: "v"))
        for index in 0..<blocks {
            let range = (index * block)..<((index + 1) * block)
            let got = Array(after[range])
            // A discarded block may read as zeros; unflushed data may also be lost back to the flushed state.
            let allowed = [Array(flushed[range])] + versions[index] + [[UInt8](repeating: 0, count: block)]
            #expect(allowed.contains(got), "seed \(seed): block \(index) holds data it never held")
            if versions[index].isEmpty {
                #expect(got == Array(flushed[range]), "seed \(seed): flushed block \(index) changed")
            }
        }
    }

    @Test("resizing keeps data within the size both ways, frees chunks past a shrink, and a regrown tail reads zeros")
    func resize() async throws {
        let device = try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "r", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 4 << 20)
        let data = AlignedBuffer(count: 4 << 20)
        fillRandom(data.bytes, seed: 8)
        try await volume.write(from: data, at: 0)
        try await volume.flush()
        let usedBefore = await pool.usage.usedChunks
        let cut = UInt64(1 << 20) + 8192  // inside a chunk
        try await pool.resizeVolume(name: "v", sizeBytes: cut)
        #expect(await pool.usage.usedChunks < usedBefore)
        let small = try await pool.openVolume(name: "v")
        #expect(small.capacityBytes == cut)
        #expect(byteDifference(try await readAll(small), Array(data.array[0..<Int(cut)])) == nil)
        try await pool.resizeVolume(name: "v", sizeBytes: 8 << 20)
        let large = try await pool.openVolume(name: "v")
        var expected = Array(data.array[0..<Int(cut)])
        expected += [UInt8](repeating: 0, count: (8 << 20) - Int(cut))
        #expect(
            byteDifference(try await readAll(large), expected) == nil, "grown space and the cut chunk's tail read zeros"
        )
        try await pool.renameVolume(name: "v", to: "w")
        #expect(try await pool.volumes().map(\.name) == ["w"])
        #expect(byteDifference(try await readAll(try await pool.openVolume(name: "w")), expected) == nil)
    }

    @Test("check finds a clean pool clean, and reports corrupt nodes and leaked or unallocated chunks precisely")
    func check() async throws {
        let device = try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "c", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 8 << 20)
        let data = AlignedBuffer(count: 1 << 20)
        fillRandom(data.bytes, seed: 2)
        try await volume.write(from: data, at: 0)
        try await volume.discard(offset: 0, length: pool.chunkBytes)
        try await volume.flush()
        let clean = try await pool.check()
        #expect(clean.isClean, "\(clean.problems)")
        #expect(clean.mappedChunks == 15 && clean.allocatedChunks == 15)

        // A chunk allocated behind the pool's back: leaked.
        try await pool.withState { state in
            state.area.roots[ThinPool.Root.referenceCounts.rawValue] = try await MetadataBTree.insert(
                400, value: 1, root: state.area.roots[ThinPool.Root.referenceCounts.rawValue], in: state.area)
        }
        let leaked = try await pool.check()
        #expect(
            leaked.problems.contains("chunk 400 is allocated (reference count 1) but nothing maps it (leaked)"),
            "\(leaked.problems)")
        // A mapping whose chunk was never allocated.
        try await pool.withState { state in
            var record = state.records[volume.id]!
            record.root = try await MetadataBTree.insert(99, value: 300, root: record.root, in: state.area)
            record.mappedChunks += 1
            state.records[volume.id] = record
        }
        let unallocated = try await pool.check()
        #expect(
            unallocated.problems.contains("chunk 300 is mapped but not allocated (it could be handed out again)"),
            "\(unallocated.problems)")

        // A corrupt node on disk is reported with its block, never used: by check, and by a read.
        let reopened = try await ThinPool.open(devices: [device])
        let (victim, position) = await reopened.withState { state in
            (state.records[volume.id]!.root, state.area.offset + state.records[volume.id]!.root * 4096)
        }
        let block = AlignedBuffer(count: 4096)
        try await device.read(into: block, at: position)
        block.bytes[64] ^= 0x01
        try await device.write(from: block, at: position)
        let damaged = try await ThinPool.open(devices: [device])
        let report = try await damaged.check()
        #expect(
            report.problems.contains { $0.contains("metadata block \(victim) is corrupt (checksum mismatch)") },
            "\(report.problems)")
        let reader = try await damaged.openVolume(name: "v")
        expectError(
            await spindleError { try await reader.read(into: AlignedBuffer(count: 4096), at: 0) },
            .corrupted, ["metadata block \(victim) is corrupt (checksum mismatch)"])
    }

    @Test("volume names are unique, and a missing one is reported")
    func names() async throws {
        let pool = try await ThinPool.create(
            name: "n", devices: [try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)])
        _ = try await pool.createVolume(name: "one", sizeBytes: 1 << 20)
        #expect(try await pool.warnings().isEmpty, "a small volume in an empty pool is nothing to warn about")
        expectError(
            await spindleError { _ = try await pool.createVolume(name: "one", sizeBytes: 1 << 20) }, .alreadyExists,
            ["'one' already"])
        expectError(
            await spindleError { _ = try await pool.openVolume(name: "two") }, .notFound, ["no volume named 'two'"])
        expectError(
            await spindleError { _ = try await pool.createVolume(name: "x", sizeBytes: 1000) }, .invalidArgument,
            ["multiple of 4 KiB"])
    }
}
