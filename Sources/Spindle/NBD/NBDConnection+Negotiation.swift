extension NBDConnection {
    /// Runs the fixed newstyle handshake and options; returns what the client chose, or nil when the
    /// client aborted or the negotiation failed (logged).
    func negotiate() async throws -> Session? {
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
        var structuredReplies = false
        // The contexts the last NBD_OPT_SET_META_CONTEXT selected, and for which export.
        var selected: (export: String, contexts: [NBDMetadataContext])?
        func session(_ export: NBDServer.Export) -> Session {
            let contexts = selected.flatMap { server.export(named: $0.export)?.name == export.name ? $0.contexts : nil }
            return Session(export: export, structuredReplies: structuredReplies, contexts: contexts ?? [])
        }
        var refusedWithoutTLS = false
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
            let option = NBDProtocol.Option(rawValue: optionCode)
            // FORCEDTLS: before the upgrade, nothing but STARTTLS and ABORT is answered.
            if server.tls.mode == .require && tls == nil && option != .startTLS && option != .abort {
                if option == .exportName {
                    server.log(
                        "\(label): refused: NBD_OPT_EXPORT_NAME without TLS, which this server requires (the option cannot be answered with an error, so the connection is closed)"
                    )
                    return nil
                }
                let message = "this server requires TLS: send NBD_OPT_STARTTLS first"
                if !refusedWithoutTLS {
                    // Logged once: a client without TLS usually tries a few options before giving up.
                    server.log(
                        "\(label): refused option \(optionCode) (\(option.map { "\($0)" } ?? "unknown")): \(message)")
                    refusedWithoutTLS = true
                }
                try await reply(.errorTLSRequired, Array(message.utf8))
                continue
            }
            switch option {
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
                return session(export)
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
                try await sendInfo(export, items: request.items, reply: reply)
                if optionCode == NBDProtocol.Option.go.rawValue { return session(export) }
            case .structuredReply:
                guard data.isEmpty else {
                    try await refuse(.errorInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                }
                structuredReplies = true
                try await reply(.ack)
            case .listMetaContext, .setMetaContext:
                let setting = optionCode == NBDProtocol.Option.setMetaContext.rawValue
                // A selection is replaced by every NBD_OPT_SET_META_CONTEXT, even one that fails.
                if setting { selected = nil }
                guard structuredReplies else {
                    try await refuse(
                        .errorInvalid, "metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first")
                    continue
                }
                guard let request = NBDProtocol.decodeMetaContextRequest(data) else {
                    try await refuse(.errorInvalid, "malformed metadata context request (\(data.count) bytes)")
                    continue
                }
                guard let export = server.export(named: request.name) else {
                    try await refuse(.errorUnknown, "no export named '\(request.name)'")
                    continue
                }
                let available = await NBDMetadataContext.available(for: export.device)
                var found: [NBDMetadataContext] = []
                var malformed: String?
                for query in request.queries {
                    guard let matches = NBDMetadataContext.matching(query, in: available, listing: !setting) else {
                        malformed = query
                        break
                    }
                    for context in matches where !found.contains(context) { found.append(context) }
                }
                if let malformed {
                    try await refuse(.errorInvalid, "the metadata context query '\(malformed)' names no namespace")
                    continue
                }
                // No query: a list names everything offered, a selection selects nothing.
                if request.queries.isEmpty && !setting { found = available }
                for (index, context) in found.enumerated() {
                    var payload: [UInt8] = []
                    NBDProtocol.append(setting ? UInt32(index + 1) : 0, to: &payload)
                    try await reply(.metaContext, payload + Array(context.name.utf8))
                }
                try await reply(.ack)
                if setting { selected = (request.name, found) }
            case .startTLS:
                guard let credentials = server.tls.credentials else {
                    try await refuse(.errorPolicy, "this server does not offer TLS")
                    continue
                }
                guard tls == nil else {
                    try await refuse(.errorInvalid, "TLS is already running on this connection")
                    continue
                }
                guard data.isEmpty else {
                    try await refuse(.errorInvalid, "NBD_OPT_STARTTLS takes no data")
                    continue
                }
                try await reply(.ack)
                let session = try TLSSession(
                    socket: socket, engine: server.engine, credentials: credentials, buffered: takeBuffered())
                tls = session
                do {
                    try await session.handshake()
                } catch {
                    server.log("\(label): refused: \((error as? SpindleError)?.message ?? "\(error)")")
                    tls = nil
                    return nil
                }
                server.log("\(label): TLS started (\(session.summary))")
                // Nothing negotiated before the upgrade carries over (the protocol's rule).
                structuredReplies = false
                selected = nil
            default:
                try await refuse(.errorUnsupported, "option \(optionCode) is not supported")
            }
        }
        server.log("\(label): refused: more than 256 options")
        return nil
    }

    /// The information replies of `NBD_OPT_INFO` and `NBD_OPT_GO`, then the acknowledgement.
    private func sendInfo(
        _ export: NBDServer.Export, items: [UInt16], reply: (NBDProtocol.Reply, [UInt8]) async throws -> Void
    ) async throws {
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
        if items.contains(NBDProtocol.Info.name.rawValue) {
            var name: [UInt8] = []
            NBDProtocol.append(NBDProtocol.Info.name.rawValue, to: &name)
            try await reply(.info, name + Array(export.name.utf8))
        }
        if items.contains(NBDProtocol.Info.description.rawValue) && !export.description.isEmpty {
            var description: [UInt8] = []
            NBDProtocol.append(NBDProtocol.Info.description.rawValue, to: &description)
            try await reply(.info, description + Array(export.description.utf8))
        }
        try await reply(.ack, [])
    }
}
