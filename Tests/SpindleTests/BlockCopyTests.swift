import Foundation
import Testing

@testable import Spindle

/// Sparse-aware copies between devices, and image files into and out of thin volumes, byte for byte.
@Suite("Block copies", .serialized)
struct BlockCopyTests {
    /// 4 MiB: random data in [0, 256K), at [1M, 1M+4K) and in the last 4 KiB; zeros elsewhere.
    static func patterned(blockBytes: Int = 4096) async throws -> (device: MemoryDevice, bytes: [UInt8]) {
        let device = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: blockBytes, name: "source")
        var bytes = [UInt8](repeating: 0, count: 4 << 20)
        for (range, seed) in [
            (0..<(256 << 10), UInt64(1)), ((1 << 20)..<((1 << 20) + 4096), 2), (((4 << 20) - 4096)..<(4 << 20), 3),
        ] {
            let piece = randomBytes(range.count, seed: seed)
            bytes.replaceSubrange(range, with: piece)
            let buffer = AlignedBuffer(count: range.count)
            piece.withUnsafeBytes { buffer.copy(from: $0, at: 0) }
            try await device.write(from: buffer, at: UInt64(range.lowerBound))
        }
        return (device, bytes)
    }

    static let dataBytes: UInt64 = (256 << 10) + 4096 + 4096

    /// A device full of 0xEE, so that every byte the copy leaves alone would show.
    static func garbage(_ device: any BlockDevice) async throws {
        let buffer = AlignedBuffer(count: Int(device.capacityBytes))
        buffer.fill(0xEE)
        try await device.write(from: buffer, at: 0)
    }

    @Test(
        "onto a target holding old data: data runs are written, zero runs discarded or zeroed, and the target reads as the source"
    )
    func copyOverOldData() async throws {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let (source, bytes) = try await Self.patterned()
        // A memory device discards to zeros; an array does not (its zero runs are written as zeros).
        let members = try (0..<2).map {
            try MemoryDevice(capacityBytes: 6 << 20, logicalBlockBytes: 4096, name: "m\($0)")
        }
        let array = try await RAIDArray.create(name: "target", level: .raid1, members: members)
        for target in [try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096) as any BlockDevice, array] {
            try await Self.garbage(target)
            let seen = Locked<[BlockCopy.Progress]>([])
            var options = BlockCopy.Options()
            options.length = 4 << 20
            options.pieceBytes = 1 << 20
            let result = try await engine.copy(from: source, to: target, options: options) { progress in
                seen.withLock { $0.append(progress) }
            }
            #expect(
                result
                    == BlockCopy.Result(
                        totalBytes: 4 << 20, writtenBytes: Self.dataBytes, skippedBytes: (4 << 20) - Self.dataBytes))
            #expect(byteDifference(Array(try await readAll(target).prefix(4 << 20)), bytes) == nil, "\(target.name)")
            #expect(seen.withLock { $0 }.map(\.doneBytes) == [1 << 20, 2 << 20, 3 << 20, 4 << 20])
            #expect(seen.withLock { $0 }.allSatisfy { $0.totalBytes == 4 << 20 })
        }
        try await array.close()
    }

    @Test("a sparse image file as the source: its holes are not read; a target that reads zeros is not written there")
    func sparseSourceAndZeroTarget() async throws {
        let folder = TemporaryFolder("copy-sparse")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let (memory, bytes) = try await Self.patterned()
        let file = try FileDevice.create(path: folder.file("source.img"), sizeBytes: 4 << 20, engine: engine)
        _ = try await engine.copy(
            from: memory, to: file,
            options: {
                var o = BlockCopy.Options()
                o.targetReadsZeros = true
                return o
            }())
        let extents = try await file.dataRanges(in: 0..<(4 << 20))
        #expect(
            !extents.isEmpty && extents.reduce(0) { $0 + $1.count } < 2 << 20, "the image stayed sparse: \(extents)")
        #expect(try await file.dataRanges(in: (2 << 20)..<(3 << 20)).isEmpty)
        // Only the pieces with data are read: a hole is never read.
        let counted = CountingSource(file)
        let target = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        var options = BlockCopy.Options()
        options.targetReadsZeros = true
        let result = try await engine.copy(from: counted, to: target, options: options)
        #expect(
            result
                == BlockCopy.Result(
                    totalBytes: 4 << 20, writtenBytes: Self.dataBytes, skippedBytes: (4 << 20) - Self.dataBytes))
        #expect(byteDifference(try await readAll(target), bytes) == nil)
        #expect(counted.readBytes.withLock { $0 } == 3 << 20, "the third MiB is a hole and was not read")
        try await file.close()
    }

    @Test(
        "ranges: offsets on both sides, and misaligned, overlapping or out-of-range copies refused before anything is written"
    )
    func rangesAndRefusals() async throws {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let (source, bytes) = try await Self.patterned(blockBytes: 512)
        let target = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 512)
        try await Self.garbage(target)
        var options = BlockCopy.Options()
        options.sourceOffset = (256 << 10) - 2048
        options.targetOffset = 8192
        options.length = 6144
        let result = try await engine.copy(from: source, to: target, options: options)
        #expect(
            result.writtenBytes == 4096 && result.skippedBytes == 2048,
            "zeros are found by 4 KiB units from the copy's start: \(result)")
        var expected = [UInt8](repeating: 0xEE, count: 1 << 20)
        expected.replaceSubrange(8192..<(8192 + 6144), with: bytes[((256 << 10) - 2048)..<((256 << 10) + 4096)])
        #expect(byteDifference(try await readAll(target), expected) == nil)

        options.length = 1000
        expectError(
            await spindleError { _ = try await engine.copy(from: source, to: target, options: options) }, .misaligned,
            [])
        options.length = 2 << 20
        expectError(
            await spindleError { _ = try await engine.copy(from: source, to: target, options: options) }, .outOfRange,
            ["copy to"])
        var overlap = BlockCopy.Options()
        overlap.sourceOffset = 0
        overlap.targetOffset = 4096
        overlap.length = 8192
        expectError(
            await spindleError { _ = try await engine.copy(from: source, to: source, options: overlap) },
            .invalidArgument, ["overlap"])
        #expect(byteDifference(try await readAll(target), expected) == nil, "refused copies wrote nothing")
    }

    @Test("image files into and out of thin volumes: any file size, zeros left unallocated, holes in the export")
    func importAndExport() async throws {
        let folder = TemporaryFolder("copy-volume")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let pool = try await ThinPool.create(
            name: "tank", devices: [try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)])
        // 3 MiB + 1234 bytes: data, a zero MiB, data, and a tail that ends inside a block.
        var file = randomBytes((3 << 20) + 1234, seed: 21)
        file.replaceSubrange((1 << 20)..<(2 << 20), with: repeatElement(0, count: 1 << 20))
        try Data(file).write(to: URL(fileURLWithPath: folder.file("odd.bin")))
        let imported = try await pool.importImage(at: folder.file("odd.bin"), into: "odd", engine: engine)
        #expect(
            imported
                == BlockCopy.Result(
                    totalBytes: UInt64(file.count), writtenBytes: UInt64(file.count) - (1 << 20), skippedBytes: 1 << 20)
        )
        let odd = try await pool.openVolume(name: "odd")
        #expect(odd.capacityBytes == (UInt64(file.count) + 4095) / 4096 * 4096)
        let padded = file + [UInt8](repeating: 0, count: Int(odd.capacityBytes) - file.count)
        #expect(byteDifference(try await readAll(odd), padded) == nil)
        #expect(
            try await odd.dataRanges(in: 0..<odd.capacityBytes) == [0..<(1 << 20), (2 << 20)..<odd.capacityBytes],
            "the zero MiB took no chunk")

        // A file smaller than a block, into an existing larger volume holding old data.
        _ = try await pool.createVolume(name: "small", sizeBytes: 1 << 20)
        let old = AlignedBuffer(count: 1 << 20)
        old.fill(0x99)
        try await pool.openVolume(name: "small").write(from: old, at: 0)
        let tiny = randomBytes(100, seed: 22)
        try Data(tiny).write(to: URL(fileURLWithPath: folder.file("tiny.bin")))
        let small = try await pool.importImage(at: folder.file("tiny.bin"), into: "small", engine: engine)
        #expect(small == BlockCopy.Result(totalBytes: 100, writtenBytes: 100, skippedBytes: 0))
        let smallBytes = try await readAll(try await pool.openVolume(name: "small"))
        #expect(
            Array(smallBytes.prefix(100)) == tiny && smallBytes[100..<4096].allSatisfy { $0 == 0 }
                && smallBytes[4096...].allSatisfy { $0 == 0x99 })
        expectError(
            await spindleError {
                _ = try await pool.importImage(at: folder.file("odd.bin"), into: "small", engine: engine)
            },
            .invalidArgument, ["holds 1 MiB; resize it first"])
        expectError(
            await spindleError {
                _ = try await pool.importImage(at: folder.file("none.bin"), into: "x", engine: engine)
            }, .notFound, ["no such file"])

        // Out again: an existing file is replaced; unmapped and zero chunks become holes.
        try Data(repeating: 0x55, count: 8 << 20).write(to: URL(fileURLWithPath: folder.file("out.img")))
        let exported = try await pool.exportVolume("odd", toImageAt: folder.file("out.img"), engine: engine)
        #expect(
            exported
                == BlockCopy.Result(
                    totalBytes: odd.capacityBytes, writtenBytes: odd.capacityBytes - (1 << 20), skippedBytes: 1 << 20))
        #expect(try Data(contentsOf: URL(fileURLWithPath: folder.file("out.img"))) == Data(padded))
        let out = try FileDevice.open(path: folder.file("out.img"), options: FileDevice.Options(readOnly: true))
        #expect(try await out.dataRanges(in: (1 << 20)..<(2 << 20)).isEmpty, "the zero MiB is a hole")
        try await out.close()
        expectError(
            await spindleError {
                _ = try await pool.exportVolume("ghost", toImageAt: folder.file("ghost.img"), engine: engine)
            },
            .notFound, ["ghost"])
        #expect(!FileManager.default.fileExists(atPath: folder.file("ghost.img")), "a missing volume creates no file")
        expectError(
            await spindleError { _ = try await pool.exportVolume("odd", toImageAt: folder.path, engine: engine) },
            .invalidArgument, ["not a regular file"])
        try await pool.close()
    }
}

/// A sparse source that counts the bytes read from it.
final class CountingSource: SparseBlockDevice {
    let inner: FileDevice
    let readBytes = Locked<Int>(0)
    init(_ inner: FileDevice) { self.inner = inner }
    var logicalBlockBytes: Int { inner.logicalBlockBytes }
    var capacityBytes: UInt64 { inner.capacityBytes }
    var isReadOnly: Bool { true }
    var discardReadsZeroes: Bool { true }
    var name: String { "counted" }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        readBytes.withLock { $0 += buffer.count }
        try await inner.read(into: buffer, at: offset)
    }
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write")
    }
    func flush() async throws {}
    func discard(offset: UInt64, length: UInt64) async throws { try checkWritable(operation: "discard") }
    func writeZeroes(offset: UInt64, length: UInt64) async throws { try checkWritable(operation: "write-zeroes") }
    func close() async throws {}
    func dataRanges(in range: Range<UInt64>) async throws -> [Range<UInt64>] { try await inner.dataRanges(in: range) }
}
