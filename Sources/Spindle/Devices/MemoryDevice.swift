import Glibc

/// A block device in memory, for tests and for measuring the layers above without disk cost.
///
/// Requests complete synchronously; flush does nothing (memory is as durable as it gets here).
/// Memory is taken from the system lazily, so a large device that is mostly unwritten costs little.
public final class MemoryDevice: BlockDevice {
    public let logicalBlockBytes: Int
    public let capacityBytes: UInt64
    public let isReadOnly: Bool
    public var discardReadsZeroes: Bool { true }
    public let name: String

    // nonisolated(unsafe): the pointer never changes; the bytes it points to are shared the way the
    // BlockDevice contract says (callers order overlapping requests), like a disk's sectors.
    nonisolated(unsafe) private let memory: UnsafeMutableRawPointer
    private let gate = RequestGate()

    /// - Parameters:
    ///   - capacityBytes: a positive multiple of `logicalBlockBytes`.
    ///   - logicalBlockBytes: a power of two from 512 to 65536.
    public init(
        capacityBytes: UInt64, logicalBlockBytes: Int = 512, readOnly: Bool = false, name: String = "memory"
    ) throws(SpindleError) {
        guard logicalBlockBytes >= 512, logicalBlockBytes <= 65536, logicalBlockBytes & (logicalBlockBytes - 1) == 0
        else {
            throw SpindleError(
                .invalidArgument, "the logical block size \(logicalBlockBytes) is not a power of two from 512 to 65536",
                path: name)
        }
        guard capacityBytes > 0, capacityBytes % UInt64(logicalBlockBytes) == 0, capacityBytes <= UInt64(Int.max) else {
            throw SpindleError(
                .invalidArgument,
                "the capacity \(capacityBytes) bytes is not a positive multiple of the block size (\(logicalBlockBytes) bytes)",
                path: name)
        }
        guard let memory = calloc(Int(capacityBytes), 1) else {
            throw SpindleError(.ioFailed, "cannot allocate \(capacityBytes) bytes of memory", path: name)
        }
        self.memory = memory
        self.capacityBytes = capacityBytes
        self.logicalBlockBytes = logicalBlockBytes
        self.isReadOnly = readOnly
        self.name = name
    }

    deinit {
        free(memory)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        buffer.baseAddress!.copyMemory(from: memory + Int(offset), byteCount: buffer.count)
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try validate(offset: offset, length: buffer.count, operation: "write")
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        (memory + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        gate.leave()
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try await zero(offset: offset, length: length, operation: "discard")
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await zero(offset: offset, length: length, operation: "write-zeroes")
    }

    private func zero(offset: UInt64, length: UInt64, operation: String) async throws {
        try checkWritable(operation: operation, offset: offset, length: length)
        try validate(offset: offset, length: length, operation: operation)
        try gate.enter(operation: operation, name: name)
        defer { gate.leave() }
        memset(memory + Int(offset), 0, Int(length))
    }

    public func close() async throws {
        await gate.close()
    }

    /// A copy of a range, bypassing the request checks (for test assertions).
    public func snapshot(offset: UInt64 = 0, length: Int? = nil) -> [UInt8] {
        let count = length ?? Int(capacityBytes - offset)
        return Array(UnsafeRawBufferPointer(start: memory + Int(offset), count: count))
    }
}
