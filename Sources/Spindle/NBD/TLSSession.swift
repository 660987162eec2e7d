import CGnuTLS
import Glibc

/// The server side of one TLS session over a connected socket, with the socket I/O on the engine.
///
/// GnuTLS never touches the socket: its transport reads ciphertext from `incoming` (filled by engine
/// reads) and writes it into `outgoing` (sent by engine writes), so a handshake or a record that
/// needs more bytes returns `GNUTLS_E_AGAIN` at once instead of blocking a thread. Every GnuTLS call
/// is made under `mutex` and none of them waits, so the reading task and the replying tasks of a
/// connection share the session safely; the ciphertext goes out in the order it was made, under
/// `flushLock`.
final class TLSSession: @unchecked Sendable {
    // @unchecked Sendable: the GnuTLS session, `incoming`'s bounds and `outgoing` are touched only
    // under `mutex` (the transport callbacks run inside GnuTLS calls made under it); `incoming`'s
    // bytes are written only by the one reading task while it is empty; `sending` is touched only
    // under `flushLock`.
    let credentials: TLSCredentials
    private let session: gnutls_session_t
    private let socket: Int32
    private let engine: IOEngine
    private let mutex = Locked(())
    private let flushLock = AsyncMutex()

    private let incoming: UnsafeMutableRawPointer
    private var incomingStart = 0
    private var incomingEnd = 0
    private static let incomingBytes = 256 * 1024
    private var outgoing = Outbox()
    private var sending = Outbox()

    /// The PSK user the client named, and whether it was unknown (set by the key lookup).
    var pskUser: String?
    var unknownUser = false
    /// Whether the handshake has sent anything (the server's hello).
    private var sentHello = false

    /// Plaintext bytes encrypted before their ciphertext is sent: bounds the outbox of a large reply.
    private static let flushEvery = 1 << 20

    /// Ciphertext waiting to be sent.
    private struct Outbox {
        var bytes: UnsafeMutableRawPointer?
        var count = 0
        var capacity = 0

        mutating func append(_ data: UnsafeRawPointer, _ length: Int) {
            if count + length > capacity {
                capacity = max(64 * 1024, (count + length) * 2)
                bytes = realloc(bytes, capacity)
            }
            (bytes! + count).copyMemory(from: data, byteCount: length)
            count += length
        }
    }

    /// A session for the client on `socket`, whose stream starts with `buffered` (bytes already read
    /// from it); the handshake is ``handshake()``.
    init(socket: Int32, engine: IOEngine, credentials: TLSCredentials, buffered: [UInt8] = []) throws(SpindleError) {
        self.socket = socket
        self.engine = engine
        self.credentials = credentials
        var created: gnutls_session_t?
        let result = gnutls_init(&created, UInt32(GNUTLS_SERVER) | UInt32(GNUTLS_NONBLOCK))
        guard result >= 0, let created else {
            throw SpindleError(.tlsFailed, "starting a TLS session failed: \(TLSCredentials.text(result))")
        }
        session = created
        incoming = .allocate(byteCount: Self.incomingBytes, alignment: 64)
        let carried = min(buffered.count, Self.incomingBytes)
        buffered.withUnsafeBytes { if carried > 0 { incoming.copyMemory(from: $0.baseAddress!, byteCount: carried) } }
        incomingEnd = carried
        let configured = credentials.configure(session)
        guard configured >= 0 else {
            gnutls_deinit(session)
            incoming.deallocate()
            throw SpindleError(.tlsFailed, "setting up a TLS session failed: \(TLSCredentials.text(configured))")
        }
        let context = Unmanaged.passUnretained(self).toOpaque()
        gnutls_session_set_ptr(session, context)
        gnutls_transport_set_ptr(session, context)
        gnutls_transport_set_push_function(session, tlsPush)
        gnutls_transport_set_pull_function(session, tlsPull)
        gnutls_transport_set_pull_timeout_function(session, tlsPullTimeout)
        // Nothing here waits inside GnuTLS, so it keeps no timers; a stalled client is the
        // connection's to deal with.
        gnutls_handshake_set_timeout(session, 0)
    }

    deinit {
        gnutls_deinit(session)
        incoming.deallocate()
        free(outgoing.bytes)
        free(sending.bytes)
    }

    // MARK: Transport (inside GnuTLS calls, under `mutex`)

    fileprivate func push(_ data: UnsafeRawPointer, _ length: Int) -> Int {
        outgoing.append(data, length)
        return length
    }

    fileprivate func pull(_ buffer: UnsafeMutableRawPointer, _ length: Int) -> Int {
        let available = incomingEnd - incomingStart
        guard available > 0 else {
            gnutls_transport_set_errno(session, EAGAIN)
            return -1
        }
        let take = min(available, length)
        buffer.copyMemory(from: incoming + incomingStart, byteCount: take)
        incomingStart += take
        return take
    }

    fileprivate var hasIncoming: Bool { incomingEnd > incomingStart }

    // MARK: Socket I/O

    /// Reads more ciphertext into `incoming` (which GnuTLS has emptied). False at the end of the stream.
    private func fill() async throws -> Bool {
        let result: Int
        do {
            result = try await engine.perform(
                .read(fd: socket, buffer: incoming, length: UInt32(Self.incomingBytes), offset: UInt64.max),
                operation: "receive")
        } catch {
            if [ECONNRESET, EPIPE, ECANCELED].contains(error.errno ?? 0) { return false }
            throw error
        }
        mutex.withLock { _ in
            incomingStart = 0
            incomingEnd = result
        }
        return result > 0
    }

    /// Sends the ciphertext made so far, in order.
    private func flush() async throws {
        try await flushLock.withLock {
            mutex.withLock { _ in swap(&outgoing, &sending) }
            defer { sending.count = 0 }
            var done = 0
            while done < sending.count {
                done += try await engine.perform(
                    .write(
                        fd: socket, buffer: sending.bytes! + done, length: UInt32(sending.count - done),
                        offset: UInt64.max, fua: false),
                    operation: "send")
            }
        }
    }

    private var pendingOutput: Bool { mutex.withLock { _ in outgoing.count > 0 } }

    // MARK: The session

    /// Runs the handshake; throws a ``SpindleError`` saying why it failed (logged by the caller,
    /// which closes the connection).
    func handshake() async throws {
        while true {
            let result = mutex.withLock { _ in gnutls_handshake(session) }
            if pendingOutput { sentHello = true }
            try await flush()
            if result == GNUTLS_E_SUCCESS { return }
            if result == GNUTLS_E_AGAIN || result == GNUTLS_E_INTERRUPTED {
                guard try await fill() else {
                    throw SpindleError(
                        .tlsFailed,
                        sentHello
                            ? "the TLS handshake was cut off: the client closed the connection after this server's hello (what a client does when it does not accept the server's certificate or key)"
                            : "the TLS handshake was cut off: the client closed the connection")
                }
                continue
            }
            if gnutls_error_is_fatal(result) == 0 { continue }
            // The client is told why with the matching alert, so its error says more than that the
            // connection closed.
            _ = mutex.withLock { _ in gnutls_alert_send_appropriate(session, result) }
            try? await flush()
            throw SpindleError(.tlsFailed, "the TLS handshake failed: \(explain(result))")
        }
    }

    /// Why a handshake failed, in words: the alert the client sent, what was wrong with its
    /// certificate, or whether its PSK user is unknown or its key wrong.
    private func explain(_ code: Int32) -> String {
        var text = TLSCredentials.text(code)
        if code == GNUTLS_E_FATAL_ALERT_RECEIVED || code == GNUTLS_E_WARNING_ALERT_RECEIVED {
            let alert = mutex.withLock { _ in gnutls_alert_get(session) }
            text = "the client sent the alert '\(String(cString: gnutls_alert_get_name(alert)))'"
            if alert == GNUTLS_A_BAD_CERTIFICATE || alert == GNUTLS_A_CERTIFICATE_EXPIRED
                || alert == GNUTLS_A_UNKNOWN_CA || alert == GNUTLS_A_CERTIFICATE_UNKNOWN
            {
                text += " (it does not accept this server's certificate)"
            }
        } else if code == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR || code == GNUTLS_E_CERTIFICATE_ERROR {
            let status = mutex.withLock { _ in gnutls_session_get_verify_cert_status(session) }
            var printed = gnutls_datum_t()
            if status != 0, gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &printed, 0) >= 0 {
                text = "the client's certificate was refused: \(String(cString: printed.data))"
                spindle_gnutls_free(printed.data)
            }
        } else if code == GNUTLS_E_NO_CERTIFICATE_FOUND || code == GNUTLS_E_CERTIFICATE_REQUIRED {
            text = "the client sent no certificate (this server requires one)"
        }
        if let user = pskUser {
            if unknownUser {
                text += " — the client named PSK user '\(user)', who is not in the key file"
            } else if code == GNUTLS_E_DECRYPTION_FAILED || code == GNUTLS_E_FATAL_ALERT_RECEIVED
                || code == GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER || code == GNUTLS_E_KEY_USAGE_VIOLATION
            {
                text += " — PSK user '\(user)' is known; the client's key for it is probably wrong"
            }
        }
        return text
    }

    /// What was negotiated, for the log: version, key exchange, cipher, and who the client is.
    var summary: String {
        mutex.withLock { _ in
            var parts: [String] = []
            if let description = gnutls_session_get_desc(session) {
                parts.append(String(cString: description))
                spindle_gnutls_free(description)
            }
            if let user = gnutls_psk_server_get_username(session) {
                parts.append("PSK user '\(String(cString: user))'")
            }
            var count: UInt32 = 0
            if let peers = gnutls_certificate_get_peers(session, &count), count > 0 {
                var certificate: gnutls_x509_crt_t?
                if gnutls_x509_crt_init(&certificate) >= 0 {
                    var name = gnutls_datum_t()
                    if gnutls_x509_crt_import(certificate, peers, GNUTLS_X509_FMT_DER) >= 0,
                        gnutls_x509_crt_get_dn2(certificate, &name) >= 0
                    {
                        parts.append("client certificate '\(String(cString: name.data))'")
                        spindle_gnutls_free(name.data)
                    }
                    gnutls_x509_crt_deinit(certificate)
                }
            }
            return parts.joined(separator: ", ")
        }
    }

    /// Decrypts into `buffer` up to `count` bytes; 0 at the end of the client's stream.
    func receive(into buffer: UnsafeMutableRawPointer, count: Int) async throws -> Int {
        while true {
            let result = mutex.withLock { _ in gnutls_record_recv(session, buffer, count) }
            // Reading may make records to send (TLS 1.3 key updates).
            if pendingOutput { try await flush() }
            if result > 0 { return result }
            if result == 0 || result == GNUTLS_E_PREMATURE_TERMINATION { return 0 }
            let code = Int32(result)
            if code == GNUTLS_E_AGAIN || code == GNUTLS_E_INTERRUPTED {
                if try await !fill() { return 0 }
                continue
            }
            if code == GNUTLS_E_REHANDSHAKE {
                // Renegotiation is not offered: the client is told so and the session goes on.
                _ = mutex.withLock { _ in gnutls_alert_send(session, GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION) }
                try await flush()
                continue
            }
            if gnutls_error_is_fatal(code) == 0 { continue }
            throw SpindleError(.tlsFailed, "receiving over TLS failed: \(explain(code))")
        }
    }

    /// Encrypts and sends the buffers of `vectors` in order, as one run of records.
    func send(vectors: UnsafePointer<iovec>, count: Int) async throws {
        var unsent = 0
        mutex.withLock { _ in gnutls_record_cork(session) }
        for index in 0..<count {
            let base = UnsafeRawPointer(vectors[index].iov_base!)
            let length = vectors[index].iov_len
            var done = 0
            while done < length {
                let piece = min(length - done, Self.flushEvery - unsent)
                let result = mutex.withLock { _ in gnutls_record_send(session, base + done, piece) }
                guard result >= 0 else {
                    throw SpindleError(.tlsFailed, "sending over TLS failed: \(TLSCredentials.text(Int32(result)))")
                }
                done += result
                unsent += result
                if unsent >= Self.flushEvery {
                    let uncorked = mutex.withLock { _ in
                        let result = gnutls_record_uncork(session, 0)
                        gnutls_record_cork(session)
                        return result
                    }
                    try corked(Int(uncorked))
                    try await flush()
                    unsent = 0
                }
            }
        }
        try corked(Int(mutex.withLock { _ in gnutls_record_uncork(session, 0) }))
        try await flush()
    }

    private func corked(_ result: Int) throws(SpindleError) {
        guard result >= 0 else {
            throw SpindleError(.tlsFailed, "sending over TLS failed: \(TLSCredentials.text(Int32(result)))")
        }
    }

    /// Ends the session with the protocol's close alert (best effort: the client may be gone).
    func close() async {
        _ = mutex.withLock { _ in gnutls_bye(session, GNUTLS_SHUT_WR) }
        try? await flush()
    }
}

private func tlsSession(_ context: gnutls_transport_ptr_t?) -> TLSSession {
    Unmanaged<TLSSession>.fromOpaque(context!).takeUnretainedValue()
}

private func tlsPush(_ context: gnutls_transport_ptr_t?, _ data: UnsafeRawPointer?, _ length: Int) -> Int {
    tlsSession(context).push(data!, length)
}

private func tlsPull(_ context: gnutls_transport_ptr_t?, _ buffer: UnsafeMutableRawPointer?, _ length: Int) -> Int {
    tlsSession(context).pull(buffer!, length)
}

/// Whether ciphertext is waiting: GnuTLS asks before some reads; nothing here waits.
private func tlsPullTimeout(_ context: gnutls_transport_ptr_t?, _ milliseconds: UInt32) -> Int32 {
    tlsSession(context).hasIncoming ? 1 : 0
}
