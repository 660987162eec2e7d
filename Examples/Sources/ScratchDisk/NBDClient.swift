import Foundation
import Glibc

/// A minimal NBD client on a blocking Unix socket: fixed newstyle negotiation with `NBD_OPT_GO`, then
/// READ, WRITE, FLUSH and DISC, one request at a time. It stands in for the VM, to check from this
/// process what a client sees; a real tool hands the URI to qemu or `nbd-client`.
final class NBDClient {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// The export's size and transmission flags (bit 1: read-only), as the server announced them.
    private(set) var sizeBytes: UInt64 = 0
    private(set) var flags: UInt16 = 0
    var isReadOnly: Bool { flags & (1 << 1) != 0 }
    private let socketDescriptor: Int32
    private var cookie: UInt64 = 0

    /// Connects to `export` on the server listening at `socketPath`.
    init(socketPath: String, export: String) throws {
        socketDescriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard socketDescriptor >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)  // a server that stops answering fails the check
        setsockopt(socketDescriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(socketDescriptor)
            throw Failure(description: "the socket path \(socketPath) is too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path + [0]) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socketDescriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            let error = errno
            close(socketDescriptor)
            throw Failure(description: "connect to \(socketPath): \(String(cString: strerror(error)))")
        }
        do {
            try negotiate(export: export)
        } catch {
            close(socketDescriptor)
            throw error
        }
    }

    deinit { close(socketDescriptor) }

    /// Reads `length` bytes at `offset`.
    func read(offset: UInt64, length: Int) throws -> [UInt8] {
        try request(command: 0, offset: offset, length: UInt32(length))
        return try receive(length)
    }

    /// Writes `bytes` at `offset`; with `fua`, durable once answered.
    func write(_ bytes: [UInt8], offset: UInt64, fua: Bool = false) throws {
        try request(command: 1, flags: fua ? 1 : 0, offset: offset, length: UInt32(bytes.count), payload: bytes)
    }

    func flush() throws {
        try request(command: 3, offset: 0, length: 0)
    }

    /// Says goodbye (NBD_CMD_DISC); the server closes the connection.
    func disconnect() throws {
        try send(requestHeader(command: 2, flags: 0, offset: 0, length: 0))
    }

    // MARK: Protocol

    private func negotiate(export: String) throws {
        let greeting = try receive(18)
        guard Self.value(UInt64.self, greeting, 0) == 0x4E42_444D_4147_4943,  // NBDMAGIC
            Self.value(UInt64.self, greeting, 8) == 0x4948_4156_454F_5054,  // IHAVEOPT
            Self.value(UInt16.self, greeting, 16) & 1 != 0  // fixed newstyle
        else { throw Failure(description: "not a fixed-newstyle NBD server") }
        try send(Self.bigEndian(UInt32(3)))  // fixed newstyle, no zeroes
        let name = Array(export.utf8)
        let data = Self.bigEndian(UInt32(name.count)) + name + Self.bigEndian(UInt16(0))  // no info requests
        let go = Self.bigEndian(UInt64(0x4948_4156_454F_5054)) + Self.bigEndian(UInt32(7))  // IHAVEOPT, NBD_OPT_GO
        try send(go + Self.bigEndian(UInt32(data.count)) + data)
        while true {
            let header = try receive(20)
            let type = Self.value(UInt32.self, header, 12)
            let reply = try receive(Int(Self.value(UInt32.self, header, 16)))
            switch type {
            case 1:  // ACK: transmission starts
                return
            case 3 where Self.value(UInt16.self, reply, 0) == 0:  // NBD_INFO_EXPORT: size and flags
                sizeBytes = Self.value(UInt64.self, reply, 2)
                flags = Self.value(UInt16.self, reply, 10)
            case 3:
                continue
            default:
                let message = String(decoding: reply, as: UTF8.self)
                throw Failure(description: "the server refused export '\(export)': \(message)")
            }
        }
    }

    /// Sends a request and waits for its reply header; throws the server's error number.
    private func request(
        command: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt32, payload: [UInt8] = []
    ) throws {
        cookie += 1
        try send(requestHeader(command: command, flags: flags, offset: offset, length: length) + payload)
        let reply = try receive(16)
        guard Self.value(UInt32.self, reply, 0) == 0x6744_6698, Self.value(UInt64.self, reply, 8) == cookie else {
            throw Failure(description: "a reply out of step with its request")
        }
        let error = Self.value(UInt32.self, reply, 4)
        guard error == 0 else {
            let reason = String(cString: strerror(Int32(error)))
            throw Failure(
                description: "the server answered command \(command) at \(offset) with error \(error) (\(reason))")
        }
    }

    /// A request's 28 bytes: magic, flags, command, cookie, offset, length.
    private func requestHeader(command: UInt16, flags: UInt16, offset: UInt64, length: UInt32) -> [UInt8] {
        Self.bigEndian(UInt32(0x2560_9513)) + Self.bigEndian(flags) + Self.bigEndian(command) + Self.bigEndian(cookie)
            + Self.bigEndian(offset) + Self.bigEndian(length)
    }

    private func send(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let sent = bytes[done...].withUnsafeBytes {
                Glibc.send(socketDescriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            if sent < 0 && errno == EINTR { continue }
            guard sent > 0 else { throw Failure(description: "send: \(String(cString: strerror(errno)))") }
            done += sent
        }
    }

    private func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes[done...].withUnsafeMutableBytes { recv(socketDescriptor, $0.baseAddress, $0.count, 0) }
            if got < 0 && errno == EINTR { continue }
            if got == 0 { throw Failure(description: "the server closed the connection") }
            guard got > 0 else { throw Failure(description: "recv: \(String(cString: strerror(errno)))") }
            done += got
        }
        return bytes
    }

    private static func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    private static func value<T: FixedWidthInteger>(_ type: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
        bytes.withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}

/// Runs blocking code (a socket client) on a thread of its own, so it holds none of the threads
/// Swift concurrency runs tasks on.
func onOwnThread<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) async throws -> Result {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Swift.Result { try body() }) }
    }
}
