import Glibc
import Synchronization

/// A fio-like load generator over any ``BlockDevice``: sequential or random reads and writes at a
/// given block size and queue depth, for a time or a number of operations, reporting IOPS, MiB/s and
/// latency percentiles, optionally verifying every byte it reads back.
public enum Bench {
    /// The access pattern, named as fio names it.
    public enum Pattern: String, CaseIterable, Codable, Sendable {
        case read, write, randread, randwrite, randrw

        var isRandom: Bool { self == .randread || self == .randwrite || self == .randrw }
        var reads: Bool { self == .read || self == .randread || self == .randrw }
        var writes: Bool { self == .write || self == .randwrite || self == .randrw }
    }

    /// What to run.
    public struct Options: Codable, Sendable, Equatable {
        public var pattern: Pattern
        /// Bytes per request: a multiple of the device's block size.
        public var blockBytes: Int = 4096
        /// Requests kept in flight.
        public var ioDepth: Int = 1
        /// Start of the region the load touches.
        public var regionOffset: UInt64 = 0
        /// Bytes of the region; the rest of the device from `regionOffset` when nil.
        public var regionBytes: UInt64?
        /// How long to run; ignored when `operations` is set. 10 s when both are nil.
        public var runtimeSeconds: Double?
        /// Requests to complete, in all.
        public var operations: UInt64?
        /// Share of reads in `randrw`, in percent.
        public var readPercent: Int = 50
        /// Seeds offsets, the read/write mix and the verified contents.
        public var seed: UInt64 = 1
        /// Write self-describing blocks and check every block read, then read back every block written.
        public var verify = false
        /// Write the whole region before measuring (fio's layout), so reads measure real data, not holes.
        public var fill = false
        /// Write nothing: read every block of the region once and check that it holds what a layout
        /// pass with this seed wrote earlier (`fill` with `verify`), as fio's verify_only does.
        public var verifyExisting = false

        public init(pattern: Pattern) { self.pattern = pattern }
    }

    /// Latency and throughput of one direction.
    public struct DirectionReport: Codable, Sendable, Equatable {
        public var operations: UInt64
        public var bytes: UInt64
        public var iops: Double
        public var mebibytesPerSecond: Double
        public var latencyNanosMean: Double
        public var latencyNanosP50: UInt64
        public var latencyNanosP99: UInt64
        public var latencyNanosP999: UInt64
        public var latencyNanosMax: UInt64

        init(_ histogram: LatencyHistogram, bytes: UInt64, seconds: Double) {
            operations = histogram.count
            self.bytes = bytes
            iops = seconds > 0 ? Double(histogram.count) / seconds : 0
            mebibytesPerSecond = seconds > 0 ? Double(bytes) / seconds / 1_048_576 : 0
            latencyNanosMean = histogram.meanNanos
            latencyNanosP50 = histogram.percentile(0.50)
            latencyNanosP99 = histogram.percentile(0.99)
            latencyNanosP999 = histogram.percentile(0.999)
            latencyNanosMax = histogram.maximumNanos
        }
    }

    /// The outcome of a run.
    public struct Report: Codable, Sendable, Equatable {
        public var device: String
        public var options: Options
        public var regionBytes: UInt64
        public var elapsedSeconds: Double
        public var operations: UInt64
        public var bytes: UInt64
        public var iops: Double
        public var mebibytesPerSecond: Double
        public var read: DirectionReport?
        public var write: DirectionReport?
        /// Bytes written by the layout pass before measuring.
        public var layoutBytes: UInt64
        /// Blocks whose contents were checked (during the run and in the final read-back).
        public var verifiedBlocks: UInt64
    }

    /// Progress of a phase, for a progress line.
    public struct Progress: Sendable {
        public var phase: String
        public var doneBytes: UInt64
        public var totalBytes: UInt64?
        public var operations: UInt64
        public var elapsedSeconds: Double
    }

    /// Runs the load.
    /// - Parameters:
    ///   - device: where to run it.
    ///   - options: what to run.
    ///   - engine: the engine whose reactor runs the workers (the device's engine, for batching); nil
    ///     runs them on the global executor.
    ///   - progress: called about once a second from another task.
    /// - Throws: ``SpindleError`` for invalid options, any I/O error, or
    ///   ``SpindleError/Code/verificationFailed`` naming the offset and what it held.
    public static func run(
        on device: any BlockDevice, options requested: Options, engine: IOEngine? = nil,
        progress: (@Sendable (Progress) -> Void)? = nil
    ) async throws -> Report {
        var options = requested
        if options.verifyExisting {
            options.pattern = .read
            options.verify = true
            options.fill = false
            options.runtimeSeconds = nil
        }
        var plan = try Plan(device: device, options: options)
        if options.verifyExisting {
            options.operations = plan.blockCount
            plan = try Plan(device: device, options: options)
        }
        let shared = Shared(plan: plan)
        let reporter = progress.map { callback in
            Task {
                while !Task.isCancelled {
                    try? await Task.sleep(nanoseconds: 1_000_000_000)
                    if Task.isCancelled { break }
                    callback(shared.progress())
                }
            }
        }
        defer { reporter?.cancel() }

        var layoutBytes: UInt64 = 0
        if options.fill || (options.verify && options.pattern.reads && !options.verifyExisting) {
            shared.beginPhase("layout", totalBytes: plan.regionBytes, deadline: nil, operations: nil)
            try await runWorkers(plan, shared, engine) { worker in try await worker.layout() }
            layoutBytes = plan.regionBytes
        }

        let runtimeNanos = options.operations == nil ? UInt64((options.runtimeSeconds ?? 10) * 1e9) : nil
        let phaseStart = monotonicNanos()
        shared.beginPhase(
            options.pattern.rawValue, totalBytes: options.operations.map { $0 * UInt64(plan.blockBytes) },
            deadline: runtimeNanos.map { phaseStart + $0 }, operations: options.operations)
        let results = try await runWorkers(plan, shared, engine) { worker in try await worker.measure() }
        let elapsed = Double(max(monotonicNanos() - phaseStart, 1)) / 1e9

        var readHistogram = LatencyHistogram()
        var writeHistogram = LatencyHistogram()
        var verified: UInt64 = 0
        for result in results {
            readHistogram.merge(result.readLatency)
            writeHistogram.merge(result.writeLatency)
            verified += result.verifiedBlocks
        }

        if options.verify && options.pattern.writes {
            shared.beginPhase("verify", totalBytes: plan.regionBytes, deadline: nil, operations: nil)
            let checks = try await runWorkers(plan, shared, engine) { worker in try await worker.verifyAll() }
            verified += checks.reduce(0) { $0 + $1.verifiedBlocks }
        }

        let block = UInt64(plan.blockBytes)
        let readBytes = readHistogram.count * block
        let writeBytes = writeHistogram.count * block
        return Report(
            device: device.name, options: options, regionBytes: plan.regionBytes, elapsedSeconds: elapsed,
            operations: readHistogram.count + writeHistogram.count, bytes: readBytes + writeBytes,
            iops: Double(readHistogram.count + writeHistogram.count) / elapsed,
            mebibytesPerSecond: Double(readBytes + writeBytes) / elapsed / 1_048_576,
            read: readHistogram.count > 0 ? DirectionReport(readHistogram, bytes: readBytes, seconds: elapsed) : nil,
            write: writeHistogram.count > 0
                ? DirectionReport(writeHistogram, bytes: writeBytes, seconds: elapsed) : nil,
            layoutBytes: layoutBytes, verifiedBlocks: verified)
    }
}
