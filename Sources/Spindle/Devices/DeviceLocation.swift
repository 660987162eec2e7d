/// Where a device is, as people write it: an image file's path, or a remote export's URI
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`; see ``NBDAddress``). Everything
/// that takes a device by name (the CLI's targets, an embedder's configuration) goes through here,
/// so a remote device works wherever an image does.
public enum DeviceLocation: Sendable, Equatable, CustomStringConvertible {
    case image(path: String)
    case nbd(NBDAddress)

    /// Reads a location: a URI when it is written as one (a malformed URI is an error, never taken
    /// for a file name), a path otherwise.
    /// - Throws: ``SpindleError`` for a malformed or unsupported URI.
    public init(_ text: String) throws(SpindleError) {
        if NBDAddress.looksLikeURI(text) {
            self = .nbd(try NBDAddress(parsing: text))
        } else {
            self = .image(path: text)
        }
    }

    /// Whether the device lives on another machine (or process) rather than in a local file.
    public var isRemote: Bool {
        if case .image = self { return false }
        return true
    }

    public var description: String {
        switch self {
        case let .image(path): return path
        case let .nbd(address): return address.uri
        }
    }

    /// Opens the device: an image with ``FileDevice/open(path:engine:options:)``, a remote export by
    /// connecting to it. The caller owns what is returned (closes it, or hands it to an owner).
    public func open(engine: IOEngine, readOnly: Bool = false, directIO: FileDevice.DirectIO = .preferred)
        async throws(SpindleError) -> any BlockDevice
    {
        switch self {
        case let .image(path):
            return try FileDevice.open(
                path: path, engine: engine, options: FileDevice.Options(readOnly: readOnly, directIO: directIO))
        case let .nbd(address):
            return try await NBDDevice.connect(address, engine: engine, options: NBDDevice.Options(readOnly: readOnly))
        }
    }
}
