/// Where an NBD export is, written as libnbd writes it (the NBD project's `doc/uri.md`):
///
/// - `nbd://HOST[:PORT][/EXPORT]`: TCP, port 10809 by default; HOST may be a name, an IPv4 address
///   or an IPv6 address in brackets (`nbd://[::1]:10809/disk`);
/// - `nbd+unix:///[EXPORT]?socket=PATH`: a Unix socket.
///
/// The export name is the path after the first `/`, percent-decoded (empty: the server's default
/// export). `nbds://` and `nbds+unix://` (TLS) are recognised and refused with a clear error until
/// the client speaks TLS. Pure parsing: nothing is resolved or connected here.
public struct NBDAddress: Sendable, Equatable, CustomStringConvertible {
    public enum Transport: Sendable, Equatable {
        case tcp(host: String, port: UInt16)
        case unix(path: String)
    }

    public static let defaultPort: UInt16 = 10809

    public var transport: Transport
    public var exportName: String
    /// The address as it was given (for messages).
    public var uri: String

    public var description: String { uri }

    /// Whether `text` is written as an NBD URI (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`),
    /// so callers can tell a remote device from an image path before parsing.
    public static func looksLikeURI(_ text: String) -> Bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://"].contains { text.hasPrefix($0) }
    }

    /// Parses an NBD URI.
    /// - Throws: ``SpindleError/Code/invalidArgument`` naming the URI and what is wrong with it, or
    ///   ``SpindleError/Code/unsupported`` for TLS schemes.
    public init(parsing text: String) throws(SpindleError) {
        func bad(_ why: String) -> SpindleError {
            SpindleError(
                .invalidArgument,
                "'\(text)' is not an NBD URI: \(why) (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)",
                operation: "parse")
        }
        guard let schemeEnd = text.range(of: "://") else { throw bad("no scheme") }
        let scheme = String(text[..<schemeEnd.lowerBound]).lowercased()
        var rest = String(text[schemeEnd.upperBound...])
        if scheme == "nbds" || scheme == "nbds+unix" || scheme == "nbds+tcp" {
            throw SpindleError(
                .unsupported,
                "'\(text)' asks for TLS, which Spindle's NBD client does not speak yet: use nbd:// on a trusted network, or tunnel the connection",
                operation: "parse")
        }
        guard ["nbd", "nbd+tcp", "nbd+unix"].contains(scheme) else {
            throw bad("unknown scheme '\(scheme)'")
        }
        if let fragment = rest.firstIndex(of: "#") { rest = String(rest[..<fragment]) }
        var query: [(String, String)] = []
        if let mark = rest.firstIndex(of: "?") {
            for pair in rest[rest.index(after: mark)...].split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard let key = parts.first, let value = Self.percentDecoded(parts.count > 1 ? parts[1] : "")
                else { throw bad("a malformed query parameter '\(pair)'") }
                query.append((key, value))
            }
            rest = String(rest[..<mark])
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = String(rest[..<slash])
        let path = slash < rest.endIndex ? String(rest[rest.index(after: slash)...]) : ""
        guard let export = Self.percentDecoded(path) else { throw bad("a malformed %-escape in the export name") }
        exportName = export
        uri = text
        if scheme == "nbd+unix" {
            guard authority.isEmpty else { throw bad("a Unix-socket URI takes no host ('\(authority)')") }
            guard let socket = query.first(where: { $0.0 == "socket" })?.1, !socket.isEmpty else {
                throw bad("no socket=PATH")
            }
            transport = .unix(path: socket)
            return
        }
        if query.contains(where: { $0.0 == "socket" }) { throw bad("socket= belongs to nbd+unix:// only") }
        var host = authority
        var port = Self.defaultPort
        if let at = host.lastIndex(of: "@") { host = String(host[host.index(after: at)...]) }
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { throw bad("an unclosed IPv6 bracket") }
            let after = host[host.index(after: close)...]
            if after.hasPrefix(":") {
                guard let number = UInt16(after.dropFirst()), number > 0 else { throw bad("a bad port '\(after)'") }
                port = number
            } else if !after.isEmpty {
                throw bad("text after the IPv6 address")
            }
            host = String(host[host.index(after: host.startIndex)..<close])
        } else if let colon = host.lastIndex(of: ":") {
            guard let number = UInt16(host[host.index(after: colon)...]), number > 0 else {
                throw bad("a bad port '\(host[host.index(after: colon)...])'")
            }
            port = number
            host = String(host[..<colon])
        }
        guard !host.isEmpty else { throw bad("no host") }
        transport = .tcp(host: host, port: port)
    }

    /// `%XX` escapes decoded as UTF-8; nil when an escape is malformed.
    static func percentDecoded(_ text: String) -> String? {
        guard text.contains("%") else { return text }
        var bytes: [UInt8] = []
        var iterator = Array(text.utf8).makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next(), let low = iterator.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            else { return nil }
            bytes.append(value)
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
