#if _endian(big)
    #error("the checksum area is written in memory order, which must be little-endian")
#endif

/// The checksum cache: 4 KiB checksum blocks held in memory up to a budget, evicted by CLOCK (clean
/// blocks only; dirty ones are written back first), written back on flush, FUA and eviction.
extension IntegrityDevice {
    /// Makes sure the checksum blocks in `indices` are cached, reading the missing ones (one read
    /// for the span they cover).
    func loadChecksums(_ indices: ClosedRange<UInt64>) async throws {
        let blockBytes = IntegritySuperblock.blockBytes
        for _ in 0..<64 {
            let (missing, evictions) = state.withLock { state -> ([UInt64], UInt64) in
                var missing: [UInt64] = []
                for index in indices {
                    if state.cache[index] == nil {
                        missing.append(index)
                    } else {
                        state.cache[index]!.referenced = true
                    }
                }
                return (missing, state.evictions)
            }
            guard let low = missing.first, let high = missing.last else { return }
            let buffer = AlignedBuffer(count: Int(high - low + 1) * blockBytes, zeroed: false)
            try await inner.read(into: buffer, at: IntegritySuperblock.checksumOffset + low * UInt64(blockBytes))
            let (inserted, mustWriteBack) = state.withLock { state -> (Bool, Bool) in
                var complete = true
                for index in missing where state.cache[index] == nil {
                    // A block evicted while this read was in flight may have been written back after
                    // the read began: what was read could be older than what was evicted.
                    if state.evictedAt[Int(index % 4096)] > evictions {
                        complete = false
                        continue
                    }
                    let start = Int(index - low) * blockBytes
                    let entries = (0..<IntegritySuperblock.checksumsPerBlock).map { entry in
                        buffer.readOnlyBytes.littleEndian(UInt32.self, at: start + entry * 4)
                    }
                    state.cache[index] = CachedChecksums(entries: entries)
                    state.clock.append(index)
                }
                let mustWriteBack = !evict(&state, keeping: indices)
                return (complete, mustWriteBack)
            }
            if mustWriteBack {
                // Every candidate is dirty: write them back so that the next load can evict.
                try await writeBack(nil, fua: false)
            }
            if inserted && state.withLock({ state in indices.allSatisfy { state.cache[$0] != nil } }) { return }
        }
        throw SpindleError(
            .ioFailed,
            "the checksums of blocks \(indices) could not be kept in memory (the checksum cache is too small)",
            operation: "read checksums", path: name)
    }

    /// Evicts clean, unreferenced checksum blocks (CLOCK) until the cache fits its budget; returns
    /// false when it could not (only dirty or protected blocks are left).
    func evict(_ state: inout State, keeping protected: ClosedRange<UInt64>) -> Bool {
        var steps = 0
        while state.cache.count > cacheCapacityBlocks {
            guard !state.clock.isEmpty, steps < 2 * state.clock.count + 2 else { return false }
            steps += 1
            if state.hand >= state.clock.count { state.hand = 0 }
            let index = state.clock[state.hand]
            guard let cached = state.cache[index] else {
                state.clock.swapAt(state.hand, state.clock.count - 1)
                state.clock.removeLast()
                continue
            }
            // A block being written back is not evicted: a load meanwhile would read the old copy.
            if cached.dirty || cached.writing || protected.contains(index) {
                state.hand += 1
                continue
            }
            if cached.referenced {
                state.cache[index]!.referenced = false
                state.hand += 1
                continue
            }
            state.cache[index] = nil
            state.evictions += 1
            state.evictedAt[Int(index % 4096)] = state.evictions
            state.clock.swapAt(state.hand, state.clock.count - 1)
            state.clock.removeLast()
        }
        return true
    }

    /// Writes the dirty checksum blocks (of `only`, or all), one write per run of neighbours, at once.
    func writeBack(_ only: [UInt64]?, fua: Bool) async throws {
        await writebackLock.lock()
        defer { writebackLock.unlock() }
        let snapshot = state.withLock { state -> [(index: UInt64, entries: [UInt32])] in
            let candidates = only ?? Array(state.cache.keys)
            var taken: [(UInt64, [UInt32])] = []
            for index in candidates where state.cache[index]?.dirty == true {
                state.cache[index]!.dirty = false
                state.cache[index]!.writing = true
                taken.append((index, state.cache[index]!.entries))
            }
            return taken.sorted { $0.0 < $1.0 }
        }
        guard !snapshot.isEmpty else { return }
        var runs: [[(index: UInt64, entries: [UInt32])]] = []
        for block in snapshot {
            if let last = runs.last?.last, last.index + 1 == block.index, runs[runs.count - 1].count < 256 {
                runs[runs.count - 1].append(block)
            } else {
                runs.append([block])
            }
        }
        let blockBytes = IntegritySuperblock.blockBytes
        let failures = await withTaskGroup(of: (Int, (any Error)?).self) { group in
            for (number, run) in runs.enumerated() {
                group.addTask {
                    let buffer = AlignedBuffer(count: run.count * blockBytes, zeroed: false)
                    for (position, block) in run.enumerated() {
                        block.entries.withUnsafeBytes { entries in
                            // Little-endian on disk, as every Spindle format; this machine's order.
                            buffer.slice(offset: position * blockBytes, length: blockBytes).copyMemory(from: entries)
                        }
                    }
                    do {
                        try await self.inner.write(
                            from: buffer,
                            at: IntegritySuperblock.checksumOffset + run[0].index * UInt64(blockBytes), fua: fua)
                        return (number, nil)
                    } catch {
                        return (number, error)
                    }
                }
            }
            var failures: [(Int, any Error)] = []
            for await (number, error) in group { if let error { failures.append((number, error)) } }
            return failures
        }
        state.withLock { state in
            for block in snapshot where state.cache[block.index] != nil { state.cache[block.index]!.writing = false }
        }
        guard let failure = failures.first else { return }
        // What did not reach the device stays dirty, to be written by the next flush.
        state.withLock { state in
            for (number, _) in failures {
                for block in runs[number] where state.cache[block.index] != nil {
                    state.cache[block.index]!.dirty = true
                }
            }
        }
        throw failure.1
    }
}
