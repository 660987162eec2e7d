// Failures on purpose, deterministic from a seed: read errors, latency, a power cut that loses or
// tears unflushed writes, a disk that vanishes mid-load. Each is checked against what it promises.
import ExampleSupport
import Spindle

await runExample("fault-injection") { folder in
    let engine = try IOEngine()
    let disk = try FileDevice.create(path: "\(folder)/disk.img", sizeBytes: 64 << 20, engine: engine)
    let faulty = FaultyDevice(wrapping: disk, seed: 42, volatileCache: true)

    // 32 blocks of 4 KiB, block i filled with the byte i + 1, flushed: the reference data.
    let blockBytes = 4096
    let blocks = 32
    let block = AlignedBuffer(count: blockBytes)
    for index in 0..<blocks {
        block.fill(UInt8(index + 1))
        try await faulty.write(from: block, at: UInt64(index * blockBytes))
    }
    try await faulty.flush()

    /// Whether each logical block of block `index` holds one of `values`.
    func holds(_ buffer: AlignedBuffer, block index: Int, oneOf values: [UInt8]) -> Bool {
        stride(from: 0, to: blockBytes, by: disk.logicalBlockBytes).allSatisfy { start in
            let first = buffer.bytes[start]
            return values.contains(first)
                && buffer.bytes[start..<(start + disk.logicalBlockBytes)].allSatisfy { $0 == first }
        }
    }

    // Read errors; the reads that succeed return the data.
    faulty.failReads(in: 0..<65536, probability: 0.1)  // EIO on 10% of the reads of the first 64 KiB
    var failedInRange = 0
    for round in 0..<10 {
        for index in 0..<blocks {
            do {
                try await faulty.read(into: block, at: UInt64(index * blockBytes))
                try expect(
                    holds(block, block: index, oneOf: [UInt8(index + 1)]),
                    "block \(index) read back wrong in round \(round)")
            } catch let error as SpindleError {
                try expect(
                    error.code == .injectedFault && index * blockBytes < 65536,
                    "unexpected read error on block \(index): \(error)")
                failedInRange += 1
            }
        }
    }
    let readsInRange = 10 * 65536 / blockBytes
    try expect(
        failedInRange > 0 && failedInRange < readsInRange / 2,
        "\(failedInRange) of \(readsInRange) reads failed, not about 10%")
    try expect(faulty.statistics.injectedReadErrors == UInt64(failedInRange), "the statistics count other read errors")
    faulty.clearFaults()

    // Latency.
    faulty.addLatency(nanoseconds: 200_000, jitterNanoseconds: 100_000)  // 200 µs plus up to 100 µs, seeded
    let start = ContinuousClock.now
    for index in 0..<20 { try await faulty.read(into: block, at: UInt64(index * blockBytes)) }
    try expect(ContinuousClock.now - start >= .microseconds(20 * 200), "20 reads took less than 20 × 200 µs")
    faulty.clearFaults()

    // A power cut: writes no flush covered are lost or torn, block by block; flushed data survives.
    block.fill(0xEE)
    for index in 0..<blocks / 2 { try await faulty.write(from: block, at: UInt64(index * blockBytes)) }
    let cut = try await faulty.powerCut(tearing: true)  // unflushed writes lost or torn
    faulty.restorePower()
    try expect(cut.unflushedWrites == blocks / 2, "the power cut found \(cut.unflushedWrites) unflushed writes")
    try expect(
        cut.blocksDropped > 0 && cut.blocksWritten > 0,
        "a torn power cut should drop some blocks and let others through")
    for index in 0..<blocks {
        try await faulty.read(into: block, at: UInt64(index * blockBytes))
        let allowed: [UInt8] = index < blocks / 2 ? [UInt8(index + 1), 0xEE] : [UInt8(index + 1)]
        try expect(
            holds(block, block: index, oneOf: allowed), "block \(index) holds \(block.bytes[0]) after the power cut")
    }

    // The disk vanishes mid-load.
    faulty.vanish(afterOperations: 1_000)  // 1,000 more operations, then every one fails
    var completed = 0
    do {
        while completed < 2_000 {
            try await faulty.read(into: block, at: UInt64(completed % blocks * blockBytes))
            completed += 1
        }
    } catch let error as SpindleError {
        try expect(error.code == .deviceGone, "the vanished disk failed with \(error)")
    }
    try expect(completed == 1_000, "the disk vanished after \(completed) operations, not 1,000")
    let again: Void? = try? await faulty.read(into: block, at: 0)
    try expect(again == nil, "the vanished disk answered a read")
    try await faulty.close()
    try await disk.close()
    engine.shutdown()
}
