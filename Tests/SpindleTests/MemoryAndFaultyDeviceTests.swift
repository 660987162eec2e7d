import Glibc
import Testing

@testable import Spindle

@Suite("Memory devices")
struct MemoryDeviceTests {
    @Test("concurrent random I/O matches a model")
    func concurrent() async throws {
        let device = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        let expected = try await exerciseConcurrently(device, engine: nil, seed: 21)
        #expect(byteDifference(try await readAll(device), expected) == nil)
        #expect(device.snapshot() == expected)
    }

    @Test("bad sizes and requests are refused")
    func validation() async throws {
        expectError(await spindleError { _ = try MemoryDevice(capacityBytes: 1000) }, .invalidArgument, ["1000 bytes"])
        expectError(
            await spindleError { _ = try MemoryDevice(capacityBytes: 4096, logicalBlockBytes: 3000) },
            .invalidArgument, ["3000"])
        let device = try MemoryDevice(capacityBytes: 64 * 1024, readOnly: true, name: "scratch")
        let buffer = AlignedBuffer(count: 512)
        expectError(await spindleError { try await device.write(from: buffer, at: 0) }, .readOnly, ["scratch"])
        expectError(await spindleError { try await device.read(into: buffer, at: 64 * 1024) }, .outOfRange, ["scratch"])
        try await device.close()
        expectError(await spindleError { try await device.read(into: buffer, at: 0) }, .closed, ["scratch"])
    }
}

@Suite("Fault injection")
struct FaultyDeviceTests {
    private func pattern(_ count: Int, seed: UInt64) -> AlignedBuffer {
        let buffer = AlignedBuffer(count: count)
        fillRandom(buffer.bytes, seed: seed)
        return buffer
    }

    @Test("read errors everywhere leave writes working")
    func readErrorsEverywhere() async throws {
        let inner = try MemoryDevice(capacityBytes: 1 << 20, name: "disk0")
        let device = FaultyDevice(wrapping: inner)
        device.failReads()
        let data = pattern(4096, seed: 1)
        try await device.write(from: data, at: 0)
        expectError(
            await spindleError { try await device.read(into: AlignedBuffer(count: 4096), at: 0) },
            .injectedFault, ["read of 4096 bytes at offset 0 on faulty(disk0)", "injected read error", "errno 5"])
        #expect(inner.snapshot(length: 4096) == data.array)
        #expect(device.statistics.injectedReadErrors == 1)
        device.clearFaults()
        let back = AlignedBuffer(count: 4096)
        try await device.read(into: back, at: 0)
        #expect(byteDifference(back.array, data.array) == nil)
    }

    @Test("errors on a range hit only requests that overlap it, and a failed write changes nothing")
    func rangeFaults() async throws {
        let inner = try MemoryDevice(capacityBytes: 1 << 20)
        let device = FaultyDevice(wrapping: inner)
        device.failWrites(in: 8192..<12288, errno: ENOSPC)
        device.failReads(in: 65536..<65537)
        let data = pattern(4096, seed: 2)
        try await device.write(from: data, at: 4096)
        try await device.write(from: data, at: 12288)
        expectError(
            await spindleError { try await device.write(from: data, at: 8192) },
            .injectedFault, ["errno \(ENOSPC)", "offset 8192"])
        let big = pattern(16384, seed: 3)
        expectError(await spindleError { try await device.write(from: big, at: 0) }, .injectedFault, ["offset 0"])
        #expect(inner.snapshot(offset: 8192, length: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(inner.snapshot(offset: 4096, length: 4096) == data.array)
        let buffer = AlignedBuffer(count: 4096)
        try await device.read(into: buffer, at: 61440)
        expectError(await spindleError { try await device.read(into: buffer, at: 65536) }, .injectedFault, ["read"])
        try await device.read(into: buffer, at: 69632)
    }

    @Test("probabilistic faults repeat exactly for a seed")
    func seededFaults() async throws {
        func failures(seed: UInt64) async throws -> [Bool] {
            let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20), seed: seed)
            device.failReads(probability: 0.3)
            var outcome: [Bool] = []
            let buffer = AlignedBuffer(count: 512)
            for index in 0..<200 {
                do {
                    try await device.read(into: buffer, at: UInt64(index * 512))
                    outcome.append(false)
                } catch {
                    outcome.append(true)
                }
            }
            return outcome
        }
        let first = try await failures(seed: 42)
        #expect(try await failures(seed: 42) == first)
        #expect(try await failures(seed: 43) != first)
        let count = first.filter { $0 }.count
        #expect(count > 20 && count < 100, "about 30% of 200 reads fail, got \(count)")
    }

    @Test("fail after N operations")
    func failAfter() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20))
        device.failAfter(operations: 3, kinds: [.writes, .flushes])
        let data = pattern(512, seed: 4)
        for index in 0..<3 { try await device.write(from: data, at: UInt64(index * 512)) }
        expectError(await spindleError { try await device.write(from: data, at: 0) }, .injectedFault, ["write"])
        expectError(await spindleError { try await device.flush() }, .injectedFault, ["flush"])
        try await device.read(into: AlignedBuffer(count: 512), at: 0)  // reads were not included
        #expect(device.statistics.injectedWriteErrors == 1 && device.statistics.injectedFlushErrors == 1)
    }

    @Test("a device vanishes after N operations and can come back")
    func vanish() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20, name: "sdb"))
        device.vanish(afterOperations: 2)
        let buffer = AlignedBuffer(count: 512)
        try await device.read(into: buffer, at: 0)
        try await device.write(from: buffer, at: 0)
        expectError(
            await spindleError { try await device.read(into: buffer, at: 0) },
            .deviceGone, ["vanished", "faulty(sdb)"])
        expectError(await spindleError { try await device.flush() }, .deviceGone, ["vanished"])
        device.reappear()
        try await device.read(into: buffer, at: 0)
        device.vanish()
        expectError(await spindleError { try await device.read(into: buffer, at: 0) }, .deviceGone, ["vanished"])
    }

    @Test("added latency delays every request")
    func latency() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20), seed: 9)
        device.addLatency(nanoseconds: 5_000_000, jitterNanoseconds: 1_000_000)
        let buffer = AlignedBuffer(count: 512)
        let start = monotonicNanos()
        for _ in 0..<4 { try await device.read(into: buffer, at: 0) }
        #expect(monotonicNanos() - start >= 20_000_000)
    }

    @Test("a power cut drops unflushed writes and keeps flushed and FUA ones")
    func powerCutDropsUnflushed() async throws {
        let inner = try MemoryDevice(capacityBytes: 1 << 20)
        let device = FaultyDevice(wrapping: inner, volatileCache: true)
        let flushed = pattern(8192, seed: 10)
        let unflushed = pattern(8192, seed: 11)
        let forced = pattern(4096, seed: 12)
        try await device.write(from: flushed, at: 0)
        try await device.flush()
        try await device.write(from: unflushed, at: 4096)  // overlaps the flushed data
        try await device.writeZeroes(offset: 65536, length: 4096)
        try await device.write(from: forced, at: 32768, fua: true)
        // Reads see the cache.
        let view = AlignedBuffer(count: 12288)
        try await device.read(into: view, at: 0)
        #expect(
            Array(view.array[4096...]) == unflushed.array
                && Array(view.array[0..<4096]) == Array(flushed.array[0..<4096]))
        #expect(
            inner.snapshot(offset: 4096, length: 4096) == Array(flushed.array[4096...]),
            "nothing unflushed reached the disk")
        #expect(device.unflushedWrites == 2)

        let report = try await device.powerCut()
        #expect(report == FaultyDevice.PowerCutReport(unflushedWrites: 2, blocksDropped: 16 + 8, blocksWritten: 0))
        expectError(await spindleError { try await device.read(into: view, at: 0) }, .deviceGone, ["lost power"])
        device.restorePower()
        try await device.read(into: view, at: 0)
        #expect(view.array[0..<8192] == flushed.array[0..<8192])
        let check = AlignedBuffer(count: 4096)
        try await device.read(into: check, at: 32768)
        #expect(byteDifference(check.array, forced.array) == nil)
        #expect(inner.snapshot(offset: 0, length: 8192) == flushed.array)
    }

    @Test("a FUA write replaces older cached data for its range only")
    func fuaOverCachedWrite() async throws {
        let inner = try MemoryDevice(capacityBytes: 1 << 20)
        let device = FaultyDevice(wrapping: inner, volatileCache: true)
        let older = pattern(12288, seed: 13)
        let newer = pattern(4096, seed: 14)
        try await device.write(from: older, at: 0)
        try await device.write(from: newer, at: 4096, fua: true)
        try await device.flush()
        var expected = older.array
        expected.replaceSubrange(4096..<8192, with: newer.array)
        #expect(
            inner.snapshot(offset: 0, length: 12288) == expected, "the flush must not put older data over the FUA write"
        )
    }

    @Test("a torn power cut lets a seeded subset of blocks through, each whole, old or new")
    func tornPowerCut() async throws {
        func cut(seed: UInt64) async throws -> [UInt8] {
            let inner = try MemoryDevice(capacityBytes: 1 << 20)
            let old = pattern(64 * 512, seed: 15)
            try await inner.write(from: old, at: 0)
            let device = FaultyDevice(wrapping: inner, seed: seed, volatileCache: true)
            let new = pattern(64 * 512, seed: 16)
            try await device.write(from: new, at: 0)
            let report = try await device.powerCut(tearing: true)
            #expect(report.blocksWritten + report.blocksDropped == 64)
            #expect(report.blocksWritten > 0 && report.blocksDropped > 0)
            let after = inner.snapshot(offset: 0, length: 64 * 512)
            var landed = 0
            for block in 0..<64 {
                let range = (block * 512)..<((block + 1) * 512)
                let isNew = after[range] == new.array[range]
                #expect(isNew || after[range] == old.array[range], "block \(block) is neither old nor new")
                if isNew { landed += 1 }
            }
            #expect(UInt64(landed) == report.blocksWritten)
            return after
        }
        let first = try await cut(seed: 99)
        #expect(try await cut(seed: 99) == first)
        #expect(try await cut(seed: 100) != first)
    }

    /// Whether each read of block `index` failed, per block in the order of its reads, for reads
    /// issued in `order` (each block as often as it appears), one at a time or all at once.
    private func readOutcomes(
        _ device: FaultyDevice, order: [Int], concurrently: Bool = false
    ) async throws -> [Int: [Bool]] {
        let failed = Locked<[Int: [Bool]]>([:])
        @Sendable func read(_ index: Int) async {
            let buffer = AlignedBuffer(count: 512)
            var failure = false
            do { try await device.read(into: buffer, at: UInt64(index * 512)) } catch { failure = true }
            failed.withLock { $0[index, default: []].append(failure) }
        }
        if concurrently {
            await withTaskGroup(of: Void.self) { group in
                for index in order { group.addTask { await read(index) } }
            }
        } else {
            for index in order { await read(index) }
        }
        return failed.withLock { $0 }
    }

    @Test(
        "which requests fail follows each request (its offset, length and repetition), not the order requests arrive in"
    )
    func orderIndependentFaults() async throws {
        func device(name: String = "disk") throws -> FaultyDevice {
            let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20), seed: 7, name: name)
            device.failReads(probability: 0.3)
            return device
        }
        let blocks = Array(0..<256)
        var random = SeededRandom(seed: 11)
        let shuffled = (blocks + blocks).shuffled(using: &random)
        let inOrder = try await readOutcomes(try device(), order: blocks + blocks)
        #expect(try await readOutcomes(try device(), order: shuffled) == inOrder)
        let failures = inOrder.values.map { $0.filter { $0 }.count }.reduce(0, +)
        #expect(failures > 80 && failures < 230, "about 30% of 512 reads fail, got \(failures)")
        #expect(inOrder.values.contains { $0[0] != $0[1] }, "a repeated request draws afresh")
        // All at once (each block once: two identical requests in flight may swap their outcomes).
        let concurrent = try await readOutcomes(try device(), order: blocks.reversed(), concurrently: true)
        #expect(concurrent == inOrder.mapValues { [$0[0]] })
        // Another device with the same seed fails other requests.
        #expect(try await readOutcomes(try device(name: "other disk"), order: blocks + blocks) != inOrder)
        // Each epoch draws afresh, and its counts start afresh.
        let epochs = try device()
        epochs.beginEpoch(1)
        let first = try await readOutcomes(epochs, order: blocks)
        #expect(first != inOrder.mapValues { [$0[0]] })
        epochs.beginEpoch(1)
        #expect(try await readOutcomes(epochs, order: blocks) == first)
    }

    @Test("a torn power cut lets the same blocks through whatever order the writes were cached in")
    func orderIndependentTearing() async throws {
        func cut(order: [Int]) async throws -> [UInt8] {
            let inner = try MemoryDevice(capacityBytes: 1 << 20)
            let device = FaultyDevice(wrapping: inner, seed: 5, volatileCache: true, name: "disk")
            for index in order {
                try await device.write(from: pattern(4 * 512, seed: UInt64(100 + index)), at: UInt64(index * 4 * 512))
            }
            let report = try await device.powerCut(tearing: true)
            #expect(report.blocksWritten > 0 && report.blocksDropped > 0)
            return inner.snapshot(offset: 0, length: 64 * 4 * 512)
        }
        let forward = try await cut(order: Array(0..<64))
        #expect(try await cut(order: Array((0..<64).reversed())) == forward)
    }

    @Test("power cuts need the volatile cache")
    func powerCutNeedsCache() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20))
        expectError(await spindleError { try await device.powerCut() }, .unsupported, ["volatileCache"])
    }

    @Test("fault injection over an image file on the engine")
    func overFileDevice() async throws {
        let folder = TemporaryFolder("faulty")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let file = try FileDevice.create(path: folder.file("f.img"), sizeBytes: 1 << 20, engine: engine)
        let device = FaultyDevice(wrapping: file, seed: 3, volatileCache: true)
        let expected = try await exerciseConcurrently(device, engine: engine, tasks: 4, operationsPerTask: 60, seed: 5)
        try await device.flush()
        #expect(byteDifference(try await readAll(file), expected) == nil)
        device.failReads(in: 0..<4096)
        expectError(
            await spindleError { try await device.read(into: AlignedBuffer(count: 4096), at: 0) },
            .injectedFault, ["faulty(\(folder.file("f.img")))"])
        try await device.close()
        try await file.close()
    }
}
