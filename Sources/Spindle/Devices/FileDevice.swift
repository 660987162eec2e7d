internal import CSpindleShims
public import Glibc

/// A block device backed by an image file, with every request going through an ``IOEngine``.
///
/// - Direct I/O (`O_DIRECT`) is used when the file system allows it; otherwise the device falls back
///   to the page cache and says why in ``directIONote`` (``DirectIO/required`` refuses instead).
/// - Opening for writing takes an exclusive `flock` on the image, so no second writer, in this process
///   or another, can open it at the same time; the error names the holder when `/proc/locks` tells.
/// - Discard punches holes; write-zeroes uses `FALLOC_FL_ZERO_RANGE`, falling back to punching or to
///   writing zeros where the file system has neither.
/// - A flush is `fdatasync`; a FUA write carries `RWF_DSYNC`.
public final class FileDevice: BlockDevice {
    /// Whether to bypass the page cache.
    public enum DirectIO: String, Sendable, Codable {
        /// Use direct I/O when the file system supports it, else the page cache.
        case preferred
        /// Use direct I/O or fail to open.
        case required
        /// Always use the page cache.
        case disabled
    }

    /// How to open an image.
    public struct Options: Sendable {
        public var readOnly = false
        public var directIO = DirectIO.preferred
        /// Logical block size; by default 512 bytes, or the file system's direct-I/O alignment if larger.
        public var logicalBlockBytes: Int?
        public init(readOnly: Bool = false, directIO: DirectIO = .preferred, logicalBlockBytes: Int? = nil) {
            self.readOnly = readOnly
            self.directIO = directIO
            self.logicalBlockBytes = logicalBlockBytes
        }
    }

    public let path: String
    public let engine: IOEngine
    public let logicalBlockBytes: Int
    public let capacityBytes: UInt64
    public let isReadOnly: Bool
    public var discardReadsZeroes: Bool { true }
    public var name: String { path }
    /// Whether requests bypass the page cache.
    public let usesDirectIO: Bool
    /// Why direct I/O is not in use, when it was asked for but is not.
    public let directIONote: String?
    /// Alignment that buffer addresses need (1 without direct I/O).
    public let memoryAlignment: Int
    /// Size of the file in bytes; ``capacityBytes`` is this rounded down to whole blocks.
    public let fileBytes: UInt64

    private let descriptor: Int32
    private let gate = RequestGate()
    private static let maximumTransferBytes = 1 << 30
    /// IOV_MAX on Linux.
    private static let maximumVectors = 1024

    /// Creates a sparse image file of `sizeBytes` and opens it for writing.
    /// - Throws: ``SpindleError`` if the file exists, the size is not a positive multiple of the block
    ///   size, or the file cannot be created.
    public static func create(
        path: String, sizeBytes: UInt64, engine: IOEngine? = nil, options: Options = Options()
    ) throws(SpindleError) -> FileDevice {
        let block = UInt64(options.logicalBlockBytes ?? 512)
        guard sizeBytes > 0, sizeBytes % block == 0 else {
            throw SpindleError(
                .invalidArgument,
                "the size \(sizeBytes) bytes is not a positive multiple of the block size (\(block) bytes)",
                operation: "create", path: path)
        }
        guard sizeBytes <= UInt64(Int64.max) else {
            throw SpindleError(
                .invalidArgument, "the size \(sizeBytes) bytes is too large", operation: "create", path: path)
        }
        let created = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard created >= 0 else {
            let error = errno
            var failure = SpindleError.system(error, operation: "create", path: path)
            if error == EEXIST { failure.message = "the file exists already; remove it or choose another path" }
            if error == ENOENT { failure.message = "its folder does not exist" }
            throw failure
        }
        if ftruncate(created, off_t(sizeBytes)) != 0 {
            let error = errno
            Glibc.close(created)
            unlink(path)
            throw SpindleError.system(error, operation: "create", path: path, length: sizeBytes)
        }
        Glibc.close(created)
        do throws(SpindleError) {
            return try open(path: path, engine: engine, options: options)
        } catch {
            unlink(path)
            throw error
        }
    }

    /// Opens an existing image.
    /// - Throws: ``SpindleError`` naming the path: missing file, not a regular file, smaller than a
    ///   block, locked by another writer, direct I/O required but unsupported.
    public static func open(path: String, engine: IOEngine? = nil, options: Options = Options()) throws(SpindleError)
        -> FileDevice
    {
        let chosen: IOEngine
        if let engine { chosen = engine } else { chosen = try IOEngine.shared }
        return try FileDevice(path: path, engine: chosen, options: options)
    }

    private init(path: String, engine: IOEngine, options: Options) throws(SpindleError) {
        self.path = path
        self.engine = engine
        isReadOnly = options.readOnly
        let accessFlags = (options.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        var note: String?
        var descriptor: Int32 = -1
        if options.directIO != .disabled {
            descriptor = Glibc.open(path, accessFlags | spindle_O_DIRECT)
            if descriptor < 0 && errno == EINVAL {
                if options.directIO == .required {
                    throw SpindleError(
                        .unsupported, "the file system does not support direct I/O (O_DIRECT)",
                        errno: EINVAL, operation: "open", path: path)
                }
                note = "the file system does not support direct I/O (O_DIRECT); using the page cache"
                descriptor = Glibc.open(path, accessFlags)
            }
        } else {
            descriptor = Glibc.open(path, accessFlags)
        }
        guard descriptor >= 0 else {
            let error = errno
            var failure = SpindleError.system(error, operation: "open", path: path)
            if error == ENOENT { failure.message = "no such image file" }
            if error == EISDIR {
                failure.code = .invalidArgument
                failure.message = "it is a directory, not a regular file"
            }
            throw failure
        }
        var direct = options.directIO != .disabled && note == nil
        do throws(SpindleError) {
            var info = stat()
            guard fstat(descriptor, &info) == 0 else {
                throw SpindleError.system(errno, operation: "open", path: path)
            }
            guard info.st_mode & S_IFMT == S_IFREG else {
                throw SpindleError(.invalidArgument, "not a regular file", operation: "open", path: path)
            }
            fileBytes = UInt64(info.st_size)

            if !options.readOnly
                && !FileLockHolder.lock(descriptor, device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
            {
                let error = errno
                if error == EWOULDBLOCK {
                    throw SpindleError(
                        .locked,
                        "the image is in use: \(FileLockHolder.describe(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))) holds its write lock",
                        errno: error, operation: "open", path: path)
                }
                throw SpindleError.system(error, operation: "lock", path: path)
            }

            var offsetAlignment = 1
            var memoryAlignment = 1
            if direct {
                var memory: UInt32 = 0
                var offset: UInt32 = 0
                if spindle_dio_alignment(descriptor, &memory, &offset) == 1 {
                    memoryAlignment = Int(memory)
                    offsetAlignment = Int(offset)
                } else {
                    // The kernel does not report alignment: assume a 4 KiB-sector device, the strictest common case.
                    memoryAlignment = 4096
                    offsetAlignment = 4096
                }
            }
            let block = options.logicalBlockBytes ?? max(512, offsetAlignment)
            guard block >= 512, block <= 65536, block & (block - 1) == 0 else {
                throw SpindleError(
                    .invalidArgument, "the logical block size \(block) is not a power of two from 512 to 65536",
                    operation: "open", path: path)
            }
            if direct && block % offsetAlignment != 0 {
                if options.directIO == .required {
                    throw SpindleError(
                        .unsupported,
                        "direct I/O here needs \(offsetAlignment)-byte alignment, more than the \(block)-byte block size asked for",
                        operation: "open", path: path)
                }
                note =
                    "direct I/O needs \(offsetAlignment)-byte alignment here, more than the \(block)-byte block size; using the page cache"
                let buffered = Glibc.open(path, accessFlags)
                guard buffered >= 0 else { throw SpindleError.system(errno, operation: "open", path: path) }
                Glibc.close(descriptor)
                descriptor = buffered
                direct = false
                memoryAlignment = 1
                if !options.readOnly && flock(descriptor, LOCK_EX | LOCK_NB) != 0 {
                    throw SpindleError.system(errno, operation: "lock", path: path)
                }
            }
            guard fileBytes >= UInt64(block) else {
                throw SpindleError(
                    .invalidArgument, "the image is \(fileBytes) bytes, smaller than one \(block)-byte block",
                    operation: "open", path: path)
            }
            logicalBlockBytes = block
            capacityBytes = fileBytes - fileBytes % UInt64(block)
            self.memoryAlignment = memoryAlignment
        } catch {
            Glibc.close(descriptor)
            throw error
        }
        self.descriptor = descriptor
        usesDirectIO = direct
        directIONote = note
    }

    deinit {
        if !gate.isClosed { Glibc.close(descriptor) }
    }

    // MARK: BlockDevice

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try check(offset: offset, length: buffer.count, address: buffer.baseAddress, operation: "read")
        try gate.enter(operation: "read", name: path)
        defer { gate.leave() }
        try await transfer(read: true, buffer.baseAddress!, count: buffer.count, offset: offset, fua: false)
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try check(offset: offset, length: buffer.count, address: buffer.baseAddress, operation: "write")
        try gate.enter(operation: "write", name: path)
        defer { gate.leave() }
        try await transfer(
            read: false, UnsafeMutableRawPointer(mutating: buffer.baseAddress!), count: buffer.count,
            offset: offset, fua: fua)
    }

    /// Reads into several buffers, filled in order from `offset`, with one vectored request.
    /// `vectors` must stay valid until the call returns.
    public func read(into vectors: UnsafeBufferPointer<iovec>, at offset: UInt64) async throws {
        try await transferVector(read: true, vectors, offset: offset, fua: false)
    }

    /// Writes several buffers, in order from `offset`, with one vectored request.
    public func write(from vectors: UnsafeBufferPointer<iovec>, at offset: UInt64, fua: Bool = false) async throws {
        try checkWritable(operation: "write", offset: offset)
        try await transferVector(read: false, vectors, offset: offset, fua: fua)
    }

    /// Reads into several buffers, filled in order from `offset`, with one vectored request.
    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) async throws {
        let vectors = Self.vectors(buffers.map { ($0.baseAddress, $0.count) })
        defer { vectors.deallocate() }
        try await transferVector(read: true, UnsafeBufferPointer(vectors), offset: offset, fua: false)
    }

    /// Writes several buffers, in order from `offset`, with one vectored request.
    public func write(from buffers: [UnsafeRawBufferPointer], at offset: UInt64, fua: Bool = false) async throws {
        try checkWritable(operation: "write", offset: offset)
        let vectors = Self.vectors(buffers.map { (UnsafeMutableRawPointer(mutating: $0.baseAddress), $0.count) })
        defer { vectors.deallocate() }
        try await transferVector(read: false, UnsafeBufferPointer(vectors), offset: offset, fua: fua)
    }

    private static func vectors(_ parts: [(UnsafeMutableRawPointer?, Int)]) -> UnsafeMutableBufferPointer<iovec> {
        let vectors = UnsafeMutableBufferPointer<iovec>.allocate(capacity: parts.count)
        for (index, part) in parts.enumerated() { vectors[index] = iovec(iov_base: part.0, iov_len: part.1) }
        return vectors
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: path)
        defer { gate.leave() }
        _ = try await engine.perform(.sync(fd: descriptor, dataOnly: true), operation: "flush", path: path)
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "discard", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "discard")
        try gate.enter(operation: "discard", name: path)
        defer { gate.leave() }
        try await zeroRange(offset: offset, length: length, preferPunch: true, operation: "discard")
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try gate.enter(operation: "write-zeroes", name: path)
        defer { gate.leave() }
        try await zeroRange(offset: offset, length: length, preferPunch: false, operation: "write-zeroes")
    }

    public func close() async throws {
        if await gate.close() {
            Glibc.close(descriptor)
        }
    }

    /// Blocks allocated to the file on disk, in bytes (less than its size when the image is sparse).
    public func allocatedBytes() throws(SpindleError) -> UInt64 {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw SpindleError.system(errno, operation: "stat", path: path) }
        return UInt64(info.st_blocks) * 512
    }

    // MARK: Internals

    @inline(__always)
    private func check(offset: UInt64, length: Int, address: UnsafeRawPointer?, operation: String) throws(SpindleError)
    {
        try validate(offset: offset, length: length, operation: operation)
        if memoryAlignment > 1, let address, Int(bitPattern: address) & (memoryAlignment - 1) != 0 {
            throw SpindleError(
                .misaligned,
                "the buffer at address \(address) is not aligned to \(memoryAlignment) bytes, as direct I/O requires (use AlignedBuffer)",
                operation: operation, path: path, offset: offset, length: UInt64(length))
        }
    }

    /// Moves `count` bytes, resubmitting the rest after a short transfer.
    private func transfer(
        read: Bool, _ base: UnsafeMutableRawPointer, count: Int, offset: UInt64, fua: Bool
    ) async throws(SpindleError) {
        var done = 0
        while done < count {
            let piece = UInt32(min(count - done, Self.maximumTransferBytes))
            let operation: IOOperation =
                read
                ? .read(fd: descriptor, buffer: base + done, length: piece, offset: offset + UInt64(done))
                : .write(fd: descriptor, buffer: base + done, length: piece, offset: offset + UInt64(done), fua: fua)
            let result = try await engine.perform(
                operation, operation: read ? "read" : "write", path: path, offset: offset, length: UInt64(count))
            if result == 0 {
                throw SpindleError(
                    .shortTransfer,
                    "the image ended after \(UInt64(done) + offset) bytes; it was truncated while open (expected \(capacityBytes) bytes)",
                    operation: read ? "read" : "write", path: path, offset: offset, length: UInt64(count))
            }
            done += result
        }
    }

    private func transferVector(
        read: Bool, _ vectors: UnsafeBufferPointer<iovec>, offset: UInt64, fua: Bool
    ) async throws {
        let operationName = read ? "read" : "write"
        var total = 0
        for vector in vectors {
            try check(offset: offset, length: vector.iov_len, address: vector.iov_base, operation: operationName)
            total += vector.iov_len
        }
        try validate(offset: offset, length: total, operation: operationName)
        guard vectors.count <= Self.maximumVectors else {
            throw SpindleError(
                .invalidArgument,
                "\(vectors.count) buffers is more than the \(Self.maximumVectors) one request can take",
                operation: operationName, path: path, offset: offset, length: UInt64(total))
        }
        try gate.enter(operation: operationName, name: path)
        defer { gate.leave() }
        let operation: IOOperation =
            read
            ? .readVector(fd: descriptor, vectors: vectors.baseAddress!, count: UInt32(vectors.count), offset: offset)
            : .writeVector(
                fd: descriptor, vectors: vectors.baseAddress!, count: UInt32(vectors.count), offset: offset, fua: fua)
        var skip = try await engine.perform(
            operation, operation: operationName, path: path, offset: offset, length: UInt64(total))
        // Finish a short transfer buffer by buffer.
        guard skip < total else { return }
        var position = offset
        for vector in vectors {
            let length = vector.iov_len
            if skip >= length {
                skip -= length
            } else {
                try await transfer(
                    read: read, vector.iov_base! + skip, count: length - skip, offset: position + UInt64(skip), fua: fua
                )
                skip = 0
            }
            position += UInt64(length)
        }
    }

    private func zeroRange(offset: UInt64, length: UInt64, preferPunch: Bool, operation: String)
        async throws(SpindleError)
    {
        let keep = spindle_FALLOC_FL_KEEP_SIZE
        let modes =
            preferPunch
            ? [spindle_FALLOC_FL_PUNCH_HOLE | keep, spindle_FALLOC_FL_ZERO_RANGE | keep]
            : [spindle_FALLOC_FL_ZERO_RANGE | keep, spindle_FALLOC_FL_PUNCH_HOLE | keep]
        for mode in modes {
            let result = await engine.execute(.allocate(fd: descriptor, mode: mode, offset: offset, length: length))
            if result == -EOPNOTSUPP || result == -EINVAL { continue }  // not supported here: try the next mode
            _ = try SpindleError.check(result, operation: operation, path: path, offset: offset, length: length)
            return
        }
        // Neither mode is supported: write zeros.
        let pieceBytes = 1 << 20
        let zeros = AlignedBuffer(count: pieceBytes, alignment: max(memoryAlignment, 4096))
        var position = offset
        while position < offset + length {
            let piece = Int(min(UInt64(pieceBytes), offset + length - position))
            try await transfer(read: false, zeros.bytes.baseAddress!, count: piece, offset: position, fua: false)
            position += UInt64(piece)
        }
        withExtendedLifetime(zeros) {}
    }
}
