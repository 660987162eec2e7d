import Glibc
import Synchronization

/// A block device that wraps another and misbehaves on purpose, deterministically from a seed: the
/// tool for rehearsing disk failures under RAID and thin volumes, in tests and under load.
///
/// Faults, all changeable while I/O runs:
/// - errors on reads, writes (including discard and write-zeroes) or flushes, over a byte range or
///   everywhere, always or with a probability (``inject(_:)``, ``failReads(in:probability:errno:)``,
///   ``failWrites(in:probability:errno:)``);
/// - every operation failing after N more operations (``failAfter(operations:kinds:)``);
/// - the device vanishing, at once or after N operations (``vanish(afterOperations:)``);
/// - added latency with seeded jitter (``addLatency(nanoseconds:jitterNanoseconds:)``);
/// - power loss (``powerCut(tearing:)``), when created with `volatileCache: true`.
///
/// ## The volatile cache and power cuts
/// With `volatileCache: true` the device behaves like a disk with a write-back cache: writes are
/// held in memory (reads see them) and reach the wrapped device only on ``flush()``; a FUA write goes
/// straight through. ``powerCut(tearing:)`` then drops every write that no completed flush covers,
/// or with `tearing: true` lets a seeded random subset of their blocks through, block by block
/// (a torn write). Afterwards the device takes no I/O until ``restorePower()``, as after an
/// unplanned shutdown. In this mode operations are serialized.
public final class FaultyDevice: BlockDevice {
    /// Operations a fault applies to.
    public struct Kinds: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let reads = Kinds(rawValue: 1)
        /// Writes, discards and write-zeroes.
        public static let writes = Kinds(rawValue: 2)
        public static let flushes = Kinds(rawValue: 4)
        public static let all: Kinds = [.reads, .writes, .flushes]
    }

    /// An error fault: operations of the given kinds that touch `range` (all of them when nil) fail
    /// with `errno`, each with the given probability.
    public struct Fault: Sendable, Equatable {
        public var kinds: Kinds
        public var range: Range<UInt64>?
        public var probability: Double
        public var errno: Int32
        public init(kinds: Kinds, range: Range<UInt64>? = nil, probability: Double = 1, errno: Int32 = EIO) {
            self.kinds = kinds
            self.range = range
            self.probability = probability
            self.errno = errno
        }
    }

    /// What the device has done, for tests and reports.
    public struct Statistics: Sendable, Equatable {
        public var operations: UInt64 = 0
        /// Write requests (writes, write-zeroes and discards) passed on or cached.
        public var writes: UInt64 = 0
        public var injectedReadErrors: UInt64 = 0
        public var injectedWriteErrors: UInt64 = 0
        public var injectedFlushErrors: UInt64 = 0
        public var powerCuts: UInt64 = 0
        /// Blocks of unflushed writes that a power cut dropped.
        public var droppedBlocks: UInt64 = 0
        /// Blocks of unflushed writes that a power cut let through (tearing).
        public var tornBlocksWritten: UInt64 = 0
    }

    /// What a power cut did to the writes no flush covered.
    public struct PowerCutReport: Sendable, Equatable {
        public var unflushedWrites: Int
        public var blocksDropped: UInt64
        public var blocksWritten: UInt64
    }

    public let inner: any BlockDevice
    public let name: String
    public var logicalBlockBytes: Int { inner.logicalBlockBytes }
    public var capacityBytes: UInt64 { inner.capacityBytes }
    public var isReadOnly: Bool { inner.isReadOnly }
    public var discardReadsZeroes: Bool { inner.discardReadsZeroes }
    /// Whether writes wait in a simulated volatile cache until flushed.
    public let volatileCache: Bool

    private enum CachedKind { case data(AlignedBuffer), zeroes, discard }
    private struct CachedWrite {
        var offset: UInt64
        var length: UInt64
        var kind: CachedKind
    }

    private struct State {
        var random: SeededRandom
        var faults: [Fault] = []
        var failAfter: (remaining: UInt64, kinds: Kinds)?
        var vanishAfter: UInt64?
        var vanished = false
        var poweredOff = false
        var latencyNanos: UInt64 = 0
        var jitterNanos: UInt64 = 0
        var cache: [CachedWrite] = []
        var statistics = Statistics()
    }

    private let state: Locked<State>
    private let serial = AsyncMutex()
    private let gate = RequestGate()

    /// - Parameters:
    ///   - inner: the device to wrap.
    ///   - seed: seeds every random decision (fault probabilities, jitter, tearing).
    ///   - volatileCache: hold writes until flushed, so that ``powerCut(tearing:)`` can drop them.
    ///   - name: for messages; by default `faulty(<inner name>)`.
    public init(wrapping inner: any BlockDevice, seed: UInt64 = 0, volatileCache: Bool = false, name: String? = nil) {
        self.inner = inner
        self.volatileCache = volatileCache
        self.name = name ?? "faulty(\(inner.name))"
        state = Locked(State(random: SeededRandom(seed: seed)))
    }

    // MARK: Controls

    /// Adds an error fault.
    public func inject(_ fault: Fault) {
        state.withLock { $0.faults.append(fault) }
    }

    /// Reads touching `range` (everywhere when nil) fail with `errno`, each with `probability`.
    public func failReads(in range: Range<UInt64>? = nil, probability: Double = 1, errno: Int32 = EIO) {
        inject(Fault(kinds: .reads, range: range, probability: probability, errno: errno))
    }

    /// Writes, discards and write-zeroes touching `range` (everywhere when nil) fail with `errno`.
    public func failWrites(in range: Range<UInt64>? = nil, probability: Double = 1, errno: Int32 = EIO) {
        inject(Fault(kinds: .writes, range: range, probability: probability, errno: errno))
    }

    /// After `operations` more operations (of any kind), every operation of `kinds` fails with EIO.
    public func failAfter(operations: UInt64, kinds: Kinds = .all) {
        state.withLock { $0.failAfter = (operations, kinds) }
    }

    /// The device disappears after `afterOperations` more operations (at once for 0): every later
    /// operation fails with ``SpindleError/Code/deviceGone`` until ``reappear()``.
    public func vanish(afterOperations: UInt64 = 0) {
        state.withLock { state in
            if afterOperations == 0 { state.vanished = true } else { state.vanishAfter = afterOperations }
        }
    }

    /// The vanished device comes back (with whatever it held).
    public func reappear() {
        state.withLock { state in
            state.vanished = false
            state.vanishAfter = nil
        }
    }

    /// Every operation waits `nanoseconds` plus a seeded random part of up to `jitterNanoseconds` first.
    public func addLatency(nanoseconds: UInt64, jitterNanoseconds: UInt64 = 0) {
        state.withLock { state in
            state.latencyNanos = nanoseconds
            state.jitterNanos = jitterNanoseconds
        }
    }

    /// Removes error faults, fail-after, vanishing and latency (not a power cut: see ``restorePower()``).
    public func clearFaults() {
        state.withLock { state in
            state.faults.removeAll()
            state.failAfter = nil
            state.vanishAfter = nil
            state.vanished = false
            state.latencyNanos = 0
            state.jitterNanos = 0
        }
    }

    /// Counts so far.
    public var statistics: Statistics { state.withLock { $0.statistics } }

    /// Number of writes waiting in the simulated volatile cache.
    public var unflushedWrites: Int { state.withLock { $0.cache.count } }

    /// Simulates losing power: writes not covered by a completed flush are dropped or, with
    /// `tearing`, partly written block by block (a seeded choice per block). The device then fails
    /// every operation until ``restorePower()``. Returns after any operation in progress has stopped.
    /// - Throws: ``SpindleError/Code/unsupported`` without `volatileCache`; errors of the wrapped device
    ///   while writing torn blocks.
    @discardableResult
    public func powerCut(tearing: Bool = false) async throws -> PowerCutReport {
        guard volatileCache else {
            throw SpindleError(
                .unsupported, "power cuts need a FaultyDevice created with volatileCache: true",
                operation: "power cut", path: name)
        }
        state.withLock { $0.poweredOff = true }
        await serial.lock()
        defer { serial.unlock() }
        let (cache, tornPlan) = state.withLock { state -> ([CachedWrite], [[Bool]]) in
            let cache = state.cache
            state.cache.removeAll()
            state.statistics.powerCuts += 1
            let block = UInt64(inner.logicalBlockBytes)
            let plan = cache.map { write in
                (0..<Int(write.length / block)).map { _ in tearing && state.random.chance(0.5) }
            }
            return (cache, plan)
        }
        var report = PowerCutReport(unflushedWrites: cache.count, blocksDropped: 0, blocksWritten: 0)
        let block = inner.logicalBlockBytes
        let blockBuffer = AlignedBuffer(count: block)
        for (write, plan) in zip(cache, tornPlan) {
            for (index, lands) in plan.enumerated() {
                guard lands else {
                    report.blocksDropped += 1
                    continue
                }
                switch write.kind {
                case let .data(bytes):
                    blockBuffer.bytes.copyMemory(from: UnsafeRawBufferPointer(bytes.slice(offset: index * block, length: block)))
                case .zeroes, .discard:
                    blockBuffer.fill(0)
                }
                try await inner.write(from: blockBuffer, at: write.offset + UInt64(index * block))
                report.blocksWritten += 1
            }
        }
        if report.blocksWritten > 0 { try await inner.flush() }
        let finalReport = report
        state.withLock { state in
            state.statistics.droppedBlocks += finalReport.blocksDropped
            state.statistics.tornBlocksWritten += finalReport.blocksWritten
        }
        return report
    }

    /// Powers the device back on after ``powerCut(tearing:)``; it holds what reached the wrapped device.
    public func restorePower() {
        state.withLock { $0.poweredOff = false }
    }

    // MARK: BlockDevice

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try await perform(.reads, "read", offset: offset, length: UInt64(buffer.count)) {
            try await self.inner.read(into: buffer, at: offset)
            guard self.volatileCache else { return }
            self.overlayCache(on: buffer, at: offset)
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try validate(offset: offset, length: buffer.count, operation: "write")
        try await perform(.writes, "write", offset: offset, length: UInt64(buffer.count)) {
            if self.volatileCache && !fua {
                self.cacheWrite(CachedWrite(offset: offset, length: UInt64(buffer.count), kind: .data(Self.copy(buffer))))
                return
            }
            try await self.inner.write(from: buffer, at: offset, fua: fua)
            if self.volatileCache { self.punchCache(offset: offset, length: UInt64(buffer.count)) }
        }
    }

    public func flush() async throws {
        try await perform(.flushes, "flush", offset: nil, length: nil) {
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
        try await perform(.writes, "discard", offset: offset, length: length) {
            if self.volatileCache {
                self.cacheWrite(CachedWrite(offset: offset, length: length, kind: .discard))
            } else {
                try await self.inner.discard(offset: offset, length: length)
            }
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try checkWritable(operation: "write-zeroes", offset: offset, length: length)
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try await perform(.writes, "write-zeroes", offset: offset, length: length) {
            if self.volatileCache {
                self.cacheWrite(CachedWrite(offset: offset, length: length, kind: .zeroes))
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

    // MARK: Internals

    private enum Verdict {
        case proceed(delayNanos: UInt64)
        case fail(SpindleError)
    }

    /// Counts the operation, decides its fate from the faults and the seed, waits any latency, runs it.
    private func perform(
        _ kind: Kinds, _ operation: String, offset: UInt64?, length: UInt64?, _ body: () async throws -> Void
    ) async throws {
        try gate.enter(operation: operation, name: name)
        defer { gate.leave() }
        let verdict = decide(kind, operation, offset: offset, length: length)
        switch verdict {
        case let .fail(error):
            throw error
        case let .proceed(delayNanos):
            // A disk does not answer faster because its caller gave up: the delay ignores cancellation.
            if delayNanos > 0 { await Self.sleepIgnoringCancellation(nanoseconds: delayNanos) }
        }
        if volatileCache {
            await serial.lock()
            defer { serial.unlock() }
            try checkPower(operation: operation, offset: offset, length: length)
            try await body()
        } else {
            try await body()
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
                await Task.detached { try? await Task.sleep(nanoseconds: deadline - min(monotonicNanos(), deadline)) }.value
            }
        }
    }

    private func decide(_ kind: Kinds, _ operation: String, offset: UInt64?, length: UInt64?) -> Verdict {
        state.withLock { state -> Verdict in
            state.statistics.operations += 1
            if kind == .writes { state.statistics.writes += 1 }
            if state.poweredOff {
                return .fail(SpindleError(.deviceGone, "the device has lost power", errno: EIO,
                                          operation: operation, path: name, offset: offset, length: length))
            }
            if state.vanished {
                return .fail(SpindleError(.deviceGone, "the device has vanished (simulated removal)", errno: ENODEV,
                                          operation: operation, path: name, offset: offset, length: length))
            }
            if let remaining = state.vanishAfter {
                if remaining == 0 {
                    state.vanished = true
                    state.vanishAfter = nil
                    return .fail(SpindleError(.deviceGone, "the device has vanished (simulated removal)", errno: ENODEV,
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
            for fault in state.faults where fault.kinds.contains(kind) {
                if let range = fault.range {
                    guard let offset, let length, offset < range.upperBound, range.lowerBound < offset + length else { continue }
                }
                if state.random.chance(fault.probability) {
                    return injected(kind, fault.errno, &state, operation, offset, length)
                }
            }
            var delay = state.latencyNanos
            if state.jitterNanos > 0 { delay += state.random.below(state.jitterNanos + 1) }
            return .proceed(delayNanos: delay)
        }
    }

    private func injected(
        _ kind: Kinds, _ errno: Int32, _ state: inout State, _ operation: String, _ offset: UInt64?, _ length: UInt64?
    ) -> Verdict {
        if kind == .reads { state.statistics.injectedReadErrors += 1 }
        if kind == .writes { state.statistics.injectedWriteErrors += 1 }
        if kind == .flushes { state.statistics.injectedFlushErrors += 1 }
        return .fail(SpindleError(
            .injectedFault, "injected \(operation) error: \(String(cString: strerror(errno))) (errno \(errno))",
            errno: errno, operation: operation, path: name, offset: offset, length: length))
    }

    private func checkPower(operation: String, offset: UInt64? = nil, length: UInt64? = nil) throws(SpindleError) {
        if state.withLock({ $0.poweredOff }) {
            throw SpindleError(.deviceGone, "the device has lost power", errno: EIO,
                               operation: operation, path: name, offset: offset, length: length)
        }
    }

    private func cacheWrite(_ write: CachedWrite) {
        state.withLock { $0.cache.append(write) }
    }

    /// Applies cached writes, oldest first, over data read from the wrapped device.
    private func overlayCache(on buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        let end = offset + UInt64(buffer.count)
        state.withLock { state in
            for write in state.cache where write.offset < end && offset < write.offset + write.length {
                let start = max(write.offset, offset)
                let stop = min(write.offset + write.length, end)
                let destination = buffer.baseAddress! + Int(start - offset)
                switch write.kind {
                case let .data(bytes):
                    destination.copyMemory(from: bytes.bytes.baseAddress! + Int(start - write.offset), byteCount: Int(stop - start))
                case .zeroes, .discard:
                    memset(destination, 0, Int(stop - start))
                }
            }
        }
    }

    /// Removes a range from the cached writes (a FUA write made it durable with newer data).
    private func punchCache(offset: UInt64, length: UInt64) {
        let end = offset + length
        state.withLock { state in
            var kept: [CachedWrite] = []
            for write in state.cache {
                let writeEnd = write.offset + write.length
                guard write.offset < end && offset < writeEnd else {
                    kept.append(write)
                    continue
                }
                if write.offset < offset { kept.append(Self.piece(of: write, from: write.offset, to: offset)) }
                if writeEnd > end { kept.append(Self.piece(of: write, from: end, to: writeEnd)) }
            }
            state.cache = kept
        }
    }

    private static func copy(_ bytes: UnsafeRawBufferPointer) -> AlignedBuffer {
        let buffer = AlignedBuffer(count: bytes.count)
        buffer.bytes.copyMemory(from: bytes)
        return buffer
    }

    private static func piece(of write: CachedWrite, from start: UInt64, to end: UInt64) -> CachedWrite {
        switch write.kind {
        case let .data(bytes):
            let slice = bytes.slice(offset: Int(start - write.offset), length: Int(end - start))
            return CachedWrite(offset: start, length: end - start, kind: .data(copy(UnsafeRawBufferPointer(slice))))
        case .zeroes, .discard:
            return CachedWrite(offset: start, length: end - start, kind: write.kind)
        }
    }
}
