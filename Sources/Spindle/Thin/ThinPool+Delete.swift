/// Deleting volumes in bounded steps: a volume that owns many chunks alone is marked deleted (its
/// name free at once) and its mappings are removed a batch at a time, each batch its own commit,
/// so other volumes' I/O waits for one batch at most, and a crash or a close in the middle leaves
/// a consistent pool whose next open carries on.
import Synchronization

extension ThinPool {
    /// Mappings freed per step (and commit) of a deletion: a few milliseconds under the pool's lock.
    static let deletionBatch = 1024

    /// Waits for the deletions carried on after open (tests).
    func waitForInterruptedDeletions() async {
        await deletions.withLock { $0 }?.value
    }

    /// Deletes a volume or snapshot, in any order: chunks no other volume shares return to the pool
    /// (each step commits before the next; the last before this returns). Time grows with what the
    /// volume owned alone, not with what it shared; the name is free from the first step on.
    public func deleteVolume(name volumeName: String) async throws {
        let remaining: UInt64? = try await withState { state in
            let record = try state.requireVolume(volumeName)
            state.openMappings(of: record.id)?.forgetAll(holding: state)
            state.openMappingTables[record.id] = nil
            state.records[record.id] = nil
            if state.damagedVolumes.removeValue(forKey: record.id) != nil {
                // A damaged tree cannot be walked: the volume goes, and `check` reports the chunks
                // it held as leaked rather than guessing which are free.
                try await state.removeRecord(record.id)
                state.dirtyRecords.remove(record.id)
                try await state.commit()
                return nil
            }
            var deleted = record
            deleted.deleting = true
            state.deleting[record.id] = deleted
            state.dirtyRecords.insert(record.id)
            return record.id
        }
        guard let remaining else { return }
        try await finishDeletion(of: remaining)
    }

    /// Frees a deleted volume's mappings a batch at a time, committing each (after letting the
    /// lock go: see ``commit()``), other requests going on in between.
    func finishDeletion(of id: UInt64) async throws {
        while true {
            let limit = deletionStep.load(ordering: .relaxed)
            let done = try await withState { try await $0.freeDeleted(id, limit: limit) }
            try await commit()
            if done { return }
        }
    }

    /// Carries on the deletions a crash or a close interrupted (on open), stopping early if the
    /// task is cancelled (a close); the rest then waits for the next open.
    func finishInterruptedDeletions() async throws {
        let pending = await withState { state in state.deleting.keys.sorted() }
        for id in pending {
            while !Task.isCancelled {
                let limit = deletionStep.load(ordering: .relaxed)
                let done = try await withState { try await $0.freeDeleted(id, limit: limit) }
                try await commit()
                if done { break }
            }
        }
    }
}

extension PoolState {
    /// One step of a deletion: removes up to `limit` of the deleted volume's mappings (dropping a
    /// reference to each chunk), for the caller to commit; when few enough are left, or the volume's tree is
    /// shared (a snapshot's, or an origin's with snapshots: one reference is dropped, in constant
    /// time), the whole tree and the record go. Returns whether the volume is gone.
    func freeDeleted(_ id: UInt64, limit: Int) async throws -> Bool {
        guard var record = deleting[id] else { return true }
        if area.referenceCount(of: record.root) > 1 || record.mappedChunks <= UInt64(limit) {
            try await MetadataBTree.release(tree: record.root, in: area, values: self)
            try await removeRecord(id)
            deleting[id] = nil
            dirtyRecords.remove(id)
            return true
        }
        var found: [(chunk: UInt64, physical: UInt64)] = []
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: record.root, store: area, prefetch: true) {
            key, value in
            found.append((key, value))
            return found.count < limit
        }
        for (chunk, physical) in found {
            record.root = try await MetadataBTree.remove(chunk, root: record.root, in: area, values: self).root
            try await adjustReferences(physical, by: -1)
        }
        record.mappedChunks -= UInt64(found.count)
        deleting[id] = record
        dirtyRecords.insert(id)
        return false
    }
}
