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
            write: writeHistogram.count > 0 ? DirectionReport(writeHistogram, bytes: writeBytes, seconds: elapsed) : nil,
            layoutBytes: layoutBytes, verifiedBlocks: verified)
    }

    // MARK: Internals

    struct Plan: Sendable {
        let device: any BlockDevice
        let options: Options
        let blockBytes: Int
        let regionOffset: UInt64
        let regionBytes: UInt64
        let blockCount: UInt64
        let layoutChunkBytes: Int

        init(device: any BlockDevice, options: Options) throws(SpindleError) {
            self.device = device
            self.options = options
            blockBytes = options.blockBytes
            let logical = device.logicalBlockBytes
            guard blockBytes > 0, blockBytes % logical == 0, blockBytes <= 64 << 20 else {
                throw SpindleError(
                    .invalidArgument,
                    "the block size \(blockBytes) bytes must be a multiple of \(device.name)'s \(logical)-byte logical block, up to 64 MiB")
            }
            if options.verify && blockBytes < 32 {
                throw SpindleError(.invalidArgument, "verification needs blocks of at least 32 bytes")
            }
            guard options.ioDepth >= 1, options.ioDepth <= 4096 else {
                throw SpindleError(.invalidArgument, "the I/O depth \(options.ioDepth) must be from 1 to 4096")
            }
            guard (0...100).contains(options.readPercent) else {
                throw SpindleError(.invalidArgument, "the read percentage \(options.readPercent) must be from 0 to 100")
            }
            if let runtime = options.runtimeSeconds, !(runtime > 0) {
                throw SpindleError(.invalidArgument, "the runtime must be more than 0 seconds")
            }
            if let operations = options.operations, operations == 0 {
                throw SpindleError(.invalidArgument, "the number of operations must be at least 1")
            }
            guard options.regionOffset % UInt64(logical) == 0, options.regionOffset < device.capacityBytes else {
                throw SpindleError(
                    .invalidArgument,
                    "the region offset \(options.regionOffset) must be a block-aligned offset inside \(device.name) (\(device.capacityBytes) bytes)")
            }
            regionOffset = options.regionOffset
            let available = device.capacityBytes - regionOffset
            let asked = options.regionBytes ?? available
            guard asked <= available else {
                throw SpindleError(
                    .outOfRange,
                    "the region of \(asked) bytes at offset \(regionOffset) does not fit in \(device.name) (\(device.capacityBytes) bytes)")
            }
            blockCount = asked / UInt64(blockBytes)
            regionBytes = blockCount * UInt64(blockBytes)
            guard blockCount > 0 else {
                throw SpindleError(
                    .invalidArgument, "the region (\(asked) bytes) is smaller than one \(blockBytes)-byte block")
            }
            if options.verify && blockCount <= UInt64(options.ioDepth) {
                throw SpindleError(
                    .invalidArgument,
                    "verification needs more blocks in the region (\(blockCount)) than requests in flight (\(options.ioDepth))")
            }
            if (options.pattern.writes || options.fill || (options.verify && !options.verifyExisting)) && device.isReadOnly {
                throw SpindleError(.readOnly, "the load writes but the device is open read-only", path: device.name)
            }
            // The layout pass writes in large requests made of whole blocks.
            layoutChunkBytes = max(blockBytes, (1 << 20) / blockBytes * blockBytes)
        }
    }

    struct VerifyTable {
        /// Serial of the last completed write per block; `unwritten` when never written and no layout.
        var lastSerial: [UInt64]
        var inFlight: [Bool]
        var nextSerial: UInt64 = 1
        static let unwritten = UInt64.max
    }

    final class Shared: Sendable {
        let plan: Plan
        let cursor = Atomic<UInt64>(0)
        let issued = Atomic<UInt64>(0)
        let completedOperations = Atomic<UInt64>(0)
        let completedBytes = Atomic<UInt64>(0)
        let phase = Locked<(name: String, totalBytes: UInt64?, deadline: UInt64?, operations: UInt64?, started: UInt64)>(
            ("", nil, nil, nil, 0))
        let verifyTable: Locked<VerifyTable>

        init(plan: Plan) {
            self.plan = plan
            let blocks = plan.options.verify ? Int(plan.blockCount) : 0
            let initial = plan.options.fill || plan.options.pattern.reads ? 0 : VerifyTable.unwritten
            verifyTable = Locked(VerifyTable(
                lastSerial: [UInt64](repeating: initial, count: blocks),
                inFlight: [Bool](repeating: false, count: blocks)))
        }

        func beginPhase(_ name: String, totalBytes: UInt64?, deadline: UInt64?, operations: UInt64?) {
            cursor.store(0, ordering: .relaxed)
            issued.store(0, ordering: .relaxed)
            completedOperations.store(0, ordering: .relaxed)
            completedBytes.store(0, ordering: .relaxed)
            phase.withLock { $0 = (name, totalBytes, deadline, operations, monotonicNanos()) }
        }

        var deadline: UInt64? { phase.withLock { $0.deadline } }
        var operationLimit: UInt64? { phase.withLock { $0.operations } }

        func progress() -> Progress {
            let current = phase.withLock { $0 }
            var elapsed = monotonicNanos() - current.started
            // A time-limited phase has no byte total; its progress is the time, capped at the deadline.
            if let deadline = current.deadline { elapsed = min(elapsed, deadline - current.started) }
            return Progress(
                phase: current.name, doneBytes: completedBytes.load(ordering: .relaxed),
                totalBytes: current.deadline == nil ? current.totalBytes : nil,
                operations: completedOperations.load(ordering: .relaxed), elapsedSeconds: Double(elapsed) / 1e9)
        }
    }

    struct WorkerResult: Sendable {
        var readLatency = LatencyHistogram()
        var writeLatency = LatencyHistogram()
        var verifiedBlocks: UInt64 = 0
    }

    @discardableResult
    private static func runWorkers(
        _ plan: Plan, _ shared: Shared, _ engine: IOEngine?,
        _ body: @escaping @Sendable (inout Worker) async throws -> Void
    ) async throws -> [WorkerResult] {
        try await withThrowingTaskGroup(of: WorkerResult.self) { group in
            for index in 0..<plan.options.ioDepth {
                group.addTask(executorPreference: engine) {
                    var worker = Worker(plan: plan, shared: shared, index: index)
                    try await body(&worker)
                    return worker.result
                }
            }
            var results: [WorkerResult] = []
            do {
                for try await result in group { results.append(result) }
            } catch {
                group.cancelAll()
                throw error
            }
            return results
        }
    }

    struct Worker: Sendable {
        let plan: Plan
        let shared: Shared
        let index: Int
        var random: SeededRandom
        let buffer: AlignedBuffer
        let scratch: AlignedBuffer
        var result = WorkerResult()

        init(plan: Plan, shared: Shared, index: Int) {
            self.plan = plan
            self.shared = shared
            self.index = index
            random = SeededRandom(seed: plan.options.seed &+ UInt64(index) &* 0x9E37_79B9)
            buffer = AlignedBuffer(count: plan.blockBytes)
            scratch = AlignedBuffer(count: plan.options.verify ? plan.blockBytes : 0)
            if !plan.options.verify {
                // Incompressible contents, written as they are for every request, as fio does.
                let words = buffer.bytes.bindMemory(to: UInt64.self)
                for word in words.indices { words[word] = random.next() }
            }
        }

        /// Writes the region sequentially in large requests.
        mutating func layout() async throws {
            let chunk = AlignedBuffer(count: plan.layoutChunkBytes)
            let chunkCount = (plan.regionBytes + UInt64(plan.layoutChunkBytes) - 1) / UInt64(plan.layoutChunkBytes)
            if !plan.options.verify {
                let words = chunk.bytes.bindMemory(to: UInt64.self)
                for word in words.indices { words[word] = random.next() }
            }
            while true {
                let chunkIndex = shared.cursor.add(1, ordering: .relaxed).oldValue
                if chunkIndex >= chunkCount { return }
                let start = chunkIndex * UInt64(plan.layoutChunkBytes)
                let length = Int(min(UInt64(plan.layoutChunkBytes), plan.regionBytes - start))
                if plan.options.verify {
                    for blockStart in stride(from: 0, to: length, by: plan.blockBytes) {
                        BlockPattern.fill(
                            chunk.slice(offset: blockStart, length: plan.blockBytes), seed: plan.options.seed,
                            offset: plan.regionOffset + start + UInt64(blockStart), serial: 0)
                    }
                }
                try await plan.device.write(from: chunk, range: 0..<length, at: plan.regionOffset + start)
                shared.completedBytes.add(UInt64(length), ordering: .relaxed)
                shared.completedOperations.add(1, ordering: .relaxed)
            }
        }

        /// The measured phase.
        mutating func measure() async throws {
            let deadline = shared.deadline
            let limit = shared.operationLimit
            let device = plan.device
            let pattern = plan.options.pattern
            let readFraction = pattern == .randrw ? Double(plan.options.readPercent) / 100 : (pattern.reads ? 1 : 0)
            let blockBytes = UInt64(plan.blockBytes)
            let verify = plan.options.verify
            var now = monotonicNanos()
            while !Task.isCancelled {
                if let limit {
                    if shared.issued.add(1, ordering: .relaxed).oldValue >= limit { return }
                } else if let deadline, now >= deadline {
                    return
                }
                let isRead = pattern == .randrw ? random.chance(readFraction) : pattern.reads
                if verify {
                    try await verifiedOperation(isRead: isRead)
                    now = monotonicNanos()
                    continue
                }
                let block = pattern.isRandom
                    ? random.below(plan.blockCount)
                    : shared.cursor.add(1, ordering: .relaxed).oldValue % plan.blockCount
                let offset = plan.regionOffset + block * blockBytes
                let start = monotonicNanos()
                if isRead {
                    try await device.read(into: buffer, at: offset)
                } else {
                    try await device.write(from: buffer, at: offset)
                }
                now = monotonicNanos()
                if isRead { result.readLatency.record(now - start) } else { result.writeLatency.record(now - start) }
                shared.completedOperations.add(1, ordering: .relaxed)
                shared.completedBytes.add(blockBytes, ordering: .relaxed)
            }
        }

        /// One request in verify mode: the block is reserved so no other request touches it meanwhile.
        private mutating func verifiedOperation(isRead: Bool) async throws {
            let plan = self.plan
            let blockCount = plan.blockCount
            let sequential = !plan.options.pattern.isRandom
            var candidate = sequential
                ? shared.cursor.add(1, ordering: .relaxed).oldValue % blockCount
                : random.below(blockCount)
            var tries = 0
            let reservation: (block: UInt64, serial: UInt64)? = shared.verifyTable.withLock { table in
                while true {
                    let index = Int(candidate)
                    if !table.inFlight[index] && !(isRead && table.lastSerial[index] == VerifyTable.unwritten) {
                        table.inFlight[index] = true
                        if isRead { return (candidate, table.lastSerial[index]) }
                        let serial = table.nextSerial
                        table.nextSerial += 1
                        return (candidate, serial)
                    }
                    tries += 1
                    if tries > 64 { return nil }
                    candidate = sequential ? (candidate + 1) % blockCount : random.below(blockCount)
                }
            }
            guard let reservation else {
                await Task.yield()
                return
            }
            let offset = plan.regionOffset + reservation.block * UInt64(plan.blockBytes)
            defer { shared.verifyTable.withLock { $0.inFlight[Int(reservation.block)] = false } }
            let start = monotonicNanos()
            if isRead {
                try await plan.device.read(into: buffer, at: offset)
                let elapsed = monotonicNanos() - start
                try check(offset: offset, serial: reservation.serial)
                result.readLatency.record(elapsed)
            } else {
                BlockPattern.fill(buffer.bytes, seed: plan.options.seed, offset: offset, serial: reservation.serial)
                try await plan.device.write(from: buffer, at: offset)
                result.writeLatency.record(monotonicNanos() - start)
                shared.verifyTable.withLock { $0.lastSerial[Int(reservation.block)] = reservation.serial }
            }
            shared.completedOperations.add(1, ordering: .relaxed)
            shared.completedBytes.add(UInt64(plan.blockBytes), ordering: .relaxed)
        }

        private mutating func check(offset: UInt64, serial: UInt64) throws(SpindleError) {
            // A later run's random writes may have replaced the layout pass: checking what exists, any
            // write of this seed for this offset is accepted whole (lost writes are not told apart then).
            let problem = plan.options.verifyExisting
                ? BlockPattern.mismatchAnyWrite(buffer.readOnlyBytes, seed: plan.options.seed, offset: offset, scratch: scratch.bytes)
                : BlockPattern.mismatch(buffer.readOnlyBytes, seed: plan.options.seed, offset: offset, serial: serial, scratch: scratch.bytes)
            if let problem {
                throw SpindleError(
                    .verificationFailed, problem, operation: "verify", path: plan.device.name, offset: offset,
                    length: UInt64(plan.blockBytes))
            }
            result.verifiedBlocks += 1
        }

        /// Reads back every block that holds known contents.
        mutating func verifyAll() async throws {
            while true {
                let block = shared.cursor.add(1, ordering: .relaxed).oldValue
                if block >= plan.blockCount { return }
                let serial = shared.verifyTable.withLock { $0.lastSerial[Int(block)] }
                if serial == VerifyTable.unwritten { continue }
                let offset = plan.regionOffset + block * UInt64(plan.blockBytes)
                try await plan.device.read(into: buffer, at: offset)
                try check(offset: offset, serial: serial)
                shared.completedBytes.add(UInt64(plan.blockBytes), ordering: .relaxed)
                shared.completedOperations.add(1, ordering: .relaxed)
            }
        }
    }
}

/// Nanoseconds on the monotonic clock.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}
