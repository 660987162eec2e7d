import Glibc

/// Reads: every block returned is checked against its checksum; a mismatch is explained by a
/// region a crash left suspect (see "Crashes" on ``IntegrityDevice``), resolved, or reported.
extension IntegrityDevice {
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        let firstBlock = offset / UInt64(IntegritySuperblock.blockBytes)
        let blockCount = buffer.count / IntegritySuperblock.blockBytes
        let generation = writeGeneration.load(ordering: .acquiring)
        let checksumBlocks = Self.checksumBlocks(firstBlock: firstBlock, count: blockCount)
        if state.withLock({ state in checksumBlocks.allSatisfy { state.cache[$0] != nil } }) {
            try await inner.read(into: buffer, at: superblock.dataOffset + offset)
        } else {
            // The checksums come in beside the data, not after it.
            async let loaded: Void = loadChecksums(checksumBlocks)
            try await inner.read(into: buffer, at: superblock.dataOffset + offset)
            try await loaded
        }
        try await verify(buffer, firstBlock: firstBlock, generation: generation)
    }

    /// The checksum blocks that hold the checksums of `count` blocks from `firstBlock`.
    static func checksumBlocks(firstBlock: UInt64, count: Int) -> ClosedRange<UInt64> {
        let perBlock = UInt64(IntegritySuperblock.checksumsPerBlock)
        return (firstBlock / perBlock)...((firstBlock + UInt64(count) - 1) / perBlock)
    }

    /// Checks the blocks of `buffer` (read from block `firstBlock`) against their checksums; on a
    /// mismatch, tells a race with a write, a suspect block and real corruption apart.
    func verify(_ buffer: UnsafeMutableRawBufferPointer, firstBlock: UInt64, generation start: UInt64) async throws {
        var generation = start
        let blockBytes = IntegritySuperblock.blockBytes
        let blockCount = buffer.count / blockBytes
        var mismatched: [Int] = []
        var retries = 0
        while true {
            let result = withUnsafeTemporaryAllocation(of: UInt32.self, capacity: blockCount) { computed -> [Int]? in
                for index in 0..<blockCount {
                    computed[index] = checksum.stored(
                        for: UnsafeRawBufferPointer(
                            rebasing: buffer[(index * blockBytes)..<((index + 1) * blockBytes)]),
                        index: firstBlock + UInt64(index))
                }
                return state.withLock { state -> [Int]? in
                    var bad: [Int] = []
                    let perBlock = UInt64(IntegritySuperblock.checksumsPerBlock)
                    for index in 0..<blockCount {
                        let block = firstBlock + UInt64(index)
                        guard let cached = state.cache[block / perBlock] else { return nil }
                        if cached.entries[Int(block % perBlock)] != computed[index] { bad.append(index) }
                    }
                    state.statistics.blocksVerified += UInt64(blockCount)
                    for index in bad
                    where explained(block: firstBlock + UInt64(index), computed: computed[index], state) {
                        bad.removeAll { $0 == index }
                    }
                    return bad
                }
            }
            guard let result else {
                // A checksum block was evicted between the load and the check: load it again.
                try await loadChecksums(Self.checksumBlocks(firstBlock: firstBlock, count: blockCount))
                continue
            }
            mismatched = result
            if mismatched.isEmpty { return }
            // A write that completed after the data was read but before the check changed the
            // checksum under it, or one still in flight over these blocks (the device underneath may
            // have returned them half written): read the blocks again once it has landed (the newer
            // version is as good an answer). Writes in flight end, so this waits a bounded time.
            let inFlight = state.withLock { state in
                mismatched.contains { index in
                    let block = firstBlock + UInt64(index)
                    return state.pending.values.contains {
                        block >= $0.firstBlock && block < $0.firstBlock + UInt64($0.checksums.count)
                    }
                }
            }
            let now = writeGeneration.load(ordering: .acquiring)
            guard now != generation || inFlight, retries < 1000 else { break }
            retries += 1
            if inFlight { try await Task.sleep(nanoseconds: 20_000) }
            // Compared with the generation before this re-read: a later mismatch counts as a race
            // only if another write completed meanwhile.
            generation = writeGeneration.load(ordering: .acquiring)
            for index in mismatched {
                let block = firstBlock + UInt64(index)
                try await inner.read(
                    into: UnsafeMutableRawBufferPointer(
                        rebasing: buffer[(index * blockBytes)..<((index + 1) * blockBytes)]),
                    at: superblock.dataOffset + block * UInt64(blockBytes))
            }
        }
        try resolveMismatches(mismatched, in: buffer, firstBlock: firstBlock)
    }

    /// Whether a block whose data gives `computed` instead of its stored checksum is explained by a
    /// write in flight or a failed write (either version is a valid answer).
    private func explained(block: UInt64, computed: UInt32, _ state: State) -> Bool {
        if state.alternates[block] == computed { return true }
        for pending in state.pending.values where block >= pending.firstBlock {
            let index = Int(block - pending.firstBlock)
            if index < pending.checksums.count && pending.checksums[index] == computed { return true }
        }
        return false
    }

    /// Blocks that fail their checksums: accepted when a crash left them suspect and the policy
    /// lets this layer decide, otherwise corruption.
    private func resolveMismatches(_ mismatched: [Int], in buffer: UnsafeMutableRawBufferPointer, firstBlock: UInt64)
        throws
    {
        let blockBytes = IntegritySuperblock.blockBytes
        let corrupt = state.withLock { state -> [UInt64] in
            var corrupt: [UInt64] = []
            for index in mismatched {
                let block = firstBlock + UInt64(index)
                let data = UnsafeRawBufferPointer(rebasing: buffer[(index * blockBytes)..<((index + 1) * blockBytes)])
                if isSuspect(block: block, state) && acceptsAlone(block: block) {
                    setEntry(block: block, to: checksum.stored(for: data, index: block), &state)
                    state.statistics.blocksAcceptedAfterCrash += 1
                    continue
                }
                corrupt.append(block)
                if state.knownBad.count < 1 << 20, state.knownBad.insert(block).inserted {
                    state.statistics.corruptBlocksFound += 1
                }
            }
            return corrupt
        }
        guard let first = corrupt.first else { return }
        let suspect = state.withLock { isSuspect(block: first, $0) }
        let offset = first * UInt64(blockBytes)
        throw SpindleError(
            .corrupted,
            "\(corrupt.count) of \(buffer.count / blockBytes) blocks do not match their checksums, the first at offset \(offset) (data at \(superblock.dataOffset + offset) of the device underneath): what is stored there is not what was written"
                + (suspect
                    ? "; it was being written when the device last stopped uncleanly, and a resync from redundancy repairs it"
                    : ""),
            operation: "read", path: name, offset: offset, length: UInt64(blockBytes))
    }

    public func matchesChecksums(_ data: UnsafeRawBufferPointer, at offset: UInt64) async throws -> Bool {
        try validate(offset: offset, length: data.count, operation: "check against checksums")
        let blockBytes = IntegritySuperblock.blockBytes
        let firstBlock = offset / UInt64(blockBytes)
        let count = data.count / blockBytes
        let computed = (0..<count).map { index in
            checksum.stored(
                for: UnsafeRawBufferPointer(rebasing: data[(index * blockBytes)..<((index + 1) * blockBytes)]),
                index: firstBlock + UInt64(index))
        }
        while true {
            try await loadChecksums(Self.checksumBlocks(firstBlock: firstBlock, count: count))
            let result = state.withLock { state -> Bool? in
                let perBlock = UInt64(IntegritySuperblock.checksumsPerBlock)
                for (index, value) in computed.enumerated() {
                    let block = firstBlock + UInt64(index)
                    guard let cached = state.cache[block / perBlock] else { return nil }
                    if cached.entries[Int(block % perBlock)] != value { return false }
                }
                return true
            }
            if let result { return result }
        }
    }
}
