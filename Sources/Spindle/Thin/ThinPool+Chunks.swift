/// The metadata operations a thin volume's I/O needs, and nothing else (the shape of dm-thin's
/// `dm-thin-metadata.h`: find a block, allocate one, insert a mapping, remove mappings, commit).
/// ``ThinVolume`` reads and writes through these alone.
extension ThinPool {
    /// A mapped chunk: where it is, and whether a write must copy it first.
    struct MappedChunk: Sendable {
        /// The pool chunk.
        let chunk: UInt64
        let device: any BlockDevice
        /// The chunk's byte offset on `device`.
        let offset: UInt64
        /// Whether another volume may use the chunk (or did when the open transaction began), or
        /// that was not looked up (for a read): a write goes to a copy, never in place.
        let shared: Bool
    }

    /// A free chunk held for one volume's write until it is mapped or released.
    struct ReservedChunk: Sendable {
        let chunk: UInt64
        /// Whether the chunk has held no data since it was zeroed: only a write's data need be
        /// written, the rest reads zeros already.
        let clean: Bool
        let device: any BlockDevice
        let offset: UInt64
    }

    /// Looks up where `chunk` of a volume is and runs `body` with it (nil when the chunk is not
    /// mapped). The chunk cannot be handed to another volume until `body` returns, whatever
    /// happens to the mapping meanwhile, so `body` may read it or write it in place (when not
    /// shared). For `writing`, a mapping known only as shared is looked up again in the metadata
    /// (it may have become the volume's alone).
    func findChunk<Result>(
        volume: ThinVolume, chunk: UInt64, writing: Bool, _ body: (MappedChunk?) async throws -> Result
    ) async throws -> Result {
        if let pinned = pinMapped(volume: volume, chunk: chunk, writing: writing) {
            defer { unpin(pinned.epoch) }
            return try await body(pinned.mapped)
        }
        let found = try await withMetadataInMemory({
            $0.missingMetadata(volume: volume.id, chunk: chunk, writing: writing)
        }) { state in
            try await state.findChunk(volume: volume, chunk: chunk, writing: writing)
        }
        guard let found else { return try await body(nil) }
        defer { inFlight.leave(found.epoch) }
        return try await body(found.mapped)
    }

    /// The steady state, without the pool's lock and without suspending: where `chunk` of a volume
    /// is when the volume's mapping table knows it (for `writing`, only when the chunk is the
    /// volume's alone), pinned against reuse until ``unpin(_:)`` is called with the epoch. Nil when
    /// the table does not know it: ``findChunk(volume:chunk:writing:_:)`` then looks in the metadata.
    @inline(__always)
    func pinMapped(volume: ThinVolume, chunk: UInt64, writing: Bool) -> (mapped: MappedChunk, epoch: Int)? {
        // Entering the epoch before looking is what makes this safe (see InFlightEpochs).
        let epoch = inFlight.enter()
        if let found = volume.mappings.find(chunk), !writing || !found.shared { return (found, epoch) }
        inFlight.leave(epoch)
        return nil
    }

    /// Ends the pin ``pinMapped(volume:chunk:writing:)`` took.
    @inline(__always)
    func unpin(_ epoch: Int) { inFlight.leave(epoch) }

    /// Runs `body` under the pool's lock once the metadata nodes it will read are in memory: while
    /// `missing` names one that is not, the lock is let go, that node (and the rest of its path) is
    /// read, and the lock is taken again. So a request that needs metadata from the device waits
    /// for it without holding up the pool's other requests, which is what keeps first writes fast
    /// when the metadata is larger than the cache. After a few rounds (a commit between each, or a
    /// node that cannot be read), `body` reads what it still lacks under the lock.
    func withMetadataInMemory<Result: Sendable>(
        _ missing: (PoolState) -> MetadataArea.MissingNode?, _ body: (PoolState) async throws -> Result
    ) async throws -> Result {
        for _ in 0..<4 {
            let outcome = try await withState { state -> MetadataOutcome<Result> in
                if let node = missing(state) { return .read(node) }
                return .done(try await body(state))
            }
            switch outcome {
            case let .done(result): return result
            case let .read(node): await node.load()
            }
        }
        return try await withState(body)
    }

    /// Reserves a free chunk for a write into an unmapped or shared chunk.
    func reserveChunk() async throws -> ReservedChunk {
        let (reserved, commitNow) = try await withState { state in
            let wasDue = state.commitDue
            let (chunk, clean) = try await state.allocateChunk()
            let location = state.layout.location(of: chunk)
            return (
                ReservedChunk(chunk: chunk, clean: clean, device: location.device, offset: location.offset),
                !wasDue && state.commitDue
            )
        }
        if commitNow {
            do {
                try await commit()
            } catch {
                await release(reserved: reserved)
                throw error
            }
        }
        return reserved
    }

    /// Maps `chunk` of a volume to a reserved chunk whose data is written, replacing the pool chunk
    /// `replacing` (the shared chunk a copy was made from) or nothing. Returns false, changing
    /// nothing, when the mapping is not `replacing` any more (a concurrent write got there first):
    /// the reservation stays, to be released, and the caller looks again.
    func map(volume: ThinVolume, chunk: UInt64, to reserved: ReservedChunk, replacing: UInt64?) async throws -> Bool {
        let outcome = try await withMetadataInMemory({
            $0.missingMetadata(
                volume: volume.id, chunk: chunk, writing: false,
                poolChunks: [reserved.chunk] + (replacing.map { [$0] } ?? []))
        }) { state -> (mapped: Bool, commit: Bool) in
            let wasDue = state.commitDue
            let mapped = try await state.map(
                volume: volume.id, name: volume.volumeName, chunk: chunk, to: reserved.chunk, replacing: replacing)
            return (mapped, !wasDue && state.commitDue)
        }
        // The write that pushed the transaction past its bound commits it, after letting the lock go.
        if outcome.commit { try await commit() }
        return outcome.mapped
    }

    /// Gives back a reserved chunk that was not mapped.
    func release(reserved: ReservedChunk) async {
        await withState { $0.returnChunk(reserved.chunk) }
    }

    /// Unmaps a volume's chunks in `chunks`; those no other volume uses are free after the next commit.
    func unmap(volume: ThinVolume, chunks: ClosedRange<UInt64>) async throws {
        try await withState { state in try await state.unmap(volume: volume.id, name: volume.volumeName, chunks: chunks)
        }
    }

    /// The mapped chunks of a volume in `chunks`, in order.
    func mappedChunks(volume: ThinVolume, in chunks: ClosedRange<UInt64>) async throws -> [UInt64] {
        try await withState { state in
            try await state.mappedChunks(volume: volume.id, name: volume.volumeName, in: chunks)
        }
    }
}

/// What a round of ``ThinPool/withMetadataInMemory(_:_:)`` came to: the body's result, or a node to
/// read first.
enum MetadataOutcome<Result: Sendable>: Sendable {
    case done(Result)
    case read(MetadataArea.MissingNode)
}
