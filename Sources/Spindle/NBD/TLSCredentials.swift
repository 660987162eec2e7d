import CGnuTLS
import Glibc

/// What an ``NBDServer`` proves itself with, and how it checks its clients, under TLS: X.509
/// certificates in the directory layout nbdkit and qemu use, or pre-shared keys in the
/// `username:hexkey` file format of nbdkit, libnbd and GnuTLS's `psktool`.
///
/// Everything is read and checked when the credentials are made, so a missing file, a key that
/// does not match its certificate or a malformed key file fails at start with the file named, not
/// at a client's first handshake. A certificate that is expired or not yet valid is accepted with a
/// warning in ``warnings`` (clients will refuse it, and say so).
public final class TLSCredentials: @unchecked Sendable {
    // @unchecked Sendable: the GnuTLS objects are set up in init and only read afterwards, which
    // GnuTLS allows from many sessions at once.

    public enum Kind: Sendable, Equatable {
        /// `ca-cert.pem` (the authority clients' certificates are checked against; optional unless
        /// `verifyPeer`), `server-cert.pem`, `server-key.pem` and an optional `ca-crl.pem`.
        case certificates(directory: String, verifyPeer: Bool)
        /// One `username:hexkey` line per client.
        case preSharedKeys(file: String)
    }

    public let kind: Kind
    /// Things worth telling the person starting the server: an expired certificate, a key file
    /// other users can read.
    public let warnings: [String]

    let priorities: gnutls_priority_t
    private let certificates: gnutls_certificate_credentials_t?
    private let keys: gnutls_psk_server_credentials_t?
    /// The pre-shared keys by user name.
    let users: [String: [UInt8]]

    /// TLS 1.2 and 1.3 only, as the NBD protocol asks, in the server's order of preference (GnuTLS puts
    /// AES-GCM first on processors with AES instructions); with pre-shared keys, the PSK key exchanges
    /// (with ephemeral Diffie-Hellman first) as well.
    private static let certificatePriorities = "NORMAL:%SERVER_PRECEDENCE:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
    private static let keyPriorities = certificatePriorities + ":+ECDHE-PSK:+DHE-PSK:+PSK"

    /// Certificates from `directory`; with `verifyPeer`, every client must present a certificate
    /// signed by `ca-cert.pem`.
    public static func certificates(directory: String, verifyPeer: Bool = false) throws(SpindleError)
        -> TLSCredentials
    {
        try TLSCredentials(kind: .certificates(directory: directory, verifyPeer: verifyPeer))
    }

    /// Pre-shared keys from `file` (`username:hexkey` lines, as `psktool -u NAME -p FILE` writes them).
    public static func preSharedKeys(file: String) throws(SpindleError) -> TLSCredentials {
        try TLSCredentials(kind: .preSharedKeys(file: file))
    }

    private init(kind: Kind) throws(SpindleError) {
        self.kind = kind
        var warnings: [String] = []
        var priorities: gnutls_priority_t?
        switch kind {
        case .certificates(let directory, let verifyPeer):
            users = [:]
            keys = nil
            var credentials: gnutls_certificate_credentials_t?
            try Self.check(gnutls_certificate_allocate_credentials(&credentials), "allocating certificate credentials")
            certificates = credentials
            let authority = directory + "/ca-cert.pem"
            let certificate = directory + "/server-cert.pem"
            let key = directory + "/server-key.pem"
            let layout = "the layout nbdkit and qemu use: ca-cert.pem, server-cert.pem, server-key.pem"
            for (path, needed) in [(certificate, true), (key, true), (authority, verifyPeer)]
            where needed && access(path, R_OK) != 0 {
                let error = errno
                gnutls_certificate_free_credentials(credentials)
                throw SpindleError(
                    .notFound,
                    "cannot read \((path as String).split(separator: "/").last!) in \(directory) (\(layout))",
                    errno: error, operation: "load TLS certificates", path: path)
            }
            let loaded = gnutls_certificate_set_x509_key_file(credentials, certificate, key, GNUTLS_X509_FMT_PEM)
            if loaded < 0 {
                gnutls_certificate_free_credentials(credentials)
                throw SpindleError(
                    .invalidArgument,
                    "the server certificate and key could not be loaded: \(Self.text(loaded)) (server-cert.pem and server-key.pem must be PEM and belong together)",
                    operation: "load TLS certificates", path: certificate)
            }
            if access(authority, R_OK) == 0 {
                let trusted = gnutls_certificate_set_x509_trust_file(credentials, authority, GNUTLS_X509_FMT_PEM)
                if trusted <= 0 {
                    gnutls_certificate_free_credentials(credentials)
                    throw SpindleError(
                        .invalidArgument,
                        trusted == 0
                            ? "holds no certificate" : "could not be loaded: \(Self.text(trusted))",
                        operation: "load TLS certificates", path: authority)
                }
            }
            let revocations = directory + "/ca-crl.pem"
            if access(revocations, R_OK) == 0 {
                let loadedList = gnutls_certificate_set_x509_crl_file(credentials, revocations, GNUTLS_X509_FMT_PEM)
                if loadedList < 0 {
                    gnutls_certificate_free_credentials(credentials)
                    throw SpindleError(
                        .invalidArgument, "could not be loaded: \(Self.text(loadedList))",
                        operation: "load TLS certificates", path: revocations)
                }
            }
            if let validity = Self.validityWarning(certificate) { warnings.append(validity) }
            try Self.check(gnutls_priority_init(&priorities, Self.certificatePriorities, nil), "TLS priorities")
        case .preSharedKeys(let file):
            certificates = nil
            users = try Self.readKeys(file)
            if let mode = Self.permissions(file), mode & 0o077 != 0 {
                warnings.append(
                    "\(file) can be read by other users (mode \(String(mode & 0o777, radix: 8))): anyone who reads it can connect; chmod 600 it"
                )
            }
            var credentials: gnutls_psk_server_credentials_t?
            try Self.check(gnutls_psk_allocate_server_credentials(&credentials), "allocating PSK credentials")
            // Keys are looked up in `users` (the handshake's session knows its credentials), so an
            // unknown user can be told apart from a wrong key in the server's log.
            gnutls_psk_set_server_credentials_function2(credentials, tlsLookUpKey)
            keys = credentials
            try Self.check(gnutls_priority_init(&priorities, Self.keyPriorities, nil), "TLS priorities")
        }
        self.priorities = priorities!
        self.warnings = warnings
    }

    deinit {
        gnutls_priority_deinit(priorities)
        if let certificates { gnutls_certificate_free_credentials(certificates) }
        if let keys { gnutls_psk_free_server_credentials(keys) }
    }

    /// Sets up a new server session with these credentials.
    func configure(_ session: gnutls_session_t) -> Int32 {
        var result = gnutls_priority_set(session, priorities)
        if result < 0 { return result }
        if let certificates {
            result = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(certificates))
            if case .certificates(_, true) = kind {
                gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
                // The trusted CAs are not named to the client, so a client with a certificate from
                // another CA still sends it and the log can say why it was refused.
                gnutls_certificate_send_x509_rdn_sequence(session, 1)
                // The client's certificate is checked during the handshake, which fails if it is
                // untrusted, expired or revoked.
                gnutls_session_set_verify_cert(session, nil, 0)
            }
        } else if let keys {
            result = gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(keys))
        }
        return result
    }

    // MARK: Reading the files

    /// The `username:hexkey` lines of `file`; blank lines and `#` comments are skipped.
    static func readKeys(_ file: String) throws(SpindleError) -> [String: [UInt8]] {
        let text: String
        do {
            text = try readText(file)
        } catch {
            throw SpindleError(
                error.code, "cannot read the pre-shared key file: \(error.message)", errno: error.errno,
                operation: "load TLS keys", path: file)
        }
        var users: [String: [UInt8]] = [:]
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingSuffix(while: { $0 == "\r" || $0 == " " })
            if line.isEmpty || line.hasPrefix("#") { continue }
            func bad(_ why: String) -> SpindleError {
                SpindleError(
                    .invalidArgument, "line \(index + 1) \(why) (each line is username:hexkey, as psktool writes)",
                    operation: "load TLS keys", path: file)
            }
            guard let colon = line.firstIndex(of: ":") else { throw bad("has no ':'") }
            let name = String(line[..<colon])
            let hex = Array(line[line.index(after: colon)...].utf8)
            guard !name.isEmpty else { throw bad("has no user name") }
            guard !hex.isEmpty, hex.count % 2 == 0 else {
                throw bad("has a key that is not an even number of hex digits")
            }
            var key: [UInt8] = []
            for pair in stride(from: 0, to: hex.count, by: 2) {
                guard let high = hexValue(hex[pair]), let low = hexValue(hex[pair + 1]) else {
                    throw bad("has a key with a character that is not a hex digit")
                }
                key.append(high << 4 | low)
            }
            guard users[name] == nil else { throw bad("names user '\(name)' a second time") }
            users[name] = key
        }
        guard !users.isEmpty else {
            throw SpindleError(
                .invalidArgument, "holds no key (each line is username:hexkey, as psktool writes)",
                operation: "load TLS keys", path: file)
        }
        return users
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    private static func readText(_ path: String) throws(SpindleError) -> String {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw SpindleError.system(errno, operation: "open", path: path) }
        defer { close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw SpindleError.system(errno, operation: "read", path: path)
            }
            if count == 0 { break }
            bytes += chunk[0..<count]
            guard bytes.count <= 16 << 20 else {
                throw SpindleError(.invalidArgument, "is larger than 16 MiB", operation: "read", path: path)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func permissions(_ path: String) -> UInt32? {
        var status = stat()
        return stat(path, &status) == 0 ? UInt32(status.st_mode) : nil
    }

    /// A warning when the certificate at `path` is not valid now.
    private static func validityWarning(_ path: String) -> String? {
        var file = gnutls_datum_t()
        guard gnutls_load_file(path, &file) >= 0 else { return nil }
        defer { spindle_gnutls_free(file.data) }
        var certificate: gnutls_x509_crt_t?
        guard gnutls_x509_crt_init(&certificate) >= 0 else { return nil }
        defer { gnutls_x509_crt_deinit(certificate) }
        guard gnutls_x509_crt_import(certificate, &file, GNUTLS_X509_FMT_PEM) >= 0 else { return nil }
        let now = time(nil)
        let expires = gnutls_x509_crt_get_expiration_time(certificate)
        let starts = gnutls_x509_crt_get_activation_time(certificate)
        if expires != -1 && expires < now {
            return "\(path) expired on \(date(expires)): clients will refuse it"
        }
        if starts != -1 && starts > now {
            return "\(path) is not valid before \(date(starts)): clients will refuse it until then"
        }
        return nil
    }

    private static func date(_ seconds: time_t) -> String {
        var moment = seconds
        var parts = tm()
        gmtime_r(&moment, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func text(_ code: Int32) -> String { String(cString: gnutls_strerror(code)) }

    private static func check(_ code: Int32, _ what: String) throws(SpindleError) {
        guard code >= 0 else { throw SpindleError(.invalidArgument, "\(what) failed: \(text(code))") }
    }
}

/// GnuTLS's key lookup for a PSK handshake: the key of the user the client named, from the
/// session's credentials; an unknown user is remembered (for the log) and refused.
private func tlsLookUpKey(
    _ session: gnutls_session_t?, _ username: UnsafePointer<gnutls_datum_t>?,
    _ key: UnsafeMutablePointer<gnutls_datum_t>?
) -> Int32 {
    guard let session, let username, let key, let context = gnutls_session_get_ptr(session) else { return -1 }
    let tls = Unmanaged<TLSSession>.fromOpaque(context).takeUnretainedValue()
    let name = String(
        decoding: UnsafeRawBufferPointer(start: username.pointee.data, count: Int(username.pointee.size)), as: UTF8.self
    )
    tls.pskUser = name
    guard let secret = tls.credentials.users[name], let memory = spindle_gnutls_malloc(secret.count) else {
        tls.unknownUser = true
        return -1
    }
    secret.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: secret.count) }
    key.pointee.data = memory.assumingMemoryBound(to: UInt8.self)
    key.pointee.size = UInt32(secret.count)
    return 0
}

extension Substring {
    fileprivate func trimmingSuffix(while predicate: (Character) -> Bool) -> Substring {
        var end = endIndex
        while end > startIndex, predicate(self[index(before: end)]) { end = index(before: end) }
        return self[startIndex..<end]
    }
}
