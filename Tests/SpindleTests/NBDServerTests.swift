import Foundation
import Glibc
import Testing

@testable import Spindle

/// A deliberately plain NBD client on a blocking socket, to speak the protocol byte by byte —
/// including the wrong bytes.
final class RawNBDClient {
    let socketDescriptor: Int32

    init(unixSocket path: String) throws {
        socketDescriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8))
            raw[path.utf8.count] = 0
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(socketDescriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socketDescriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else { throw SpindleError.system(errno, operation: "connect", path: path) }
    }

    deinit { close(socketDescriptor) }

    func send(_ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let count = bytes[done...].withUnsafeBytes {
                Glibc.send(socketDescriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            if count <= 0 { return }
            done += count
        }
    }

    /// Exactly `count` bytes, or nil when the server closed the connection first.
    func receive(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes[done...].withUnsafeMutableBytes { recv(socketDescriptor, $0.baseAddress, $0.count, 0) }
            if got <= 0 { return nil }
            done += got
        }
        return bytes
    }

    /// Whether the server closed the connection (reads return end of file).
    var isClosedByServer: Bool {
        var byte: UInt8 = 0
        return recv(socketDescriptor, &byte, 1, 0) == 0
    }

    static func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.bigEndian) { Array($0) } }
    static func read<T: FixedWidthInteger>(_ type: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
        bytes.withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    /// Reads the greeting and answers with fixed newstyle and no zeroes.
    func greet() throws {
        let greeting = try #require(receive(18))
        #expect(Self.read(UInt64.self, greeting, 0) == 0x4E42_444D_4147_4943)
        #expect(Self.read(UInt64.self, greeting, 8) == 0x4948_4156_454F_5054)
        #expect(Self.read(UInt16.self, greeting, 16) & 3 == 3)
        send(Self.be(UInt32(3)))
    }

    func option(_ code: UInt32, _ data: [UInt8]) {
        send(Self.be(UInt64(0x4948_4156_454F_5054)) + Self.be(code) + Self.be(UInt32(data.count)) + data)
    }

    /// One option reply: (reply type, data), or nil when closed.
    func optionReply() -> (type: UInt32, data: [UInt8])? {
        guard let header = receive(20) else { return nil }
        #expect(Self.read(UInt64.self, header, 0) == 0x0003_E889_0455_65A9)
        let length = Int(Self.read(UInt32.self, header, 16))
        guard let data = receive(length) else { return nil }
        return (Self.read(UInt32.self, header, 12), data)
    }

    static func infoRequest(_ name: String, items: [UInt16] = []) -> [UInt8] {
        be(UInt32(name.utf8.count)) + Array(name.utf8) + be(UInt16(items.count)) + items.flatMap { be($0) }
    }

    /// Negotiates `name` with NBD_OPT_GO; returns (size, transmission flags, preferred block).
    func go(_ name: String) throws -> (size: UInt64, flags: UInt16, preferredBlock: UInt32) {
        try greet()
        option(7, Self.infoRequest(name, items: [3]))
        var size: UInt64 = 0
        var flags: UInt16 = 0
        var minimum: UInt32 = 0
        while let reply = optionReply() {
            if reply.type == 1 { return (size, flags, minimum) }
            try #require(
                reply.type == 3, "GO failed: reply \(reply.type) \(String(decoding: reply.data, as: UTF8.self))")
            switch Self.read(UInt16.self, reply.data, 0) {
            case 0:
                size = Self.read(UInt64.self, reply.data, 2)
                flags = Self.read(UInt16.self, reply.data, 10)
            case 3:
                minimum = Self.read(UInt32.self, reply.data, 6)
            default:
                break
            }
        }
        throw SpindleError(.closed, "the server closed the connection during GO")
    }

    func request(
        _ type: UInt16, offset: UInt64, length: UInt32, cookie: UInt64, flags: UInt16 = 0, payload: [UInt8] = []
    ) {
        send(
            Self.be(UInt32(0x2560_9513)) + Self.be(flags) + Self.be(type) + Self.be(cookie) + Self.be(offset)
                + Self.be(length) + payload)
    }

    /// A simple reply: (error, cookie), plus `dataLength` bytes of data when the error is 0.
    func reply(dataLength: Int = 0) -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let header = receive(16) else { return nil }
        #expect(Self.read(UInt32.self, header, 0) == 0x6744_6698)
        let error = Self.read(UInt32.self, header, 4)
        let data = error == 0 && dataLength > 0 ? receive(dataLength) ?? [] : []
        return (error, Self.read(UInt64.self, header, 8), data)
    }
}

/// A device whose reads of its first block wait: lets a test see replies overtake each other.
final class SlowFirstBlockDevice: BlockDevice {
    let inner: MemoryDevice
    var logicalBlockBytes: Int { inner.logicalBlockBytes }
    var capacityBytes: UInt64 { inner.capacityBytes }
    var isReadOnly: Bool { false }
    var discardReadsZeroes: Bool { true }
    var name: String { "slow-first-block" }

    init(_ inner: MemoryDevice) { self.inner = inner }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        if offset == 0 { try await Task.sleep(for: .milliseconds(300)) }
        try await inner.read(into: buffer, at: offset)
    }
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try await inner.write(from: buffer, at: offset, fua: fua)
    }
    func flush() async throws { try await inner.flush() }
    func discard(offset: UInt64, length: UInt64) async throws {
        try await inner.discard(offset: offset, length: length)
    }
    func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await inner.writeZeroes(offset: offset, length: length)
    }
    func close() async throws {}
}

/// A server on a Unix socket in a temporary folder, with a log to inspect.
final class TestServer {
    let folder = TemporaryFolder("nbd")
    let engine: IOEngine
    let server: NBDServer
    let socketPath: String
    let logLines = Locked([String]())

    init(_ exports: [NBDServer.Export], tls: NBDServer.TLS = .off) throws {
        engine = try IOEngine()
        let lines = logLines
        server = try NBDServer(exports: exports, engine: engine, tls: tls) { line in
            lines.withLock { $0.append(line) }
        }
        socketPath = folder.file("nbd.sock")
        try server.listen(unixSocket: socketPath)
    }

    func client() throws -> RawNBDClient { try RawNBDClient(unixSocket: socketPath) }

    var log: [String] { logLines.withLock { $0 } }

    func stop() async {
        await server.stop()
        engine.shutdown()
        folder.remove()
    }
}

@Suite("NBD server", .serialized)
struct NBDServerTests {
    @Test("negotiation: list, info with block sizes, unknown exports and options refused, go")
    func negotiation() async throws {
        let disk = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let other = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 512)
        let test = try TestServer([
            NBDServer.Export(name: "disk", device: disk, description: "the disk"),
            NBDServer.Export(name: "small", device: other, readOnly: true),
        ])
        let client = try test.client()
        try client.greet()
        client.option(3, [])  // LIST
        var names: [String] = []
        while let reply = client.optionReply(), reply.type == 2 {
            let length = Int(RawNBDClient.read(UInt32.self, reply.data, 0))
            names.append(String(decoding: reply.data[4..<(4 + length)], as: UTF8.self))
        }
        #expect(names == ["disk", "small"])
        client.option(99, [1, 2, 3])  // unknown option: refused, negotiation goes on
        #expect(client.optionReply()?.type == 0x8000_0001)
        client.option(6, RawNBDClient.infoRequest("nope"))
        let unknown = try #require(client.optionReply())
        #expect(
            unknown.type == 0x8000_0006
                && String(decoding: unknown.data, as: UTF8.self).contains("no export named 'nope'"))
        client.option(6, [0, 0, 0, 9, 1])  // malformed INFO data
        #expect(client.optionReply()?.type == 0x8000_0003)
        client.option(6, RawNBDClient.infoRequest("small", items: [3]))
        var sawExport = false
        var sawBlockSize = false
        while let reply = client.optionReply(), reply.type == 3 {
            switch RawNBDClient.read(UInt16.self, reply.data, 0) {
            case 0:
                sawExport = true
                #expect(RawNBDClient.read(UInt64.self, reply.data, 2) == 1 << 20)
                let flags = RawNBDClient.read(UInt16.self, reply.data, 10)
                #expect(flags & 2 != 0, "read-only flag")
                #expect(flags & (1 << 5) == 0, "no trim on a read-only export")
            case 3:
                sawBlockSize = true
                #expect(RawNBDClient.read(UInt32.self, reply.data, 2) == 1, "any alignment is served")
                #expect(RawNBDClient.read(UInt32.self, reply.data, 6) == 4096, "the device's block is preferred")
                #expect(RawNBDClient.read(UInt32.self, reply.data, 10) == NBDServer.maximumRequestBytes)
            default: break
            }
        }
        #expect(sawExport && sawBlockSize)
        client.option(7, RawNBDClient.infoRequest("disk"))
        var info = client.optionReply()
        while let reply = info, reply.type == 3 { info = client.optionReply() }
        #expect(info?.type == 1, "GO acknowledged")
        client.request(0, offset: 0, length: 4096, cookie: 1)
        #expect(client.reply(dataLength: 4096)?.error == 0)
        await test.stop()
    }

    @Test("many requests in flight on one connection, answered as they complete; data round-trips")
    func pipelined() async throws {
        let memory = try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096)
        let test = try TestServer([NBDServer.Export(name: "d", device: SlowFirstBlockDevice(memory))])
        let client = try test.client()
        let negotiated = try client.go("d")
        #expect(negotiated.size == 4 << 20 && negotiated.preferredBlock == 4096)
        #expect(negotiated.flags & (1 << 8) != 0, "multi-conn is advertised")
        var model = [UInt8](repeating: 0, count: 4 << 20)
        var random = SeededRandom(seed: 9)
        for cookie in UInt64(1)...64 {
            let block = Int(random.below(1024))
            let data = (0..<4096).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            model.replaceSubrange((block * 4096)..<((block + 1) * 4096), with: data)
            client.request(1, offset: UInt64(block * 4096), length: 4096, cookie: cookie, payload: data)
        }
        var answered = Set<UInt64>()
        for _ in 0..<64 {
            let reply = try #require(client.reply())
            #expect(reply.error == 0)
            answered.insert(reply.cookie)
        }
        #expect(answered == Set(1...64))
        client.request(3, offset: 0, length: 0, cookie: 100)  // flush
        #expect(client.reply()?.cookie == 100)

        // The slow read of block 0 is answered after the quick read sent after it.
        client.request(0, offset: 0, length: 4096, cookie: 200)
        client.request(0, offset: 4096, length: 4096, cookie: 201)
        let first = try #require(client.reply(dataLength: 4096))
        let second = try #require(client.reply(dataLength: 4096))
        #expect(first.cookie == 201 && second.cookie == 200, "replies go out as requests complete")
        #expect(second.data == Array(model[0..<4096]) && first.data == Array(model[4096..<8192]))
        for block in stride(from: 0, to: 1024, by: 64) {
            client.request(0, offset: UInt64(block * 4096), length: 64 * 4096, cookie: UInt64(block))
            let reply = try #require(client.reply(dataLength: 64 * 4096))
            #expect(byteDifference(reply.data, Array(model[(block * 4096)..<((block + 64) * 4096)])) == nil)
        }
        client.request(2, offset: 0, length: 0, cookie: 0)  // disconnect
        #expect(client.isClosedByServer)
        await test.stop()
    }

    @Test("bad requests get the protocol's errors and change nothing; a broken stream closes only its own connection")
    func badInput() async throws {
        let memory = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        let frozen = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        let test = try TestServer([
            NBDServer.Export(name: "rw", device: memory), NBDServer.Export(name: "ro", device: frozen, readOnly: true),
        ])
        let good = try test.client()
        _ = try good.go("rw")
        let data = [UInt8](repeating: 0x77, count: 4096)
        good.request(1, offset: 0, length: 4096, cookie: 1, payload: data)
        #expect(good.reply()?.error == 0)

        let bad = try test.client()
        _ = try bad.go("rw")
        bad.request(0, offset: 1 << 20, length: 4096, cookie: 1)  // past the end
        #expect(bad.reply()?.error == 22)
        bad.request(1, offset: (1 << 20) - 4096, length: 8192, cookie: 2, payload: [UInt8](repeating: 1, count: 8192))
        #expect(bad.reply()?.error == 28, "a write past the end: ENOSPC")
        // Requests off the device's 4 KiB blocks are served by read-modify-write.
        bad.request(1, offset: 16384 + 512, length: 512, cookie: 3, payload: [UInt8](repeating: 9, count: 512))
        #expect(bad.reply()?.error == 0)
        bad.request(1, offset: 16384 + 1024 + 100, length: 50, cookie: 4, payload: [UInt8](repeating: 8, count: 50))
        #expect(bad.reply()?.error == 0)
        bad.request(0, offset: 16384 + 500, length: 700, cookie: 5)
        let unaligned = try #require(bad.reply(dataLength: 700))
        var expectedBytes = [UInt8](repeating: 0, count: 700)
        expectedBytes.replaceSubrange(12..<524, with: repeatElement(9, count: 512))
        expectedBytes.replaceSubrange(624..<674, with: repeatElement(8, count: 50))
        #expect(unaligned.error == 0 && unaligned.data == expectedBytes)
        bad.request(0, offset: 0, length: 64 << 20, cookie: 5)  // oversized read
        #expect(bad.reply()?.error == 75)
        bad.request(42, offset: 0, length: 0, cookie: 6)  // unknown command
        #expect(bad.reply()?.error == 22)
        bad.request(1, offset: 0, length: 64 << 20, cookie: 7)  // a 64 MiB write: the stream is refused
        #expect(bad.isClosedByServer)

        let readOnly = try test.client()
        _ = try readOnly.go("ro")
        readOnly.request(1, offset: 0, length: 4096, cookie: 1, payload: data)
        #expect(readOnly.reply()?.error == 1, "EPERM on a read-only export")
        readOnly.request(4, offset: 0, length: 4096, cookie: 2)
        #expect(readOnly.reply()?.error == 1)
        readOnly.request(0, offset: 0, length: 4096, cookie: 3)
        #expect(
            readOnly.reply(dataLength: 4096)?.data == [UInt8](repeating: 0, count: 4096),
            "the payload was consumed; reads go on")

        let garbage = try test.client()
        _ = try garbage.go("rw")
        garbage.send([UInt8](repeating: 0xAB, count: 28))  // no request magic
        #expect(garbage.isClosedByServer)

        let handshake = try test.client()
        _ = handshake.receive(18)
        handshake.send(RawNBDClient.be(UInt32(0)))  // not fixed newstyle
        #expect(handshake.isClosedByServer)

        // A client that goes away in the middle of a write's data: nothing of it is written.
        let quitter = try test.client()
        _ = try quitter.go("rw")
        quitter.request(1, offset: 8192, length: 8192, cookie: 1, payload: [UInt8](repeating: 0xEE, count: 5000))
        close(quitter.socketDescriptor)
        try await Task.sleep(for: .milliseconds(200))

        // The well-behaved client never noticed.
        good.request(0, offset: 0, length: 12288, cookie: 2)
        let reply = try #require(good.reply(dataLength: 12288))
        #expect(reply.error == 0 && Array(reply.data[0..<4096]) == data)
        #expect(reply.data[4096...].allSatisfy { $0 == 0 }, "no partial or refused write landed")
        let log = test.log
        #expect(log.contains { $0.contains("past the end of the export") })
        #expect(log.contains { $0.contains("a request without the request magic; closing") })
        #expect(log.contains { $0.contains("the export is read-only") })
        #expect(log.contains { $0.contains("does not speak fixed newstyle") })
        await test.stop()
    }

    @Test("stop finishes requests in flight and flushes the exports")
    func stopFlushes() async throws {
        let inner = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        let faulty = FaultyDevice(wrapping: inner, seed: 1, volatileCache: true)
        let test = try TestServer([NBDServer.Export(name: "v", device: faulty)])
        let client = try test.client()
        _ = try client.go("v")
        client.request(1, offset: 0, length: 4096, cookie: 1, payload: [UInt8](repeating: 0x42, count: 4096))
        #expect(client.reply()?.error == 0)
        #expect(faulty.unflushedWrites == 1)
        await test.server.stop()
        #expect(faulty.unflushedWrites == 0, "stop flushed the export")
        try await faulty.powerCut()
        let check = AlignedBuffer(count: 4096)
        try await inner.read(into: check, at: 0)
        #expect(check.array.allSatisfy { $0 == 0x42 })
        test.engine.shutdown()
        test.folder.remove()
    }
}
