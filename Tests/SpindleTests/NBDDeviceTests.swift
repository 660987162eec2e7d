import Foundation
import Glibc
import Testing

@testable import Spindle

/// nbdkit in another process on a Unix socket (in `folder`), killed when the test ends with it.
final class NBDKit {
    let process = Process()
    let socket: String

    init(_ arguments: [String], socket: String) throws {
        self.socket = socket
        unlink(socket)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["nbdkit", "--foreground", "--exit-with-parent", "-U", socket] + arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(15)
        while access(socket, F_OK) != 0 {
            guard process.isRunning, Date() < deadline else {
                throw SpindleError(.ioFailed, "nbdkit \(arguments.joined(separator: " ")) did not start")
            }
            usleep(10_000)
        }
    }

    /// The URI of its default export.
    var uri: String { "nbd+unix:///?socket=\(socket)" }

    func kill() {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { kill() }
}

@Suite("NBD client device", .serialized)
struct NBDDeviceTests {
    @Test("URIs as libnbd writes them: TCP with ports and IPv6, Unix sockets, escapes; bad ones named")
    func addresses() async throws {
        let cases: [(String, NBDAddress.Transport, String)] = [
            ("nbd://localhost/disk", .tcp(host: "localhost", port: 10809), "disk"),
            ("nbd://127.0.0.1:10810/a%20b/c", .tcp(host: "127.0.0.1", port: 10810), "a b/c"),
            ("nbd://[::1]:10811/x", .tcp(host: "::1", port: 10811), "x"),
            ("nbd://[::1]", .tcp(host: "::1", port: 10809), ""),
            ("nbd://host", .tcp(host: "host", port: 10809), ""),
            ("nbd+unix:///e?socket=/tmp/s.sock", .unix(path: "/tmp/s.sock"), "e"),
            ("nbd+unix:///?socket=/tmp/a%3Fb", .unix(path: "/tmp/a?b"), ""),
        ]
        for (text, transport, export) in cases {
            let address = try NBDAddress(parsing: text)
            #expect(address.transport == transport, "\(text)")
            #expect(address.exportName == export, "\(text)")
            #expect(try DeviceLocation(text).isRemote)
        }
        #expect(try DeviceLocation("pool.img") == .image(path: "pool.img"))
        for (text, fragment) in [
            ("nbd://", "no host"), ("nbd://host:99999/x", "bad port"), ("nbd://host:0/x", "bad port"),
            ("nbd+unix:///e", "no socket=PATH"), ("nbd+unix://host/e?socket=/s", "takes no host"),
            ("nbd://[::1/x", "unclosed IPv6"), ("nbd://h/%zz", "%-escape"), ("nbd://h/x?socket=/s", "nbd+unix"),
        ] {
            expectError(
                await spindleError { _ = try NBDAddress(parsing: text) }, .invalidArgument, [text, fragment])
        }
        expectError(
            await spindleError { _ = try DeviceLocation("nbds://h/x") }, .unsupported, ["nbds://h/x", "TLS"])
    }

    @Test(
        "against Spindle's own server: block sizes as offered, concurrent reads, writes, FUA, write-zeroes and flushes byte-exact; an unknown export named",
        arguments: [UInt64(1), 2])
    func againstSpindleServer(seed: UInt64) async throws {
        let disk = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096)
        let server = try TestServer([NBDServer.Export(name: "disk", device: disk)])
        let uri = "nbd+unix:///disk?socket=\(server.socketPath)"
        let device = try await NBDDevice.connect(uri, engine: server.engine)
        #expect(device.capacityBytes == 8 << 20)
        // Spindle's server takes any byte range (minimum 1), preferring the device's 4 KiB blocks.
        #expect(device.logicalBlockBytes == 512)
        #expect(device.info.preferredBlockBytes == 4096)
        #expect(device.info.sendsFlush && device.info.sendsFUA && device.info.sendsTrim)
        #expect(device.info.sendsWriteZeroes && !device.info.isReadOnly)
        #expect(!device.isReadOnly)
        let expected = try await exerciseConcurrently(device, engine: server.engine, tasks: 16, seed: seed)
        #expect(try await readAll(device) == expected)
        #expect(try await readAll(disk) == expected)
        expectError(
            await spindleError {
                try await device.read(into: AlignedBuffer(count: 256), at: 0)
            }, .misaligned, [uri])
        try await device.close()
        try await device.close()
        expectError(
            await spindleError { try await device.read(into: AlignedBuffer(count: 4096), at: 0) }, .closed, [uri])

        let wrong = "nbd+unix:///nope?socket=\(server.socketPath)"
        expectError(
            await spindleError { _ = try await NBDDevice.connect(wrong, engine: server.engine) }, .ioFailed,
            [wrong, "no export 'nope'"])
        await server.stop()
    }

    @Test(
        "against nbdkit: the server's block sizes split large requests; without write-zeroes, zeros are written; server errors named"
    )
    func againstNBDKit() async throws {
        let folder = TemporaryFolder("nbdkit")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let policy = try NBDKit(
            [
                "--filter=blocksize-policy", "--filter=nozero", "memory", "8M", "blocksize-minimum=4096",
                "blocksize-preferred=65536", "blocksize-maximum=65536", "blocksize-error-policy=error",
            ], socket: folder.file("policy.sock"))
        let device = try await NBDDevice.connect(policy.uri, engine: engine)
        #expect(device.logicalBlockBytes == 4096)
        #expect(device.maximumPayload == 65536)
        #expect(!device.info.sendsWriteZeroes, "the nozero filter takes write-zeroes away")
        // A 1 MiB + 12 KiB request at an odd block goes out as pieces of at most 64 KiB.
        let big = AlignedBuffer(count: (1 << 20) + 12288)
        fillRandom(big.bytes, seed: 9)
        try await device.write(from: big, at: 4096 * 3, fua: true)
        let back = AlignedBuffer(count: big.count)
        try await device.read(into: back, at: 4096 * 3)
        #expect(back.array == big.array)
        try await device.writeZeroes(offset: 4096 * 5, length: 4096 * 20)
        try await device.read(into: back, at: 4096 * 3)
        var model = big.array
        model.replaceSubrange((4096 * 2)..<(4096 * 22), with: repeatElement(0, count: 4096 * 20))
        #expect(back.array == model)
        let expected = try await exerciseConcurrently(device, engine: engine, tasks: 8, operationsPerTask: 100, seed: 5)
        #expect(try await readAll(device) == expected)
        try await device.close()
        policy.kill()

        let failing = try NBDKit(
            ["--filter=error", "memory", "4M", "error=EIO", "error-pread-rate=1"], socket: folder.file("error.sock"))
        let broken = try await NBDDevice.connect(failing.uri, engine: engine)
        expectError(
            await spindleError { try await broken.read(into: AlignedBuffer(count: 4096), at: 8192) }, .ioFailed,
            [failing.uri, "Input/output error", "8192"])
        // The connection is still good: writes go on.
        try await broken.write(from: AlignedBuffer(count: 4096), at: 0)
        try await broken.close()

        let readOnly = try NBDKit(["-r", "memory", "4M"], socket: folder.file("ro.sock"))
        let reader = try await NBDDevice.connect(readOnly.uri, engine: engine)
        #expect(reader.isReadOnly && reader.info.isReadOnly)
        expectError(
            await spindleError { try await reader.write(from: AlignedBuffer(count: 4096), at: 0) }, .readOnly,
            [readOnly.uri])
        try await reader.close()
    }

    @Test(
        "the server killed under load: requests in flight and later fail as the device gone, naming the URI; reconnect brings back the flushed data; a resized export is refused"
    )
    func connectionLoss() async throws {
        let folder = TemporaryFolder("nbdloss")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let image = folder.file("remote.img")
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        truncate(image, 16 << 20)
        let socket = folder.file("remote.sock")
        var server = try NBDKit(["file", image], socket: socket)
        let device = try await NBDDevice.connect(server.uri, engine: engine)
        try await device.reconnect()  // connected: nothing to do
        #expect(device.isConnected)
        let durable = AlignedBuffer(count: 1 << 20)
        fillRandom(durable.bytes, seed: 3)
        try await device.write(from: durable, at: 0)
        try await device.flush()

        let failures = Locked([SpindleError]())
        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<16 {
                group.addTask(executorPreference: engine) {
                    let buffer = AlignedBuffer(count: 64 << 10)
                    for step in 0..<100_000 {
                        do {
                            try await device.write(
                                from: buffer, at: UInt64(2 << 20) + UInt64((task * 7 + step) % 200) * 65536)
                        } catch let error as SpindleError {
                            failures.withLock { $0.append(error) }
                            return
                        }
                    }
                }
            }
            try await Task.sleep(nanoseconds: 200_000_000)
            server.kill()
            try await group.waitForAll()
        }
        let seen = failures.withLock { $0 }
        #expect(seen.count == 16, "every writer saw the loss")
        for error in seen { expectError(error, .deviceGone, [server.uri, "lost"]) }
        #expect(!device.isConnected)
        expectError(
            await spindleError { try await device.read(into: AlignedBuffer(count: 4096), at: 0) }, .deviceGone,
            [server.uri, "reconnect"])
        expectError(await spindleError { try await device.reconnect() }, .ioFailed, [server.uri])

        server = try NBDKit(["file", image], socket: socket)
        try await device.reconnect()
        #expect(device.isConnected)
        let back = AlignedBuffer(count: durable.count)
        try await device.read(into: back, at: 0)
        #expect(back.array == durable.array)
        server.kill()

        truncate(image, 8 << 20)
        server = try NBDKit(["file", image], socket: socket)
        expectError(
            await spindleError { try await device.reconnect() }, .invalidArgument,
            [server.uri, "8388608 bytes", "16777216"])
        try await device.close()
        server.kill()
    }

    @Test(
        "bad servers: nothing listening, no socket, not NBD, a reply cut off mid-data: each a clear error naming the URI"
    )
    func badServers() async throws {
        let folder = TemporaryFolder("nbdbad")
        defer { folder.remove() }
        let engine = try IOEngine()
        defer { engine.shutdown() }
        expectError(
            await spindleError { _ = try await NBDDevice.connect("nbd://127.0.0.1:1/x", engine: engine) }, .ioFailed,
            ["nbd://127.0.0.1:1/x", "nothing listens at 127.0.0.1:1"])
        let missing = "nbd+unix:///x?socket=\(folder.file("none.sock"))"
        expectError(
            await spindleError { _ = try await NBDDevice.connect(missing, engine: engine) }, .ioFailed,
            [missing, "there is no socket"])

        let notNBD = FakeServer(path: folder.file("http.sock")) { client in
            _ = "HTTP/1.1 400 Bad Request\r\n\r\n".withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        }
        expectError(
            await spindleError { _ = try await NBDDevice.connect(notNBD.uri, engine: engine) }, .ioFailed,
            [notNBD.uri, "not an NBD server"])
        notNBD.join()

        // Negotiates properly, then answers the first read with a header and half its data.
        let cutOff = FakeServer(path: folder.file("cut.sock")) { client in
            FakeServer.negotiate(client, size: 1 << 20)
            guard let request = FakeServer.receive(client, 28) else { return }
            var reply: [UInt8] = []
            NBDProtocol.append(NBDProtocol.simpleReplyMagic, to: &reply)
            NBDProtocol.append(UInt32(0), to: &reply)
            reply += request[8..<16]
            reply += [UInt8](repeating: 7, count: 100)
            FakeServer.send(client, reply)
        }
        let device = try await NBDDevice.connect(cutOff.uri, engine: engine)
        #expect(device.capacityBytes == 1 << 20)
        expectError(
            await spindleError { try await device.read(into: AlignedBuffer(count: 4096), at: 0) }, .deviceGone,
            [cutOff.uri, "closed the connection"])
        try await device.close()
        cutOff.join()
    }
}

@Suite("NBD client device in the CLI", .serialized)
struct NBDDeviceCLITests {
    @Test("spindle bench on an NBD URI verifies what it wrote; spindle serve proxies a remote export byte for byte")
    func benchAndProxy() async throws {
        let folder = TemporaryFolder("nbdcli")
        defer { folder.remove() }
        let remote = try NBDKit(["memory", "64M"], socket: folder.file("remote.sock"))
        let bench = try spindle([
            "bench", remote.uri, "--rw", "randrw", "--bs", "4K", "--iodepth", "16", "--ops", "4000", "--verify",
            "--size", "16M", "--json",
        ])
        #expect(bench.status == 0, "\(bench.errors)")
        let report = try JSONSerialization.jsonObject(with: Data(bench.output.utf8)) as? [String: Any]
        let inner = report?["report"] as? [String: Any]
        let written = (inner?["write"] as? [String: Any])?["operations"] as? Int ?? 0
        let read = (inner?["read"] as? [String: Any])?["operations"] as? Int ?? 0
        #expect(written + read >= 4000, "\(bench.output)")
        #expect(written > 0 && read > 0)

        let bad = try spindle(["bench", "nbd+unix:///x?socket=\(folder.file("none.sock"))", "--rw", "randread"])
        #expect(bad.status != 0)
        #expect(bad.errors.contains("there is no socket"), "\(bad.errors)")

        let proxySocket = folder.file("proxy.sock")
        let proxy = try ServeProcess([remote.uri, "--socket", proxySocket], directory: folder.path)
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let viaProxy = try await NBDDevice.connect("nbd+unix:///remote?socket=\(proxySocket)", engine: engine)
        let direct = try await NBDDevice.connect(remote.uri, engine: engine)
        #expect(viaProxy.capacityBytes == 64 << 20)
        let buffer = AlignedBuffer(count: 3 << 20)
        fillRandom(buffer.bytes, seed: 11)
        try await viaProxy.write(from: buffer, at: 5 << 20, fua: true)
        try await viaProxy.writeZeroes(offset: 6 << 20, length: 8192)
        try await viaProxy.flush()
        let back = AlignedBuffer(count: buffer.count)
        try await direct.read(into: back, at: 5 << 20)
        var expected = buffer.array
        expected.replaceSubrange((1 << 20)..<((1 << 20) + 8192), with: repeatElement(0, count: 8192))
        #expect(back.array == expected)
        try await viaProxy.close()
        try await direct.close()
        let stopped = proxy.stop()
        #expect(stopped.status == 0, "\(stopped.errors)")
        #expect(stopped.output.contains("stopped cleanly"), "\(stopped.output)")
    }
}

/// A one-connection server on a Unix socket that runs `serve` for its client on a thread, then closes.
final class FakeServer: @unchecked Sendable {
    let path: String
    private let done = DispatchSemaphore(value: 0)
    var uri: String { "nbd+unix:///?socket=\(path)" }

    init(path: String, serve: @escaping @Sendable (Int32) -> Void) {
        self.path = path
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
        }
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        listen(listener, 1)
        let done = self.done
        DispatchQueue.global().async {
            let client = accept(listener, nil, nil)
            if client >= 0 {
                serve(client)
                close(client)
            }
            close(listener)
            done.signal()
        }
    }

    func join() { done.wait() }

    static func receive(_ socket: Int32, _ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes { recv(socket, $0.baseAddress! + done, count - done, 0) }
            guard got > 0 else { return nil }
            done += got
        }
        return bytes
    }

    static func send(_ socket: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(socket, $0.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL)) }
    }

    /// The server's half of a fixed newstyle `NBD_OPT_GO`, offering an export of `size` bytes.
    static func negotiate(_ client: Int32, size: UInt64) {
        var greeting: [UInt8] = []
        NBDProtocol.append(NBDProtocol.initialMagic, to: &greeting)
        NBDProtocol.append(NBDProtocol.optionMagic, to: &greeting)
        NBDProtocol.append(NBDProtocol.flagFixedNewstyle | NBDProtocol.flagNoZeroes, to: &greeting)
        send(client, greeting)
        guard receive(client, 4) != nil, let header = receive(client, 16) else { return }
        let length = Int(NBDProtocol.bigEndian(UInt32.self, header, 12))
        guard receive(client, length) != nil else { return }
        var info: [UInt8] = []
        NBDProtocol.append(NBDProtocol.Info.export.rawValue, to: &info)
        NBDProtocol.append(size, to: &info)
        NBDProtocol.append(NBDProtocol.TransmissionFlags.hasFlags.rawValue, to: &info)
        send(client, NBDProtocol.optionReply(option: 7, reply: NBDProtocol.Reply.info.rawValue, data: info))
        send(client, NBDProtocol.optionReply(option: 7, reply: NBDProtocol.Reply.ack.rawValue, data: []))
    }
}
