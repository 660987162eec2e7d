extension NBDConnection {
    /// Reads requests until the client disconnects, serving each in a task of its own.
    func transmit(_ session: Session) async throws {
        let export = session.export
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
                    try await sendError(
                        error, message: message, cookie: request.cookie,
                        offset: command == .read ? request.offset : nil, session: session)
                }
                switch command {
                case .disconnect:
                    break requests
                case .read, .write, .trim, .writeZeroes, .blockStatus:
                    if command == .read && request.length > NBDServer.maximumRequestBytes {
                        try await fail(.overflow, "longer than the maximum of \(NBDServer.maximumRequestBytes) bytes")
                        continue
                    }
                    if command == .blockStatus {
                        guard session.structuredReplies, !session.contexts.isEmpty else {
                            try await fail(
                                .invalid,
                                session.structuredReplies
                                    ? "no metadata context was selected for this export (NBD_OPT_SET_META_CONTEXT)"
                                    : "block status needs structured replies and a metadata context")
                            continue
                        }
                    } else if command != .read && export.readOnly {
                        try await fail(.permission, "the export is read-only")
                        continue
                    }
                    guard request.offset <= size, length <= size - request.offset else {
                        try await fail(
                            command == .read || command == .blockStatus ? .invalid : .noSpace,
                            "past the end of the export (\(size) bytes)")
                        continue
                    }
                    guard length > 0 else {
                        if command == .blockStatus {
                            try await fail(.invalid, "a block status request of 0 bytes")
                        } else if command == .read && session.structuredReplies {
                            try await sendReply(
                                NBDProtocol.structuredChunk(
                                    flags: NBDProtocol.replyFlagDone, type: .none, cookie: request.cookie, payload: []))
                        } else {
                            try await sendReply(error: 0, cookie: request.cookie)
                        }
                        continue
                    }
                    let fua = request.flags & NBDProtocol.commandFlagFUA != 0
                    group.addTask { [self] in
                        defer { if let payload { server.buffers.give(payload) } }
                        try await serve(command!, request, payload: payload, fua: fua, session: session)
                    }
                case .flush:
                    group.addTask { [self] in
                        try await serve(.flush, request, payload: nil, fua: false, session: session)
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
        session: Session
    ) async throws {
        let device = session.export.device
        let block = UInt64(device.logicalBlockBytes)
        let aligned = request.offset % block == 0 && UInt64(request.length) % block == 0
        do {
            if !aligned && (command == .read || command == .write) {
                try await serveUnaligned(command, request, payload: payload, fua: fua, session: session, block: block)
                return
            }
            switch command {
            case .read:
                let buffer = server.buffers.take(Int(request.length))
                defer { server.buffers.give(buffer) }
                try await device.read(into: buffer, range: 0..<Int(request.length), at: request.offset)
                try await sendRead(
                    data: buffer, length: Int(request.length), offset: request.offset, cookie: request.cookie,
                    session: session)
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
            case .blockStatus:
                try await serveBlockStatus(request, session: session)
                return
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
            case .outOfRange?, .misaligned?, .invalidArgument?, .notFound?: code = .invalid
            case .closed?: code = .shutdown
            default: code = .io
            }
            server.log("\(label): \(command) at offset \(request.offset), \(request.length) bytes failed: \(error)")
            // A read's error chunk says where it failed: at the error's own offset when it is this
            // device's and inside the request, else at the request's start (no data went out).
            var failedAt: UInt64?
            if command == .read {
                failedAt = request.offset
                if let spindleError = error as? SpindleError, spindleError.path == device.name,
                    let offset = spindleError.offset, offset >= request.offset,
                    offset < request.offset + UInt64(request.length)
                {
                    failedAt = offset
                }
            }
            try? await sendError(
                code, message: "\(error)", cookie: request.cookie, offset: failedAt, session: session)
        }
    }

    /// A block status reply: one chunk per selected context, each describing the request's range
    /// from its offset (one descriptor with `NBD_CMD_FLAG_REQ_ONE`, else at most
    /// ``NBDProtocol/maximumExtentsPerChunk``), the last chunk marked done.
    private func serveBlockStatus(_ request: NBDProtocol.Request, session: Session) async throws {
        let one = request.flags & NBDProtocol.commandFlagRequestOne != 0
        var reply: [UInt8] = []
        for (index, context) in session.contexts.enumerated() {
            let extents = try await context.extents(
                of: session.export.device, offset: request.offset, length: request.length,
                limit: one ? 1 : NBDProtocol.maximumExtentsPerChunk)
            reply += NBDProtocol.structuredChunk(
                flags: index == session.contexts.count - 1 ? NBDProtocol.replyFlagDone : 0, type: .blockStatus,
                cookie: request.cookie,
                payload: NBDMetadataContext.blockStatusPayload(id: UInt32(index + 1), extents: extents))
        }
        try await sendReply(reply)
    }

    /// A read or write that does not fall on the device's blocks (FUSE and some clients send them): a
    /// read goes through a bounce buffer; a write becomes a read-modify-write of the covering blocks,
    /// one at a time per export (with unaligned trims and write-zeroes), so two such requests sharing
    /// a block cannot lose each other's bytes.
    private func serveUnaligned(
        _ command: NBDProtocol.Command, _ request: NBDProtocol.Request, payload: AlignedBuffer?, fua: Bool,
        session: Session, block: UInt64
    ) async throws {
        let device = session.export.device
        let start = request.offset / block * block
        let end = (request.offset + UInt64(request.length) + block - 1) / block * block
        let bounce = AlignedBuffer(count: Int(end - start), zeroed: false)
        let within = Int(request.offset - start)
        let length = Int(request.length)
        if command == .read {
            try await device.read(into: bounce, at: start)
            let data = AlignedBuffer(count: length, zeroed: false)
            data.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce.bytes[within..<(within + length)]))
            try await sendRead(
                data: data, length: length, offset: request.offset, cookie: request.cookie, session: session)
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
}
