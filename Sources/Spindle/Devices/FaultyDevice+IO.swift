import Glibc

/// ``BlockDevice`` conformance: each request is counted, meets its faults, waits its latency, then
/// reaches the wrapped device or the volatile cache.
extension FaultyDevice {
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try await perform(.reads, "read", offset: offset, length: UInt64(buffer.count)) { key, silent in
            try await self.inner.read(into: buffer, at: offset)
            if self.volatileCache { self.overlayCache(on: buffer, at: offset) }
            if silent?.kind == .corruptOnRead {
                Self.flipBit(in: buffer, key: key)
                self.state.withLock { $0.statistics.corruptedReads += 1 }
            }
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try validate(offset: offset, length: buffer.count, operation: "write")
        try await perform(.writes, "write", offset: offset, length: UInt64(buffer.count)) { key, silent in
            var buffer = buffer
            var offset = offset
            var altered: AlignedBuffer?
            switch silent?.kind {
            case .lose?:
                self.state.withLock { $0.statistics.lostWrites += 1 }
                return
            case .corruptAtRest?:
                let copy = Self.copy(buffer)
                Self.flipBit(in: copy.bytes, key: key)
                altered = copy
                buffer = copy.readOnlyBytes
                self.state.withLock { $0.statistics.corruptedWrites += 1 }
            case .misdirect?:
                offset = self.misdirected(offset, length: UInt64(buffer.count), within: silent?.within, key: key)
                self.state.withLock { $0.statistics.misdirectedWrites += 1 }
            default:
                break
            }
            defer { withExtendedLifetime(altered) {} }
            if self.volatileCache && !fua {
                self.cacheWrite(
                    CachedWrite(
                        offset: offset, length: UInt64(buffer.count), kind: .data(Self.copy(buffer)), key: key))
                return
            }
            try await self.inner.write(from: buffer, at: offset, fua: fua)
            if self.volatileCache { self.punchCache(offset: offset, length: UInt64(buffer.count)) }
        }
    }

    public func flush() async throws {
        try await perform(.flushes, "flush", offset: nil, length: nil) { _, _ in
            guard self.volatileCache else {
                try await self.inner.flush()
                return
            }
            let pending = self.state.withLock { $0.cache }
            for write in pending {
                try self.checkPower(operation: "flush")
                switch write.kind {
                case let .data(bytes):
                    try await self.inner.write(from: bytes, at: write.offset)
                case .zeroes:
                    try await self.inner.writeZeroes(offset: write.offset, length: write.length)
                case .discard:
                    try await self.inner.discard(offset: write.offset, length: write.length)
                }
            }
            try self.checkPower(operation: "flush")
            try await self.inner.flush()
            // Operations are serialized in this mode, so the cache still starts with `pending`.
            self.state.withLock { $0.cache.removeFirst(min(pending.count, $0.cache.count)) }
        }
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "discard", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "discard")
        try await perform(.writes, "discard", offset: offset, length: length) { key, _ in
            if self.volatileCache {
                self.cacheWrite(CachedWrite(offset: offset, length: length, kind: .discard, key: key))
            } else {
                try await self.inner.discard(offset: offset, length: length)
            }
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try await perform(.writes, "write-zeroes", offset: offset, length: length) { key, _ in
            if self.volatileCache {
                self.cacheWrite(CachedWrite(offset: offset, length: length, kind: .zeroes, key: key))
            } else {
                try await self.inner.writeZeroes(offset: offset, length: length)
            }
        }
    }

    /// Closes this wrapper only; the wrapped device stays open (its owner closes it). Unflushed
    /// cached writes are kept, as a disk keeps its cache while the host closes a file.
    public func close() async throws {
        await gate.close()
    }

    // MARK: Deciding

    /// Names the jitter draw (fault draws are named by the fault's index).
    private static let jitterSalt: UInt64 = 0x4A17_7E50
    private enum Verdict {
        case proceed(delayNanos: UInt64, key: UInt64, silent: Silent?, within: Range<UInt64>?)
        case fail(SpindleError)
    }

    /// Counts the operation, decides its fate from the faults and the request's key, waits any
    /// latency, runs it (with the key, which a cached write keeps).
    private func perform(
        _ kind: Kinds, _ operation: String, offset: UInt64?, length: UInt64?,
        _ body: (_ key: UInt64, _ silent: (kind: Silent, within: Range<UInt64>?)?) async throws -> Void
    ) async throws {
        try gate.enter(operation: operation, name: name)
        defer { gate.leave() }
        let verdict = decide(kind, operation, offset: offset, length: length)
        let key: UInt64
        let silent: (kind: Silent, within: Range<UInt64>?)?
        switch verdict {
        case let .fail(error):
            throw error
        case let .proceed(delayNanos, decided, decidedSilent, within):
            key = decided
            silent = decidedSilent.map { ($0, within) }
            // A disk does not answer faster because its caller gave up: the delay ignores cancellation.
            if delayNanos > 0 { await Self.sleepIgnoringCancellation(nanoseconds: delayNanos) }
        }
        if volatileCache {
            await serial.lock()
            defer { serial.unlock() }
            try checkPower(operation: operation, offset: offset, length: length)
            try await body(key, silent)
        } else {
            try await body(key, silent)
        }
    }

    private static func sleepIgnoringCancellation(nanoseconds: UInt64) async {
        let deadline = monotonicNanos() + nanoseconds
        while true {
            let now = monotonicNanos()
            if now >= deadline { return }
            do {
                try await Task.sleep(nanoseconds: deadline - now)
            } catch {
                // Cancelled: wait out the rest without the task's cancellation cutting it short.
                await Task.detached { try? await Task.sleep(nanoseconds: deadline - min(monotonicNanos(), deadline)) }
                    .value
            }
        }
    }

    /// The fate of a request that has just arrived. Probabilistic choices derive from its key (see
    /// the type's notes on determinism); the operation counters follow arrival order.
    private func decide(_ kind: Kinds, _ operation: String, offset: UInt64?, length: UInt64?) -> Verdict {
        state.withLock { state -> Verdict in
            let key = state.decisions.key(kind: kind.rawValue, offset: offset ?? .max, length: length ?? 0)
            state.statistics.operations += 1
            if kind == .writes { state.statistics.writes += 1 }
            if state.poweredOff {
                return .fail(
                    SpindleError(
                        .deviceGone, "the device has lost power", errno: EIO,
                        operation: operation, path: name, offset: offset, length: length))
            }
            if state.vanished {
                return .fail(
                    SpindleError(
                        .deviceGone, "the device has vanished (simulated removal)", errno: ENODEV,
                        operation: operation, path: name, offset: offset, length: length))
            }
            if let remaining = state.vanishAfter {
                if remaining == 0 {
                    state.vanished = true
                    state.vanishAfter = nil
                    return .fail(
                        SpindleError(
                            .deviceGone, "the device has vanished (simulated removal)", errno: ENODEV,
                            operation: operation, path: name, offset: offset, length: length))
                }
                state.vanishAfter = remaining - 1
            }
            if let failAfter = state.failAfter {
                if failAfter.remaining > 0 {
                    state.failAfter = (failAfter.remaining - 1, failAfter.kinds)
                } else if failAfter.kinds.contains(kind) {
                    return injected(kind, EIO, &state, operation, offset, length)
                }
            }
            var silent: Silent?
            var within: Range<UInt64>?
            for (index, fault) in state.faults.enumerated() where fault.kinds.contains(kind) {
                if let range = fault.range {
                    guard let offset, let length, offset < range.upperBound, range.lowerBound < offset + length else {
                        continue
                    }
                }
                // Silent faults touch data: reads and writes, not discards or write-zeroes.
                if fault.silent != nil && operation != "read" && operation != "write" { continue }
                if FaultDecisions.chance(fault.probability, key: key, salt: UInt64(index)) {
                    guard let kindOfSilence = fault.silent else {
                        return injected(kind, fault.errno, &state, operation, offset, length)
                    }
                    if silent == nil {
                        silent = kindOfSilence
                        within = fault.range
                    }
                }
            }
            var delay = state.latencyNanos
            if state.jitterNanos > 0 {
                delay += FaultDecisions.below(state.jitterNanos + 1, key: key, salt: Self.jitterSalt)
            }
            return .proceed(delayNanos: delay, key: key, silent: silent, within: within)
        }
    }

    private func injected(
        _ kind: Kinds, _ errno: Int32, _ state: inout State, _ operation: String, _ offset: UInt64?, _ length: UInt64?
    ) -> Verdict {
        if kind == .reads { state.statistics.injectedReadErrors += 1 }
        if kind == .writes { state.statistics.injectedWriteErrors += 1 }
        if kind == .flushes { state.statistics.injectedFlushErrors += 1 }
        return .fail(
            SpindleError(
                .injectedFault, "injected \(operation) error: \(String(cString: strerror(errno))) (errno \(errno))",
                errno: errno, operation: operation, path: name, offset: offset, length: length))
    }

    // MARK: Silent faults

    private static let bitSalt: UInt64 = 0xB17F_11B5
    private static let misdirectSalt: UInt64 = 0x0FF5_E7ED

    /// Flips one bit of `buffer`, chosen from `key`.
    static func flipBit(in buffer: UnsafeMutableRawBufferPointer, key: UInt64) {
        guard buffer.count > 0 else { return }
        let bit = FaultDecisions.below(UInt64(buffer.count) * 8, key: key, salt: bitSalt)
        buffer[Int(bit / 8)] ^= 1 << UInt8(bit % 8)
    }

    /// Where a misdirected write of `length` bytes meant for `offset` lands instead: another
    /// offset, aligned as requests are, with the write inside the fault's range (the device when
    /// it has none).
    func misdirected(_ offset: UInt64, length: UInt64, within range: Range<UInt64>?, key: UInt64) -> UInt64 {
        let block = UInt64(logicalBlockBytes)
        let start = ((range?.lowerBound ?? 0) + block - 1) / block * block
        let end = min(range?.upperBound ?? capacityBytes, capacityBytes)
        guard end >= start + length else { return offset }
        let places = (end - start - length) / block + 1
        guard places > 1 else { return offset }
        let target = start + FaultDecisions.below(places, key: key, salt: Self.misdirectSalt) * block
        return target == offset ? (target + block + length <= end ? target + block : start) : target
    }

    /// Bit rot on demand: flips one bit in each of `count` blocks of `blockBytes` in `range`
    /// (everywhere when nil) of the wrapped device, chosen from the seed, and returns their offsets.
    /// What is stored changes underneath every layer above, with no error anywhere.
    @discardableResult
    public func corruptStoredBlocks(in range: Range<UInt64>? = nil, count: Int, blockBytes: Int = 4096) async throws
        -> [UInt64]
    {
        let block = UInt64(max(blockBytes, inner.logicalBlockBytes))
        let range = range ?? 0..<capacityBytes
        let first = (range.lowerBound + block - 1) / block
        let end = min(range.upperBound, capacityBytes) / block
        guard end > first else { return [] }
        var chosen = Set<UInt64>()
        var attempt: UInt64 = 0
        let base = state.withLock { state in
            state.decisions.key(kind: 0x40, offset: range.lowerBound, length: range.upperBound - range.lowerBound)
        }
        while chosen.count < min(count, Int(end - first)) {
            chosen.insert(first + FaultDecisions.below(end - first, key: FaultDecisions.mix(base, attempt), salt: 7))
            attempt += 1
        }
        let buffer = AlignedBuffer(count: Int(block), zeroed: false)
        for index in chosen.sorted() {
            try await inner.read(into: buffer, at: index * block)
            Self.flipBit(in: buffer.bytes, key: FaultDecisions.mix(base, index))
            try await inner.write(from: buffer, at: index * block)
        }
        state.withLock { $0.statistics.rottedBlocks += UInt64(chosen.count) }
        return chosen.sorted().map { $0 * block }
    }

    func checkPower(operation: String, offset: UInt64? = nil, length: UInt64? = nil) throws(SpindleError) {
        if state.withLock({ $0.poweredOff }) {
            throw SpindleError(
                .deviceGone, "the device has lost power", errno: EIO,
                operation: operation, path: name, offset: offset, length: length)
        }
    }
}
