import Foundation
import Testing

@testable import Spindle

@Suite("NBD over TLS (nbdinfo, nbdcopy, qemu-img; pre-shared keys and certificates; bad input)", .serialized)
struct NBDTLSTests {
    /// 24 MiB of seeded bytes with a run of zeros in the middle.
    static func sourceFile(in folder: TemporaryFolder) throws -> String {
        let path = folder.file("source.bin")
        var random = SeededRandom(seed: 18)
        var bytes = [UInt8](repeating: 0, count: 24 << 20)
        for index in stride(from: 0, to: bytes.count, by: 8) where (index >> 20) % 4 != 2 {
            withUnsafeBytes(of: random.next()) { bytes.replaceSubrange(index..<(index + 8), with: $0) }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    static func same(_ first: String, _ second: String) throws -> Bool {
        try Data(contentsOf: URL(fileURLWithPath: first)) == Data(contentsOf: URL(fileURLWithPath: second))
    }

    static func port(of server: ServeProcess) throws -> UInt16 {
        let uri = try #require(server.uri("nbds://"))
        return try #require(UInt16(uri.split(separator: ":")[2].split(separator: "/")[0]))
    }

    @Test("PSK: nbdcopy and qemu-img copy in and out byte for byte over TCP and a Unix socket; plaintext is refused")
    func preSharedKeys() throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let folder = tls.folder
        #expect(try spindle(["image", "create", folder.file("disk.img"), "--size", "32M"]).status == 0)
        let source = try Self.sourceFile(in: folder)
        let server = try ServeProcess(
            [
                "image:\(folder.file("disk.img"))", "--tcp", "127.0.0.1:0", "--socket", folder.file("s.sock"),
                "--tls-psk", tls.keys,
            ], directory: folder.path)
        #expect(server.lines.contains { $0.contains("TLS required") })
        let port = try Self.port(of: server)
        let uri = TLSFixture.pskURI(port: port, export: "disk.img", keys: tls.keys)

        let copiedIn = try tool(["nbdcopy", source, uri])
        #expect(copiedIn.status == 0, "\(copiedIn.errors)")
        let back = folder.file("back.bin")
        let copiedOut = try tool(["nbdcopy", uri, back])
        #expect(copiedOut.status == 0, "\(copiedOut.errors)")
        #expect(
            try Data(contentsOf: URL(fileURLWithPath: back)).prefix(24 << 20)
                == Data(contentsOf: URL(fileURLWithPath: source)))

        let unixURI =
            "nbds+unix://alice@/disk.img?socket=\(folder.file("s.sock"))&tls-psk-file=\(tls.keys)"
        let unixSize = try tool(["nbdinfo", "--size", unixURI])
        #expect(unixSize.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(32 << 20)", "\(unixSize.errors)")

        let viaQemu = folder.file("qemu.raw")
        let qemu = try tool([
            "qemu-img", "convert", "-O", "raw", "--object",
            "tls-creds-psk,id=tls0,endpoint=client,dir=\(tls.qemuKeys),username=alice", "--image-opts",
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=\(port),export=disk.img,tls-creds=tls0",
            viaQemu,
        ])
        #expect(qemu.status == 0, "\(qemu.errors)")
        #expect(try Self.same(viaQemu, back))

        // The same clients without TLS get nothing.
        let plain = try tool(["nbdinfo", "nbd://127.0.0.1:\(port)/disk.img"])
        #expect(plain.status != 0)
        let plainCopy = try tool(["nbdcopy", "nbd://127.0.0.1:\(port)/disk.img", folder.file("leak.bin")])
        #expect(plainCopy.status != 0)
        let leaked = (try? Data(contentsOf: URL(fileURLWithPath: folder.file("leak.bin")))) ?? Data()
        #expect(leaked.allSatisfy { $0 == 0 })
        let stopped = server.stop()
        #expect(stopped.status == 0)
        #expect(stopped.errors.contains("TLS started ((TLS1.3)"), "\(stopped.errors)")
        #expect(stopped.errors.contains("PSK user 'alice'"))
        #expect(stopped.errors.contains("this server requires TLS: send NBD_OPT_STARTTLS first"))
        #expect(stopped.output.contains("stopped cleanly"))
    }

    @Test("Certificates: clients with a certificate copy byte for byte; without one, or from another CA, are refused")
    func certificates() throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let folder = tls.folder
        #expect(try spindle(["image", "create", folder.file("disk.img"), "--size", "32M"]).status == 0)
        let source = try Self.sourceFile(in: folder)
        let server = try ServeProcess(
            [
                "image:\(folder.file("disk.img"))", "--tcp", "127.0.0.1:0", "--tls-certificates", tls.server,
                "--tls-verify-peer",
            ], directory: folder.path)
        let port = try Self.port(of: server)
        let uri = TLSFixture.certificateURI(port: port, export: "disk.img", directory: tls.client)
        let copiedIn = try tool(["nbdcopy", source, uri])
        #expect(copiedIn.status == 0, "\(copiedIn.errors)")
        let viaQemu = folder.file("qemu.raw")
        let qemu = try tool([
            "qemu-img", "convert", "-O", "raw", "--object",
            "tls-creds-x509,id=tls0,endpoint=client,dir=\(tls.client),verify-peer=on", "--image-opts",
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=\(port),export=disk.img,tls-creds=tls0",
            viaQemu,
        ])
        #expect(qemu.status == 0, "\(qemu.errors)")
        #expect(
            try Data(contentsOf: URL(fileURLWithPath: viaQemu)).prefix(24 << 20)
                == Data(contentsOf: URL(fileURLWithPath: source)))

        let anonymous = try tool([
            "nbdinfo", TLSFixture.certificateURI(port: port, export: "disk.img", directory: tls.anonymousClient),
        ])
        #expect(anonymous.status != 0)
        let untrusted = try tool([
            "nbdinfo", TLSFixture.certificateURI(port: port, export: "disk.img", directory: tls.untrustedClient),
        ])
        #expect(untrusted.status != 0)
        // Still serving the good client after the refusals.
        let again = try tool(["nbdinfo", "--size", uri])
        #expect(again.output.contains("\(32 << 20)"), "\(again.errors)")
        let stopped = server.stop()
        #expect(stopped.errors.contains("client certificate 'CN=spindle-test-client'"), "\(stopped.errors)")
        #expect(stopped.errors.contains("the client sent no certificate"), "\(stopped.errors)")
        #expect(stopped.errors.contains("the client's certificate was refused"), "\(stopped.errors)")
        #expect(stopped.errors.contains("The certificate issuer is unknown"), "\(stopped.errors)")
    }

    @Test("An expired server certificate: a warning at start, the client refuses it, the server logs that it did")
    func expiredCertificate() throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let folder = tls.folder
        #expect(try spindle(["image", "create", folder.file("disk.img"), "--size", "8M"]).status == 0)
        let server = try ServeProcess(
            ["image:\(folder.file("disk.img"))", "--tcp", "127.0.0.1:0", "--tls-certificates", tls.expiredServer],
            directory: folder.path)
        let port = try Self.port(of: server)
        let refused = try tool([
            "nbdinfo", TLSFixture.certificateURI(port: port, export: "disk.img", directory: tls.client),
        ])
        #expect(refused.status != 0)
        #expect(refused.errors.contains("expired") || refused.errors.contains("certificate"), "\(refused.errors)")
        let stopped = server.stop()
        #expect(stopped.errors.contains("server-cert.pem expired on 2020-06-01"), "\(stopped.errors)")
        #expect(stopped.errors.contains("after this server's hello"), "\(stopped.errors)")
    }

    @Test(
        "Bad input: wrong key, unknown user, no STARTTLS, data with STARTTLS, a cut-off handshake, garbage; a live client is unaffected"
    )
    func badInput() async throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let device = try MemoryDevice(capacityBytes: 8 << 20)
        let credentials = try TLSCredentials.preSharedKeys(file: tls.keys)
        #expect(credentials.warnings.isEmpty)
        let test = try TestServer(
            [NBDServer.Export(name: "mem", device: device)],
            tls: try NBDServer.TLS(mode: .require, credentials: credentials))
        let port = try test.server.listen(host: "127.0.0.1", port: 0)
        let live = try LongLivedNBDClient(uri: TLSFixture.pskURI(port: port, export: "mem", keys: tls.keys))

        let wrong = try tool(["nbdinfo", TLSFixture.pskURI(port: port, export: "mem", keys: tls.wrongKey)])
        #expect(wrong.status != 0)
        let unknown = try tool([
            "nbdinfo", TLSFixture.pskURI(port: port, export: "mem", keys: tls.stranger, user: "mallory"),
        ])
        #expect(unknown.status != 0)

        // A client that skips STARTTLS: options are answered NBD_REP_ERR_TLS_REQD; EXPORT_NAME,
        // which cannot be answered with an error, closes the connection.
        let plain = try test.client()
        try plain.greet()
        plain.option(6, RawNBDClient.infoRequest("mem"))
        let info = try #require(plain.optionReply())
        #expect(info.type == 0x8000_0005)
        #expect(String(decoding: info.data, as: UTF8.self).contains("requires TLS"))
        plain.option(3, [])
        #expect(plain.optionReply()?.type == 0x8000_0005)
        plain.option(1, Array("mem".utf8))
        #expect(plain.isClosedByServer)

        // STARTTLS with data is refused (and the connection goes on in plaintext, TLS still required).
        let withData = try test.client()
        try withData.greet()
        withData.option(5, [1, 2, 3])
        #expect(withData.optionReply()?.type == 0x8000_0003)
        withData.option(7, RawNBDClient.infoRequest("mem"))
        #expect(withData.optionReply()?.type == 0x8000_0005)

        // A handshake cut off after half a ClientHello.
        let cut = try test.client()
        try cut.greet()
        cut.option(5, [])
        #expect(cut.optionReply()?.type == 1)
        cut.send([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03])
        shutdown(cut.socketDescriptor, Int32(SHUT_WR))
        #expect(cut.isClosedByServer)

        // Garbage where the ClientHello should be.
        let garbage = try test.client()
        try garbage.greet()
        garbage.option(5, [])
        #expect(garbage.optionReply()?.type == 1)
        var random = SeededRandom(seed: 5)
        garbage.send((0..<512).map { _ in UInt8(truncatingIfNeeded: random.next()) })
        var closed = false
        for _ in 0..<64 where !closed {
            var byte = [UInt8](repeating: 0, count: 256)
            closed = recv(garbage.socketDescriptor, &byte, 256, 0) <= 0
        }
        #expect(closed)

        let finished = live.finish()
        #expect(finished.ok, "\(finished.errors)")
        let good = try tool(["nbdinfo", "--size", TLSFixture.pskURI(port: port, export: "mem", keys: tls.keys)])
        #expect(good.output.contains("\(8 << 20)"), "\(good.errors)")
        await test.stop()
        let log = test.log.joined(separator: "\n")
        #expect(log.contains("PSK user 'alice' is known; the client's key for it is probably wrong"), "\(log)")
        #expect(log.contains("the client named PSK user 'mallory', who is not in the key file"), "\(log)")
        #expect(log.contains("refused option 6 (info): this server requires TLS"), "\(log)")
        #expect(log.contains("NBD_OPT_EXPORT_NAME without TLS"), "\(log)")
        #expect(log.contains("NBD_OPT_STARTTLS takes no data"), "\(log)")
        #expect(log.contains("the TLS handshake was cut off"), "\(log)")
        #expect(log.contains("from 127.0.0.1:"), "\(log)")
        #expect(log.contains("the TLS handshake failed"), "\(log)")
    }

    @Test("A TLS client against a server without TLS is refused; STARTTLS twice is refused")
    func startTLSPolicies() async throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let plainServer = try TestServer([
            NBDServer.Export(name: "mem", device: try MemoryDevice(capacityBytes: 1 << 20))
        ])
        let plainPort = try plainServer.server.listen(host: "127.0.0.1", port: 0)
        let refused = try tool(["nbdinfo", TLSFixture.pskURI(port: plainPort, export: "mem", keys: tls.keys)])
        #expect(refused.status != 0)
        await plainServer.stop()
        #expect(plainServer.log.contains { $0.contains("this server does not offer TLS") }, "\(plainServer.log)")

        // TLS on offer: plaintext and TLS clients are both served.
        let credentials = try TLSCredentials.preSharedKeys(file: tls.keys)
        let optional = try TestServer(
            [NBDServer.Export(name: "mem", device: try MemoryDevice(capacityBytes: 1 << 20))],
            tls: try NBDServer.TLS(mode: .on, credentials: credentials))
        let port = try optional.server.listen(host: "127.0.0.1", port: 0)
        #expect(try tool(["nbdinfo", "--size", "nbd://127.0.0.1:\(port)/mem"]).output.contains("\(1 << 20)"))
        #expect(
            try tool(["nbdinfo", "--size", TLSFixture.pskURI(port: port, export: "mem", keys: tls.keys)]).output
                .contains(
                    "\(1 << 20)"))
        await optional.stop()
        #expect(optional.log.contains { $0.contains("TLS started") })
    }

    @Test("Safe defaults: an address other machines reach needs TLS required or --insecure (then a warning)")
    func safeDefaults() async throws {
        let tls = try TLSFixture()
        defer { tls.remove() }
        let folder = tls.folder
        #expect(try spindle(["image", "create", folder.file("disk.img"), "--size", "8M"]).status == 0)
        let image = "image:\(folder.file("disk.img"))"
        let plain = try spindle(["serve", image, "--tcp", "0.0.0.0:0", "--dir", folder.path])
        #expect(plain.status != 0)
        #expect(
            plain.errors.contains("in plaintext would let anyone who reaches it read and overwrite"), "\(plain.errors)")
        #expect(plain.errors.contains("--insecure"))
        let optional = try spindle([
            "serve", image, "--tcp", "0.0.0.0:0", "--tls", "on", "--tls-psk", tls.keys, "--dir", folder.path,
        ])
        #expect(optional.status != 0)
        #expect(optional.errors.contains("clients may still connect in plaintext"), "\(optional.errors)")

        let insecure = try ServeProcess([image, "--tcp", "0.0.0.0:0", "--insecure"], directory: folder.path)
        let insecureStop = insecure.stop()
        #expect(insecureStop.errors.contains("warning: listening on 0.0.0.0:0 in plaintext, with no authentication"))
        let secure = try ServeProcess([image, "--tcp", "0.0.0.0:0", "--tls-psk", tls.keys], directory: folder.path)
        #expect(secure.lines.contains { $0.contains("TLS required: reachable from other machines") })
        #expect(!secure.stop().errors.contains("warning"))

        // The library refuses it too, before binding anything.
        let server = try NBDServer(
            exports: [NBDServer.Export(name: "m", device: try MemoryDevice(capacityBytes: 1 << 20))], engine: IOEngine()
        )
        let error = await spindleError { _ = try server.listen(host: "0.0.0.0", port: 0) }
        #expect(error?.code == .invalidArgument)
        await server.stop()
    }

    @Test("Credential files: each problem named with its file and line")
    func credentialErrors() throws {
        let folder = TemporaryFolder("tls-files")
        defer { folder.remove() }
        func keys(_ text: String) throws -> SpindleError? {
            let path = folder.file("k.psk")
            try Data(text.utf8).write(to: URL(fileURLWithPath: path))
            chmod(path, 0o600)
            do {
                _ = try TLSCredentials.preSharedKeys(file: path)
                return nil
            } catch { return error }
        }
        #expect(try keys("alice:00ff\n# comment\n\nbob:A1B2\n") == nil)
        #expect(try keys("alice:00ff\nbob\n")?.description.contains("line 2 has no ':'") == true)
        #expect(try keys("alice:0f0\n")?.description.contains("line 1 has a key that is not an even number") == true)
        #expect(try keys("alice:zz\n")?.description.contains("not a hex digit") == true)
        #expect(try keys(":00\n")?.description.contains("has no user name") == true)
        #expect(try keys("a:00\na:11\n")?.description.contains("names user 'a' a second time") == true)
        #expect(try keys("\n# nothing\n")?.description.contains("holds no key") == true)
        let open = folder.file("open.psk")
        try Data("alice:00ff\n".utf8).write(to: URL(fileURLWithPath: open))
        chmod(open, 0o644)
        #expect(try TLSCredentials.preSharedKeys(file: open).warnings.first?.contains("chmod 600") == true)
        do {
            _ = try TLSCredentials.preSharedKeys(file: folder.file("missing.psk"))
            Issue.record("a missing key file was accepted")
        } catch {
            #expect(error.description.contains("missing.psk"))
        }
        do {
            _ = try TLSCredentials.certificates(directory: folder.path)
            Issue.record("a folder without certificates was accepted")
        } catch {
            #expect(error.description.contains("cannot read server-cert.pem"), "\(error)")
            #expect(error.description.contains("ca-cert.pem, server-cert.pem, server-key.pem"))
        }
        // CLI checks of the options.
        let image = "image:\(folder.file("x.img"))"
        let noCredentials = try spindle(["serve", image, "--tls", "require"])
        #expect(noCredentials.errors.contains("--tls require needs credentials"), "\(noCredentials.errors)")
        let both = try spindle(["serve", image, "--tls-psk", "a", "--tls-certificates", "b"])
        #expect(both.errors.contains("not both"))
        let verify = try spindle(["serve", image, "--tls-verify-peer", "--tls-psk", "a"])
        #expect(verify.errors.contains("--tls-verify-peer checks client certificates"))
        let badFile = try spindle(["serve", image, "--tls-psk", folder.file("k.psk")])
        #expect(badFile.status != 0)
        #expect(badFile.errors.contains("k.psk"), "\(badFile.errors)")
    }
}
