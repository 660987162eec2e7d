/// A block device: the one abstraction every Spindle layer implements and builds on. Image files,
/// memory, fault injectors, RAID arrays and thin volumes are all block devices, and each layer knows
/// only this protocol of the layers beneath it.
///
/// ## Requests
/// Offsets and lengths are in bytes and must be multiples of ``logicalBlockBytes``; a request must lie
/// inside ``capacityBytes`` and must not be empty. A request that breaks these rules fails with
/// ``SpindleError/Code/misaligned``, ``SpindleError/Code/outOfRange`` or
/// ``SpindleError/Code/invalidArgument`` and touches nothing. ``validate(offset:length:operation:)``
/// makes these checks for implementations.
///
/// Buffers are borrowed: the memory must stay valid and untouched by anyone else until the call
/// returns. Devices that use direct I/O may also require the buffer's address to be aligned
/// (``AlignedBuffer`` always is). Swift may release an object right after its last use, so a raw
/// pointer taken from an ``AlignedBuffer`` does not by itself keep the buffer alive across the
/// `await`: pass the ``AlignedBuffer`` itself (``read(into:range:at:)``, ``write(from:range:at:fua:)``),
/// which holds it for the whole call, or use the buffer again after the `await`.
///
/// Concurrent requests may complete in any order. Overlapping concurrent writes, or a read
/// concurrent with an overlapping write, leave or return either version, per logical block; callers
/// that care order them.
///
/// ## Durability: the flush contract
/// - A completed ``write(from:at:fua:)`` is visible to every later read, but it is durable only once
///   it is covered by a completed ``flush()``, or if it was written with `fua: true`.
/// - A completed ``flush()`` guarantees that every write, discard and write-zeroes that completed
///   before the flush was issued survives a crash or power loss.
/// - After a crash, a write that was not covered by a flush may be absent, present, or present in
///   part: each logical block it touched holds either its old or its new contents, never anything
///   else.
/// - Read errors never change data; a failed write leaves each block it touched either old or new.
///
/// ## Discard and write-zeroes
/// ``discard(offset:length:)`` tells the device a range is no longer needed: afterwards it reads
/// either as its old contents or as zeros (devices that always return zeros say so in
/// ``discardReadsZeroes``). ``writeZeroes(offset:length:)`` guarantees zeros and may free space.
/// Both take whole blocks; ``discardBytes(offset:length:)`` and ``zeroBytes(offset:length:)`` take any
/// byte range (what an NBD client may send): the whole blocks inside go to the aligned calls, and only
/// write-zeroes rewrites the partial blocks at the edges (a discard is advisory and leaves them).
/// Layers that know more (a thin volume knows which chunks hold data) implement them themselves.
///
/// ## Ownership: who closes a device
/// A device built from other devices owns them once the call that builds it returns: a
/// ``RAIDArray`` owns its members from `create` or `assemble`, a ``ThinPool`` its data devices from
/// `create` or `open`, and a device added later (`add`, `replace`, `extend`) belongs to it once that
/// call returns. The owner closes what it owns in its own `close()` (an array also closes a member
/// it lets go of, removed or replaced). When the building call throws, nothing changed hands: the
/// caller still owns every device it passed and closes them itself. Devices a build leaves out (an
/// assembly's stale or surplus members) stay the caller's too. So a caller closes only the outermost
/// thing it holds, once, and never a device underneath it.
///
/// Two kinds of object stand beside a device without owning it: a ``ThinVolume`` is a view of its
/// pool (closing the volume leaves the pool open; closing the pool ends its volumes), and a
/// ``FaultyDevice`` stands for a disk under test (closing it leaves the wrapped device open, as a
/// crash leaves the disk). ``Discovery`` opens whole stacks by these rules: what it returns is the
/// one thing to close.
public protocol BlockDevice: AnyObject, Sendable {
    /// Size of the smallest unit that can be read or written, in bytes (a power of two, at least 512).
    var logicalBlockBytes: Int { get }
    /// Usable size in bytes, a multiple of ``logicalBlockBytes``.
    var capacityBytes: UInt64 { get }
    /// Whether writes, discards and write-zeroes are refused.
    var isReadOnly: Bool { get }
    /// Whether a discarded range reads as zeros afterwards.
    var discardReadsZeroes: Bool { get }
    /// A short name for messages: a path, or a description of the layer.
    var name: String { get }

    /// Reads `buffer.count` bytes at `offset` into `buffer`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws
    /// Writes `buffer` at `offset`. With `fua`, the data is durable when the call returns.
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws
    /// Makes every write that completed before this call durable (see the flush contract above).
    func flush() async throws
    /// Releases a range; it then reads as old data or zeros (see ``discardReadsZeroes``).
    func discard(offset: UInt64, length: UInt64) async throws
    /// Makes a range read as zeros.
    func writeZeroes(offset: UInt64, length: UInt64) async throws
    /// Releases any byte range, aligned or not, as an advisory request that never needs space (an NBD
    /// trim): afterwards each byte reads as its old contents or zeros. The default discards the whole
    /// blocks inside it and leaves the partial blocks at its edges as they are, reading and writing
    /// no data.
    /// - Throws: ``SpindleError`` for an empty range or one past the end, or what the device's
    ///   ``discard(offset:length:)`` throws.
    func discardBytes(offset: UInt64, length: UInt64) async throws
    /// Makes any byte range, aligned or not, read as zeros. The default passes the whole blocks inside
    /// it to ``writeZeroes(offset:length:)`` and rewrites each partial block at its edges (read, zero
    /// the bytes in the range, write). Callers order concurrent requests that share an edge block,
    /// as for any overlapping writes (``NBDServer`` does).
    /// - Throws: ``SpindleError`` for an empty range or one past the end, or what the device's reads
    ///   and writes throw.
    func zeroBytes(offset: UInt64, length: UInt64) async throws
    /// Waits for the device's requests in flight, then releases it and the devices it owns (see
    /// "Ownership" above). Later requests fail with ``SpindleError/Code/closed``. Closing twice is
    /// harmless.
    func close() async throws
}

extension BlockDevice {
    /// Writes without forced unit access.
    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64) async throws {
        try await write(from: buffer, at: offset, fua: false)
    }

    /// Reads into an aligned buffer (all of it, or `range` of it), keeping the buffer alive until done.
    public func read(into buffer: AlignedBuffer, range: Range<Int>? = nil, at offset: UInt64) async throws {
        let range = range ?? 0..<buffer.count
        defer { withExtendedLifetime(buffer) {} }  // the pointer below is good only while the owner lives
        try await read(into: buffer.slice(offset: range.lowerBound, length: range.count), at: offset)
    }

    /// Writes an aligned buffer (all of it, or `range` of it), keeping the buffer alive until done.
    public func write(from buffer: AlignedBuffer, range: Range<Int>? = nil, at offset: UInt64, fua: Bool = false)
        async throws
    {
        let range = range ?? 0..<buffer.count
        defer { withExtendedLifetime(buffer) {} }  // the pointer below is good only while the owner lives
        try await write(
            from: UnsafeRawBufferPointer(buffer.slice(offset: range.lowerBound, length: range.count)), at: offset,
            fua: fua)
    }

    /// Checks a request against this device's block size and capacity.
    /// - Throws: ``SpindleError`` naming the device, the operation, the offset and the length.
    @inlinable
    public func validate(offset: UInt64, length: Int, operation: String) throws(SpindleError) {
        try validateRequest(
            offset: offset, length: UInt64(max(length, 0)), isEmpty: length <= 0, operation: operation)
    }

    /// Checks a request given as a 64-bit length (discard, write-zeroes).
    @inlinable
    public func validate(offset: UInt64, length: UInt64, operation: String) throws(SpindleError) {
        try validateRequest(offset: offset, length: length, isEmpty: length == 0, operation: operation)
    }

    @usableFromInline
    func validateRequest(offset: UInt64, length: UInt64, isEmpty: Bool, operation: String) throws(SpindleError) {
        let block = UInt64(logicalBlockBytes)
        if isEmpty {
            throw SpindleError(
                .invalidArgument, "the request is empty; give a length of at least one block (\(block) bytes)",
                operation: operation, path: name, offset: offset, length: length)
        }
        if offset % block != 0 || length % block != 0 {
            throw SpindleError(
                .misaligned,
                "offset and length must be multiples of the logical block size, \(block) bytes",
                operation: operation, path: name, offset: offset, length: length)
        }
        if offset > capacityBytes || length > capacityBytes - offset {
            throw SpindleError(
                .outOfRange, "the request ends past the end of the device (capacity \(capacityBytes) bytes)",
                operation: operation, path: name, offset: offset, length: length)
        }
    }

    /// Checks a byte range of any alignment (``discardBytes(offset:length:)``,
    /// ``zeroBytes(offset:length:)``) against this device's capacity.
    /// - Throws: ``SpindleError`` naming the device, the operation, the offset and the length.
    public func validateByteRange(offset: UInt64, length: UInt64, operation: String) throws(SpindleError) {
        if length == 0 {
            throw SpindleError(
                .invalidArgument, "the request is empty; give a length of at least one byte",
                operation: operation, path: name, offset: offset, length: length)
        }
        if offset > capacityBytes || length > capacityBytes - offset {
            throw SpindleError(
                .outOfRange, "the request ends past the end of the device (capacity \(capacityBytes) bytes)",
                operation: operation, path: name, offset: offset, length: length)
        }
    }

    /// Fails with ``SpindleError/Code/readOnly`` when the device is read-only.
    @inlinable
    public func checkWritable(operation: String, offset: UInt64? = nil, length: UInt64? = nil) throws(SpindleError) {
        if isReadOnly {
            throw SpindleError(
                .readOnly, "the device is open read-only", operation: operation, path: name,
                offset: offset, length: length)
        }
    }
}
