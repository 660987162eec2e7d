import Glibc

/// One client of an ``NBDServer``: negotiation, then requests read one after another and served
/// concurrently, each by its own task, replies sent as requests complete.
final class NBDConnection: @unchecked Sendable {
    // @unchecked Sendable: the socket is read by `run` alone and written under `replyLock`.
    let socket: Int32
    unowned let server: NBDServer
    private let replyLock = AsyncMutex()
    private var label = ""

    /// The end of the client's stream (or the server stopping it); not an error.
    private struct EndOfStream: Error {}

    /// Bytes read from the socket and not consumed yet: one read takes in as many pipelined
    /// requests as have arrived, instead of one read per 28-byte header.
    private let inbox = UnsafeMutableRawPointer.allocate(byteCount: NBDConnection.inboxBytes, alignment: 64)
    private var inboxStart = 0
    private var inboxEnd = 0
    private static let inboxBytes = 256 * 1024

    init(socket: Int32, server: NBDServer) {
        self.socket = socket
        self.server = server
    }

    /// The reply header and the writev vectors, used only under `replyLock`: no allocation per reply.
    private let replyHeader = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    private let replyVectors = UnsafeMutablePointer<iovec>.allocate(capacity: 2)

    deinit {
        inbox.deallocate()
        replyHeader.deallocate()
        replyVectors.deallocate()
    }

    func run(id: Int) async {
        label = "connection \(id)"
        defer { Glibc.close(socket) }
        do {
            guard let export = try await negotiate() else { return }
            label = "connection \(id) (export '\(export.name)')"
            server.log("\(label): transmission started")
            try await transmit(export)
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
    private func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int) async throws {
        var done = 0
        while done < count {
            if inboxStart < inboxEnd {
                let take = min(count - done, inboxEnd - inboxStart)
                (buffer + done).copyMemory(from: inbox + inboxStart, byteCount: take)
                inboxStart += take
                done += take
                continue
            }
            let direct = count - done >= Self.inboxBytes / 4
            let target = direct ? buffer + done : inbox
            let room = direct ? count - done : Self.inboxBytes
            let result = try await socketOperation(
                .read(fd: socket, buffer: target, length: UInt32(min(room, 1 << 30)), offset: UInt64.max),
                operation: "receive")
            if result == 0 { throw EndOfStream() }
            if direct {
                done += result
            } else {
                inboxStart = 0
                inboxEnd = result
            }
        }
    }

    private func receive(_ count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        defer { buffer.deallocate() }
        try await receive(buffer, count)
        return Array(UnsafeRawBufferPointer(start: buffer, count: count))
    }

    private func send(_ buffer: UnsafeRawPointer, _ count: Int) async throws {
        var done = 0
        while done < count {
            done += try await socketOperation(
                .write(
                    fd: socket, buffer: buffer + done, length: UInt32(min(count - done, 1 << 30)), offset: UInt64.max,
                    fua: false),
                operation: "send")
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

    private func send(_ bytes: [UInt8]) async throws {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        defer { buffer.deallocate() }
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try await send(buffer, bytes.count)
    }

    // MARK: Negotiation

    /// Runs the fixed newstyle handshake and options; returns the export chosen, or nil when the
    /// client aborted or the negotiation failed (logged).
    private func negotiate() async throws -> NBDServer.Export? {
        var greeting: [UInt8] = []
        NBDProtocol.append(NBDProtocol.initialMagic, to: &greeting)
        NBDProtocol.append(NBDProtocol.optionMagic, to: &greeting)
        NBDProtocol.append(NBDProtocol.flagFixedNewstyle | NBDProtocol.flagNoZeroes, to: &greeting)
        try await send(greeting)
        let clientFlags = NBDProtocol.bigEndian(UInt32.self, try await receive(4), 0)
        guard clientFlags & NBDProtocol.clientFixedNewstyle != 0 else {
            server.log("\(label): refused: the client does not speak fixed newstyle negotiation (flags \(clientFlags))")
            return nil
        }
        guard clientFlags & ~(NBDProtocol.clientFixedNewstyle | NBDProtocol.clientNoZeroes) == 0 else {
            server.log("\(label): refused: unknown client flags \(clientFlags)")
            return nil
        }
        let noZeroes = clientFlags & NBDProtocol.clientNoZeroes != 0
        for _ in 0..<256 {
            let header = try await receive(16)
            guard NBDProtocol.bigEndian(UInt64.self, header, 0) == NBDProtocol.optionMagic else {
                server.log("\(label): refused: an option without the IHAVEOPT magic")
                return nil
            }
            let optionCode = NBDProtocol.bigEndian(UInt32.self, header, 8)
            let length = Int(NBDProtocol.bigEndian(UInt32.self, header, 12))
            guard length <= 65536 else {
                server.log("\(label): refused: option \(optionCode) carries \(length) bytes (at most 65536)")
                try? await send(
                    NBDProtocol.optionReply(
                        option: optionCode, reply: NBDProtocol.Reply.errorTooBig.rawValue,
                        data: Array("option data too long".utf8)))
                return nil
            }
            let data = try await receive(length)
            func reply(_ type: NBDProtocol.Reply, _ payload: [UInt8] = []) async throws {
                try await send(NBDProtocol.optionReply(option: optionCode, reply: type.rawValue, data: payload))
            }
            func refuse(_ type: NBDProtocol.Reply, _ message: String) async throws {
                server.log("\(label): option \(optionCode): \(message)")
                try await reply(type, Array(message.utf8))
            }
            switch NBDProtocol.Option(rawValue: optionCode) {
            case .exportName:
                let name = String(decoding: data, as: UTF8.self)
                guard let export = server.export(named: name) else {
                    server.log(
                        "\(label): refused: no export named '\(name)' (NBD_OPT_EXPORT_NAME closes the connection)")
                    return nil
                }
                var bytes: [UInt8] = []
                NBDProtocol.append(export.device.capacityBytes, to: &bytes)
                NBDProtocol.append(export.flags.rawValue, to: &bytes)
                if !noZeroes { bytes += [UInt8](repeating: 0, count: 124) }
                try await send(bytes)
                return export
            case .abort:
                try? await reply(.ack)
                server.log("\(label): the client aborted the negotiation")
                return nil
            case .list:
                guard data.isEmpty else {
                    try await refuse(.errorInvalid, "NBD_OPT_LIST takes no data")
                    continue
                }
                for export in server.exports {
                    var payload: [UInt8] = []
                    NBDProtocol.append(UInt32(export.name.utf8.count), to: &payload)
                    payload += Array(export.name.utf8)
                    payload += Array(export.description.utf8)
                    try await reply(.server, payload)
                }
                try await reply(.ack)
            case .info, .go:
                guard let request = NBDProtocol.decodeInfoRequest(data) else {
                    try await refuse(.errorInvalid, "malformed NBD_OPT_INFO/GO data (\(data.count) bytes)")
                    continue
                }
                guard let export = server.export(named: request.name) else {
                    try await refuse(.errorUnknown, "no export named '\(request.name)'")
                    continue
                }
                var info: [UInt8] = []
                NBDProtocol.append(NBDProtocol.Info.export.rawValue, to: &info)
                NBDProtocol.append(export.device.capacityBytes, to: &info)
                NBDProtocol.append(export.flags.rawValue, to: &info)
                try await reply(.info, info)
                var sizes: [UInt8] = []
                NBDProtocol.append(NBDProtocol.Info.blockSize.rawValue, to: &sizes)
                NBDProtocol.append(export.minimumBlockBytes, to: &sizes)
                NBDProtocol.append(export.preferredBlockBytes, to: &sizes)
                NBDProtocol.append(NBDServer.maximumRequestBytes, to: &sizes)
                try await reply(.info, sizes)
                if request.items.contains(NBDProtocol.Info.name.rawValue) {
                    var name: [UInt8] = []
                    NBDProtocol.append(NBDProtocol.Info.name.rawValue, to: &name)
                    try await reply(.info, name + Array(export.name.utf8))
                }
                if request.items.contains(NBDProtocol.Info.description.rawValue) && !export.description.isEmpty {
                    var description: [UInt8] = []
                    NBDProtocol.append(NBDProtocol.Info.description.rawValue, to: &description)
                    try await reply(.info, description + Array(export.description.utf8))
                }
                try await reply(.ack)
                if optionCode == NBDProtocol.Option.go.rawValue { return export }
            case .startTLS:
                try await refuse(.errorPolicy, "TLS is not offered by this server")
            default:
                try await refuse(.errorUnsupported, "option \(optionCode) is not supported")
            }
        }
        server.log("\(label): refused: more than 256 options")
        return nil
    }

    // MARK: Transmission

    private func transmit(_ export: NBDServer.Export) async throws {
        let header = UnsafeMutableRawPointer.allocate(byteCount: NBDProtocol.Request.bytes, alignment: 16)
        defer { header.deallocate() }
        let size = export.device.capacityBytes
        try await withThrowingDiscardingTaskGroup { group in
            requests: while true {
                do {
                    try await receive(header, NBDProtocol.Request.bytes)
                } catch is EndOfStream {
                    break requests
                }
                guard
                    let request = NBDProtocol.Request.decode(
                        UnsafeRawBufferPointer(start: header, count: NBDProtocol.Request.bytes))
                else {
                    server.log(
                        "\(label): a request without the request magic; closing (the stream cannot be trusted past it)")
                    break requests
                }
                let command = NBDProtocol.Command(rawValue: request.type)
                let length = UInt64(request.length)
                // A write's data follows its header: read it before anything else, or refuse the stream.
                var payload: AlignedBuffer?
                if command == .write {
                    guard request.length <= NBDServer.maximumRequestBytes else {
                        server.log(
                            "\(label): a write of \(request.length) bytes, more than \(NBDServer.maximumRequestBytes); closing"
                        )
                        break requests
                    }
                    let buffer = server.buffers.take(Int(request.length))
                    try await receive(buffer.bytes.baseAddress!, Int(request.length))
                    withExtendedLifetime(buffer) {}  // received into while alive; kept on as the payload
                    payload = buffer
                }
                func fail(_ error: NBDProtocol.ErrorCode, _ message: String) async throws {
                    server.log(
                        "\(label): \(command.map { "\($0)" } ?? "command \(request.type)") at offset \(request.offset), \(request.length) bytes: \(message)"
                    )
                    try await sendReply(error: error.rawValue, cookie: request.cookie)
                }
                switch command {
                case .disconnect:
                    break requests
                case .read, .write, .trim, .writeZeroes:
                    if command == .read && request.length > NBDServer.maximumRequestBytes {
                        try await fail(.overflow, "longer than the maximum of \(NBDServer.maximumRequestBytes) bytes")
                        continue
                    }
                    if command != .read && export.readOnly {
                        try await fail(.permission, "the export is read-only")
                        continue
                    }
                    guard request.offset <= size, length <= size - request.offset else {
                        try await fail(
                            command == .read ? .invalid : .noSpace, "past the end of the export (\(size) bytes)")
                        continue
                    }
                    guard length > 0 else {
                        try await sendReply(error: 0, cookie: request.cookie)
                        continue
                    }
                    let fua = request.flags & NBDProtocol.commandFlagFUA != 0
                    group.addTask { [self] in
                        defer { if let payload { server.buffers.give(payload) } }
                        try await serve(command!, request, payload: payload, fua: fua, device: export.device)
                    }
                case .flush:
                    group.addTask { [self] in
                        try await serve(.flush, request, payload: nil, fua: false, device: export.device)
                    }
                default:
                    try await fail(.invalid, "command \(request.type) is not supported")
                }
            }
        }
    }

    /// Serves one request on the device and sends its reply.
    private func serve(
        _ command: NBDProtocol.Command, _ request: NBDProtocol.Request, payload: AlignedBuffer?, fua: Bool,
        device: any BlockDevice
    ) async throws {
        let block = UInt64(device.logicalBlockBytes)
        let aligned = request.offset % block == 0 && UInt64(request.length) % block == 0
        do {
            if !aligned && (command == .read || command == .write) {
                try await serveUnaligned(command, request, payload: payload, fua: fua, device: device, block: block)
                return
            }
            switch command {
            case .read:
                let buffer = server.buffers.take(Int(request.length))
                defer { server.buffers.give(buffer) }
                try await device.read(into: buffer, range: 0..<Int(request.length), at: request.offset)
                try await sendReply(error: 0, cookie: request.cookie, data: buffer, length: Int(request.length))
                return
            case .write:
                try await device.write(from: payload!, range: 0..<Int(request.length), at: request.offset, fua: fua)
            case .trim, .writeZeroes:
                // Any alignment: the device releases whole blocks and decides what partial ones need
                // (a thin volume zeroes only chunks that hold data, and never allocates for a trim).
                // Partial blocks may be read and rewritten: under the lock unaligned writes take.
                let offset = request.offset
                let length = UInt64(request.length)
                let release = { () async throws -> Void in
                    if command == .trim {
                        try await device.discardBytes(offset: offset, length: length)
                    } else {
                        try await device.zeroBytes(offset: offset, length: length)
                    }
                }
                if aligned {
                    try await release()
                } else {
                    try await server.unalignedLock(for: device).withLock { try await release() }
                }
                if fua { try await device.flush() }
            case .flush:
                try await device.flush()
            default:
                break
            }
            try await sendReply(error: 0, cookie: request.cookie)
        } catch is EndOfStream {
            return
        } catch {
            let code: NBDProtocol.ErrorCode
            switch (error as? SpindleError)?.code {
            case .readOnly?: code = .permission
            case .noSpace?: code = .noSpace
            case .outOfRange?, .misaligned?, .invalidArgument?: code = .invalid
            case .closed?: code = .shutdown
            default: code = .io
            }
            server.log("\(label): \(command) at offset \(request.offset), \(request.length) bytes failed: \(error)")
            try? await sendReply(error: code.rawValue, cookie: request.cookie)
        }
    }

    /// A read or write that does not fall on the device's blocks (FUSE and some clients send them): a
    /// read goes through a bounce buffer; a write becomes a read-modify-write of the covering blocks,
    /// one at a time per export (with unaligned trims and write-zeroes), so two such requests sharing
    /// a block cannot lose each other's bytes.
    private func serveUnaligned(
        _ command: NBDProtocol.Command, _ request: NBDProtocol.Request, payload: AlignedBuffer?, fua: Bool,
        device: any BlockDevice, block: UInt64
    ) async throws {
        let start = request.offset / block * block
        let end = (request.offset + UInt64(request.length) + block - 1) / block * block
        let bounce = AlignedBuffer(count: Int(end - start), zeroed: false)
        let within = Int(request.offset - start)
        let length = Int(request.length)
        if command == .read {
            try await device.read(into: bounce, at: start)
            let data = AlignedBuffer(count: length, zeroed: false)
            data.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce.bytes[within..<(within + length)]))
            try await sendReply(error: 0, cookie: request.cookie, data: data)
            return
        }
        try await server.unalignedLock(for: device).withLock {
            try await device.read(into: bounce, at: start)
            let target = UnsafeMutableRawBufferPointer(rebasing: bounce.bytes[within..<(within + length)])
            if let payload {
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: payload.bytes[0..<length]))
            } else {
                target.initializeMemory(as: UInt8.self, repeating: 0)
            }
            try await device.write(from: bounce, at: start, fua: fua)
        }
        try await sendReply(error: 0, cookie: request.cookie)
    }

    /// Sends a simple reply (and a read's data) as one message: replies never interleave.
    private func sendReply(error: UInt32, cookie: UInt64, data: AlignedBuffer? = nil, length dataLength: Int? = nil)
        async throws
    {
        try await replyLock.withLock {
            let header = replyHeader
            let vectors = replyVectors
            NBDProtocol.simpleReply(
                error: error, cookie: cookie, into: UnsafeMutableRawBufferPointer(start: header, count: 16))
            guard let data else {
                try await send(header, 16)
                return
            }
            // Header and data in one writev; a partial write finishes with plain sends.
            vectors[0] = iovec(iov_base: header, iov_len: 16)
            let count = dataLength ?? data.count
            vectors[1] = iovec(iov_base: data.bytes.baseAddress!, iov_len: count)
            let offload = count >= 128 * 1024
            let sent = try await socketOperation(
                .writeStream(fd: socket, vectors: vectors, count: 2, offload: offload), operation: "send")
            if sent < 16 {
                try await send(header + sent, 16 - sent)
                try await send(data.bytes.baseAddress!, count)
            } else if sent < 16 + count {
                try await send(data.bytes.baseAddress! + (sent - 16), count - (sent - 16))
            }
            withExtendedLifetime(data) {}
        }
    }
}
