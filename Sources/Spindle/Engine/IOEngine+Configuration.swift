extension IOEngine {
    /// How an engine sets up its ring.
    public struct Configuration: Sendable {
        /// Submission queue size; the completion queue is sized to hold every operation in flight.
        public var submissionQueueEntries: UInt32 = 256
        /// Operations in flight at once; more wait in the engine until a slot frees.
        public var maximumInFlight: Int = 4096
        /// Operations that may wait for a slot once ``maximumInFlight`` are in flight. One more fails
        /// at once with ``SpindleError/Code/overloaded`` (`ENOBUFS`) instead of queueing without bound.
        public var maximumWaiting: Int = 1 << 18
        /// `IORING_SETUP_SINGLE_ISSUER`: only the reactor submits, so the kernel can skip locking.
        public var singleIssuer = true
        /// `IORING_SETUP_DEFER_TASKRUN`: completions are processed when the reactor asks for them,
        /// not by interrupting it. Requires ``singleIssuer``.
        public var deferTaskRun = true
        /// Largest batch of prepared entries the reactor holds before submitting them mid-round.
        /// In each round the first entry is submitted at once, then batches double up to this size:
        /// the device gets work without waiting for the whole round (the kernel plugs a batch until
        /// all of it is issued), and a busy round still costs only a few system calls.
        public var submitBatch = 16
        /// Name of the reactor thread, as `top -H` shows it (15 characters at most).
        public var threadName = "spindle-io"

        public init() {}
    }
}
