import Dispatch
import Glibc

/// An NBD server: exports block devices (thin volumes, arrays, image files) to any NBD client —
/// qemu, the Linux `nbd` driver, fio, libnbd's tools — over a Unix socket and/or TCP, with no root
/// and no kernel module.
///
/// Negotiation is the protocol's fixed newstyle (`NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
/// `EXPORT_NAME`), advertising block size constraints. In transmission, every request is served by
/// its own task on the I/O engine as soon as it is read, and answered when it completes, out of
/// order: many requests are in flight per connection. Replies are simple replies unless the client
/// asks for structured ones (`NBD_OPT_STRUCTURED_REPLY`): then reads send runs of zeros as holes,
/// errors carry a message (and a read's, its offset), and `NBD_CMD_BLOCK_STATUS` answers for the
/// metadata contexts the client selected: `base:allocation` on every export (a thin volume's
/// unmapped chunks and an image file's holes are holes) and, on a thin volume, one
/// `qemu:dirty-bitmap:NAME` per other volume of its pool (what changed since snapshot NAME, as
/// qemu names changed-block tracking); see ``NBDMetadataContext``.
///
/// Bad input never crashes the server or reaches a device half-checked: malformed negotiation closes
/// that connection; out-of-range, misaligned or oversized requests and writes to read-only exports
/// are answered with the protocol's error; a request stream that loses its framing (a bad magic, a
/// write longer than the server accepts) closes that connection. Every such event is logged.
public final class NBDServer: @unchecked Sendable {
    // @unchecked Sendable: mutable state is in `state`, under its lock.

    /// A device offered to clients under a name.
    public struct Export: Sendable {
        public var name: String
        public var device: any BlockDevice
        public var readOnly: Bool
        public var description: String

        public init(name: String, device: any BlockDevice, readOnly: Bool = false, description: String = "") {
            self.name = name
            self.device = device
            self.readOnly = readOnly || device.isReadOnly
            self.description = description
        }

        var flags: NBDProtocol.TransmissionFlags {
            var flags: NBDProtocol.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .canMultiConn]
            // Multi-connection is safe: every Spindle device's flush covers writes from all
            // connections (it flushes the whole device), as the protocol requires.
            if readOnly { flags.insert(.readOnly) } else { flags.formUnion([.sendTrim, .sendWriteZeroes]) }
            return flags
        }

        /// Any alignment is served (unaligned writes by read-modify-write of their edge blocks,
        /// trims and write-zeroes by the device's byte-range calls); the device's block is what
        /// clients should prefer.
        var minimumBlockBytes: UInt32 { 1 }
        var preferredBlockBytes: UInt32 { UInt32(max(4096, device.logicalBlockBytes)) }
    }

    /// Whether clients upgrade their connections to TLS (`NBD_OPT_STARTTLS`), and with what.
    public struct TLS: Sendable {
        public enum Mode: String, Sendable, CaseIterable {
            /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
            case off
            /// TLS for the clients that ask for it; others are served in plaintext.
            case on
            /// Only TLS: every option before `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_TLS_REQD`
            /// (the protocol's FORCEDTLS mode), and nothing is served in plaintext.
            case require
        }

        public let mode: Mode
        public let credentials: TLSCredentials?

        public static let off = TLS(checked: .off, credentials: nil)

        /// - Throws: `invalidArgument` when `mode` is `on` or `require` with no credentials.
        public init(mode: Mode, credentials: TLSCredentials?) throws(SpindleError) {
            guard mode == .off || credentials != nil else {
                throw SpindleError(
                    .invalidArgument, "TLS \(mode.rawValue) needs credentials: certificates or pre-shared keys")
            }
            self.init(checked: mode, credentials: mode == .off ? nil : credentials)
        }

        private init(checked mode: Mode, credentials: TLSCredentials?) {
            self.mode = mode
            self.credentials = credentials
        }
    }

    /// Largest read or write a client may send (`NBD_INFO_BLOCK_SIZE` maximum).
    public static let maximumRequestBytes: UInt32 = 32 << 20

    public let exports: [Export]
    public let tls: TLS
    let engine: IOEngine
    let log: @Sendable (String) -> Void

    private struct State {
        var listeners: [Int32] = []
        var connections: [Int: (socket: Int32, task: Task<Void, Never>)] = [:]
        var nextConnection = 0
        var stopping = false
    }
    private let state = Locked(State())
    private let unalignedLocks: [ObjectIdentifier: AsyncMutex]
    /// Request buffers, reused across requests and connections.
    let buffers = BufferPool()

    /// The lock serializing read-modify-writes of one device.
    func unalignedLock(for device: any BlockDevice) -> AsyncMutex {
        unalignedLocks[ObjectIdentifier(device)]!
    }

    /// - Parameters:
    ///   - exports: the devices to offer; names must be unique. With one export, the empty name (a
    ///     client's default) reaches it too.
    ///   - tls: whether connections may or must be upgraded to TLS, and the credentials.
    ///   - log: receives one line per connection, refusal and protocol error.
    public init(
        exports: [Export], engine: IOEngine, tls: TLS = .off, log: @escaping @Sendable (String) -> Void = { _ in }
    ) throws(SpindleError) {
        guard !exports.isEmpty else { throw SpindleError(.invalidArgument, "an NBD server needs at least one export") }
        var seen = Set<String>()
        for export in exports where !seen.insert(export.name).inserted {
            throw SpindleError(.invalidArgument, "two exports are named '\(export.name)'")
        }
        self.exports = exports
        var locks: [ObjectIdentifier: AsyncMutex] = [:]
        for export in exports { locks[ObjectIdentifier(export.device)] = AsyncMutex() }
        unalignedLocks = locks
        self.engine = engine
        self.tls = tls
        self.log = log
        // A reply to a client that has gone away must fail with EPIPE, not kill the process: the
        // engine writes to sockets with write(2), which raises SIGPIPE. Process-wide, as servers do.
        signal(SIGPIPE, SIG_IGN)
    }

    func export(named name: String) -> Export? {
        if let export = exports.first(where: { $0.name == name }) { return export }
        return name.isEmpty && exports.count == 1 ? exports[0] : nil
    }

    // MARK: Listening

    /// Listens on a Unix socket at `path` (a stale socket file there is replaced). Returns the
    /// socket path.
    @discardableResult
    public func listen(unixSocket path: String) throws(SpindleError) -> String {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SpindleError(
                .invalidArgument,
                "the socket path is longer than \(MemoryLayout.size(ofValue: address.sun_path) - 1) bytes", path: path)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        var status = stat()
        if lstat(path, &status) == 0 {
            guard status.st_mode & S_IFMT == S_IFSOCK else {
                throw SpindleError(
                    .alreadyExists, "a file that is not a socket is in the way", operation: "listen", path: path)
            }
            unlink(path)
        }
        let socketDescriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard socketDescriptor >= 0 else { throw SpindleError.system(errno, operation: "socket", path: path) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(socketDescriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard bound == 0, Glibc.listen(socketDescriptor, 128) == 0 else {
            let error = errno
            Glibc.close(socketDescriptor)
            throw SpindleError.system(error, operation: "listen", path: path)
        }
        startAccepting(socketDescriptor, label: path)
        return path
    }

    /// Listens on TCP at `host` (an IPv4 address; loopback unless told otherwise) and `port` (0 picks
    /// a free one). Returns the port.
    ///
    /// An address other machines can reach is refused unless TLS is required
    /// (``TLS/Mode/require``) or `allowPlaintext` says plaintext is meant (then a warning is logged):
    /// in plaintext, anyone who reaches the port reads and overwrites the exports.
    @discardableResult
    public func listen(host: String = "127.0.0.1", port: UInt16, allowPlaintext: Bool = false) throws(SpindleError)
        -> UInt16
    {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            throw SpindleError(.invalidArgument, "'\(host)' is not an IPv4 address", operation: "listen")
        }
        let loopback = UInt32(bigEndian: address.sin_addr.s_addr) >> 24 == 127
        if !loopback && tls.mode != .require {
            let plaintext =
                tls.mode == .on ? "with TLS only on offer (clients may still connect in plaintext)" : "in plaintext"
            guard allowPlaintext else {
                throw SpindleError(
                    .invalidArgument,
                    "serving \(host):\(port) \(plaintext) would let anyone who reaches it read and overwrite every export, with no authentication: require TLS, or allow plaintext explicitly (spindle serve --insecure)",
                    operation: "listen")
            }
            log(
                "warning: listening on \(host):\(port) \(plaintext), with no authentication: anyone who reaches it can read and overwrite the exports"
            )
        }
        let socketDescriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard socketDescriptor >= 0 else { throw SpindleError.system(errno, operation: "socket") }
        var one: Int32 = 1
        setsockopt(socketDescriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(socketDescriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, Glibc.listen(socketDescriptor, 128) == 0 else {
            let error = errno
            Glibc.close(socketDescriptor)
            throw SpindleError.system(error, operation: "listen on \(host):\(port)")
        }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socketDescriptor, $0, &length) }
        }
        startAccepting(socketDescriptor, label: "\(host):\(UInt16(bigEndian: actual.sin_port))")
        return UInt16(bigEndian: actual.sin_port)
    }

    private func startAccepting(_ listener: Int32, label: String) {
        state.withLock { $0.listeners.append(listener) }
        // accept(2) blocks: one thread per listener, which hands each connection to the engine.
        DispatchQueue(label: "spindle.nbd.accept").async { [self] in
            // Interrupted or aborted accepts are retried, a bounded number in a row; any other
            // failure (the listener closed by stop()) ends the loop.
            var failuresInARow = 0
            while true {
                var peer = sockaddr_storage()
                var peerLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let client = withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(listener, $0, &peerLength) }
                }
                if client < 0 {
                    failuresInARow += 1
                    if (errno == EINTR || errno == ECONNABORTED) && failuresInARow < 1000 { continue }
                    if failuresInARow >= 1000 {
                        self.log("stopped accepting on \(label): 1000 failed accepts in a row")
                    }
                    break
                }
                failuresInARow = 0
                _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                // Room for several 1 MiB replies and writes in the socket, so large requests move in
                // few system calls.
                var bufferBytes: Int32 = 4 << 20
                setsockopt(client, SOL_SOCKET, SO_SNDBUF, &bufferBytes, socklen_t(MemoryLayout<Int32>.size))
                setsockopt(client, SOL_SOCKET, SO_RCVBUF, &bufferBytes, socklen_t(MemoryLayout<Int32>.size))
                self.serve(client, peer: Self.describe(peer, listener: label))
            }
        }
    }

    /// Who a connection is from, for the log: `127.0.0.1:40222`, or the Unix socket it came in on.
    private static func describe(_ peer: sockaddr_storage, listener: String) -> String {
        guard peer.ss_family == sa_family_t(AF_INET) else { return "on \(listener)" }
        var address = peer
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { inet in
                var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
                var bytes = inet.pointee.sin_addr
                inet_ntop(AF_INET, &bytes, &text, socklen_t(text.count))
                let host = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                return "from \(host):\(UInt16(bigEndian: inet.pointee.sin_port))"
            }
        }
    }

    private func serve(_ client: Int32, peer: String) {
        let connection = NBDConnection(socket: client, server: self, peer: peer)
        let table = state
        table.withLock { current in
            guard !current.stopping else {
                Glibc.close(client)
                return
            }
            let id = current.nextConnection
            current.nextConnection += 1
            let task = Task(executorPreference: engine) {
                await connection.run(id: id)
                table.withLock { _ = $0.connections.removeValue(forKey: id) }
            }
            current.connections[id] = (client, task)
        }
    }

    /// Stops accepting, lets every connection finish the requests it has read (new ones are not
    /// read), waits for them, and flushes every writable export. The devices stay open (their owner
    /// closes them).
    public func stop() async {
        let (listeners, connections) = state.withLock { state in
            state.stopping = true
            let listeners = state.listeners
            state.listeners = []
            return (listeners, Array(state.connections.values))
        }
        for listener in listeners {
            Glibc.shutdown(listener, Int32(SHUT_RDWR))
            Glibc.close(listener)
        }
        // Ending the read side makes each connection see the end of its requests; replies still go out.
        for connection in connections { Glibc.shutdown(connection.socket, Int32(SHUT_RD)) }
        for connection in connections { await connection.task.value }
        for export in exports where !export.readOnly {
            do { try await export.device.flush() } catch {
                log("flush of export '\(export.name)' failed at stop: \(error)")
            }
        }
    }

    /// Connections open now.
    public var connectionCount: Int { state.withLock { $0.connections.count } }
}
