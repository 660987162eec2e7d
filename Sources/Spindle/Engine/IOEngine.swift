internal import CSpindleRing
internal import CSpindleShims
import Dispatch
import Glibc
import Synchronization

/// Spindle's I/O engine: one io_uring ring driven by one thread, the reactor, which is also a Swift
/// task executor.
///
/// Every operation of every device opened on an engine goes through its ring. The reactor loop runs
/// the Swift jobs that are ready, collects the submission queue entries they prepare, and hands them
/// all to the kernel with one `io_uring_enter` that also waits for the next completion. Completions
/// resume the waiting tasks, whose jobs run on the reactor again.
///
/// Tasks that run with the engine as their executor preference (``run(_:)``,
/// `Task(executorPreference: engine)`) issue I/O with no lock, no wake-up and no system call of their
/// own: the reactor batches what they prepare. Tasks on other executors work too; their requests go
/// through a locked inbox and an eventfd wakes the reactor when it sleeps. `spindle bench` measures both.
///
/// Operations in flight never outlive the engine: ``shutdown()`` stops taking new ones, cancels those
/// in flight, waits until every one has completed or failed with `ECANCELED`, then closes the ring.
///
/// The engine's thread and ring are freed by ``shutdown()``; an engine that is never shut down keeps
/// its thread for the life of the process (``shared`` is such an engine).
public final class IOEngine: TaskExecutor, @unchecked Sendable {
    // @unchecked Sendable: state shared between threads lives in `inbox` (a lock) and in atomics;
    // every other stored variable is touched only by the reactor thread (see `assertOnReactor`).

    /// The engine the CLI and library use when none is given. Created on first use; never shut down.
    public static var shared: IOEngine {
        get throws(SpindleError) { try sharedEngine.get() }
    }
    private static let sharedEngine: Result<IOEngine, SpindleError> = Result { () throws(SpindleError) in
        try IOEngine()
    }

    /// Which of single-issuer (1) and deferred task running (2) the kernel accepted for the ring.
    public private(set) var ringFlags: UInt32 = 0
    public let configuration: Configuration

    private struct Request: @unchecked Sendable {
        // @unchecked: IOOperation's pointers are owned by the suspended caller (see IOOperation).
        var operation: IOOperation
        var continuation: UnsafeContinuation<Int32, Never>
    }

    private struct Inbox {
        var jobs: [UnownedJob] = []
        var requests: [Request] = []
        var stopping = false
        var terminated = false
    }

    private let inbox = Locked(Inbox())
    /// Items posted to the inbox since the reactor last drained it (may over-count, never under-count).
    private let inboxCount = Atomic<Int>(0)
    /// True while the reactor is about to block or blocked in the kernel.
    private let sleeping = Atomic<Bool>(false)
    private let wakeDescriptor: Int32
    private let joined = Locked(false)

    // Reactor-only state.
    private var reactorThread = pthread_t()
    private var ring: OpaquePointer?
    private var localJobs: [UnownedJob] = []
    private var runningJobs: [UnownedJob] = []
    private var drainedJobs: [UnownedJob] = []
    private var drainedRequests: [Request] = []
    private var overflow: [Request] = []
    private var overflowHead = 0
    private let continuations: UnsafeMutablePointer<UnsafeContinuation<Int32, Never>?>
    private let timespecs: UnsafeMutablePointer<spindle_timespec>
    private let freeSlots: UnsafeMutablePointer<Int32>
    private var freeSlotCount: Int
    private let completionTags: UnsafeMutablePointer<UInt64>
    private let completionResults: UnsafeMutablePointer<Int32>
    private let completionBatchSize: UInt32 = 256
    private let wakeBuffer: UnsafeMutablePointer<UInt64>
    private var wakeArmed = false
    private var inFlight = 0
    private let submitBatch: UInt32
    /// Prepared entries that trigger a submission in the current round (doubles after each).
    private var submitThreshold: UInt32 = 1
    private var stopping = false

    private static let wakeTag: UInt64 = .max
    private static let cancelTag: UInt64 = .max - 1

    /// Starts an engine: creates its reactor thread and, on it, the ring.
    /// - Throws: ``SpindleError`` when io_uring is unavailable (disabled by sysctl, seccomp, an old kernel).
    public init(configuration: Configuration = Configuration()) throws(SpindleError) {
        precondition(configuration.maximumInFlight > 0 && configuration.maximumInFlight < Int(Int32.max))
        precondition(configuration.maximumWaiting >= 0)
        self.configuration = configuration
        submitBatch = UInt32(max(1, configuration.submitBatch))
        let slots = configuration.maximumInFlight
        continuations = .allocate(capacity: slots)
        continuations.initialize(repeating: nil, count: slots)
        timespecs = .allocate(capacity: slots)
        timespecs.initialize(repeating: spindle_timespec(), count: slots)
        freeSlots = .allocate(capacity: slots)
        for index in 0..<slots { freeSlots[index] = Int32(slots - 1 - index) }
        freeSlotCount = slots
        completionTags = .allocate(capacity: Int(completionBatchSize))
        completionResults = .allocate(capacity: Int(completionBatchSize))
        wakeBuffer = .allocate(capacity: 1)
        wakeBuffer.initialize(to: 0)
        localJobs.reserveCapacity(1024)
        runningJobs.reserveCapacity(1024)
        wakeDescriptor = spindle_eventfd()
        guard wakeDescriptor >= 0 else {
            let error = Glibc.errno
            freeMemory()
            throw SpindleError.system(error, operation: "eventfd")
        }

        // The ring is created on the reactor thread: with IORING_SETUP_SINGLE_ISSUER the creating
        // thread is the only one allowed to submit.
        let context = ThreadContext(engine: self)
        var thread = pthread_t()
        let created = pthread_create(
            &thread, nil,
            { argument in
                let context = Unmanaged<ThreadContext>.fromOpaque(argument!).takeRetainedValue()
                context.engine.threadMain(context)
                return nil
            }, Unmanaged.passRetained(context).toOpaque())
        guard created == 0 else {
            close(wakeDescriptor)
            freeMemory()
            throw SpindleError.system(created, operation: "start the I/O engine thread")
        }
        context.started.wait()
        if let error = context.setupResult.withLock({ $0 }) {
            pthread_join(thread, nil)
            joined.withLock { $0 = true }
            close(wakeDescriptor)
            freeMemory()
            throw error
        }
    }

    deinit {
        close(wakeDescriptor)
        freeMemory()
    }

    private func freeMemory() {
        continuations.deallocate()
        timespecs.deallocate()
        freeSlots.deallocate()
        completionTags.deallocate()
        completionResults.deallocate()
        wakeBuffer.deallocate()
    }

    private final class ThreadContext: @unchecked Sendable {
        // @unchecked: the engine is @unchecked Sendable; the semaphore and lock are thread-safe.
        let engine: IOEngine
        let started = DispatchSemaphore(value: 0)
        let setupResult = Locked<SpindleError?>(nil)
        init(engine: IOEngine) {
            self.engine = engine
        }
    }

    // MARK: Public operations

    /// Runs one operation and returns the kernel's result: a byte count or 0 on success, `-errno` on failure.
    ///
    /// No allocation and, on the reactor thread, no lock: the continuation waits in a preallocated slot
    /// whose index is the entry's user data.
    @inlinable
    public func execute(_ operation: IOOperation) async -> Int32 {
        await withUnsafeContinuation { continuation in
            self.submit(operation, continuation)
        }
    }

    /// Runs `body` with this engine as its task executor preference, so the I/O it issues is batched
    /// by the reactor with no cross-thread hand-off.
    public func run<Result: Sendable>(
        _ body: @Sendable () async throws -> Result
    ) async rethrows -> Result {
        try await withTaskExecutorPreference(self, operation: body)
    }

    /// Stops the engine: new operations fail with `ECANCELED`, those in flight are cancelled or
    /// completed, then the ring and thread are released. Tasks that preferred this engine continue on
    /// the global executor. Safe to call more than once and from any thread; from the reactor itself
    /// it only starts the shutdown.
    public func shutdown() {
        inbox.withLock { $0.stopping = true }
        inboxCount.add(1, ordering: .sequentiallyConsistent)
        wake()
        if isOnReactorThread { return }
        joined.withLock { joined in
            if !joined {
                pthread_join(reactorThread, nil)
                joined = true
            }
        }
    }

    /// True once ``shutdown()`` has finished.
    public var isShutDown: Bool { inbox.withLock { $0.terminated } }

    // MARK: TaskExecutor

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if isOnReactorThread {
            localJobs.append(job)
            return
        }
        let terminated = inbox.withLock { inbox -> Bool in
            if inbox.terminated { return true }
            inbox.jobs.append(job)
            return false
        }
        if terminated {
            globalConcurrentExecutor.enqueue(ExecutorJob(job))
            return
        }
        signal()
    }

    // MARK: Submission

    /// Whether the caller runs on this engine's reactor (a thread-local, not a thread id: ids of
    /// ended threads are reused).
    @usableFromInline
    var isOnReactorThread: Bool { spindle_current_reactor() == Unmanaged.passUnretained(self).toOpaque() }

    @usableFromInline
    func submit(_ operation: IOOperation, _ continuation: UnsafeContinuation<Int32, Never>) {
        if isOnReactorThread {
            start(operation, continuation)
            return
        }
        let accepted = inbox.withLock { inbox -> Bool in
            if inbox.stopping || inbox.terminated { return false }
            inbox.requests.append(Request(operation: operation, continuation: continuation))
            return true
        }
        if accepted {
            signal()
        } else {
            continuation.resume(returning: -ECANCELED)
        }
    }

    private func signal() {
        inboxCount.add(1, ordering: .sequentiallyConsistent)
        if sleeping.load(ordering: .sequentiallyConsistent) { wake() }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeDescriptor, &one, 8)
    }

    /// Takes a slot and prepares a submission entry; the reactor submits it with the rest of the batch.
    private func start(_ operation: IOOperation, _ continuation: UnsafeContinuation<Int32, Never>) {
        if stopping {
            continuation.resume(returning: -ECANCELED)
            return
        }
        guard freeSlotCount > 0 else {
            guard overflow.count - overflowHead < configuration.maximumWaiting else {
                continuation.resume(returning: -ENOBUFS)
                return
            }
            overflow.append(Request(operation: operation, continuation: continuation))
            return
        }
        freeSlotCount -= 1
        let slot = Int(freeSlots[freeSlotCount])
        continuations[slot] = continuation
        check(Self.prepare(operation, ring: ring, tag: UInt64(slot), timespec: timespecs + slot), "prepare a request")
        inFlight += 1
        if spindle_ring_unsubmitted(ring) >= submitThreshold {
            _ = spindle_ring_submit(ring)
            submitThreshold = min(submitThreshold * 2, submitBatch)
        }
    }

    /// The ring failing to take work is not recoverable: the kernel refused a submission for a
    /// reason other than being busy.
    private func check(_ result: Int32, _ what: String) {
        if result < 0 { fatalError("io_uring: cannot \(what): \(String(cString: strerror(-result)))") }
    }

    // MARK: Reactor

    private func threadMain(_ context: ThreadContext) {
        reactorThread = pthread_self()
        spindle_set_current_reactor(Unmanaged.passUnretained(self).toOpaque())
        defer { spindle_set_current_reactor(nil) }
        configuration.threadName.withCString { spindle_set_thread_name($0) }
        let setupError = setUpRing()
        context.setupResult.withLock { $0 = setupError }
        context.started.signal()
        guard setupError == nil else { return }
        runLoop()
        finish()
    }

    private func setUpRing() -> SpindleError? {
        var wanted: UInt32 = 0
        if configuration.singleIssuer { wanted |= UInt32(SPINDLE_RING_SINGLE_ISSUER) }
        if configuration.deferTaskRun { wanted |= UInt32(SPINDLE_RING_DEFER_TASKRUN) }
        var inUse: UInt32 = 0
        var error: Int32 = 0
        guard
            let created = spindle_ring_create(
                configuration.submissionQueueEntries, UInt32(configuration.maximumInFlight + 64), wanted, &inUse, &error
            )
        else {
            var failure = SpindleError.system(-error, operation: "io_uring_queue_init")
            failure.message +=
                "; io_uring may be disabled (see /proc/sys/kernel/io_uring_disabled) or blocked by a sandbox"
            return failure
        }
        ring = created
        ringFlags = inUse
        return nil
    }

    private func runLoop() {
        let defersTaskRun = ringFlags & UInt32(SPINDLE_RING_DEFER_TASKRUN) != 0
        while true {
            if inboxCount.load(ordering: .relaxed) > 0 { drainInbox() }
            runJobs()
            reapCompletions()
            if !localJobs.isEmpty || inboxCount.load(ordering: .relaxed) > 0 {
                // More work is ready: submit what is prepared (and collect finished work) without waiting.
                if spindle_ring_unsubmitted(ring) > 0 || (defersTaskRun && inFlight > 0) {
                    _ = spindle_ring_submit_and_get_events(ring)
                }
                continue
            }
            if stopping && inFlight == 0 && overflowHead == overflow.count {
                if terminateIfIdle() { return }
                continue
            }
            armWake()
            sleeping.store(true, ordering: .sequentiallyConsistent)
            if inboxCount.load(ordering: .sequentiallyConsistent) > 0 {
                sleeping.store(false, ordering: .relaxed)
                continue
            }
            let result = spindle_ring_submit_and_wait(ring, 1)
            sleeping.store(false, ordering: .relaxed)
            submitThreshold = 1
            if result < 0 && result != -EINTR && result != -EAGAIN && result != -EBUSY && result != -ETIME {
                fatalError("io_uring_submit_and_wait failed: \(String(cString: strerror(-result)))")
            }
        }
    }

    private func drainInbox() {
        let stopRequested = inbox.withLock { inbox -> Bool in
            inboxCount.store(0, ordering: .sequentiallyConsistent)
            swap(&inbox.jobs, &drainedJobs)
            swap(&inbox.requests, &drainedRequests)
            return inbox.stopping
        }
        localJobs.append(contentsOf: drainedJobs)
        drainedJobs.removeAll(keepingCapacity: true)
        if stopRequested && !stopping { beginStopping() }
        for request in drainedRequests { start(request.operation, request.continuation) }
        drainedRequests.removeAll(keepingCapacity: true)
    }

    private func runJobs() {
        guard !localJobs.isEmpty else { return }
        swap(&localJobs, &runningJobs)
        let executor = asUnownedTaskExecutor()
        for job in runningJobs { job.runSynchronously(on: executor) }
        runningJobs.removeAll(keepingCapacity: true)
    }

    private func reapCompletions() {
        while true {
            let count = spindle_ring_reap(ring, completionTags, completionResults, completionBatchSize)
            for index in 0..<Int(count) {
                complete(tag: completionTags[index], result: completionResults[index])
            }
            if count < completionBatchSize { break }
        }
        startOverflow()
    }

    private func complete(tag: UInt64, result: Int32) {
        switch tag {
        case Self.wakeTag:
            wakeArmed = false
        case Self.cancelTag:
            break
        default:
            let slot = Int(tag)
            let continuation = continuations[slot]!
            continuations[slot] = nil
            freeSlots[freeSlotCount] = Int32(slot)
            freeSlotCount += 1
            inFlight -= 1
            continuation.resume(returning: result)
        }
    }

    private func startOverflow() {
        while overflowHead < overflow.count && (freeSlotCount > 0 || stopping) {
            let request = overflow[overflowHead]
            overflowHead += 1
            start(request.operation, request.continuation)
        }
        if overflowHead == overflow.count && overflowHead > 0 {
            overflow.removeAll(keepingCapacity: true)
            overflowHead = 0
        }
    }

    /// Keeps a read of the eventfd in the ring, so that a write to it from another thread ends the wait.
    private func armWake() {
        guard !wakeArmed else { return }
        check(spindle_ring_read(ring, wakeDescriptor, wakeBuffer, 8, 0, Self.wakeTag), "arm the wake-up read")
        wakeArmed = true
    }

    private func beginStopping() {
        stopping = true
        startOverflow()  // fails every waiting request with ECANCELED
        check(spindle_ring_cancel_all(ring, Self.cancelTag), "cancel requests in flight")
        // The cancel also takes out the wake read; it is re-armed before the reactor next blocks.
    }

    /// Once stopping and idle: marks the engine terminated unless jobs arrived meanwhile.
    private func terminateIfIdle() -> Bool {
        let done = inbox.withLock { inbox -> Bool in
            if !inbox.jobs.isEmpty || !inbox.requests.isEmpty { return false }
            inbox.terminated = true
            return true
        }
        if !done { drainInbox() }
        return done
    }

    private func finish() {
        if let ring {
            spindle_ring_destroy(ring)
            self.ring = nil
        }
    }
}
