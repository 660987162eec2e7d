import Synchronization

extension RAIDArray {
    // MARK: Superblocks and bitmap

    /// Bumps the event count and writes the superblock (the copy `events % 2`) to every member that can
    /// take it, with FUA. A member whose write fails is marked faulty and the others are told.
    func commitSuperblocks() async throws {
        await metadataLock.lock()
        defer { metadataLock.unlock() }
        for _ in 0..<RAIDSuperblock.maximumMembers {
            let (targets, blocks, copy) = state.withLock { state -> ([(Int?, Member)], [[UInt8]], Int) in
                state.events += 1
                var targets: [(Int?, Member)] = []
                for (slot, member) in state.slots.enumerated() {
                    if let member, state.slotStates[slot] == .active || state.slotStates[slot] == .rebuilding {
                        targets.append((slot, member))
                    }
                }
                for spare in state.spares { targets.append((nil, spare)) }
                let blocks = targets.map { slot, member in
                    superblock(for: member, role: slot ?? -1, state: state).encoded()
                }
                return (targets, blocks, Int(state.events % 2))
            }
            var failedSlot: Int?
            let buffer = AlignedBuffer(count: RAIDSuperblock.blockBytes)
            for ((slot, member), block) in zip(targets, blocks) {
                block.withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
                do {
                    try await member.device.write(from: buffer, at: RAIDSuperblock.copyOffsets[copy], fua: true)
                } catch is CancellationError {
                    throw CancellationError()
                } catch {
                    if let slot {
                        failedSlot = slot
                        break
                    }
                    state.withLock { $0.spares.removeAll { $0 === member } }
                }
            }
            guard let slot = failedSlot else { return }
            state.withLock { state in
                state.slotStates[slot] = .faulty
                if state.slotStates.filter({ $0 != .active }).count > geometry.redundancy { state.failed = true }
            }
        }
    }

    func superblock(for member: Member, role: Int, state: State) -> RAIDSuperblock {
        RAIDSuperblock(
            arrayUUID: arrayUUID, memberUUID: member.uuid, name: arrayName, level: geometry.level,
            chunkBytes: UInt32(geometry.chunkBytes), memberCount: geometry.memberCount, role: role, dirty: state.dirty,
            events: state.events, dataOffset: Self.dataOffset, memberDataBytes: geometry.memberDataBytes,
            createdSeconds: createdSeconds, rebuildSlot: state.rebuildSlot,
            rebuildCheckpointBytes: state.rebuildCheckpointBytes, bitmapOffset: Self.bitmapOffset,
            bitmapBytes: UInt32(Self.bitmapBytes), bitmapChunkShift: bitmapChunkShift,
            slots: state.slotStates.indices.map { slot in
                let member = state.slots[slot]
                let recorded = state.recordedSlots.indices.contains(slot) ? state.recordedSlots[slot] : nil
                return RAIDSuperblock.Slot(
                    member: member?.uuid ?? recorded?.member ?? .zero, state: state.slotStates[slot],
                    lastKnownName: member?.name ?? recorded?.lastKnownName ?? "")
            })
    }

    /// Writes a bitmap to every writable member, with FUA.
    func writeBitmap(_ bits: [UInt8]? = nil) async throws {
        let (current, members) = state.withLock { state in
            (
                state.bitmap,
                state.slots.enumerated().compactMap { index, member in
                    state.slotStates[index] == .active || state.slotStates[index] == .rebuilding ? member : nil
                }
            )
        }
        let buffer = AlignedBuffer(count: Self.bitmapBytes)
        (bits ?? current).withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
        for member in members {
            // A member that cannot take the bitmap fails on its next data write; the bitmap on the
            // others is what resync reads.
            try? await member.device.write(from: buffer, at: Self.bitmapOffset, fua: true)
        }
    }

    /// Before writing member range `memberOffset ..< memberOffset + length`: makes sure the array is
    /// marked dirty on disk and the range's bitmap bits are set on disk, so that a crash during the
    /// write leads to a resync of that range.
    func markWriteIntent(memberOffset: UInt64, length: UInt64) async throws {
        let first = Int(memberOffset >> UInt64(bitmapChunkShift))
        let last = Int((memberOffset + length - 1) >> UInt64(bitmapChunkShift))
        func recorded(_ state: State) -> Bool {
            state.dirtyOnDisk && !(first...last).contains { state.bitmap[$0 / 8] & (1 << UInt8($0 % 8)) == 0 }
        }
        if state.withLock({ recorded($0) }) { return }
        await bitmapLock.lock()
        defer { bitmapLock.unlock() }
        if state.withLock({ recorded($0) }) { return }
        var bits = state.withLock { $0.bitmap }
        for bit in first...last { bits[bit / 8] |= 1 << UInt8(bit % 8) }
        try await writeBitmap(bits)
        let mustMarkDirty = state.withLock { state -> Bool in
            state.bitmap = bits
            return !state.dirty
        }
        if mustMarkDirty {
            state.withLock { $0.dirty = true }
            try await commitSuperblocks()
        }
        state.withLock { $0.dirtyOnDisk = true }
    }

    // MARK: Idle clean

    /// Sets how long the array waits without writes before marking itself clean (0 turns it off).
    public func setIdleCleanDelay(nanoseconds: UInt64) {
        idleCleanNanos.store(nanoseconds, ordering: .relaxed)
    }

    func startIdleCleaner() {
        let task = Task { [weak self] in
            while !Task.isCancelled {
                let delay = self?.idleCleanNanos.load(ordering: .relaxed) ?? 0
                try? await Task.sleep(nanoseconds: max(min(delay, RAIDArray.defaultIdleCleanNanos) / 4, 10_000_000))
                guard let self, !Task.isCancelled else { return }
                // The delay as it is now: one set while this task slept (an owner that turns idle
                // cleaning off right after assembly) counts from this round on, not the next.
                let current = self.idleCleanNanos.load(ordering: .relaxed)
                if current > 0 && current != .max { await self.markCleanIfIdle(idleNanos: current) }
            }
        }
        cleaner.withLock { $0 = task }
    }

    /// Marks the array clean on disk when it is dirty and no write has run for `idleNanos`: flushes
    /// the members, clears the bitmap and the dirty flag. A write that starts meanwhile keeps it dirty.
    func markCleanIfIdle(idleNanos: UInt64) async {
        let candidate = state.withLock { $0.dirty && !$0.failed }
        guard candidate, writesInFlight.load(ordering: .sequentiallyConsistent) == 0,
            monotonicNanos() - lastWriteNanos.load(ordering: .relaxed) >= idleNanos
        else { return }
        await bitmapLock.lock()
        defer { bitmapLock.unlock() }
        // New writes now take the slow path and wait for this lock; any write already past the fast
        // path is counted in `writesInFlight` (it counts itself before looking).
        state.withLock { $0.dirtyOnDisk = false }
        if writesInFlight.load(ordering: .sequentiallyConsistent) > 0 {
            state.withLock { $0.dirtyOnDisk = true }
            return
        }
        for member in writableMembers().compactMap({ $0 }) {
            do {
                try await member.device.flush()
            } catch {
                state.withLock { $0.dirtyOnDisk = true }
                return
            }
        }
        let zeros = [UInt8](repeating: 0, count: Self.bitmapBytes)
        do {
            try await writeBitmap(zeros)
            state.withLock { state in
                state.bitmap = zeros
                state.dirty = false
            }
            try await commitSuperblocks()
        } catch {
            state.withLock {
                $0.dirty = true
                $0.dirtyOnDisk = false
            }
        }
    }
}
