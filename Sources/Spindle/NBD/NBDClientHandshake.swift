import Dispatch
import Glibc

/// What an NBD server said about an export during negotiation.
public struct NBDExportInfo: Sendable, Equatable {
    /// The export's size in bytes.
    public var sizeBytes: UInt64
    /// The transmission flags: read-only, and which of flush, FUA, trim and write-zeroes it takes.
    package var flags: NBDProtocol.TransmissionFlags
    /// The block size constraints (`NBD_INFO_BLOCK_SIZE`; the protocol's defaults when not sent).
    public var minimumBlockBytes: UInt32
    public var preferredBlockBytes: UInt32
    public var maximumPayloadBytes: UInt32

    /// Whether the server offers the export read-only.
    public var isReadOnly: Bool { flags.contains(.readOnly) }
    /// Which requests the server takes: flush, FUA writes, trim, write-zeroes.
    public var sendsFlush: Bool { flags.contains(.sendFlush) }
    public var sendsFUA: Bool { flags.contains(.sendFUA) }
    public var sendsTrim: Bool { flags.contains(.sendTrim) }
    public var sendsWriteZeroes: Bool { flags.contains(.sendWriteZeroes) }
    /// Whether the server says several connections see each other's writes and flushes.
    public var allowsMultipleConnections: Bool { flags.contains(.canMultiConn) }
}

/// The client side of fixed newstyle negotiation: connect, greet, `NBD_OPT_GO` for the export with
/// block sizes asked for (falling back to `NBD_OPT_EXPORT_NAME` for servers without it). Done with
/// blocking calls bounded by a timeout on a thread of its own, once per connection: requests go
/// through the engine afterwards (``NBDDevice``).
enum NBDClientHandshake {
    typealias P = NBDProtocol

    /// Connects to `address` and negotiates; the socket returned is connected, in blocking mode
    /// with no timeouts, and the caller's to close.
    static func connect(_ address: NBDAddress, timeoutSeconds: Int) async throws(SpindleError) -> (
        socket: Int32, info: NBDExportInfo
    ) {
        let result: Result<(Int32, NBDExportInfo), SpindleError> = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(
                    returning: Result { () throws(SpindleError) in
                        let socket = try open(address, timeoutSeconds: timeoutSeconds)
                        do throws(SpindleError) {
                            let info = try negotiate(socket, address: address)
                            var none = timeval()
                            setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
                            setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
                            return (socket, info)
                        } catch {
                            Glibc.close(socket)
                            throw error
                        }
                    })
            }
        }
        return try result.get()
    }

    static func failure(_ address: NBDAddress, _ message: String, errno: Int32? = nil) -> SpindleError {
        SpindleError(.ioFailed, message, errno: errno, operation: "connect", path: address.uri)
    }

    // MARK: Connecting

    static func open(_ address: NBDAddress, timeoutSeconds: Int) throws(SpindleError) -> Int32 {
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        func configure(_ socket: Int32) {
            setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        }
        func describe(_ error: Int32, _ place: String) -> String {
            switch error {
            case ECONNREFUSED: return "nothing listens at \(place) (connection refused)"
            case ENOENT: return "there is no socket at \(place)"
            case EAGAIN, EINPROGRESS, ETIMEDOUT: return "\(place) did not answer within \(timeoutSeconds) s"
            default: return "cannot connect to \(place): \(String(cString: strerror(error)))"
            }
        }
        switch address.transport {
        case let .unix(path):
            var socketAddress = sockaddr_un()
            socketAddress.sun_family = sa_family_t(AF_UNIX)
            let capacity = MemoryLayout.size(ofValue: socketAddress.sun_path)
            guard path.utf8.count < capacity else {
                throw failure(address, "the socket path is longer than \(capacity - 1) bytes")
            }
            withUnsafeMutableBytes(of: &socketAddress.sun_path) { raw in
                for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
            }
            let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard descriptor >= 0 else { throw failure(address, "socket() failed", errno: errno) }
            configure(descriptor)
            let connected = withUnsafePointer(to: &socketAddress) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            guard connected == 0 else {
                let error = errno
                Glibc.close(descriptor)
                throw failure(address, describe(error, path), errno: error)
            }
            return descriptor
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var list: UnsafeMutablePointer<addrinfo>?
            let resolved = getaddrinfo(host, String(port), &hints, &list)
            guard resolved == 0, let first = list else {
                throw failure(address, "cannot resolve host '\(host)': \(String(cString: gai_strerror(resolved)))")
            }
            defer { freeaddrinfo(list) }
            var lastError: Int32 = ECONNREFUSED
            var entry: UnsafeMutablePointer<addrinfo>? = first
            while let current = entry {
                entry = current.pointee.ai_next
                let descriptor = socket(
                    current.pointee.ai_family, current.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue),
                    current.pointee.ai_protocol)
                guard descriptor >= 0 else {
                    lastError = errno
                    continue
                }
                configure(descriptor)
                if Glibc.connect(descriptor, current.pointee.ai_addr, current.pointee.ai_addrlen) == 0 {
                    var one: Int32 = 1
                    setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                    return descriptor
                }
                lastError = errno
                Glibc.close(descriptor)
            }
            throw failure(address, describe(lastError, "\(host):\(port)"), errno: lastError)
        }
    }

    // MARK: Negotiating

    static func negotiate(_ socket: Int32, address: NBDAddress) throws(SpindleError) -> NBDExportInfo {
        let greeting = try receive(socket, 18, address)
        guard P.bigEndian(UInt64.self, greeting, 0) == P.initialMagic else {
            throw failure(address, "the peer is not an NBD server (its greeting does not start with NBDMAGIC)")
        }
        let second = P.bigEndian(UInt64.self, greeting, 8)
        guard second == P.optionMagic else {
            throw failure(
                address,
                second == 0x0000_4202_8186_1253
                    ? "the server speaks the oldstyle NBD protocol, which has no export names; Spindle needs fixed newstyle"
                    : "the server's greeting is neither newstyle nor oldstyle NBD")
        }
        let serverFlags = P.bigEndian(UInt16.self, greeting, 16)
        guard serverFlags & P.flagFixedNewstyle != 0 else {
            throw failure(address, "the server does not speak fixed newstyle NBD negotiation")
        }
        let noZeroes = serverFlags & P.flagNoZeroes != 0
        var clientFlags: [UInt8] = []
        P.append(P.clientFixedNewstyle | (noZeroes ? P.clientNoZeroes : 0), to: &clientFlags)
        try send(socket, clientFlags, address)

        let name = Array(address.exportName.utf8)
        var data: [UInt8] = []
        P.append(UInt32(name.count), to: &data)
        data += name
        P.append(UInt16(1), to: &data)
        P.append(P.Info.blockSize.rawValue, to: &data)
        try send(socket, option(.go, data), address)

        var size: UInt64?
        var flags = P.TransmissionFlags()
        var blocks: (UInt32, UInt32, UInt32) = (1, 4096, 32 << 20)
        let exportLabel = address.exportName.isEmpty ? "the default export" : "export '\(address.exportName)'"
        while true {
            let header = try receive(socket, 20, address)
            guard P.bigEndian(UInt64.self, header, 0) == P.optionReplyMagic else {
                throw failure(address, "the server's option reply has a bad magic number")
            }
            let type = P.bigEndian(UInt32.self, header, 12)
            let length = Int(P.bigEndian(UInt32.self, header, 16))
            guard length <= 1 << 20 else {
                throw failure(address, "the server sent an option reply of \(length) bytes")
            }
            let body = try receive(socket, length, address)
            let message = type & 0x8000_0000 != 0 && length > 0 ? ": \(String(decoding: body, as: UTF8.self))" : ""
            switch P.Reply(rawValue: type) {
            case .info:
                guard body.count >= 2 else { throw failure(address, "the server sent an empty information reply") }
                switch P.bigEndian(UInt16.self, body, 0) {
                case P.Info.export.rawValue where body.count >= 12:
                    size = P.bigEndian(UInt64.self, body, 2)
                    flags = P.TransmissionFlags(rawValue: P.bigEndian(UInt16.self, body, 10))
                case P.Info.blockSize.rawValue where body.count >= 14:
                    blocks = (
                        P.bigEndian(UInt32.self, body, 2), P.bigEndian(UInt32.self, body, 6),
                        P.bigEndian(UInt32.self, body, 10)
                    )
                default: break
                }
            case .ack:
                guard let size else { throw failure(address, "the server accepted \(exportLabel) without its size") }
                return try checked(
                    NBDExportInfo(
                        sizeBytes: size, flags: flags, minimumBlockBytes: blocks.0, preferredBlockBytes: blocks.1,
                        maximumPayloadBytes: blocks.2), address)
            case .errorUnsupported:
                return try exportName(socket, address: address, noZeroes: noZeroes)
            case .errorUnknown:
                throw failure(address, "the server has no \(exportLabel)\(message)")
            case .errorTLSRequired:
                throw failure(address, "the server requires TLS for \(exportLabel) (nbds:// is not supported yet)")
            case .errorPolicy:
                throw failure(address, "the server refused access to \(exportLabel)\(message)")
            case .errorBlockSizeRequired:
                throw failure(address, "the server requires block size negotiation for \(exportLabel)\(message)")
            default:
                if type & 0x8000_0000 != 0 {
                    throw failure(address, "the server refused \(exportLabel) (option reply \(type))\(message)")
                }
            }
        }
    }

    /// The old way in, for servers without `NBD_OPT_GO`: `NBD_OPT_EXPORT_NAME`, answered by the size
    /// and flags (a server without the export closes the connection).
    static func exportName(_ socket: Int32, address: NBDAddress, noZeroes: Bool) throws(SpindleError) -> NBDExportInfo {
        try send(socket, option(.exportName, Array(address.exportName.utf8)), address)
        let reply: [UInt8]
        do {
            reply = try receive(socket, 10 + (noZeroes ? 0 : 124), address)
        } catch {
            throw failure(address, "the server closed the connection: it has no export '\(address.exportName)'")
        }
        return try checked(
            NBDExportInfo(
                sizeBytes: P.bigEndian(UInt64.self, reply, 0),
                flags: P.TransmissionFlags(rawValue: P.bigEndian(UInt16.self, reply, 8)), minimumBlockBytes: 1,
                preferredBlockBytes: 4096, maximumPayloadBytes: 32 << 20), address)
    }

    /// Refuses block sizes Spindle cannot honour (a minimum above 64 KiB or not a power of two).
    static func checked(_ info: NBDExportInfo, _ address: NBDAddress) throws(SpindleError) -> NBDExportInfo {
        let minimum = info.minimumBlockBytes
        guard minimum > 0, minimum & (minimum - 1) == 0, minimum <= 65536 else {
            throw failure(
                address, "the server's minimum block size, \(minimum) bytes, is not a power of two up to 64 KiB")
        }
        guard info.maximumPayloadBytes >= max(minimum, 512) else {
            throw failure(
                address, "the server's largest request, \(info.maximumPayloadBytes) bytes, is below one block")
        }
        return info
    }

    static func option(_ option: P.Option, _ data: [UInt8]) -> [UInt8] {
        var bytes: [UInt8] = []
        P.append(P.optionMagic, to: &bytes)
        P.append(option.rawValue, to: &bytes)
        P.append(UInt32(data.count), to: &bytes)
        return bytes + data
    }

    static func receive(_ socket: Int32, _ count: Int, _ address: NBDAddress) throws(SpindleError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes { recv(socket, $0.baseAddress! + done, count - done, 0) }
            if got > 0 {
                done += got
                continue
            }
            let error = got == 0 ? 0 : errno
            if error == EINTR { continue }
            throw failure(
                address,
                got == 0
                    ? "the server closed the connection during negotiation"
                    : error == EAGAIN
                        ? "the server stopped answering during negotiation"
                        : "negotiation failed: \(String(cString: strerror(error)))", errno: got == 0 ? nil : error)
        }
        return bytes
    }

    static func send(_ socket: Int32, _ bytes: [UInt8], _ address: NBDAddress) throws(SpindleError) {
        var done = 0
        while done < bytes.count {
            let sent = bytes.withUnsafeBytes {
                Glibc.send(socket, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            }
            if sent > 0 {
                done += sent
                continue
            }
            if errno == EINTR { continue }
            let error = errno
            throw failure(address, "negotiation failed: \(String(cString: strerror(error)))", errno: error)
        }
    }
}
