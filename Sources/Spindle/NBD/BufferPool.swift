/// Request buffers for the NBD server, reused instead of allocated per request: a 1 MiB buffer from
/// the C allocator is a fresh mapping each time (page faults on every page, then an unmap), which
/// costs more than the request itself. Buffers come in power-of-two sizes from 4 KiB; a few of each
/// size are kept.
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
