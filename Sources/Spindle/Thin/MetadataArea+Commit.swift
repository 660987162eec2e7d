/// What a metadata area shares with work done outside its owner's lock: the node cache, the commit
/// epoch (see ``MetadataArea/MissingNode``), the nodes of a sealed transaction until they are
/// durable, the blocks such a transaction released (free once it is durable), and the error of a
/// sealed transaction that could not be written.
struct SharedNodes {
    var nodes: NodeCache
    var epoch: UInt64 = 0
    var sealed: [UInt64: MetadataNode] = [:]
    var durablyReleased: [UInt64] = []
    var failure: SpindleError?
}

/// Committing in two halves, so that the owner's lock need not be held while the device writes:
/// ``MetadataArea/seal()`` (under the lock) ends the open transaction and starts the next, and the
/// returned ``MetadataArea/SealedTransaction`` is written (outside the lock, one at a time: the
/// owner serializes sealed transactions) and then finished.
///
/// While a sealed transaction is being written, its nodes stay readable; the next transaction
/// treats them as committed (it copies before changing them) and the blocks the sealed one
/// released stay in use until it is durable. A sealed transaction that cannot be written fails the
/// area: later transactions build on it, so none may commit; reopening finds the last durable one.
extension MetadataArea {
    /// Makes the open transaction durable: its nodes, a flush, then the superblock with ``roots``.
    package func commit() async throws {
        let sealed = try seal()
        do {
            try await sealed.write()
        } catch {
            sealed.fail(error)
            throw error
        }
        sealed.finish()
        reclaimReleased()
    }

    /// Ends the open transaction, to be written by the caller, and starts the next.
    /// - Throws: the error of an earlier sealed transaction that could not be written.
    package func seal() throws -> SealedTransaction {
        let shared = cache.withLock { cache -> (failure: SpindleError?, busy: Bool) in
            (cache.failure, !cache.sealed.isEmpty)
        }
        if let failure = shared.failure { throw failure }
        precondition(!shared.busy, "a sealed metadata transaction is still being written")
        let sealed = SealedTransaction(
            nodes: pending.values.sorted { $0.block < $1.block }, roots: roots, parameters: parameters,
            transaction: transaction, released: releasedNow, device: device, offset: offset, blockCount: blockCount,
            cache: cache)
        cache.withLock { $0.sealed = pending }
        sealedReleased += releasedNow.count
        committedRoots = roots
        committedParameters = parameters
        pending = [:]
        releasedNow = []
        allocatedNow = []
        transaction += 1
        return sealed
    }

    /// Marks free the blocks that durable sealed transactions released.
    func reclaimReleased() {
        let blocks = cache.withLock { cache -> [UInt64] in
            defer { cache.durablyReleased = [] }
            return cache.durablyReleased
        }
        for block in blocks { markFree(block) }
        sealedReleased -= blocks.count
    }

    /// A transaction ended by ``seal()``: its nodes, roots and parameters, to be made durable
    /// without the area's owner holding its lock.
    package struct SealedTransaction: Sendable {
        let nodes: [MetadataNode]
        let roots: [UInt64]
        let parameters: [UInt64]
        let transaction: UInt64
        let released: [UInt64]
        let device: any BlockDevice
        let offset: UInt64
        let blockCount: UInt64
        let cache: Locked<SharedNodes>

        /// Writes the nodes (runs of adjacent blocks, many at once), flushes, then writes the
        /// superblock naming the new roots (FUA).
        package func write() async throws {
            let blockBytes = MetadataNode.blockBytes
            let buffer = AlignedBuffer(count: max(1, nodes.count) * blockBytes, zeroed: false)
            for (index, node) in nodes.enumerated() {
                node.encoded().withUnsafeBytes {
                    buffer.slice(offset: index * blockBytes, length: blockBytes).copyMemory(from: $0)
                }
            }
            try await MetadataArea.transferRuns(of: nodes.map(\.block), device: device, offset: offset) {
                device, range, offset in
                try await device.write(from: buffer, range: range, at: offset)
            }
            try await device.flush()
            try await MetadataArea.writeSuperblock(
                MetadataArea.superblockBytes(
                    transaction: transaction, blockCount: blockCount, roots: roots, parameters: parameters),
                transaction: transaction, device: device, offset: offset, fua: true)
        }

        /// After ``write()``: the nodes go to the cache, the blocks released become reusable (and
        /// reads made outside the lock before now are not kept: their blocks may be reused).
        package func finish() {
            cache.withLock { cache in
                for node in nodes { cache.nodes.insert(node) }
                cache.epoch += 1
                cache.sealed = [:]
                cache.durablyReleased += released
            }
        }

        /// After a failed ``write()``: every later commit fails with this error until the area is
        /// opened again (from the last durable transaction).
        package func fail(_ error: any Error) {
            let failure = SpindleError(
                .ioFailed,
                "a metadata commit failed (\(error)); nothing more can be committed: open the pool again to continue from the last durable commit",
                operation: "commit metadata", path: device.name, cause: error)
            cache.withLock { $0.failure = failure }
        }
    }

    // MARK: Superblocks

    static func superblockBytes(transaction: UInt64, blockCount: UInt64, roots: [UInt64], parameters: [UInt64])
        -> [UInt8]
    {
        var bytes = [UInt8](repeating: 0, count: MetadataNode.blockBytes)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) { bytes.putLittleEndian(value, at: offset) }
        put(magic, at: 0)
        put(formatVersion, at: 8)
        put(transaction, at: 16)
        put(blockCount, at: 24)
        put(UInt32(rootCount), at: 32)
        for (index, root) in roots.enumerated() { put(root, at: 64 + index * 8) }
        for (index, value) in parameters.enumerated() { put(value, at: 128 + index * 8) }
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        put(checksum, at: 4092)
        return bytes
    }

    /// Writes superblock copy `transaction % 2`.
    static func writeSuperblock(
        _ bytes: [UInt8], transaction: UInt64, device: any BlockDevice, offset: UInt64, fua: Bool
    ) async throws {
        let buffer = AlignedBuffer(count: MetadataNode.blockBytes, zeroed: false)
        bytes.withUnsafeBytes { buffer.bytes.copyMemory(from: $0) }
        try await device.write(
            from: buffer, at: offset + (transaction % 2) * UInt64(MetadataNode.blockBytes), fua: fua)
    }

    /// Writes the superblock of `transaction` with the area's current roots and parameters.
    func writeSuperblock(transaction: UInt64, fua: Bool) async throws {
        try await Self.writeSuperblock(
            Self.superblockBytes(
                transaction: transaction, blockCount: blockCount, roots: roots, parameters: parameters),
            transaction: transaction, device: device, offset: offset, fua: fua)
    }
}
