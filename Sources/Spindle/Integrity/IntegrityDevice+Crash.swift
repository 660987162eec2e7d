/// Crash handling: the dirty-region bitmap (set before writes, cleared when idle), and the
/// resolution of regions a crash left suspect (see "Crashes" on ``IntegrityDevice``).
extension IntegrityDevice {
    /// What resolving suspect regions found and did.
    public struct SuspectResolution: Sendable, Equatable, Codable {
        /// Suspect regions read through.
        public var regionsChecked = 0
        /// Blocks whose data did not match their checksums and was kept, with a new checksum.
        public var blocksAccepted: UInt64 = 0
        /// Blocks that still do not match (left for redundancy: their regions stay suspect).
        public var blocksLeft: UInt64 = 0
    }

    /// Whether regions a crash left suspect are still unresolved.
    public var hasSuspects: Bool { state.withLock { $0.suspect.contains { $0 != 0 } } }

    func region(of block: UInt64) -> Int {
        Int((block * UInt64(IntegritySuperblock.blockBytes)) >> UInt64(superblock.regionShift))
    }

    func isSuspect(block: UInt64, _ state: State) -> Bool {
        let region = region(of: block)
        return state.suspect[region / 8] & (1 << UInt8(region % 8)) != 0
    }

    /// Whether this layer may keep a suspect block's data on its own: with no redundancy above, or
    /// in the owner's self-checked headers.
    func acceptsAlone(block: UInt64) -> Bool {
        superblock.policy == .standalone
            || block * UInt64(IntegritySuperblock.blockBytes) < superblock.selfCheckedBytes
    }

    /// Reads every suspect region and compares each block with its checksum. A block that does not
    /// match keeps its data and gets a new checksum when this layer may decide alone
    /// (``acceptsAlone(block:)``) or `acceptingRemaining` says so (the owner repaired what it could
    /// from redundancy first); regions with nothing left unresolved stop being suspect, durably.
    @discardableResult
    public func resolveSuspects(acceptingRemaining: Bool) async throws -> SuspectResolution {
        try await resolveSuspects(acceptingRemaining: acceptingRemaining, below: nil)
    }

    /// Resolves the suspect regions that start below `limit` (all of them when nil).
    func resolveSuspects(acceptingRemaining: Bool, below limit: UInt64?) async throws -> SuspectResolution {
        try checkWritable(operation: "resolve suspect regions")
        await resolveLock.lock()
        defer { resolveLock.unlock() }
        let regions = state.withLock { state in
            (0..<superblock.regionCount).filter { region in
                let start = UInt64(region) * superblock.regionBytes
                return state.suspect[region / 8] & (1 << UInt8(region % 8)) != 0 && start < (limit ?? .max)
            }
        }
        var result = SuspectResolution()
        var resolved: [Int] = []
        let blockBytes = UInt64(IntegritySuperblock.blockBytes)
        let stepBytes: UInt64 = 1 << 20
        let buffer = AlignedBuffer(count: Int(stepBytes), zeroed: false)
        for region in regions {
            result.regionsChecked += 1
            var left: UInt64 = 0
            let start = UInt64(region) * superblock.regionBytes
            let regionEnd = min(start + superblock.regionBytes, superblock.dataBytes)
            // With a limit, only the part below it is read, and a region past it stays suspect.
            let end = min(regionEnd, limit ?? regionEnd)
            if end < regionEnd { left += 1 }
            var position = start
            while position < end {
                let length = min(stepBytes, end - position)
                try await inner.read(into: buffer, range: 0..<Int(length), at: superblock.dataOffset + position)
                let firstBlock = position / blockBytes
                let count = Int(length / blockBytes)
                try await loadChecksums(Self.checksumBlocks(firstBlock: firstBlock, count: count))
                let outcome = state.withLock { state -> (accepted: UInt64, left: UInt64)? in
                    var accepted: UInt64 = 0
                    var left: UInt64 = 0
                    let perBlock = UInt64(IntegritySuperblock.checksumsPerBlock)
                    for index in 0..<count {
                        let block = firstBlock + UInt64(index)
                        guard let cached = state.cache[block / perBlock] else { return nil }
                        let data = UnsafeRawBufferPointer(
                            buffer.slice(offset: index * Int(blockBytes), length: Int(blockBytes)))
                        let computed = checksum.stored(for: data, index: block)
                        if cached.entries[Int(block % perBlock)] == computed { continue }
                        if acceptingRemaining || acceptsAlone(block: block) {
                            setEntry(block: block, to: computed, &state)
                            state.knownBad.remove(block)
                            accepted += 1
                        } else {
                            left += 1
                        }
                    }
                    state.statistics.blocksAcceptedAfterCrash += accepted
                    return (accepted, left)
                }
                // A checksum block evicted between the load and the check: do this step again.
                guard let outcome else { continue }
                result.blocksAccepted += outcome.accepted
                left += outcome.left
                position += length
            }
            result.blocksLeft += left - (end < regionEnd ? 1 : 0)
            if left == 0 { resolved.append(region) }
        }
        withExtendedLifetime(buffer) {}
        // The new checksums are durable before any bit that covers them is cleared.
        try await flushChecksumsAndData()
        await bitmapLock.lock()
        defer { bitmapLock.unlock() }
        let bits = state.withLock { state -> [UInt8] in
            for region in resolved { state.suspect[region / 8] &= ~(1 << UInt8(region % 8)) }
            return zip(state.written, state.suspect).map { $0 | $1 }
        }
        try await writeBitmap(bits)
        state.withLock { $0.onDisk = bits }
        return result
    }

    // MARK: The bitmap

    /// Before changing data range `offset ..< offset + length`: its regions' bits are set on disk.
    func markWritten(offset: UInt64, length: UInt64) async throws {
        let shift = UInt64(superblock.regionShift)
        let first = Int(offset >> shift)
        let last = Int((offset + length - 1) >> shift)
        func recorded(_ state: inout State) -> Bool {
            guard state.bitmapValid else { return false }
            for bit in first...last where state.onDisk[bit / 8] & (1 << UInt8(bit % 8)) == 0 { return false }
            for bit in first...last { state.written[bit / 8] |= 1 << UInt8(bit % 8) }
            return true
        }
        if state.withLock({ recorded(&$0) }) { return }
        await bitmapLock.lock()
        defer { bitmapLock.unlock() }
        if state.withLock({ recorded(&$0) }) { return }
        var bits = state.withLock { $0.onDisk }
        for bit in first...last { bits[bit / 8] |= 1 << UInt8(bit % 8) }
        try await writeBitmap(bits)
        state.withLock { state in
            state.onDisk = bits
            state.bitmapValid = true
            for bit in first...last { state.written[bit / 8] |= 1 << UInt8(bit % 8) }
        }
    }

    /// Writes the bitmap, with FUA.
    func writeBitmap(_ bits: [UInt8]) async throws {
        let buffer = AlignedBuffer(count: IntegritySuperblock.bitmapBytes)
        bits.withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
        try await inner.write(from: buffer, at: IntegritySuperblock.bitmapOffset, fua: true)
    }

    // MARK: Idle clean

    /// Sets how long the device waits without writes before marking itself clean (0 turns it off).
    public func setIdleCleanDelay(nanoseconds: UInt64) {
        idleCleanNanos.store(nanoseconds, ordering: .relaxed)
    }

    func startIdleCleaner() {
        let task = Task { [weak self] in
            while !Task.isCancelled {
                let delay = self?.idleCleanNanos.load(ordering: .relaxed) ?? 0
                try? await Task.sleep(
                    nanoseconds: max(min(delay, IntegrityDevice.defaultIdleCleanNanos) / 4, 10_000_000))
                guard let self, !Task.isCancelled else { return }
                let current = self.idleCleanNanos.load(ordering: .relaxed)
                if current > 0 && current != .max { await self.markCleanIfIdle(idleNanos: current) }
            }
        }
        cleaner.withLock { $0 = task }
    }

    /// When regions are marked and no write has run for `idleNanos`: flushes checksums and data,
    /// then clears the bitmap (but for suspect regions). A write that starts meanwhile keeps it.
    func markCleanIfIdle(idleNanos: UInt64) async {
        let candidate = state.withLock { $0.written.contains { $0 != 0 } }
        guard candidate, writesInFlight.load(ordering: .sequentiallyConsistent) == 0,
            monotonicNanos() - lastWriteNanos.load(ordering: .relaxed) >= idleNanos
        else { return }
        await bitmapLock.lock()
        defer { bitmapLock.unlock() }
        // New writes now take the slow path and wait for this lock; one already past the fast path
        // counts itself in `writesInFlight` before it looks.
        state.withLock { $0.bitmapValid = false }
        defer { state.withLock { $0.bitmapValid = true } }
        if writesInFlight.load(ordering: .sequentiallyConsistent) > 0 { return }
        do {
            try await flushChecksumsAndData()
            let bits = state.withLock { $0.suspect }
            try await writeBitmap(bits)
            state.withLock { state in
                state.onDisk = bits
                state.written = [UInt8](repeating: 0, count: IntegritySuperblock.bitmapBytes)
            }
        } catch {
            // The bitmap on disk is the old one or the new one: the old one covers both.
        }
    }
}
