/// Structured replies and metadata querying (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT`,
/// `NBD_OPT_SET_META_CONTEXT`, `NBD_CMD_BLOCK_STATUS`), as `doc/proto.md` specifies them.
extension NBDProtocol {
    static let structuredReplyMagic: UInt32 = 0x668E_33EF
    /// A structured reply chunk's header: magic, flags, type, cookie, payload length.
    static let structuredHeaderBytes = 20
    /// The last chunk of a structured reply.
    static let replyFlagDone: UInt16 = 1 << 0

    /// Structured reply chunk types.
    enum ChunkType: UInt16 {
        case none = 0, offsetData = 1, offsetHole = 2, blockStatus = 5
        case error = 0x8001, errorOffset = 0x8002
    }

    /// Command flags of reads and block status.
    static let commandFlagDontFragment: UInt16 = 1 << 2
    static let commandFlagRequestOne: UInt16 = 1 << 3

    /// `base:allocation` flags.
    static let stateHole: UInt32 = 1 << 0
    static let stateZero: UInt32 = 1 << 1
    /// `qemu:dirty-bitmap:` flag.
    static let stateDirty: UInt32 = 1 << 0

    /// Descriptors in one block status chunk at most (the protocol asks servers for no more than 2^20).
    static let maximumExtentsPerChunk = 1 << 16
    /// Longest message in an error chunk (the protocol's string limit).
    static let maximumMessageBytes = 4096

    /// Writes a structured reply chunk's header at the start of `bytes`.
    static func structuredHeader(
        flags: UInt16, type: ChunkType, cookie: UInt64, payloadBytes: Int, into bytes: UnsafeMutableRawBufferPointer
    ) {
        putBigEndian(structuredReplyMagic, bytes, 0)
        putBigEndian(flags, bytes, 4)
        putBigEndian(type.rawValue, bytes, 6)
        putBigEndian(cookie, bytes, 8)
        putBigEndian(UInt32(payloadBytes), bytes, 16)
    }

    /// A whole structured chunk (header and payload), for replies built as bytes.
    static func structuredChunk(flags: UInt16, type: ChunkType, cookie: UInt64, payload: [UInt8]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: structuredHeaderBytes)
        bytes.withUnsafeMutableBytes {
            structuredHeader(flags: flags, type: type, cookie: cookie, payloadBytes: payload.count, into: $0)
        }
        return bytes + payload
    }

    /// The payload of an error chunk: the error, the message (cut to the protocol's limit), and for
    /// `NBD_REPLY_TYPE_ERROR_OFFSET` the offset.
    static func errorPayload(error: UInt32, message: String, offset: UInt64?) -> [UInt8] {
        var text = Array(message.utf8.prefix(maximumMessageBytes))
        // A cut inside a multi-byte character would not be valid UTF-8.
        while !text.isEmpty, String(validating: text, as: UTF8.self) == nil { text.removeLast() }
        var bytes: [UInt8] = []
        append(error, to: &bytes)
        append(UInt16(text.count), to: &bytes)
        bytes += text
        if let offset { append(offset, to: &bytes) }
        return bytes
    }

    /// The export name and queries of an `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`,
    /// or nil when the data is malformed (a length reaching past the data, bytes left over, or a
    /// string that is not UTF-8).
    static func decodeMetaContextRequest(_ data: [UInt8]) -> (name: String, queries: [String])? {
        var position = 0
        func string() -> String? {
            guard data.count - position >= 4 else { return nil }
            let length = Int(bigEndian(UInt32.self, data, position))
            position += 4
            guard length <= 4096, data.count - position >= length else { return nil }
            defer { position += length }
            return String(validating: data[position..<(position + length)], as: UTF8.self)
        }
        guard let name = string(), data.count - position >= 4 else { return nil }
        let count = Int(bigEndian(UInt32.self, data, position))
        position += 4
        // Each query takes at least its 4-byte length: a count beyond that is malformed.
        guard count <= (data.count - position) / 4 else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let query = string() else { return nil }
            queries.append(query)
        }
        return position == data.count ? (name, queries) : nil
    }

    /// An `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` request's data (what a client
    /// sends; for tests).
    static func metaContextRequest(name: String, queries: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        append(UInt32(name.utf8.count), to: &bytes)
        bytes += Array(name.utf8)
        append(UInt32(queries.count), to: &bytes)
        for query in queries {
            append(UInt32(query.utf8.count), to: &bytes)
            bytes += Array(query.utf8)
        }
        return bytes
    }
}
