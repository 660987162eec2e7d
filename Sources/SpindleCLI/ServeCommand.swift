import ArgumentParser
import Dispatch
import Foundation
import Spindle

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract:
            "Export thin volumes, arrays and image files over NBD, to qemu, nbd-client, fio, nbdcopy and other clients.",
        discussion: """
            EXPORT is volume:POOL/NAME (a thin volume or snapshot, exported as POOL/NAME), array:NAME (an \
            array whose members are in --dir, exported as NAME), image:PATH (an image file, exported by its \
            file name) or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH: another \
            server's export, proxied under its export name). Runs in the foreground and prints each export's URI; on SIGINT or SIGTERM it stops \
            accepting, finishes requests in flight, flushes, and closes pools and arrays cleanly. A member \
            that fails under a served array is logged on standard error when it happens, and each array's \
            state is printed at the stop.

            Serving other machines: give TLS credentials (--tls-psk FILE or --tls-certificates DIR) and \
            clients connect with nbds:// URIs (libnbd's tls-psk-file= or tls-certificates=, qemu's \
            tls-creds). Without TLS, only loopback and Unix sockets are served unless --insecure is given.
            """)

    @Argument(help: "What to export: volume:POOL/NAME, array:NAME or image:PATH.")
    var exports: [String]

    @Option(
        help: "Listen on this Unix socket (default: spindle-nbd.sock in the current folder, unless --tcp is given).")
    var socket: String?

    @Option(
        help: """
            Listen on TCP: PORT (on loopback) or HOST:PORT. An address other machines reach (0.0.0.0 is \
            every interface) needs --tls require, or --insecure.
            """)
    var tcp: String?

    @Option(
        help: ArgumentHelp(
            "TLS (NBD STARTTLS): off, on (for clients that ask) or require (nothing in plaintext). Default: require when credentials are given, else off.",
            valueName: "off|on|require"))
    var tls: NBDServer.TLS.Mode?

    @Option(
        name: .customLong("tls-certificates"),
        help: ArgumentHelp(
            "TLS with X.509 certificates from DIR: ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit and qemu lay them out; certtool makes them).",
            valueName: "dir"))
    var tlsCertificates: String?

    @Option(
        name: .customLong("tls-psk"),
        help: ArgumentHelp(
            "TLS with pre-shared keys from FILE: username:hexkey lines (psktool -u NAME -p FILE makes them).",
            valueName: "file"))
    var tlsPSK: String?

    @Flag(
        name: .customLong("tls-verify-peer"),
        help: "With --tls-certificates: every client must present a certificate signed by ca-cert.pem.")
    var tlsVerifyPeer = false

    @Flag(
        help:
            "Allow serving an address other machines reach without TLS required: anyone who reaches it reads and overwrites the exports, with no authentication."
    )
    var insecure = false

    @Flag(name: .customLong("read-only"), help: "Export everything read-only.")
    var readOnly = false

    @Flag(
        inversion: .prefixedNo,
        help: "Open image exports with O_DIRECT (bypassing the page cache, as the volumes and arrays do).")
    var direct = true

    @Option(
        help: ArgumentHelp(
            "Inject faults into an export's device: EXPORTNAME:SPEC (see spindle bench --fault for SPEC).",
            valueName: "name:spec"))
    var fault: [String] = []

    @OptionGroup var folder: PoolFolder

    func validate() throws {
        guard !exports.isEmpty else {
            throw ValidationError("give something to export: volume:POOL/NAME, array:NAME or image:PATH")
        }
        for export in exports
        where
            !(export.hasPrefix("volume:") || export.hasPrefix("array:") || export.hasPrefix("image:")
            || NBDAddress.looksLikeURI(export))
        {
            throw ValidationError(
                "'\(export)' is not an export: write volume:POOL/NAME, array:NAME, image:PATH or an NBD URI to proxy")
        }
        if tlsCertificates != nil && tlsPSK != nil {
            throw ValidationError("give one of --tls-certificates and --tls-psk, not both")
        }
        if tlsVerifyPeer && tlsCertificates == nil {
            throw ValidationError("--tls-verify-peer checks client certificates: it needs --tls-certificates DIR")
        }
        if let tls, tls != .off, tlsCertificates == nil && tlsPSK == nil {
            throw ValidationError(
                "--tls \(tls.rawValue) needs credentials: --tls-psk FILE (psktool -u NAME -p FILE makes one) or --tls-certificates DIR"
            )
        }
        if tls == .off && (tlsCertificates != nil || tlsPSK != nil) {
            throw ValidationError("--tls off with --tls-certificates or --tls-psk: leave out one or the other")
        }
    }

    /// The TLS settings the options describe (credentials loaded and checked now, so a bad file
    /// fails before anything is opened).
    func tlsSettings() throws -> NBDServer.TLS {
        let credentials: TLSCredentials? =
            if let tlsCertificates {
                try TLSCredentials.certificates(directory: tlsCertificates, verifyPeer: tlsVerifyPeer)
            } else if let tlsPSK {
                try TLSCredentials.preSharedKeys(file: tlsPSK)
            } else {
                nil
            }
        for warning in credentials?.warnings ?? [] { Terminal.warning(warning) }
        return try NBDServer.TLS(mode: tls ?? (credentials == nil ? .off : .require), credentials: credentials)
    }

    func run() async throws {
        let tlsSettings = try tlsSettings()
        let engine = try IOEngine()
        defer { engine.shutdown() }
        var pools: [String: OpenedPool] = [:]
        var arrays: [RAIDArray] = []
        var files: [FileDevice] = []
        var remotes: [NBDDevice] = []
        /// Closes everything; returns whether every pool and array closed without an error.
        @discardableResult
        func closeAll() async -> Bool {
            var clean = true
            for pool in pools.values {
                do { try await pool.close() } catch {
                    Terminal.error("closing pool: \(error)")
                    clean = false
                }
            }
            for array in arrays {
                do { try await array.close() } catch {
                    Terminal.error("closing \(array.name): \(error)")
                    clean = false
                }
            }
            for file in files { try? await file.close() }
            for remote in remotes { try? await remote.close() }
            return clean
        }
        // What the folder holds, scanned once when an export or a fault needs it.
        var scanned: Discovery?
        func discovery() async throws -> Discovery {
            if let scanned { return scanned }
            let found = try await Discovery.scan(folder: folder.path)
            scanned = found
            return found
        }
        // A fault names an export, or an array member image (applied as its array assembles).
        let exportNames = exports.map { Self.exportName($0) }
        var options = PoolStore.openOptions(readOnly: readOnly, metadataCacheBytes: folder.metadataCacheBytes)
        var exportFaults: [(name: String, spec: FaultSpec)] = []
        for text in fault {
            guard let colon = text.lastIndex(of: ":"), colon != text.startIndex else {
                throw ValidationError("--fault takes NAME:SPEC, where NAME is an export name or an array member image")
            }
            let target = String(text[..<colon])
            let spec = try FaultSpec.parse(String(text[text.index(after: colon)...]))
            if exportNames.contains(target) {
                exportFaults.append((target, spec))
            } else if try await discovery().devices.contains(where: {
                Discovery.canonicalPath($0.name) == Discovery.canonicalPath(target)
            }) {
                options.faults[target] = spec
            } else {
                throw ValidationError(
                    "--fault names '\(target)', which is neither an export (\(exportNames.joined(separator: ", "))) nor an image file"
                )
            }
        }
        var list: [NBDServer.Export] = []
        do {
            for text in exports {
                if NBDAddress.looksLikeURI(text) {
                    // A proxy: the remote export served under its own name.
                    let remote = try await NBDDevice.connect(
                        text, engine: engine, options: NBDDevice.Options(readOnly: readOnly))
                    remotes.append(remote)
                    list.append(
                        NBDServer.Export(
                            name: Self.exportName(text), device: remote, readOnly: readOnly || remote.isReadOnly,
                            description: "proxy of \(text)"))
                    continue
                }
                let value = String(text[text.index(after: text.firstIndex(of: ":")!)...])
                if text.hasPrefix("volume:") {
                    let (poolName, volumeName) = try PoolStore.split(value)
                    if pools[poolName] == nil {
                        let found = try await discovery()
                        pools[poolName] = try await found.open(
                            try PoolStore.find(poolName, in: found, folder: folder.path), engine: engine,
                            options: options)
                    }
                    let volume = try await pools[poolName]!.pool.openVolume(name: volumeName)
                    list.append(
                        NBDServer.Export(
                            name: value, device: volume, readOnly: readOnly,
                            description: "Spindle thin volume \(value)"))
                } else if text.hasPrefix("array:") {
                    let found = try await discovery()
                    for damaged in found.damaged {
                        if case .arraySuperblock = damaged.reason { Terminal.warning(PoolStore.describe(damaged)) }
                    }
                    let array = try await found.open(
                        try ArrayCommand.Selection.choose(value, in: found, folder: folder.path), engine: engine,
                        options: options)
                    arrays.append(array)
                    list.append(
                        NBDServer.Export(
                            name: value, device: array, readOnly: readOnly, description: "Spindle array \(value)"))
                } else {
                    let file = try FileDevice.open(
                        path: value, engine: engine,
                        options: FileDevice.Options(readOnly: readOnly, directIO: direct ? .preferred : .disabled))
                    files.append(file)
                    list.append(
                        NBDServer.Export(
                            name: Self.exportName(text), device: file, readOnly: readOnly, description: "image \(value)"
                        ))
                }
            }
            for (name, spec) in exportFaults {
                let index = list.firstIndex { $0.name == name }!
                let faulty = FaultyDevice(wrapping: list[index].device, seed: 1, name: list[index].device.name)
                spec.apply(to: faulty)
                list[index].device = faulty
            }
        } catch {
            await closeAll()
            throw error
        }

        let server = try NBDServer(exports: list, engine: engine, tls: tlsSettings) { line in
            FileHandle.standardError.write(Data("spindle serve: \(line)\n".utf8))
        }
        var uris: [String] = []
        // Clients that must use TLS are shown the TLS URIs (libnbd's nbds://).
        let scheme = tlsSettings.mode == .require ? "nbds" : "nbd"
        do {
            if let tcp {
                let parts = tcp.split(separator: ":")
                let host = parts.count == 2 ? String(parts[0]) : "127.0.0.1"
                guard let port = UInt16(parts.last ?? "") else {
                    throw ValidationError("--tcp takes PORT or HOST:PORT, such as 10809")
                }
                let bound = try server.listen(host: host, port: port, allowPlaintext: insecure)
                let shown = host == "0.0.0.0" ? ProcessInfo.processInfo.hostName : host
                uris += list.map { "\(scheme)://\(shown):\(bound)/\($0.name)" }
                let security =
                    switch tlsSettings.mode {
                    case .require: "TLS required"
                    case .on: "TLS on offer, plaintext allowed"
                    case .off: "plaintext"
                    }
                print(
                    host.hasPrefix("127.")
                        ? "TCP on \(host):\(bound), \(security) (loopback only; --tcp 0.0.0.0:\(bound) serves other machines)"
                        : "TCP on \(host):\(bound), \(security): reachable from other machines\(tlsSettings.mode == .require ? "" : ", with no authentication")"
                )
            }
            if socket != nil || tcp == nil {
                let path = (socket ?? "spindle-nbd.sock")
                let absolute = URL(fileURLWithPath: path).path
                try server.listen(unixSocket: absolute)
                uris += list.map { "\(scheme)+unix:///\($0.name)?socket=\(absolute)" }
            }
        } catch {
            await server.stop()
            await closeAll()
            throw error
        }
        for (export, uri) in zip(list + list, uris) {
            print("\(uri)  \(ByteSize.format(export.device.capacityBytes))\(export.readOnly ? ", read-only" : "")")
        }
        // Caught from before the line that says the server is ready: a signal sent the moment a
        // script reads it still stops the server.
        let termination = ProcessControl.watchForTermination()
        print("serving; stop with Ctrl-C or SIGTERM")
        ProcessControl.flushOutput()

        // Arrays (served directly or under a pool) are polled, so a member failure is logged when it
        // happens rather than found at the stop.
        let watch = ArrayWatch(arrays + pools.values.flatMap(\.arrays))
        let watcher = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(200))
                watch.check()
            }
        }
        let signalName = await termination.wait()
        print("\(signalName): stopping (finishing requests in flight, flushing, closing)")
        await server.stop()
        watcher.cancel()
        watch.check()
        let closed = await closeAll()
        if socket != nil || tcp == nil {
            try? FileManager.default.removeItem(atPath: socket ?? "spindle-nbd.sock")
        }
        let unwell = watch.arrays.map(\.status).filter { $0.state != .clean }
        for status in unwell {
            let lost = status.slots.filter { $0.state != .active }.map {
                "slot \($0.slot) \($0.state)\($0.device.map { " (\($0))" } ?? "")"
            }
            print("array \(status.name) is \(status.state)\(lost.isEmpty ? "" : ": " + lost.joined(separator: ", "))")
        }
        if closed && unwell.isEmpty {
            print("stopped cleanly")
        } else {
            print(
                "stopped\(unwell.isEmpty ? "" : "; " + unwell.map { "array \($0.name) is \($0.state)" }.joined(separator: ", "))\(closed ? "" : "; not everything closed cleanly (see the errors above)")"
            )
        }
    }

    /// The name an export is served under: POOL/NAME, the array's name, or the image's file name.
    static func exportName(_ export: String) -> String {
        if NBDAddress.looksLikeURI(export) {
            let name = (try? NBDAddress(parsing: export))?.exportName ?? ""
            return name.isEmpty ? "remote" : name
        }
        let value = String(export[export.index(after: export.firstIndex(of: ":")!)...])
        return export.hasPrefix("image:") ? (value as NSString).lastPathComponent : value
    }
}

extension NBDServer.TLS.Mode: ExpressibleByArgument {}

/// The arrays `serve` exports, watched for members that fail under them.
final class ArrayWatch: Sendable {
    let arrays: [RAIDArray]
    /// The slot states last seen, per array.
    private let seen: [LockedValue<[RAIDMemberState]>]

    init(_ arrays: [RAIDArray]) {
        self.arrays = arrays
        seen = arrays.map { LockedValue($0.status.slots.map(\.state)) }
    }

    /// Logs each member that stopped serving since the last check, with the array's state.
    func check() {
        for (array, seen) in zip(arrays, seen) {
            let status = array.status
            let before = seen.exchange(status.slots.map(\.state))
            for slot in status.slots where slot.slot < before.count {
                let wasServing = before[slot.slot] == .active || before[slot.slot] == .rebuilding
                guard wasServing && (slot.state == .faulty || slot.state == .missing) else { continue }
                let state = status.state == .failed ? "has failed" : "is \(status.state)"
                let member = slot.device.map { "member \($0)" } ?? "the member"
                FileHandle.standardError.write(
                    Data("spindle serve: \(member) in slot \(slot.slot) failed; array \(status.name) \(state)\n".utf8))
            }
        }
    }
}
