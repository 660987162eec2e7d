import Glibc

/// Memory aligned for direct I/O (4096 bytes by default), freed when the last reference goes.
///
/// The buffer is a reference to one fixed region of memory, like `UnsafeMutableRawBufferPointer`
/// with an owner: keep a reference across the `await` of every request that uses it, and do not
/// touch the bytes a request reads into or writes from until that request returns. Requests take
/// the region, or part of it, as a raw buffer pointer (``bytes``, ``slice(offset:length:)``).
public final class AlignedBuffer: @unchecked Sendable {
    // @unchecked Sendable: the class holds only immutable fields (a pointer and sizes); who may touch
    // the memory, and when, is the request contract above, as for an unsafe buffer pointer.

    /// Size in bytes.
    public let count: Int
    /// Alignment of the start address, in bytes.
    public let alignment: Int
    /// The whole region.
    public let bytes: UnsafeMutableRawBufferPointer

    /// Allocates `count` bytes aligned to `alignment`, filled with zeros unless `zeroed` is false
    /// (for buffers about to be filled by a read, where clearing them first is wasted work).
    /// - Parameters:
    ///   - count: bytes to allocate (0 gives an empty buffer).
    ///   - alignment: a power of two, at least the pointer size.
    public init(count: Int, alignment: Int = 4096, zeroed: Bool = true) {
        precondition(count >= 0, "AlignedBuffer count must not be negative")
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        self.count = count
        self.alignment = max(alignment, MemoryLayout<UnsafeRawPointer>.size)
        var memory: UnsafeMutableRawPointer?
        let result = posix_memalign(&memory, self.alignment, max(count, 1))
        precondition(result == 0 && memory != nil, "posix_memalign(\(count)) failed: \(result)")
        if zeroed { memset(memory!, 0, max(count, 1)) }
        bytes = UnsafeMutableRawBufferPointer(start: memory, count: count)
    }

    deinit {
        free(bytes.baseAddress)
    }

    /// Part of the region.
    public func slice(offset: Int, length: Int) -> UnsafeMutableRawBufferPointer {
        precondition(offset >= 0 && length >= 0 && offset + length <= count, "slice out of the buffer")
        return UnsafeMutableRawBufferPointer(rebasing: bytes[offset..<(offset + length)])
    }

    /// The whole region, read-only.
    public var readOnlyBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }

    /// Sets every byte to `value`.
    public func fill(_ value: UInt8) {
        bytes.initializeMemory(as: UInt8.self, repeating: value)
    }

    /// A copy of the contents.
    public var array: [UInt8] { Array(bytes) }

    /// Copies `length` bytes at `offset` of `source` to the same place in this buffer (all of
    /// `source` by default), both buffers kept alive for the copy.
    public func copy(from source: AlignedBuffer, offset: Int = 0, length: Int? = nil) {
        let length = length ?? source.count
        precondition(offset >= 0 && offset + length <= min(count, source.count), "copy out of the buffers")
        withExtendedLifetime((self, source)) {
            (bytes.baseAddress! + offset).copyMemory(from: source.bytes.baseAddress! + offset, byteCount: length)
        }
    }

    /// Copies `source` into this buffer at `offset` (this buffer kept alive for the copy).
    public func copy(from source: UnsafeRawBufferPointer, at offset: Int) {
        precondition(offset >= 0 && offset + source.count <= count, "copy out of the buffer")
        guard let start = source.baseAddress else { return }
        withExtendedLifetime(self) {
            (bytes.baseAddress! + offset).copyMemory(from: start, byteCount: source.count)
        }
    }

    /// Whether `length` bytes at `offset` are the same in both buffers.
    public func equals(_ other: AlignedBuffer, offset: Int = 0, length: Int? = nil) -> Bool {
        let length = length ?? count
        precondition(offset >= 0 && offset + length <= min(count, other.count), "comparison out of the buffers")
        return withExtendedLifetime((self, other)) {
            memcmp(bytes.baseAddress! + offset, other.bytes.baseAddress! + offset, length) == 0
        }
    }
}
