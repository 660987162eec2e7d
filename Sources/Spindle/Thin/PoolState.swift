/// Everything about a thin pool that changes: the metadata area and its trees, the volume records,
/// and the allocation state. It is reachable only through ``PoolStateLock/withState(_:)`` (for a
/// pool, ``ThinPool/withState(_:)``), which holds the pool's lock for the length of the body, so
/// "callers hold the lock" is a fact the compiler checks: code that has a `PoolState` is inside
/// the lock. The type is not `Sendable`, so a body can neither return it nor hand it to another
/// task.
final class PoolState {
    /// The pool's name, for messages.
    let name: String
    let chunkBytes: UInt64
    let isReadOnly: Bool
    let area: MetadataArea
    /// Requests that looked a mapping up and have not finished (shared with the pool, whose
    /// lock-free lookups enter it without this state).
    let inFlight: InFlightEpochs
    /// The devices and their runs of chunks. Only ``ThinPool/extend(adding:overwrite:)`` changes it;
    /// every change is published for readers outside the lock.
    var layout: ChunkLayout {
        didSet { published.withLock { $0 = layout } }
    }
    private let published: Locked<ChunkLayout>

    var records: [UInt64: VolumeRecord] = [:]
    /// Deleted volumes whose mappings are still being freed (``ThinPool/deleteVolume(name:)``):
    /// no longer volumes, but their trees hold chunks until they are gone.
    var deleting: [UInt64: VolumeRecord] = [:]
    /// Volumes whose mapping tree could not be read on open, with the error.
    var damagedVolumes: [UInt64: String] = [:]
    var dirtyRecords: Set<UInt64> = []
    /// Chunks freed in the open transaction: committed mappings may still use them.
    var pendingFree: Set<UInt64> = []
    /// Chunks handed to a first write or a copy that is not mapped yet.
    var reserved: Set<UInt64> = []
    var cursor: UInt64 = 0
    var usedChunks: UInt64
    /// Chunks whose sharing ended in the open transaction: written by copy until it commits.
    var unsharedSinceCommit: Set<UInt64> = []
    /// Chunks with more than one referrer (kept in the volumes tree under id 0).
    var sharedChunks: UInt64 = 0
    var storedSharedChunks: UInt64 = .max
    /// Chunks from here on have held no data since they were zeroed (discarded at creation or
    /// extension): a first write into one writes only its data. Recorded in the metadata and raised
    /// in batches, always ahead of ``cleanNext``, so that after a crash every chunk that may have
    /// been written counts as dirty.
    var dirtyBelow: UInt64
    /// ``dirtyBelow`` as the last commit recorded it: chunks from here on may not be handed out
    /// before a commit records more.
    var committedDirtyBelow: UInt64
    /// The next never-used chunk to hand out (in memory; reopening starts at ``dirtyBelow``).
    var cleanNext: UInt64
    /// The mapping tables of open volumes (see ``VolumeMappings``), by volume id.
    var openMappingTables: [UInt64: WeakMappings] = [:]
    /// The open transaction has grown past ``automaticCommitNodes`` and a commit is on its way
    /// (one writer claims it; ``commit()`` clears it).
    var commitDue = false
    /// Held from sealing a transaction until it is durable: one sealed transaction at a time. Taken
    /// only by a holder of the pool's lock, and let go without needing it, so never a deadlock.
    let commitGate = AsyncMutex()
    /// Commits sealed and not yet completed (see PoolState+Commit.swift).
    var sealedCommits: [SealedCommitState] = []
    var commitSequence: UInt64 = 0

    struct WeakMappings {
        weak var mappings: VolumeMappings?
    }

    init(
        name: String, layout: ChunkLayout, published: Locked<ChunkLayout>, area: MetadataArea, inFlight: InFlightEpochs
    ) {
        self.name = name
        self.layout = layout
        self.published = published
        self.area = area
        self.inFlight = inFlight
        chunkBytes = layout.chunkBytes
        isReadOnly = layout.devices.contains { $0.isReadOnly }
        usedChunks = area.parameters[ThinPool.Parameter.usedChunks.rawValue]
        dirtyBelow = area.parameters[ThinPool.Parameter.dirtyBelow.rawValue]
        cleanNext = dirtyBelow
        committedDirtyBelow = dirtyBelow
    }

    var chunkCount: UInt64 { layout.chunkCount }

    func deletedError(_ volumeName: String) -> SpindleError {
        SpindleError(.notFound, "volume \(volumeName) of pool \(name) was deleted", path: "\(name)/\(volumeName)")
    }
}

/// The lock that guards a ``PoolState``: the state is handed out only to a body running under it.
final class PoolStateLock: @unchecked Sendable {
    // @unchecked Sendable: `state` is touched only inside `withState`, which holds `mutex`, and
    // `PoolState` is not Sendable, so no body can let it escape to another task.
    private let mutex = AsyncMutex()
    private let state: PoolState

    init(_ state: PoolState) {
        self.state = state
    }

    /// Runs `body` with the state, holding the lock (waiters are admitted in arrival order).
    func withState<Result: Sendable>(_ body: (PoolState) async throws -> Result) async rethrows -> Result {
        try await mutex.withLock { try await body(state) }
    }
}
