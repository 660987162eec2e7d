/// Buffers reused instead of allocated per request (by the NBD server for requests, by RAID5 for
/// stripe writes and reconstructed reads): a 1 MiB buffer from the C allocator is a fresh mapping
/// each time (page faults on every page, then an unmap), which costs more than the request itself.
/// Buffers come in power-of-two sizes from 4 KiB; a few of each size are kept.
///
/// A buffer may be given back only once no request uses it any more: every read or write that was
/// handed it has returned (on error paths too). ``PooledBuffers`` gives a whole operation's
/// buffers back at once.
final class BufferPool: Sendable {
    private let free = Locked([Int: [AlignedBuffer]]())
    private let keptPerSize: Int

    init(keptPerSize: Int = 64) {
        self.keptPerSize = keptPerSize
    }

    /// A buffer of at least `count` bytes (its contents are not zeroed).
    func take(_ count: Int) -> AlignedBuffer {
        let size = Self.sizeClass(count)
        if let buffer = free.withLock({ $0[size]?.popLast() }) { return buffer }
        return AlignedBuffer(count: size, zeroed: false)
    }

    func give(_ buffer: AlignedBuffer) {
        let size = buffer.count
        guard size == Self.sizeClass(size) else { return }
        free.withLock { free in
            if free[size, default: []].count < keptPerSize { free[size, default: []].append(buffer) }
        }
    }

    static func sizeClass(_ count: Int) -> Int {
        max(4096, 1 << (Int.bitWidth - (max(count, 1) - 1).leadingZeroBitCount))
    }
}

/// The buffers one operation takes from a pool, given back together by ``giveBack()``. Call it
/// where every request that used them has returned: in a `defer` of the function that awaits them
/// all, so that error paths give them back too, and never while a request may still be in flight.
/// Buffers are larger than asked for (their size class): requests and XORs use their first bytes.
final class PooledBuffers {
    private let pool: BufferPool
    private var taken: [AlignedBuffer] = []

    init(_ pool: BufferPool) {
        self.pool = pool
    }

    /// A buffer of at least `count` bytes (not zeroed), kept until ``giveBack()``.
    func take(_ count: Int) -> AlignedBuffer {
        let buffer = pool.take(count)
        taken.append(buffer)
        return buffer
    }

    /// Gives every buffer taken back to the pool.
    func giveBack() {
        for buffer in taken { pool.give(buffer) }
        taken = []
    }
}
