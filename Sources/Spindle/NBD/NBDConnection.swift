import Glibc

/// One client of an ``NBDServer``: negotiation (NBDConnection+Negotiation.swift), then requests read
/// one after another and served concurrently, each by its own task, replies sent as requests
/// complete (NBDConnection+Transmission.swift). This file holds the socket I/O and the replies.
final class NBDConnection: @unchecked Sendable {
    // @unchecked Sendable: the socket is read by `run` alone and written under `replyLock`; the
    // reply scratch memory is used only under `replyLock`.
    let socket: Int32
    unowned let server: NBDServer
    private let replyLock = AsyncMutex()
    var label = ""
    /// Who the client is: its address, or the socket it came in on.
    let peer: String
    /// The TLS session once the client has upgraded (`NBD_OPT_STARTTLS`): set during negotiation,
    /// before any request is served concurrently; from then on every byte goes through it.
    var tls: TLSSession?

    /// The end of the client's stream (or the server stopping it); not an error.
    struct EndOfStream: Error {}

    /// What negotiation settled for the transmission phase.
    struct Session: Sendable {
        let export: NBDServer.Export
        /// Whether the client asked for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
        let structuredReplies: Bool
        /// The metadata contexts selected for this export; a context's id is its index plus one.
        let contexts: [NBDMetadataContext]
    }

    /// Bytes read from the socket and not consumed yet (many pipelined requests per read).
    private let inbox = SocketInbox()

    /// Chunks of one read reply at most: runs of data and of zeros beyond this go out as data.
    private static let maximumReadChunks = 32
    /// The unit a structured read reply looks for zeros in (runs of zero units become holes).
    private static let holeUnitBytes = 4096
    /// Reply headers (a simple header, or one structured chunk header and its offset and hole size
    /// per chunk) and the writev vectors, used only under `replyLock`: no allocation per reply.
    private static let headerSlotBytes = 32
    private let replyHeaders = UnsafeMutableRawPointer.allocate(
        byteCount: NBDConnection.maximumReadChunks * NBDConnection.headerSlotBytes, alignment: 16)
    private let replyVectors = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * NBDConnection.maximumReadChunks)

    init(socket: Int32, server: NBDServer, peer: String) {
        self.socket = socket
        self.server = server
        self.peer = peer
    }

    deinit {
        replyHeaders.deallocate()
        replyVectors.deallocate()
    }

    func run(id: Int) async {
        label = "connection \(id) \(peer)"
        defer { Glibc.close(socket) }
        do {
            guard let session = try await negotiate() else {
                await tls?.close()
                return
            }
            label = "connection \(id) \(peer) (export '\(session.export.name)'\(tls == nil ? "" : ", TLS"))"
            server.log("\(label): transmission started")
            try await transmit(session)
            await tls?.close()
            server.log("\(label): closed")
        } catch is EndOfStream {
            server.log("\(label): the client went away")
        } catch {
            server.log("\(label): closed after an error: \(error)")
        }
    }

    // MARK: Socket I/O through the engine

    /// Exactly `count` bytes: from the inbox first, then from the socket (large remainders straight
    /// into `buffer`, small ones through the inbox).
    func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int) async throws {
        let complete = try await inbox.receive(buffer, count) { target, room in
            if let tls { return try await tls.receive(into: target, count: room) }
            return try await socketOperation(
                .read(fd: socket, buffer: target, length: UInt32(room), offset: UInt64.max), operation: "receive")
        }
        if !complete { throw EndOfStream() }
    }

    /// The bytes read from the socket and not consumed yet, taken out of the inbox (at
    /// `NBD_OPT_STARTTLS`, they are the start of the TLS stream).
    func takeBuffered() -> [UInt8] { inbox.takeBuffered() }

    func receive(_ count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        defer { buffer.deallocate() }
        try await receive(buffer, count)
        return Array(UnsafeRawBufferPointer(start: buffer, count: count))
    }

    private func send(_ buffer: UnsafeRawPointer, _ count: Int) async throws {
        if let tls {
            var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer), iov_len: count)
            try await tls.send(vectors: &vector, count: 1)
            return
        }
        var done = 0
        while done < count {
            done += try await socketOperation(
                .write(
                    fd: socket, buffer: buffer + done, length: UInt32(min(count - done, 1 << 30)), offset: UInt64.max,
                    fua: false),
                operation: "send")
        }
    }

    /// Sends the buffers of `vectors` in order: one writev, finished by plain sends when the socket
    /// takes less.
    private func send(vectors: UnsafeMutablePointer<iovec>, count: Int) async throws {
        if let tls {
            try await tls.send(vectors: vectors, count: count)
            return
        }
        var total = 0
        for index in 0..<count { total += vectors[index].iov_len }
        let sent = try await socketOperation(
            .writeStream(fd: socket, vectors: vectors, count: UInt32(count), offload: total >= 128 * 1024),
            operation: "send")
        guard sent < total else { return }
        var skip = sent
        for index in 0..<count {
            let vector = vectors[index]
            if skip >= vector.iov_len {
                skip -= vector.iov_len
                continue
            }
            try await send(UnsafeRawPointer(vector.iov_base!) + skip, vector.iov_len - skip)
            skip = 0
        }
    }

    /// A socket operation on the engine: its byte count, or ``EndOfStream`` when the client went away
    /// (reset, closed pipe, or the engine shutting down).
    private func socketOperation(_ request: IOOperation, operation: String) async throws -> Int {
        let result: Result<Int, SpindleError>
        do {
            result = .success(try await server.engine.perform(request, operation: operation))
        } catch {
            result = .failure(error)
        }
        if case .failure(let error) = result, [ECONNRESET, EPIPE, ECANCELED].contains(error.errno ?? 0) {
            throw EndOfStream()
        }
        return try result.get()
    }

    func send(_ bytes: [UInt8]) async throws {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        defer { buffer.deallocate() }
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try await send(buffer, bytes.count)
    }

    // MARK: Replies (one message each, under the reply lock: replies never interleave)

    /// A simple reply with no data: a success, or an error without structured replies.
    func sendReply(error: UInt32, cookie: UInt64) async throws {
        try await replyLock.withLock {
            NBDProtocol.simpleReply(
                error: error, cookie: cookie, into: UnsafeMutableRawBufferPointer(start: replyHeaders, count: 16))
            try await send(replyHeaders, 16)
        }
    }

    /// A reply of bytes built beforehand (structured chunks of a block status reply or an error).
    func sendReply(_ bytes: [UInt8]) async throws {
        try await replyLock.withLock { try await send(bytes) }
    }

    /// An error: a simple reply, or with structured replies an error chunk carrying `message` (and
    /// `offset`, for reads: `NBD_REPLY_TYPE_ERROR_OFFSET`) as the last chunk of the reply.
    func sendError(_ code: NBDProtocol.ErrorCode, message: String, cookie: UInt64, offset: UInt64?, session: Session)
        async throws
    {
        guard session.structuredReplies else {
            try await sendReply(error: code.rawValue, cookie: cookie)
            return
        }
        try await sendReply(
            NBDProtocol.structuredChunk(
                flags: NBDProtocol.replyFlagDone, type: offset == nil ? .error : .errorOffset, cookie: cookie,
                payload: NBDProtocol.errorPayload(error: code.rawValue, message: message, offset: offset)))
    }

    /// A read's data, `length` bytes of `data` read at `offset`: after a simple reply header, or with
    /// structured replies as chunks, runs of zero 4 KiB units as holes (`NBD_REPLY_TYPE_OFFSET_HOLE`)
    /// and the rest as data, the last chunk marked done. Holes follow what was read, so a thin
    /// volume's unmapped chunks and a file's holes go out as holes with no metadata lookup.
    func sendRead(data: AlignedBuffer, length: Int, offset: UInt64, cookie: UInt64, session: Session) async throws {
        try await replyLock.withLock {
            let base = data.bytes.baseAddress!
            var count = 0
            if !session.structuredReplies {
                NBDProtocol.simpleReply(
                    error: 0, cookie: cookie, into: UnsafeMutableRawBufferPointer(start: replyHeaders, count: 16))
                replyVectors[0] = iovec(iov_base: replyHeaders, iov_len: 16)
                replyVectors[1] = iovec(iov_base: base, iov_len: length)
                count = 2
            } else {
                // Runs of zero units and of the rest, found and written into the reply's chunks in
                // one pass (no allocation); the last chunk allowed takes whatever is left, as data.
                let bytes = UnsafeRawBufferPointer(start: base, count: length)
                func isZero(_ at: Int) -> Bool {
                    BlockCopy.isZero(UnsafeRawBufferPointer(rebasing: bytes[at..<min(at + Self.holeUnitBytes, length)]))
                }
                var chunk = 0
                var start = 0
                while start < length {
                    let zero = chunk < Self.maximumReadChunks - 1 && isZero(start)
                    var end = min(start + Self.holeUnitBytes, length)
                    if chunk == Self.maximumReadChunks - 1 {
                        end = length
                    } else {
                        while end < length && isZero(end) == zero { end = min(end + Self.holeUnitBytes, length) }
                    }
                    let header = replyHeaders + chunk * Self.headerSlotBytes
                    let slot = UnsafeMutableRawBufferPointer(start: header, count: Self.headerSlotBytes)
                    let flags = end == length ? NBDProtocol.replyFlagDone : 0
                    NBDProtocol.putBigEndian(offset + UInt64(start), slot, 20)
                    if zero {
                        NBDProtocol.structuredHeader(
                            flags: flags, type: .offsetHole, cookie: cookie, payloadBytes: 12, into: slot)
                        NBDProtocol.putBigEndian(UInt32(end - start), slot, 28)
                        replyVectors[count] = iovec(iov_base: header, iov_len: 32)
                        count += 1
                    } else {
                        NBDProtocol.structuredHeader(
                            flags: flags, type: .offsetData, cookie: cookie, payloadBytes: 8 + end - start, into: slot)
                        replyVectors[count] = iovec(iov_base: header, iov_len: 28)
                        replyVectors[count + 1] = iovec(iov_base: base + start, iov_len: end - start)
                        count += 2
                    }
                    chunk += 1
                    start = end
                }
            }
            try await send(vectors: replyVectors, count: count)
            withExtendedLifetime(data) {}
        }
    }
}
