import Glibc
import Synchronization

/// A block device served by an NBD server somewhere else (nbdkit, qemu-nbd, qemu-storage-daemon,
/// another `spindle serve`), reached by a URI as libnbd writes it (``NBDAddress``).
///
/// Negotiation is fixed newstyle with `NBD_OPT_GO`, asking for the server's block sizes: the device's
/// ``logicalBlockBytes`` is the server's minimum (at least 512), requests above its maximum payload
/// are split, and flush, FUA, trim and write-zeroes are sent when the server offers them (otherwise a
/// flush is a no-op, FUA becomes a write then a flush, a discard does nothing, and write-zeroes writes
/// zeros). Requests go through the engine's ring on one socket, many in flight (no thread per
/// request); see ``NBDClientConnection``.
///
/// When the connection breaks, requests in flight and later ones fail with
/// ``SpindleError/Code/deviceGone`` naming the URI, so an array fails this member. ``reconnect()``
/// connects again (the export must have the same size); an array's write-intent bitmap then resyncs
/// only what the member missed.
public final class NBDDevice: BlockDevice, @unchecked Sendable {
    // @unchecked Sendable: the connection is swapped under a lock; everything else is immutable.

    /// How to connect.
    public struct Options: Sendable {
        /// Open read-only even when the server allows writing.
        public var readOnly: Bool
        /// Bound on connecting and negotiating, in seconds.
        public var timeoutSeconds: Int
        /// Requests in flight on the connection at most; more wait for a free slot.
        public var maximumInFlight: Int
        public init(readOnly: Bool = false, timeoutSeconds: Int = 10, maximumInFlight: Int = 128) {
            self.readOnly = readOnly
            self.timeoutSeconds = timeoutSeconds
            self.maximumInFlight = maximumInFlight
        }
    }

    public let address: NBDAddress
    public let engine: IOEngine
    public let options: Options
    /// What the server said about the export when the device connected.
    public let info: NBDExportInfo
    public let logicalBlockBytes: Int
    public let capacityBytes: UInt64
    public let isReadOnly: Bool
    public var discardReadsZeroes: Bool { false }
    public var name: String { address.uri }
    /// Largest payload of one request, a multiple of the block size.
    let maximumPayload: Int

    private let connection: Locked<NBDClientConnection>
    private let gate = RequestGate()
    private let zeroes: AlignedBuffer

    /// Connects to the export at `uri` (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
    /// - Throws: ``SpindleError`` naming the URI: a malformed URI, a host that cannot be reached, no
    ///   such export, a server that is not NBD, block sizes Spindle cannot honour.
    public static func connect(_ uri: String, engine: IOEngine? = nil, options: Options = Options())
        async throws(SpindleError) -> NBDDevice
    {
        try await connect(NBDAddress(parsing: uri), engine: engine, options: options)
    }

    /// Connects to the export at `address`.
    public static func connect(_ address: NBDAddress, engine: IOEngine? = nil, options: Options = Options())
        async throws(SpindleError) -> NBDDevice
    {
        // Writes to a socket whose peer is gone raise SIGPIPE; the failure is handled as an error.
        signal(SIGPIPE, SIG_IGN)
        let chosen: IOEngine
        if let engine { chosen = engine } else { chosen = try IOEngine.shared }
        let engine = chosen
        let (socket, info) = try await NBDClientHandshake.connect(address, timeoutSeconds: options.timeoutSeconds)
        let readOnly = options.readOnly || info.flags.contains(.readOnly)
        let block = max(512, Int(info.minimumBlockBytes))
        let connection = NBDClientConnection(
            socket: socket, info: info, address: address, engine: engine, slots: max(1, options.maximumInFlight))
        connection.start()
        return NBDDevice(
            address: address, engine: engine, options: options, info: info, block: block, readOnly: readOnly,
            connection: connection)
    }

    private init(
        address: NBDAddress, engine: IOEngine, options: Options, info: NBDExportInfo, block: Int, readOnly: Bool,
        connection: NBDClientConnection
    ) {
        self.address = address
        self.engine = engine
        self.options = options
        self.info = info
        logicalBlockBytes = block
        capacityBytes = info.sizeBytes / UInt64(block) * UInt64(block)
        isReadOnly = readOnly
        maximumPayload = max(block, Int(min(info.maximumPayloadBytes, 32 << 20)) / block * block)
        self.connection = Locked(connection)
        zeroes = AlignedBuffer(count: min(maximumPayload, 1 << 20))
    }

    /// Whether the connection is up (false once it broke, until ``reconnect()``).
    public var isConnected: Bool { connection.withLock { $0 }.failure == nil }

    /// Connects again after the connection broke, to the same URI (nothing to do while it works).
    /// The export must have the size it had; requests made while it was down failed and stay failed (the caller, an array's bitmap,
    /// knows what to write again).
    /// - Throws: ``SpindleError`` when the server cannot be reached or the export changed size.
    public func reconnect() async throws(SpindleError) {
        let old = connection.withLock { $0 }
        // A connection that works is kept: requests in flight on it go on.
        guard old.failure != nil else { return }
        let (socket, info) = try await NBDClientHandshake.connect(address, timeoutSeconds: options.timeoutSeconds)
        guard info.sizeBytes == self.info.sizeBytes else {
            Glibc.close(socket)
            throw SpindleError(
                .invalidArgument,
                "the export now has \(info.sizeBytes) bytes, not the \(self.info.sizeBytes) it had when the device was opened",
                operation: "reconnect", path: address.uri)
        }
        if !isReadOnly && info.flags.contains(.readOnly) {
            Glibc.close(socket)
            throw SpindleError(
                .readOnly, "the server now offers the export read-only", operation: "reconnect", path: address.uri)
        }
        let fresh = NBDClientConnection(
            socket: socket, info: info, address: address, engine: engine, slots: max(1, options.maximumInFlight))
        fresh.start()
        connection.withLock { $0 = fresh }
        await old.close()
    }

    // MARK: Requests

    /// One request on the current connection; a server error becomes a ``SpindleError`` naming the
    /// URI, the operation and the range.
    private func perform(
        _ command: NBDProtocol.Command, operation: String, flags: UInt16 = 0, offset: UInt64, length: Int,
        payload: UnsafeRawPointer? = nil, target: UnsafeMutableRawPointer? = nil
    ) async throws(SpindleError) {
        let current = connection.withLock { $0 }
        let error = try await current.request(
            command, flags: flags, offset: offset, length: UInt32(length), payload: payload, target: target)
        guard error == 0 else {
            let errno = Int32(error)
            throw SpindleError(
                errno == ENOSPC ? .noSpace : errno == EPERM ? .readOnly : .ioFailed,
                "the NBD server failed the request: \(String(cString: strerror(errno))) (error \(error))",
                errno: errno, operation: operation, path: address.uri, offset: offset, length: UInt64(length))
        }
    }

    /// Runs `body` for each piece of at most ``maximumPayload`` bytes of a range.
    private func pieces(
        offset: UInt64, length: Int, _ body: (_ offset: UInt64, _ start: Int, _ count: Int) async throws -> Void
    ) async throws {
        var start = 0
        while start < length {
            let count = min(maximumPayload, length - start)
            try await body(offset + UInt64(start), start, count)
            start += count
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        let base = buffer.baseAddress!
        try await pieces(offset: offset, length: buffer.count) { offset, start, count in
            try await perform(.read, operation: "read", offset: offset, length: count, target: base + start)
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try validate(offset: offset, length: buffer.count, operation: "write")
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        let base = buffer.baseAddress!
        let sendsFUA = fua && info.flags.contains(.sendFUA)
        try await pieces(offset: offset, length: buffer.count) { offset, start, count in
            try await perform(
                .write, operation: "write", flags: sendsFUA ? NBDProtocol.commandFlagFUA : 0, offset: offset,
                length: count, payload: base + start)
        }
        if fua && !sendsFUA && info.flags.contains(.sendFlush) {
            try await perform(.flush, operation: "flush", offset: 0, length: 0)
        }
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        guard info.flags.contains(.sendFlush) else { return }
        try await perform(.flush, operation: "flush", offset: 0, length: 0)
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "discard")
        try checkWritable(operation: "discard", offset: offset, length: length)
        try gate.enter(operation: "discard", name: name)
        defer { gate.leave() }
        guard info.flags.contains(.sendTrim) else { return }
        try await ranges(offset: offset, length: length) { offset, count in
            try await perform(.trim, operation: "discard", offset: offset, length: count)
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        try gate.enter(operation: "write-zeroes", name: name)
        defer { gate.leave() }
        if info.flags.contains(.sendWriteZeroes) {
            try await ranges(offset: offset, length: length) { offset, count in
                try await perform(.writeZeroes, operation: "write-zeroes", offset: offset, length: count)
            }
            return
        }
        let zeroes = self.zeroes
        try await ranges(offset: offset, length: length, piece: zeroes.count) { offset, count in
            try await perform(
                .write, operation: "write-zeroes", offset: offset, length: count,
                payload: UnsafeRawPointer(zeroes.bytes.baseAddress!))
        }
        withExtendedLifetime(zeroes) {}
    }

    /// Splits a 64-bit range into requests of at most `piece` bytes (the protocol's lengths are 32-bit).
    private func ranges(
        offset: UInt64, length: UInt64, piece: Int? = nil, _ body: (UInt64, Int) async throws -> Void
    ) async throws {
        let limit = UInt64(piece ?? (Int(UInt32.max) / logicalBlockBytes * logicalBlockBytes))
        var done: UInt64 = 0
        while done < length {
            let count = min(limit, length - done)
            try await body(offset + done, Int(count))
            done += count
        }
    }

    /// Waits for the requests in flight, then says goodbye to the server and closes the socket.
    public func close() async throws {
        guard await gate.close() else { return }
        await connection.withLock { $0 }.close()
    }
}
