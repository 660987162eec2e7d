import Glibc
import Testing

@testable import Spindle

@Suite("Image files", .serialized)
struct FileDeviceTests {
    @Test(
        "concurrent random I/O matches a model, on the reactor and off it, direct and buffered, and survives reopening",
        arguments: [(FileDevice.DirectIO.preferred, true), (.preferred, false), (.disabled, true)])
    func concurrentReadWrite(directIO: FileDevice.DirectIO, onReactor: Bool) async throws {
        let folder = TemporaryFolder("concurrent")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let path = folder.file("disk.img")
        let options = FileDevice.Options(directIO: directIO)
        let device = try FileDevice.create(path: path, sizeBytes: 8 << 20, engine: engine, options: options)
        #expect(device.usesDirectIO == (directIO == .preferred))
        let expected = try await exerciseConcurrently(device, engine: onReactor ? engine : nil, seed: 7)
        #expect(byteDifference(try await readAll(device), expected) == nil)
        try await device.flush()
        try await device.close()

        let reopened = try FileDevice.open(path: path, engine: engine, options: options)
        #expect(byteDifference(try await readAll(reopened), expected) == nil)
        try await reopened.close()
    }

    @Test("vectored reads and writes move the buffers in order")
    func vectoredIO() async throws {
        let folder = TemporaryFolder("vectored")
        defer { folder.remove() }
        let device = try FileDevice.create(path: folder.file("v.img"), sizeBytes: 1 << 20)
        let parts = (0..<3).map { index -> AlignedBuffer in
            let buffer = AlignedBuffer(count: 4096 * (index + 1))
            fillRandom(buffer.bytes, seed: UInt64(index))
            return buffer
        }
        try await device.write(from: parts.map { $0.readOnlyBytes }, at: 8192)
        let whole = AlignedBuffer(count: 4096 * 6)
        try await device.read(into: whole, at: 8192)
        #expect(byteDifference(whole.array, parts.flatMap { $0.array }) == nil)

        let targets = (0..<2).map { _ in AlignedBuffer(count: 4096 * 3) }
        try await device.read(into: targets.map { $0.bytes }, at: 8192)
        #expect(targets.flatMap { $0.array } == whole.array)

        // The iovec form, with caller-owned vectors, and a bad vector refused before any I/O.
        let vectors = UnsafeMutableBufferPointer<iovec>.allocate(capacity: 2)
        defer { vectors.deallocate() }
        vectors[0] = iovec(iov_base: targets[1].bytes.baseAddress, iov_len: 4096)
        vectors[1] = iovec(iov_base: targets[0].bytes.baseAddress, iov_len: 4096)
        try await device.read(into: UnsafeBufferPointer(vectors), at: 8192)
        #expect(Array(targets[1].array[0..<4096]) == Array(parts[0].array[0..<4096]))
        vectors[1].iov_len = 100
        expectError(
            await spindleError { try await device.read(into: UnsafeBufferPointer(vectors), at: 8192) },
            .misaligned, ["read of 100 bytes"])
        try await device.close()
    }

    @Test("bad requests fail with a clear error and change nothing")
    func requestValidation() async throws {
        let folder = TemporaryFolder("validation")
        defer { folder.remove() }
        let path = folder.file("v.img")
        let device = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        let original = AlignedBuffer(count: 8192)
        fillRandom(original.bytes, seed: 3)
        try await device.write(from: original, at: 0)
        let data = AlignedBuffer(count: 4096)
        data.fill(0xEE)

        expectError(
            await spindleError { try await device.write(from: data, at: 100) },
            .misaligned,
            ["write of 4096 bytes at offset 100 on \(path)", "multiples of the logical block size, 512 bytes"])
        expectError(
            await spindleError {
                try await device.write(from: UnsafeRawBufferPointer(data.slice(offset: 0, length: 1000)), at: 0)
            },
            .misaligned, ["write of 1000 bytes at offset 0"])
        expectError(
            await spindleError { try await device.read(into: data.slice(offset: 0, length: 0), at: 0) },
            .invalidArgument, ["empty"])
        expectError(
            await spindleError { try await device.write(from: data, at: (1 << 20) - 2048) },
            .outOfRange, ["past the end of the device (capacity 1048576 bytes)", "offset 1046528"])
        expectError(
            await spindleError { try await device.read(into: data, at: 2 << 20) },
            .outOfRange, ["read of 4096 bytes at offset 2097152"])
        expectError(
            await spindleError { try await device.discard(offset: 0, length: 0) }, .invalidArgument, ["discard"])
        expectError(
            await spindleError { try await device.writeZeroes(offset: 512, length: 1 << 20) }, .outOfRange,
            ["write-zeroes"])
        if device.usesDirectIO {
            let unaligned = AlignedBuffer(count: 8192)
            let shifted = UnsafeRawBufferPointer(rebasing: unaligned.readOnlyBytes[8..<(8 + 4096)])
            expectError(
                await spindleError { try await device.write(from: shifted, at: 0) },
                .misaligned, ["not aligned", "direct I/O", "AlignedBuffer"])
        }
        let check = AlignedBuffer(count: 8192)
        try await device.read(into: check, at: 0)
        #expect(byteDifference(check.array, original.array) == nil, "failed requests must not change data")
        try await device.close()
    }

    @Test("read-only opens refuse writes, discards and write-zeroes")
    func readOnly() async throws {
        let folder = TemporaryFolder("readonly")
        defer { folder.remove() }
        let path = folder.file("r.img")
        let writer = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        try await writer.close()
        let device = try FileDevice.open(path: path, options: FileDevice.Options(readOnly: true))
        #expect(device.isReadOnly)
        let data = AlignedBuffer(count: 4096)
        expectError(await spindleError { try await device.write(from: data, at: 0) }, .readOnly, ["read-only", path])
        expectError(await spindleError { try await device.discard(offset: 0, length: 4096) }, .readOnly, ["discard"])
        expectError(
            await spindleError { try await device.writeZeroes(offset: 0, length: 4096) }, .readOnly, ["write-zeroes"])
        try await device.read(into: data, at: 0)
        try await device.close()
    }

    @Test("opening and creating fail clearly for bad paths and sizes")
    func openErrors() async throws {
        let folder = TemporaryFolder("open")
        defer { folder.remove() }
        expectError(
            await spindleError { _ = try FileDevice.open(path: folder.file("missing.img")) },
            .notFound, ["open on \(folder.file("missing.img")) failed: no such image file"])
        expectError(
            await spindleError { _ = try FileDevice.open(path: folder.path) }, .invalidArgument, ["not a regular file"])
        expectError(
            await spindleError { _ = try FileDevice.create(path: folder.file("a.img"), sizeBytes: 1000) },
            .invalidArgument, ["1000 bytes is not a positive multiple of the block size (512 bytes)"])
        expectError(
            await spindleError { _ = try FileDevice.create(path: folder.file("none/a.img"), sizeBytes: 4096) },
            .notFound, ["its folder does not exist"])
        let device = try FileDevice.create(path: folder.file("a.img"), sizeBytes: 4096)
        try await device.close()
        expectError(
            await spindleError { _ = try FileDevice.create(path: folder.file("a.img"), sizeBytes: 4096) },
            .alreadyExists, ["exists already"])
        expectError(
            await spindleError {
                _ = try FileDevice.open(
                    path: folder.file("a.img"), options: FileDevice.Options(logicalBlockBytes: 1000))
            }, .invalidArgument, ["1000 is not a power of two"])
        let tiny = folder.file("tiny.img")
        let descriptor = open(tiny, O_CREAT | O_WRONLY, 0o644)
        ftruncate(descriptor, 100)
        close(descriptor)
        expectError(
            await spindleError { _ = try FileDevice.open(path: tiny) }, .invalidArgument,
            ["100 bytes, smaller than one"])
        #expect(access(folder.file("b.img"), F_OK) != 0, "a failed create leaves no file")
    }

    @Test("a second writer is refused and told who holds the lock, in this process and another")
    func writeLock() async throws {
        let folder = TemporaryFolder("lock")
        defer { folder.remove() }
        let path = folder.file("locked.img")
        let first = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        expectError(
            await spindleError { _ = try FileDevice.open(path: path) },
            .locked, ["open on \(path) failed", "the image is in use", "this process"])
        #expect(FileDevice.writeLockHolder(path: path)?.contains("this process") == true)
        let reader = try FileDevice.open(path: path, options: FileDevice.Options(readOnly: true))
        try await reader.close()
        try await first.close()
        #expect(FileDevice.writeLockHolder(path: path) == nil)
        let second = try FileDevice.open(path: path)
        try await second.close()

        // Another process holds the lock with flock(1).
        var pid: pid_t = 0
        let arguments = ["/usr/bin/flock", "-x", path, "sleep", "30"]
        var argv = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        #expect(posix_spawn(&pid, "/usr/bin/flock", nil, nil, &argv, environ) == 0)
        defer {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        var holder: String?
        for _ in 0..<200 {
            holder = FileDevice.writeLockHolder(path: path)
            if holder != nil { break }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        #expect(holder == "process \(pid) (flock)")
        expectError(
            await spindleError { _ = try FileDevice.open(path: path) },
            .locked, ["process \(pid) (flock) holds its write lock"])
    }

    @Test("discard punches holes and write-zeroes reads as zeros")
    func discardAndZeroes() async throws {
        let folder = TemporaryFolder("discard")
        defer { folder.remove() }
        let device = try FileDevice.create(path: folder.file("d.img"), sizeBytes: 4 << 20)
        let data = AlignedBuffer(count: 4 << 20)
        fillRandom(data.bytes, seed: 11)
        try await device.write(from: data, at: 0, fua: true)
        try await device.flush()
        let allocatedBefore = try device.allocatedBytes()
        try await device.discard(offset: 1 << 20, length: 1 << 20)
        try await device.writeZeroes(offset: 3 << 20, length: 4096)
        #expect(try device.allocatedBytes() <= allocatedBefore - (1 << 20))
        var expected = data.array
        expected.replaceSubrange((1 << 20)..<(2 << 20), with: repeatElement(0, count: 1 << 20))
        expected.replaceSubrange((3 << 20)..<((3 << 20) + 4096), with: repeatElement(0, count: 4096))
        #expect(byteDifference(try await readAll(device), expected) == nil)
        try await device.close()
    }

    @Test("an image truncated while open gives a short-read error naming it")
    func truncatedUnderneath() async throws {
        let folder = TemporaryFolder("truncate")
        defer { folder.remove() }
        let path = folder.file("t.img")
        let device = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        #expect(truncate(path, 512 * 1024) == 0)
        let buffer = AlignedBuffer(count: 4096)
        expectError(
            await spindleError { try await device.read(into: buffer, at: 768 * 1024) },
            .shortTransfer, ["read of 4096 bytes at offset 786432 on \(path)", "truncated"])
        try await device.close()
    }

    @Test("closing waits for requests in flight; later requests fail as closed")
    func closeWithRequestsInFlight() async throws {
        let folder = TemporaryFolder("close")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let device = try FileDevice.create(path: folder.file("c.img"), sizeBytes: 16 << 20, engine: engine)
        let outcomes = await withTaskGroup(of: String.self) { group in
            for index in 0..<64 {
                group.addTask(executorPreference: engine) {
                    let buffer = AlignedBuffer(count: 256 * 1024)
                    do {
                        try await device.write(from: buffer, at: UInt64(index % 64) * 256 * 1024)
                        return "ok"
                    } catch let error as SpindleError {
                        return error.code == .closed ? "closed" : "\(error)"
                    } catch {
                        return "\(error)"
                    }
                }
            }
            group.addTask {
                try? await device.close()
                return "closer"
            }
            var all: [String] = []
            for await outcome in group { all.append(outcome) }
            return all
        }
        #expect(outcomes.count == 65)
        #expect(outcomes.allSatisfy { $0 == "ok" || $0 == "closed" || $0 == "closer" }, "\(outcomes)")
        let buffer = AlignedBuffer(count: 4096)
        expectError(await spindleError { try await device.read(into: buffer, at: 0) }, .closed, ["closed"])
        expectError(await spindleError { try await device.flush() }, .closed, ["flush"])
        try await device.close()
        // The write lock went with the descriptor.
        let again = try FileDevice.open(path: folder.file("c.img"), engine: engine)
        try await again.close()
    }

    @Test("direct I/O falls back to the page cache when alignment does not allow it, or refuses when required")
    func directIOAlignmentFallback() async throws {
        // tmpfs takes direct I/O only in whole pages, so 512-byte blocks cannot use it.
        let path = "/dev/shm/spindle-dio-\(getpid()).img"
        defer { unlink(path) }
        let device = try FileDevice.create(
            path: path, sizeBytes: 1 << 20, options: FileDevice.Options(logicalBlockBytes: 512))
        if device.usesDirectIO {
            #expect(device.logicalBlockBytes == 512)
        } else {
            #expect(
                device.directIONote?.contains("alignment") == true || device.directIONote?.contains("O_DIRECT") == true)
        }
        try await device.close()
        if !device.usesDirectIO {
            expectError(
                await spindleError {
                    _ = try FileDevice.open(
                        path: path, options: FileDevice.Options(directIO: .required, logicalBlockBytes: 512))
                }, .unsupported, [path])
        }
    }

    @Test(
        "a file system without O_DIRECT falls back to the page cache and says so",
        .enabled(if: getuid() == 0, "mounting ramfs needs root"))
    func noDirectIOFileSystem() async throws {
        let folder = TemporaryFolder("ramfs")
        defer { folder.remove() }
        guard system("mount -t ramfs none '\(folder.path)' 2>/dev/null") == 0 else {
            Issue.record("could not mount ramfs on \(folder.path)")
            return
        }
        defer { _ = system("umount '\(folder.path)'") }
        let path = folder.file("r.img")
        let device = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        #expect(!device.usesDirectIO)
        #expect(device.directIONote == "the file system does not support direct I/O (O_DIRECT); using the page cache")
        let data = AlignedBuffer(count: 4096)
        fillRandom(data.bytes, seed: 5)
        try await device.write(from: data, at: 4096)
        let back = AlignedBuffer(count: 4096)
        try await device.read(into: back, at: 4096)
        #expect(byteDifference(back.array, data.array) == nil)
        try await device.close()
        expectError(
            await spindleError {
                _ = try FileDevice.open(path: path, options: FileDevice.Options(directIO: .required))
            }, .unsupported, ["does not support direct I/O", path])
    }

    @Test("kernel errors carry errno, operation, path, offset and length")
    func kernelErrorDescription() {
        let error = SpindleError.system(EIO, operation: "read", path: "/images/a.img", offset: 8192, length: 4096)
        #expect(
            error.description
                == "read of 4096 bytes at offset 8192 on /images/a.img failed: Input/output error (errno 5)")
        #expect(error.errno == EIO && error.code == .ioFailed)
    }
}
