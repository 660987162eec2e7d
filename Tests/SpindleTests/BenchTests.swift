import Glibc
import Testing

@testable import Spindle

/// A device that silently loses writes to one block: what the bench's verification must catch.
final class LossyDevice: BlockDevice {
    let inner: MemoryDevice
    let lostOffset: UInt64
    init(inner: MemoryDevice, lostOffset: UInt64) {
        self.inner = inner
        self.lostOffset = lostOffset
    }
    var logicalBlockBytes: Int { inner.logicalBlockBytes }
    var capacityBytes: UInt64 { inner.capacityBytes }
    var isReadOnly: Bool { false }
    var discardReadsZeroes: Bool { true }
    var name: String { "lossy" }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try await inner.read(into: buffer, at: offset)
    }
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        if offset <= lostOffset && lostOffset < offset + UInt64(buffer.count) { return }
        try await inner.write(from: buffer, at: offset, fua: fua)
    }
    func flush() async throws {}
    func discard(offset: UInt64, length: UInt64) async throws {
        try await inner.discard(offset: offset, length: length)
    }
    func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await inner.writeZeroes(offset: offset, length: length)
    }
    func close() async throws {}
}

@Suite("Bench")
struct BenchTests {
    @Test("every pattern runs, counts its requests and verifies what it wrote", arguments: Bench.Pattern.allCases)
    func patterns(pattern: Bench.Pattern) async throws {
        let device = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        var options = Bench.Options(pattern: pattern)
        options.ioDepth = 8
        options.operations = 3000
        options.verify = true
        let report = try await Bench.run(on: device, options: options)
        #expect(report.operations == 3000)
        #expect(report.bytes == 3000 * 4096)
        #expect(report.read != nil || report.write != nil)
        if pattern == .randrw {
            let reads = report.read?.operations ?? 0
            #expect(reads > 1000 && reads < 2000, "randrw is about half reads, got \(reads)")
        }
        #expect(report.verifiedBlocks > 0)
        if pattern.reads { #expect(report.layoutBytes == 4 << 20) }
    }

    @Test("the bench runs on an image file through the engine, time-limited")
    func onImageFile() async throws {
        let folder = TemporaryFolder("bench")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let device = try FileDevice.create(path: folder.file("b.img"), sizeBytes: 8 << 20, engine: engine)
        var options = Bench.Options(pattern: .randwrite)
        options.ioDepth = 16
        options.runtimeSeconds = 0.3
        options.verify = true
        let report = try await Bench.run(on: device, options: options, engine: engine)
        #expect(report.operations > 0)
        #expect(report.verifiedBlocks > 0)
        #expect(report.write!.latencyNanosP50 <= report.write!.latencyNanosP99)
        #expect(report.write!.latencyNanosP99 <= report.write!.latencyNanosMax)
        try await device.close()
    }

    @Test("verification catches a lost write and names the block")
    func catchesLostWrite() async throws {
        let device = LossyDevice(
            inner: try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096), lostOffset: 40960)
        var options = Bench.Options(pattern: .write)
        options.operations = 256
        options.ioDepth = 4
        options.verify = true
        let error = await spindleError { _ = try await Bench.run(on: device, options: options) }
        expectError(error, .verificationFailed, ["verify of 4096 bytes at offset 40960 on lossy", "holds zeros"])
    }

    @Test(
        "verify-existing after random writes accepts any whole block of the run, and catches a corrupt or foreign one")
    func verifyExistingAfterRandomWrites() async throws {
        let memory = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096, name: "mem")
        var options = Bench.Options(pattern: .randwrite)
        options.operations = 300
        options.ioDepth = 8
        options.fill = true
        options.verify = true
        options.seed = 3
        _ = try await Bench.run(on: memory, options: options)
        var check = Bench.Options(pattern: .read)
        check.verifyExisting = true
        check.seed = 3
        let report = try await Bench.run(on: memory, options: check)
        #expect(report.verifiedBlocks == 256)
        // A block's payload corrupted: named, with its offset.
        let block = AlignedBuffer(count: 4096)
        try await memory.read(into: block, at: 8192)
        block.bytes[100] ^= 0xFF
        try await memory.write(from: block, at: 8192)
        expectError(
            await spindleError { _ = try await Bench.run(on: memory, options: check) },
            .verificationFailed, ["offset 8192", "contents differ"])
        block.bytes[100] ^= 0xFF
        try await memory.write(from: block, at: 8192)
        // Another offset's block where this one belongs (a misdirected write).
        try await memory.read(into: block, at: 12288)
        try await memory.write(from: block, at: 8192)
        expectError(
            await spindleError { _ = try await Bench.run(on: memory, options: check) },
            .verificationFailed, ["offset 8192", "misdirected"])
        try await memory.close()
    }

    @Test("bad options are refused before any I/O")
    func badOptions() async throws {
        let device = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        var options = Bench.Options(pattern: .randread)
        options.blockBytes = 1000
        expectError(
            await spindleError { _ = try await Bench.run(on: device, options: options) },
            .invalidArgument, ["1000 bytes must be a multiple of memory's 4096-byte logical block"])
        options.blockBytes = 4096
        options.regionBytes = 2 << 20
        expectError(
            await spindleError { _ = try await Bench.run(on: device, options: options) }, .outOfRange, ["does not fit"])
        options.regionBytes = nil
        options.ioDepth = 0
        expectError(
            await spindleError { _ = try await Bench.run(on: device, options: options) }, .invalidArgument, ["depth"])
        options.ioDepth = 1
        options.runtimeSeconds = 0
        expectError(
            await spindleError { _ = try await Bench.run(on: device, options: options) }, .invalidArgument, ["runtime"])
        let readOnly = try MemoryDevice(capacityBytes: 1 << 20, readOnly: true)
        expectError(
            await spindleError { _ = try await Bench.run(on: readOnly, options: Bench.Options(pattern: .write)) },
            .readOnly, ["writes"])
    }

    @Test("an I/O error stops the run and is reported")
    func ioErrorStops() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20), seed: 1)
        device.failReads(in: 0..<(1 << 20), probability: 0.01)
        var options = Bench.Options(pattern: .randread)
        options.operations = 100_000
        options.ioDepth = 4
        let error = await spindleError { _ = try await Bench.run(on: device, options: options) }
        expectError(error, .injectedFault, ["injected read error"])
    }
}
