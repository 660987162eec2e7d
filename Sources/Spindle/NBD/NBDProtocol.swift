/// The Network Block Device protocol's numbers and message layouts (fixed newstyle negotiation,
/// simple replies; structured replies and metadata contexts are in NBDProtocol+Structured.swift), as
/// the NBD project's `doc/proto.md` specifies. Pure encoding and decoding; all integers on the wire
/// are big-endian.
package enum NBDProtocol {
    static let initialMagic: UInt64 = 0x4E42_444D_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698

    // Handshake flags (server) and client flags.
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1

    /// Options a client sends during negotiation.
    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, peekExport = 4, startTLS = 5, info = 6, go = 7, structuredReply = 8
        case listMetaContext = 9, setMetaContext = 10, extendedHeaders = 11
    }

    /// Option reply types.
    enum Reply: UInt32 {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errorUnsupported = 0x8000_0001, errorPolicy = 0x8000_0002, errorInvalid = 0x8000_0003
        case errorPlatform = 0x8000_0004, errorTLSRequired = 0x8000_0005, errorUnknown = 0x8000_0006
        case errorShutdown = 0x8000_0007, errorBlockSizeRequired = 0x8000_0008, errorTooBig = 0x8000_0009
    }

    /// Information items of `NBD_OPT_INFO` and `NBD_OPT_GO`.
    enum Info: UInt16 {
        case export = 0, name = 1, description = 2, blockSize = 3
    }

    /// Transmission flags, advertised per export.
    package struct TransmissionFlags: OptionSet, Sendable {
        package let rawValue: UInt16
        package init(rawValue: UInt16) { self.rawValue = rawValue }
        package static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
        package static let readOnly = TransmissionFlags(rawValue: 1 << 1)
        package static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
        package static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
        package static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
        package static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
        package static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    }

    /// Commands of the transmission phase.
    enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7,
            resize = 8
    }

    static let commandFlagFUA: UInt16 = 1 << 0
    static let commandFlagNoHole: UInt16 = 1 << 1

    /// Error values on the wire (Linux errno numbers, as the protocol fixes them).
    enum ErrorCode: UInt32 {
        case permission = 1, io = 5, outOfMemory = 12, invalid = 22, noSpace = 28, overflow = 75, notSupported = 95,
            shutdown = 108
    }

    /// A transmission request: 28 bytes.
    struct Request: Equatable {
        static let bytes = 28
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var offset: UInt64
        var length: UInt32

        /// Nil when the magic is wrong (the stream cannot be trusted past that point).
        static func decode(_ bytes: UnsafeRawBufferPointer) -> Request? {
            guard bytes.count >= Self.bytes, bigEndian(UInt32.self, bytes, 0) == requestMagic else { return nil }
            return Request(
                flags: bigEndian(UInt16.self, bytes, 4), type: bigEndian(UInt16.self, bytes, 6),
                cookie: bigEndian(UInt64.self, bytes, 8), offset: bigEndian(UInt64.self, bytes, 16),
                length: bigEndian(UInt32.self, bytes, 24))
        }

        func encoded() -> [UInt8] {
            var bytes: [UInt8] = []
            append(requestMagic, to: &bytes)
            append(flags, to: &bytes)
            append(type, to: &bytes)
            append(cookie, to: &bytes)
            append(offset, to: &bytes)
            append(length, to: &bytes)
            return bytes
        }
    }

    /// A simple reply header: 16 bytes (the data of a successful read follows).
    static func simpleReply(error: UInt32, cookie: UInt64, into bytes: UnsafeMutableRawBufferPointer) {
        putBigEndian(simpleReplyMagic, bytes, 0)
        putBigEndian(error, bytes, 4)
        putBigEndian(cookie, bytes, 8)
    }

    static func optionReply(option: UInt32, reply: UInt32, data: [UInt8]) -> [UInt8] {
        var bytes: [UInt8] = []
        append(optionReplyMagic, to: &bytes)
        append(option, to: &bytes)
        append(reply, to: &bytes)
        append(UInt32(data.count), to: &bytes)
        return bytes + data
    }

    /// The export name and requested information items of an `NBD_OPT_INFO` or `NBD_OPT_GO`, or
    /// nil when the data is malformed.
    static func decodeInfoRequest(_ data: [UInt8]) -> (name: String, items: [UInt16])? {
        guard data.count >= 6 else { return nil }
        let nameLength = Int(bigEndian(UInt32.self, data, 0))
        guard nameLength <= 4096, data.count >= 4 + nameLength + 2 else { return nil }
        let name = String(decoding: data[4..<(4 + nameLength)], as: UTF8.self)
        let count = Int(bigEndian(UInt16.self, data, 4 + nameLength))
        guard data.count == 4 + nameLength + 2 + count * 2 else { return nil }
        let items = (0..<count).map { bigEndian(UInt16.self, data, 4 + nameLength + 2 + $0 * 2) }
        return (name, items)
    }

    // MARK: Big-endian helpers

    static func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    static func bigEndian<T: FixedWidthInteger>(_ type: T.Type, _ bytes: UnsafeRawBufferPointer, _ offset: Int) -> T {
        T(bigEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    static func bigEndian<T: FixedWidthInteger>(_ type: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
        bytes.withUnsafeBytes { bigEndian(type, $0, offset) }
    }

    static func putBigEndian<T: FixedWidthInteger>(_ value: T, _ bytes: UnsafeMutableRawBufferPointer, _ offset: Int) {
        bytes.storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
    }
}
