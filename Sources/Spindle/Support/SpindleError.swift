import Glibc

/// The error every Spindle API throws: what kind of failure it was, a message a person can act on,
/// and, where they apply, the system error number, the operation, the path, the offset and the length.
///
/// `description` reads as one sentence, for example
/// `read of 4096 bytes at offset 8192 on /var/lib/a.img failed: Input/output error (errno 5)`.
public struct SpindleError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What went wrong, for code that reacts to it.
    public enum Code: String, Sendable, Codable, Equatable {
        /// The kernel or a lower device reported an I/O error.
        case ioFailed
        /// A request is not a multiple of the logical block size, or a buffer is badly aligned.
        case misaligned
        /// A request reaches past the end of the device.
        case outOfRange
        /// A request, option or value that can never be valid.
        case invalidArgument
        /// A write, discard or write-zeroes on a device opened read-only.
        case readOnly
        /// The device or engine was closed.
        case closed
        /// Another opener holds the image's write lock.
        case locked
        /// The named file does not exist.
        case notFound
        /// The file to create exists already.
        case alreadyExists
        /// Fewer bytes were transferred than asked for (the image shrank underneath).
        case shortTransfer
        /// A fault injected on purpose by a ``FaultyDevice``.
        case injectedFault
        /// A ``FaultyDevice`` lost power or vanished; it takes no I/O until restored.
        case deviceGone
        /// The operation is not supported by this device or file system.
        case unsupported
        /// Data read back does not match what was written.
        case verificationFailed
        /// A thin pool has no free chunk for a write that needs one.
        case noSpace
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

    public init(
        _ code: Code, _ message: String, errno: Int32? = nil, operation: String? = nil,
        path: String? = nil, offset: UInt64? = nil, length: UInt64? = nil
    ) {
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
        case EINVAL: code = .invalidArgument
        default: code = .ioFailed
        }
        return SpindleError(
            code, "\(String(cString: strerror(errno))) (errno \(errno))", errno: errno,
            operation: operation, path: path, offset: offset, length: length)
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
