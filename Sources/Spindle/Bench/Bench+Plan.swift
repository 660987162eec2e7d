import Synchronization

/// What a run's workers share: the checked plan, the phase and its counters, the verify table,
/// and running one worker per request in flight.
extension Bench {
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
                    "the block size \(blockBytes) bytes must be a multiple of \(device.name)'s \(logical)-byte logical block, up to 64 MiB"
                )
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
                    "the region offset \(options.regionOffset) must be a block-aligned offset inside \(device.name) (\(device.capacityBytes) bytes)"
                )
            }
            regionOffset = options.regionOffset
            let available = device.capacityBytes - regionOffset
            let asked = options.regionBytes ?? available
            guard asked <= available else {
                throw SpindleError(
                    .outOfRange,
                    "the region of \(asked) bytes at offset \(regionOffset) does not fit in \(device.name) (\(device.capacityBytes) bytes)"
                )
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
                    "verification needs more blocks in the region (\(blockCount)) than requests in flight (\(options.ioDepth))"
                )
            }
            if (options.pattern.writes || options.fill || (options.verify && !options.verifyExisting))
                && device.isReadOnly
            {
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
        let phase = Locked<
            (name: String, totalBytes: UInt64?, deadline: UInt64?, operations: UInt64?, started: UInt64)
        >(
            ("", nil, nil, nil, 0))
        let verifyTable: Locked<VerifyTable>

        init(plan: Plan) {
            self.plan = plan
            let blocks = plan.options.verify ? Int(plan.blockCount) : 0
            let initial = plan.options.fill || plan.options.pattern.reads ? 0 : VerifyTable.unwritten
            verifyTable = Locked(
                VerifyTable(
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
    static func runWorkers(
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
}
