import Foundation
import Testing

@testable import Spindle

/// TLS credentials made for a test with GnuTLS's own tools, as a user would make them: a PSK file
/// from `psktool`, and from `certtool` a CA with a server certificate (for localhost and 127.0.0.1)
/// and a client certificate, an expired server certificate, and a client certificate from a CA the
/// server does not trust.
struct TLSFixture {
    let folder: TemporaryFolder
    /// `alice:<key>` as psktool writes it.
    var keys: String { folder.file("keys.psk") }
    /// alice with another key.
    var wrongKey: String { folder.file("wrong.psk") }
    /// A user the server does not know.
    var stranger: String { folder.file("stranger.psk") }
    /// ca-cert.pem, server-cert.pem, server-key.pem.
    var server: String { folder.file("server") }
    /// The same with an expired server certificate.
    var expiredServer: String { folder.file("expired") }
    /// ca-cert.pem, client-cert.pem, client-key.pem (libnbd's and qemu's client layout).
    var client: String { folder.file("client") }
    /// ca-cert.pem only: trusts the server, has no certificate of its own.
    var anonymousClient: String { folder.file("anonymous") }
    /// A client whose certificate is signed by another CA.
    var untrustedClient: String { folder.file("untrusted") }
    /// qemu's PSK layout: keys.psk in a directory.
    var qemuKeys: String { folder.file("qemu-psk") }

    init() throws {
        folder = TemporaryFolder("tls")
        let script = #"""
            set -euo pipefail
            psktool -u alice -p keys.psk >/dev/null
            psktool -u alice -p wrong.psk >/dev/null
            psktool -u mallory -p stranger.psk >/dev/null
            mkdir -p server expired client anonymous untrusted qemu-psk
            cp keys.psk qemu-psk/keys.psk
            key() { certtool --generate-privkey --key-type ecdsa --outfile "$1" 2>/dev/null; }
            key ca-key.pem
            printf 'cn = Spindle test CA\nca\ncert_signing_key\nexpiration_days = 30\n' > ca.info
            certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
            for d in server expired client anonymous; do cp ca-cert.pem "$d/ca-cert.pem"; done
            printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n' > server.info
            key server/server-key.pem
            certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
              --load-privkey server/server-key.pem --template server.info --outfile server/server-cert.pem 2>/dev/null
            printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nactivation_date = "2020-01-01 00:00:00 UTC"\nexpiration_date = "2020-06-01 00:00:00 UTC"\n' > expired.info
            key expired/server-key.pem
            certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
              --load-privkey expired/server-key.pem --template expired.info --outfile expired/server-cert.pem 2>/dev/null
            printf 'cn = spindle-test-client\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 30\n' > client.info
            key client/client-key.pem
            certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
              --load-privkey client/client-key.pem --template client.info --outfile client/client-cert.pem 2>/dev/null
            key other-ca-key.pem
            printf 'cn = Another CA\nca\ncert_signing_key\nexpiration_days = 30\n' > other-ca.info
            certtool --generate-self-signed --load-privkey other-ca-key.pem --template other-ca.info --outfile other-ca.pem 2>/dev/null
            cp ca-cert.pem untrusted/ca-cert.pem
            key untrusted/client-key.pem
            certtool --generate-certificate --load-ca-certificate other-ca.pem --load-ca-privkey other-ca-key.pem \
              --load-privkey untrusted/client-key.pem --template client.info --outfile untrusted/client-cert.pem 2>/dev/null
            chmod 600 keys.psk wrong.psk stranger.psk qemu-psk/keys.psk
            """#
        let made = try tool(["bash", "-c", script], directory: folder.path)
        guard made.status == 0 else {
            throw SpindleError(.ioFailed, "making the TLS test credentials failed: \(made.errors)")
        }
    }

    func remove() { folder.remove() }

    /// A libnbd URI with the PSK file `keys` for user `user`, over TCP.
    static func pskURI(port: UInt16, export: String, keys: String, user: String = "alice") -> String {
        "nbds://\(user)@127.0.0.1:\(port)/\(export)?tls-psk-file=\(keys)"
    }

    /// A libnbd URI with certificates from `directory`, over TCP.
    static func certificateURI(port: UInt16, export: String, directory: String) -> String {
        "nbds://127.0.0.1:\(port)/\(export)?tls-certificates=\(directory)"
    }
}

/// A libnbd client (Python bindings) that connects, writes, waits until told to go on, then
/// checks what it wrote and writes and reads again: a connection that must stay unaffected while
/// other clients misbehave.
final class LongLivedNBDClient {
    private let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private let errors = Pipe()

    static let script = #"""
        import nbd, sys
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(sys.argv[1])
        h.pwrite(b"\x5a" * 65536, 0)
        print("connected", flush=True)
        sys.stdin.readline()
        assert h.pread(65536, 0) == b"\x5a" * 65536, "first block changed"
        h.pwrite(b"\xa5" * 65536, 65536)
        h.flush()
        assert h.pread(65536, 65536) == b"\xa5" * 65536, "second block wrong"
        print("ok", flush=True)
        h.shutdown()
        """#

    init(uri: String) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", Self.script, uri]
        process.standardInput = input
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let line = readLine()
        guard line == "connected" else {
            process.waitUntilExit()
            let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw SpindleError(.ioFailed, "the long-lived client did not connect: \(line) \(message)")
        }
    }

    private func readLine() -> String {
        var text = ""
        while !text.contains("\n") {
            let data = output.fileHandleForReading.availableData
            if data.isEmpty { break }
            text += String(decoding: data, as: UTF8.self)
        }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Lets the client go on; returns whether it read back everything and finished cleanly.
    func finish() -> (ok: Bool, errors: String) {
        input.fileHandleForWriting.write(Data("go\n".utf8))
        let line = readLine()
        process.waitUntilExit()
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return (line == "ok" && process.terminationStatus == 0, message)
    }
}
