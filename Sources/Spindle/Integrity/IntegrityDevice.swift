import Glibc
import Synchronization

/// A block device that checks every block it returns: a CRC32C per 4 KiB block (ISA-L), seeded with
/// the device's UUID and the block's address, kept in a checksum area on the device underneath (as
/// dm-integrity does under LVM's `--raidintegrity`). A read whose data does not match fails with
/// ``SpindleError/Code/corrupted`` naming the device and the offset: nothing wrong is returned as
/// data. Under a RAID array that error is a member read error, which the array answers from the
/// mirror or parity and rewrites; a pool on a plain image reports it.
///
/// What it catches: bits flipped at rest or on the way up, writes that landed at another offset
/// (the address is in the checksum), writes acknowledged but never stored (the checksum says what
/// should be there). The layout is ``IntegritySuperblock``'s; `docs/FORMATS.md` documents it.
///
/// ## Crashes
/// Data and checksums are written separately, so a power cut can leave them apart. Before the
/// first write into a region (``IntegritySuperblock/regionBytes``) since the device was last clean,
/// its bit is set in the on-disk bitmap (a FUA write); an idle device (no writes for
/// ``defaultIdleCleanNanos``) flushes and clears the bitmap, as md's write-intent bitmap does. The
/// regions a crash leaves marked are *suspect*: a block there whose data does not match its
/// checksum holds its old or its new contents (the block device contract), so
/// - with ``IntegritySuperblock/CrashPolicy/standalone`` (no redundancy above) it keeps its data and
///   gets a new checksum, at open;
/// - with ``IntegritySuperblock/CrashPolicy/redundant`` (under RAID) it reads as corrupted, so that
///   the array's resync rewrites it from the mirror or parity, and only what redundancy could not
///   answer is accepted afterwards (``resolveSuspects(acceptingRemaining:)``). A bad block that a
///   good copy could repair is never blessed (dm-integrity's bitmap mode recomputes checksums over
///   whatever the data is).
/// Blocks outside suspect regions always fail as corrupted when they do not match: a flushed block
/// reads back correct or fails, never silently wrong.
///
/// ## Ownership
/// The integrity device owns the device underneath: closing it flushes, marks it clean and closes
/// that device. Its ``name`` is the underlying device's, so array members keep their paths.
public final class IntegrityDevice: BlockDevice {
    /// What the layer has seen, for status and scrub reports.
    public struct Statistics: Sendable, Equatable, Codable {
        /// 4 KiB blocks read and checked.
        public var blocksVerified: UInt64 = 0
        /// Distinct blocks found not matching their checksums (each counted once, until rewritten).
        public var corruptBlocksFound: UInt64 = 0
        /// Of those, blocks written again since (repaired by the layer above, or overwritten).
        public var corruptBlocksRewritten: UInt64 = 0
        /// Blocks in regions a crash left suspect whose data was kept and checksummed afresh.
        public var blocksAcceptedAfterCrash: UInt64 = 0
        /// Regions a crash left suspect and not yet resolved.
        public var suspectRegions: Int = 0
        /// Checksum blocks (4 KiB, 1024 checksums each) held in memory.
        public var cachedChecksumBlocks: Int = 0
    }

    public let superblock: IntegritySuperblock
    let inner: any BlockDevice
    let checksum: BlockChecksum
    public var logicalBlockBytes: Int { IntegritySuperblock.blockBytes }
    public var capacityBytes: UInt64 { superblock.dataBytes }
    public var isReadOnly: Bool { inner.isReadOnly }
    public var discardReadsZeroes: Bool { inner.discardReadsZeroes }
    public var name: String { inner.name }

    /// Default memory for cached checksums: 64 MiB, the checksums of 64 GiB of data.
    public static let defaultChecksumCacheBytes = 64 << 20
    /// An integrity device with no writes for this long flushes and marks itself clean.
    public static let defaultIdleCleanNanos: UInt64 = 2_000_000_000
    /// Writes of this size or more compute their checksums off the calling executor.
    static let offloadedChecksumBytes = 128 << 10
    /// Writes lock 64 KiB units against overlapping writes (so data and checksum land in one order).
    static let lockUnitShift: UInt64 = 16

    struct CachedChecksums {
        var entries: [UInt32]
        var dirty = false
        /// Being written back (not to be evicted until the write has landed).
        var writing = false
        var referenced = true
    }

    struct State {
        var cache: [UInt64: CachedChecksums] = [:]
        var clock: [UInt64] = []
        var hand = 0
        /// Per hash slot of checksum block indices, the eviction count at the last eviction there:
        /// a load that began before it may have read what a since-evicted dirty copy replaced.
        var evictedAt = [UInt64](repeating: 0, count: 4096)
        var evictions: UInt64 = 0
        /// Writes in flight: their first block and new checksums (a read that races one may see
        /// the new data before the new checksum).
        var pending: [UInt64: (firstBlock: UInt64, checksums: [UInt32])] = [:]
        var nextPendingID: UInt64 = 0
        /// Blocks whose write failed: their data may be old or new, so either checksum is accepted.
        var alternates: [UInt64: UInt32] = [:]
        /// Blocks found corrupt and not written since (bounded).
        var knownBad: Set<UInt64> = []
        /// Regions written since the device was last clean; suspect regions; what the disk has.
        var written: [UInt8]
        var suspect: [UInt8]
        var onDisk: [UInt8]
        /// Whether `onDisk` may be trusted by the fast path (false while the cleaner works).
        var bitmapValid = true
        var statistics = Statistics()
    }

    let state: Locked<State>
    let cacheCapacityBlocks: Int
    let gate = RequestGate()
    let unitLocks = StripeLocks()
    /// Serializes bitmap writes.
    let bitmapLock = AsyncMutex()
    /// Serializes write-backs of checksum blocks (so no two writes of one block are in flight).
    let writebackLock = AsyncMutex()
    /// Taken by suspect resolution, and by writes into suspect regions while it runs.
    let resolveLock = AsyncMutex()
    let writesInFlight = Atomic<Int>(0)
    let writeGeneration = Atomic<UInt64>(0)
    let lastWriteNanos = Atomic<UInt64>(0)
    let idleCleanNanos = Atomic<UInt64>(IntegrityDevice.defaultIdleCleanNanos)
    let cleaner = Locked<Task<Void, Never>?>(nil)

    init(inner: any BlockDevice, superblock: IntegritySuperblock, bitmap: [UInt8], checksumCacheBytes: Int) {
        self.inner = inner
        self.superblock = superblock
        checksum = BlockChecksum(uuid: superblock.uuid)
        cacheCapacityBlocks = max(16, checksumCacheBytes / IntegritySuperblock.blockBytes)
        var initial = State(
            written: [UInt8](repeating: 0, count: IntegritySuperblock.bitmapBytes), suspect: bitmap,
            onDisk: bitmap)
        initial.statistics.suspectRegions = bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
        state = Locked(initial)
    }

    // MARK: Writes

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try validate(offset: offset, length: buffer.count, operation: "write")
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        let firstBlock = offset / UInt64(IntegritySuperblock.blockBytes)
        let checksums: [UInt32]
        if buffer.count >= Self.offloadedChecksumBytes {
            // A large write's checksums are computed on the global executor, so that the engine's
            // reactor (where requests usually run) goes on submitting meanwhile: one core computes
            // while the other submits (this took full-stripe RAID5 writes from 0.6x to … of an
            // array without the layer).
            let borrowed = BorrowedBytes(bytes: buffer)
            let checksum = self.checksum
            checksums = await Task.detached { checksum.stored(forBlocksOf: borrowed.bytes, firstIndex: firstBlock) }
                .value
        } else {
            checksums = checksum.stored(forBlocksOf: buffer, firstIndex: firstBlock)
        }
        try await changeBlocks(offset: offset, length: UInt64(buffer.count), checksums: checksums, fua: fua) {
            try await self.inner.write(from: buffer, at: self.superblock.dataOffset + offset, fua: fua)
        }
    }

    /// The frame of every change to data: counts the write in flight, marks its regions in the
    /// bitmap, locks its units, loads its checksums, runs `body` (which writes the data whose blocks
    /// have `checksums`), then records them (with FUA, durably).
    func changeBlocks(
        offset: UInt64, length: UInt64, checksums: [UInt32], fua: Bool, _ body: () async throws -> Void
    ) async throws {
        writesInFlight.add(1, ordering: .sequentiallyConsistent)
        defer {
            lastWriteNanos.store(monotonicNanos(), ordering: .relaxed)
            writesInFlight.subtract(1, ordering: .sequentiallyConsistent)
        }
        try await markWritten(offset: offset, length: length)
        let blockBytes = UInt64(IntegritySuperblock.blockBytes)
        let firstBlock = offset / blockBytes
        let blockCount = Int(length / blockBytes)
        let units = (offset >> Self.lockUnitShift)...((offset + length - 1) >> Self.lockUnitShift)
        await unitLocks.lock(units)
        defer { unitLocks.unlock(units) }
        // While suspect regions are being resolved, a write there waits, so that resolution never
        // checksums data this write is replacing.
        let intoSuspect = state.withLock { state in
            (firstBlock..<(firstBlock + UInt64(blockCount))).contains { isSuspect(block: $0, state) }
        }
        if intoSuspect { await resolveLock.lock() }
        defer { if intoSuspect { resolveLock.unlock() } }
        let checksumBlocks = Self.checksumBlocks(firstBlock: firstBlock, count: blockCount)
        try await loadChecksums(checksumBlocks)
        let id = state.withLock { state -> UInt64 in
            state.nextPendingID += 1
            state.pending[state.nextPendingID] = (firstBlock, checksums)
            return state.nextPendingID
        }
        defer { _ = state.withLock { $0.pending.removeValue(forKey: id) } }
        do {
            try await body()
        } catch {
            // Each block holds its old or its new data now: accept either until it is written again.
            state.withLock { state in
                for (index, value) in checksums.enumerated() { state.alternates[firstBlock + UInt64(index)] = value }
            }
            throw error
        }
        try await record(checksums, firstBlock: firstBlock)
        writeGeneration.add(1, ordering: .releasing)
        if fua { try await writeBack(Array(checksumBlocks), fua: true) }
    }

    /// Records the new checksums of blocks from `firstBlock` (loading any checksum block evicted
    /// meanwhile) and counts the known-bad blocks they replace.
    func record(_ checksums: [UInt32], firstBlock: UInt64) async throws {
        let checksumBlocks = Self.checksumBlocks(firstBlock: firstBlock, count: checksums.count)
        while true {
            let done = state.withLock { state -> Bool in
                guard checksumBlocks.allSatisfy({ state.cache[$0] != nil }) else { return false }
                for (index, value) in checksums.enumerated() {
                    let block = firstBlock + UInt64(index)
                    setEntry(block: block, to: value, &state)
                    state.alternates.removeValue(forKey: block)
                    if state.knownBad.remove(block) != nil { state.statistics.corruptBlocksRewritten += 1 }
                }
                return true
            }
            if done { return }
            try await loadChecksums(checksumBlocks)
        }
    }

    /// Sets a cached checksum (the checksum block must be cached) and marks its block dirty.
    func setEntry(block: UInt64, to value: UInt32, _ state: inout State) {
        let perBlock = UInt64(IntegritySuperblock.checksumsPerBlock)
        state.cache[block / perBlock]!.entries[Int(block % perBlock)] = value
        // A read-only device keeps what it accepts in memory only (see ``resolveMismatches``).
        if !inner.isReadOnly { state.cache[block / perBlock]!.dirty = true }
        state.cache[block / perBlock]!.referenced = true
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        try await flushChecksumsAndData()
    }

    /// Writes every dirty checksum block, then flushes the device underneath.
    func flushChecksumsAndData() async throws {
        if inner.isReadOnly { return }
        try await writeBack(nil, fua: false)
        try await inner.flush()
    }

    /// A discard reaches the device underneath only when it then reads zeros (so the checksums can
    /// say zeros); otherwise it is dropped, as discards may be.
    public func discard(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "discard", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "discard")
        guard inner.discardReadsZeroes else { return }
        try gate.enter(operation: "discard", name: name)
        defer { gate.leave() }
        try await zeroRange(offset: offset, length: length) { offset, length in
            try await self.inner.discard(offset: offset, length: length)
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try gate.enter(operation: "write-zeroes", name: name)
        defer { gate.leave() }
        try await zeroRange(offset: offset, length: length) { offset, length in
            try await self.inner.writeZeroes(offset: offset, length: length)
        }
    }

    /// Zeroes (or discards) data range `offset ..< offset + length` through `zero` in pieces of 64
    /// MiB, and sets the checksums of its blocks to zero.
    private func zeroRange(
        offset: UInt64, length: UInt64, _ zero: @escaping (UInt64, UInt64) async throws -> Void
    ) async throws {
        let pieceBytes: UInt64 = 64 << 20
        var position = offset
        while position < offset + length {
            let piece = min(pieceBytes - position % pieceBytes, offset + length - position)
            let start = position
            let zeros = [UInt32](repeating: 0, count: Int(piece / UInt64(IntegritySuperblock.blockBytes)))
            try await changeBlocks(offset: start, length: piece, checksums: zeros, fua: false) {
                try await zero(self.superblock.dataOffset + start, piece)
            }
            position += piece
        }
    }

    /// Lets go of the device without closing what is underneath (a build that failed hands the
    /// device back to its caller): stops the idle cleaner. Unflushed checksums are dropped, as a
    /// crash would drop them.
    public func abandon() {
        cleaner.withLock { $0?.cancel() }
    }

    /// Waits for requests in flight, flushes, marks the device clean and closes the device
    /// underneath. Closing twice is harmless.
    public func close() async throws {
        guard await gate.close() else { return }
        cleaner.withLock { $0?.cancel() }
        if !inner.isReadOnly {
            await bitmapLock.lock()
            var failure: (any Error)?
            do {
                try await flushChecksumsAndData()
                let clean = state.withLock { $0.suspect }
                try await writeBitmap(clean)
                state.withLock { state in
                    state.onDisk = clean
                    state.written = [UInt8](repeating: 0, count: IntegritySuperblock.bitmapBytes)
                }
            } catch {
                failure = error
            }
            bitmapLock.unlock()
            try? await inner.close()
            if let failure { throw failure }
            return
        }
        try await inner.close()
    }
}

/// A caller's buffer lent to a task that computes its checksums.
///
/// @unchecked Sendable: the buffer is borrowed for the whole request (the block device contract),
/// and the request awaits the task before it returns; the task only reads it.
struct BorrowedBytes: @unchecked Sendable {
    let bytes: UnsafeRawBufferPointer
}

/// A device that checks what it returns against checksums (``IntegrityDevice``): what a RAID array
/// asks of members that have one, without knowing their type.
public protocol IntegrityChecking: BlockDevice {
    /// Counts of verified, corrupt and repaired blocks.
    var statistics: IntegrityDevice.Statistics { get }
    /// Whether regions a crash left suspect are still unresolved.
    var hasSuspects: Bool { get }
    /// Resolves suspect regions (see ``IntegrityDevice/resolveSuspects(acceptingRemaining:)``).
    func resolveSuspects(acceptingRemaining: Bool) async throws -> IntegrityDevice.SuspectResolution
    /// Whether `data` is what the checksums stored for `offset ..< offset + data.count` describe
    /// (without reading the data there): how a layer above checks a block it rebuilt from
    /// redundancy before it writes it back or returns it.
    func matchesChecksums(_ data: UnsafeRawBufferPointer, at offset: UInt64) async throws -> Bool
}

extension IntegrityChecking {
    /// ``matchesChecksums(_:at:)`` for `range` of an aligned buffer, kept alive until done.
    public func matchesChecksums(_ buffer: AlignedBuffer, range: Range<Int>, at offset: UInt64) async throws -> Bool {
        defer { withExtendedLifetime(buffer) {} }  // the pointer below is good only while the owner lives
        return try await matchesChecksums(
            UnsafeRawBufferPointer(buffer.slice(offset: range.lowerBound, length: range.count)), at: offset)
    }
}

extension IntegrityDevice: IntegrityChecking {}
