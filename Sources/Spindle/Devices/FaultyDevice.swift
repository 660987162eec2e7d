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
///
/// ## Determinism
/// Every random decision (whether a request meets a probabilistic error fault, its jitter, which
/// blocks of a torn write land) derives from the seed, the device's name and the identity of the
/// request: its kind, offset and length, the epoch (``beginEpoch(_:)``), and how many requests of
/// the same kind, offset and length arrived before it in that epoch. No decision depends on the
/// order in which different requests arrive, so the same requests meet the same faults however
/// they interleave: a simulation that replays a seed sees the same faults although an array's
/// concurrent member requests reach each member in a different order every time. Devices that
/// share a seed but not a name fail independently.
///
/// What arrival order still decides: the operations counted by ``failAfter(operations:kinds:)`` and
/// ``vanish(afterOperations:)`` (under concurrency, which request is the first to fail); which of two
/// identical requests in flight at once gets which outcome; and, past 65,536 distinct requests in
/// one epoch, where the occurrence counts start afresh (a workload that needs the guarantee begins
/// epochs more often than that).
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

    /// A fault: operations of the given kinds that touch `range` (all of them when nil) fail with
    /// `errno`, each with the given probability; or, with `silent`, succeed but do the wrong thing.
    public struct Fault: Sendable, Equatable {
        public var kinds: Kinds
        public var range: Range<UInt64>?
        public var probability: Double
        public var errno: Int32
        /// A fault that reports success: what only a checksum catches (nil for an error fault).
        public var silent: Silent?
        public init(
            kinds: Kinds, range: Range<UInt64>? = nil, probability: Double = 1, errno: Int32 = EIO,
            silent: Silent? = nil
        ) {
            self.kinds = kinds
            self.range = range
            self.probability = probability
            self.errno = errno
            self.silent = silent
        }

        /// A silent fault of `silent`'s kind (reads for ``Silent/corruptOnRead``, writes otherwise).
        public init(_ silent: Silent, range: Range<UInt64>? = nil, probability: Double = 1) {
            self.init(
                kinds: silent == .corruptOnRead ? .reads : .writes, range: range, probability: probability,
                silent: silent)
        }
    }

    /// What a disk may do wrong while reporting success (TigerBeetle's simulated storage injects the
    /// same): each choice of bit, offset and fate derives from the seed and the request.
    public enum Silent: String, Sendable, Equatable, CaseIterable {
        /// A read returns one bit flipped in one block; what is stored stays right.
        case corruptOnRead = "corrupt-read"
        /// A write stores one bit flipped in one block (corruption at rest, as bit rot leaves it).
        case corruptAtRest = "corrupt-write"
        /// A write lands at another offset (the same length, block-aligned) instead of its own.
        case misdirect = "misdirect-write"
        /// A write is acknowledged and never stored.
        case lose = "lose-write"
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
        /// Silent faults: reads returned with a bit flipped, writes stored with a bit flipped,
        /// writes that landed elsewhere, writes never stored; and blocks rotted on demand
        /// (``corruptStoredBlocks(in:count:blockBytes:)``).
        public var corruptedReads: UInt64 = 0
        public var corruptedWrites: UInt64 = 0
        public var misdirectedWrites: UInt64 = 0
        public var lostWrites: UInt64 = 0
        public var rottedBlocks: UInt64 = 0
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

    struct State {
        var decisions: FaultDecisions
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

    let state: Locked<State>
    let serial = AsyncMutex()
    let gate = RequestGate()

    /// - Parameters:
    ///   - inner: the device to wrap.
    ///   - seed: seeds every random decision (fault probabilities, jitter, tearing), with `name`.
    ///   - volatileCache: hold writes until flushed, so that ``powerCut(tearing:)`` can drop them.
    ///   - name: for messages; by default `faulty(<inner name>)`.
    public init(wrapping inner: any BlockDevice, seed: UInt64 = 0, volatileCache: Bool = false, name: String? = nil) {
        let name = name ?? "faulty(\(inner.name))"
        self.inner = inner
        self.volatileCache = volatileCache
        self.name = name
        state = Locked(State(decisions: FaultDecisions(seed: seed, name: name)))
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

    /// Starts epoch `epoch`: later decisions mix it in, and the occurrence counts that tell repeated
    /// requests apart start afresh. Call it between phases of a workload, with no request in
    /// flight (a simulation calls it before each of its steps), so that each phase's faults depend
    /// only on that phase's requests.
    public func beginEpoch(_ epoch: UInt64) {
        state.withLock { $0.decisions.begin(epoch: epoch) }
    }

    /// Counts so far.
    public var statistics: Statistics { state.withLock { $0.statistics } }

    /// Number of writes waiting in the simulated volatile cache.
    public var unflushedWrites: Int { state.withLock { $0.cache.count } }
}
