/// Committing a pool: the records and parameters go into the metadata, the metadata transaction
/// is sealed, the data devices are flushed, the sealed transaction is written (nodes, flush,
/// superblock), and then the chunks it freed become reusable once the requests that might still
/// use them have finished.
///
/// ``ThinPool/commit()`` does the flushing and writing with the pool's lock let go, so requests
/// go on while the device syncs (``beginCommit()`` and ``completeCommit(_:)`` under the lock, the
/// rest outside); ``commit()`` does it all under the lock, for changes that must be durable before
/// anything else happens (creating a volume, a snapshot, an extension).
extension PoolState {
    /// What a sealed commit keeps from the pool until it completes: the chunks it freed (not to be
    /// handed out), the chunks whose sharing it ended (still written by copy), its `dirtyBelow`.
    struct SealedCommitState {
        let sequence: UInt64
        let freed: Set<UInt64>
        let unshared: Set<UInt64>
        let dirtyBelow: UInt64
    }

    /// Flushes the data of every device, then commits the metadata, all under the lock: every
    /// completed write becomes durable and mapped.
    func commit() async throws {
        await commitGate.lock()
        defer { commitGate.unlock() }
        guard let commit = try await seal() else { return }
        try await commit.write()
        area.reclaimReleased()
        await completeCommit(commit.sequence)
    }

    /// The first half of a commit made with the lock let go: takes the commit gate and seals. The
    /// caller writes the result with the lock let go, lets the gate go, and calls
    /// ``completeCommit(_:)`` under the lock. When another sealed commit is still being written,
    /// returns `.busy` at once rather than wait for it holding the lock: the caller waits for the
    /// gate with the lock let go, and tries again.
    func beginCommit() async throws -> CommitStart {
        guard commitGate.tryLock() else { return .busy(commitGate) }
        do {
            guard let commit = try await seal() else {
                commitGate.unlock()
                return .nothingToWrite
            }
            return .sealed(commit)
        } catch {
            commitGate.unlock()
            throw error
        }
    }

    enum CommitStart: Sendable {
        case sealed(ThinPool.SealedCommit)
        /// A read-only pool.
        case nothingToWrite
        /// Another sealed commit is being written: wait for this gate, then try again.
        case busy(AsyncMutex)
    }

    /// Makes the chunks freed by sealed commits up to `sequence` (durable now) reusable, once the
    /// requests that looked them up before they were unmapped have finished: `drained` says the
    /// caller waited for them already, with the lock let go (any time after the seal will do).
    func completeCommit(_ sequence: UInt64, drained: Bool = false) async {
        area.reclaimReleased()
        guard sealedCommits.contains(where: { $0.sequence <= sequence }) else { return }
        if !drained { await inFlight.drain() }
        for done in sealedCommits where done.sequence <= sequence {
            committedDirtyBelow = max(committedDirtyBelow, done.dirtyBelow)
        }
        sealedCommits.removeAll { $0.sequence <= sequence }
    }

    /// Whether a chunk freed in the open transaction or in a sealed one not yet completed (its
    /// committed mappings may still name it).
    func freedSinceCommit(_ chunk: UInt64) -> Bool {
        pendingFree.contains(chunk) || sealedCommits.contains { $0.freed.contains(chunk) }
    }

    /// Chunks freed and not yet reusable.
    var freedSinceCommitCount: Int { pendingFree.count + sealedCommits.reduce(0) { $0 + $1.freed.count } }

    /// Whether a chunk's sharing ended in the open transaction or a sealed one not yet completed.
    func unsharedSinceCommitted(_ chunk: UInt64) -> Bool {
        unsharedSinceCommit.contains(chunk) || sealedCommits.contains { $0.unshared.contains(chunk) }
    }

    /// Stores the records and parameters and seals the metadata transaction (with the commit gate
    /// held). Nil for a read-only pool, which has nothing to commit.
    private func seal() async throws -> ThinPool.SealedCommit? {
        commitDue = false
        for id in dirtyRecords {
            if let record = records[id] ?? deleting[id] { try await storeRecord(record) }
        }
        dirtyRecords.removeAll()
        if sharedChunks != storedSharedChunks && !isReadOnly {
            try await storePoolFields()
            storedSharedChunks = sharedChunks
        }
        area.parameters[ThinPool.Parameter.usedChunks.rawValue] = usedChunks
        area.parameters[ThinPool.Parameter.chunkCount.rawValue] = chunkCount
        area.parameters[ThinPool.Parameter.dirtyBelow.rawValue] = dirtyBelow
        if isReadOnly {
            guard !area.hasChanges else {
                throw SpindleError(.readOnly, "pool \(name) is open read-only", operation: "commit", path: name)
            }
            return nil
        }
        let metadata = area.hasChanges ? try area.seal() : nil
        commitSequence += 1
        sealedCommits.append(
            SealedCommitState(
                sequence: commitSequence, freed: pendingFree, unshared: unsharedSinceCommit, dirtyBelow: dirtyBelow))
        pendingFree.removeAll()
        unsharedSinceCommit.removeAll()
        // Data on every device first; the metadata write flushes device 0 before its superblock.
        let devices = metadata == nil ? layout.devices : Array(layout.devices.dropFirst())
        return ThinPool.SealedCommit(
            sequence: commitSequence, metadata: metadata, dataDevices: devices, gate: commitGate)
    }
}

extension ThinPool {
    /// A sealed pool commit, written without the pool's lock (see PoolState+Commit.swift).
    struct SealedCommit: Sendable {
        let sequence: UInt64
        let metadata: MetadataArea.SealedTransaction?
        /// Devices to flush before the metadata is written.
        let dataDevices: [any BlockDevice]
        let gate: AsyncMutex

        /// Flushes the data devices, then writes the metadata and finishes it. A failure leaves the
        /// metadata area failed (see ``MetadataArea/SealedTransaction/fail(_:)``).
        func write() async throws {
            do {
                for device in dataDevices { try await device.flush() }
                try await metadata?.write()
            } catch {
                metadata?.fail(error)
                throw error
            }
            metadata?.finish()
        }
    }
}
