import Glibc

/// The error every Spindle API throws: what kind of failure it was, a message a person can act on,
/// and, where they apply, the system error number, the operation, the path, the offset and the length.
///
/// `description` reads as one sentence, for example
/// `read of 4096 bytes at offset 8192 on /var/lib/a.img failed: Input/output error (errno 5)`.
public struct SpindleError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What went wrong, for code that reacts to it.
    ///
    /// A set of named values rather than an enum, so that new codes can be added without breaking
    /// callers: a `switch` over codes needs a `default:` branch, and one written today keeps compiling
    /// when a later version adds a code. Codes compare by name and encode as their name.
    public struct Code: RawRepresentable, Hashable, Sendable, Codable, CustomStringConvertible {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The kernel or a lower device reported an I/O error.
        public static let ioFailed = Code(rawValue: "ioFailed")
        /// A request is not a multiple of the logical block size, or a buffer is badly aligned.
        public static let misaligned = Code(rawValue: "misaligned")
        /// A request reaches past the end of the device.
        public static let outOfRange = Code(rawValue: "outOfRange")
        /// A request, option or value that can never be valid.
        public static let invalidArgument = Code(rawValue: "invalidArgument")
        /// A write, discard or write-zeroes on a device opened read-only.
        public static let readOnly = Code(rawValue: "readOnly")
        /// The device or engine was closed.
        public static let closed = Code(rawValue: "closed")
        /// Another opener holds the image's write lock.
        public static let locked = Code(rawValue: "locked")
        /// The named file does not exist.
        public static let notFound = Code(rawValue: "notFound")
        /// The file to create exists already.
        public static let alreadyExists = Code(rawValue: "alreadyExists")
        /// Fewer bytes were transferred than asked for (the image shrank underneath).
        public static let shortTransfer = Code(rawValue: "shortTransfer")
        /// A fault injected on purpose by a ``FaultyDevice``.
        public static let injectedFault = Code(rawValue: "injectedFault")
        /// A ``FaultyDevice`` lost power or vanished; it takes no I/O until restored.
        public static let deviceGone = Code(rawValue: "deviceGone")
        /// The operation is not supported by this device or file system.
        public static let unsupported = Code(rawValue: "unsupported")
        /// Data read back does not match what was written.
        public static let verificationFailed = Code(rawValue: "verificationFailed")
        /// A thin pool has no free chunk for a write that needs one.
        public static let noSpace = Code(rawValue: "noSpace")
        /// On-disk state failed a check: a checksum, a magic number, a version or a field out of its
        /// range. The data underneath was read; what it holds is not valid. ``SpindleError/cause``
        /// holds the typed problem (for example ``RAIDSuperblock/Problem``).
        public static let corrupted = Code(rawValue: "corrupted")
        /// The I/O engine has more operations waiting than its configuration allows
        /// (``IOEngine/Configuration/maximumWaiting``); nothing was submitted.
        public static let overloaded = Code(rawValue: "overloaded")
        /// A TLS session could not be set up or broke: a failed handshake (wrong key, refused
        /// certificate), a peer that skipped or cut off TLS.
        public static let tlsFailed = Code(rawValue: "tlsFailed")
    }

    public var code: Code
    /// The failure, in words; ``description`` adds the context.
    public var message: String
    /// The system error number, when the failure came from the kernel.
    public var errno: Int32?
    /// The operation: `read`, `write`, `flush`, `discard`, `write-zeroes`, `open`, …
    public var operation: String?
    /// The file or device the operation was on.
    public var path: String?
    /// Byte offset of the request.
    public var offset: UInt64?
    /// Byte length of the request.
    public var length: UInt64?
    /// The error underneath, when this one wraps another: the typed problem of a ``Code/corrupted``
    /// header (``RAIDSuperblock/Problem``, ``ThinPoolLabel/Problem``, …) or the lower device's error.
    public var cause: (any Error & Sendable)?

    public init(
        _ code: Code, _ message: String, errno: Int32? = nil, operation: String? = nil,
        path: String? = nil, offset: UInt64? = nil, length: UInt64? = nil, cause: (any Error & Sendable)? = nil
    ) {
        self.cause = cause
        self.code = code
        self.message = message
        self.errno = errno
        self.operation = operation
        self.path = path
        self.offset = offset
        self.length = length
    }

    /// An error from a system call, with the kernel's text for the error number.
    public static func system(
        _ errno: Int32, operation: String, path: String? = nil, offset: UInt64? = nil, length: UInt64? = nil
    ) -> SpindleError {
        let code: Code
        switch errno {
        case ENOENT: code = .notFound
        case EEXIST: code = .alreadyExists
        case EROFS, EPERM, EACCES: code = .readOnly
        case EOPNOTSUPP: code = .unsupported
        case ECANCELED: code = .closed
        case ENOBUFS: code = .overloaded
        case EINVAL: code = .invalidArgument
        default: code = .ioFailed
        }
        return SpindleError(
            code, "\(String(cString: strerror(errno))) (errno \(errno))", errno: errno,
            operation: operation, path: path, offset: offset, length: length)
    }

    /// The result of an engine operation (``IOEngine/execute(_:)``): its byte count or 0 when it
    /// succeeded, the error when the kernel returned `-errno`. The one place engine results become errors.
    public static func check(
        _ result: Int32, operation: String, path: String? = nil, offset: UInt64? = nil, length: UInt64? = nil
    ) throws(SpindleError) -> Int {
        if result < 0 { throw system(-result, operation: operation, path: path, offset: offset, length: length) }
        return Int(result)
    }

    /// The innermost cause: follows ``cause`` through wrapped Spindle errors.
    public var rootCause: any Error {
        var current: any Error = self
        while let wrapped = (current as? SpindleError)?.cause { current = wrapped }
        return current
    }

    /// Errors are equal when every field is; causes compare by their description.
    public static func == (lhs: SpindleError, rhs: SpindleError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message && lhs.errno == rhs.errno
            && lhs.operation == rhs.operation && lhs.path == rhs.path && lhs.offset == rhs.offset
            && lhs.length == rhs.length
            && lhs.cause.map { String(describing: $0) } == rhs.cause.map { String(describing: $0) }
    }

    public var description: String {
        var subject = ""
        if let operation {
            subject = operation
            if let length { subject += " of \(length) bytes" }
            if let offset { subject += " at offset \(offset)" }
            if let path { subject += " on \(path)" }
        } else if let path {
            subject = path
        }
        return subject.isEmpty ? message : "\(subject) failed: \(message)"
    }
}
