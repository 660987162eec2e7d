import Glibc

/// The volatile cache of a ``FaultyDevice`` created with `volatileCache: true`, and power cuts.
extension FaultyDevice {
    enum CachedKind { case data(AlignedBuffer), zeroes, discard }

    /// A write held in the cache, with the key of the request that made it (its blocks' fate in a
    /// torn power cut derives from it).
    struct CachedWrite {
        var offset: UInt64
        var length: UInt64
        var kind: CachedKind
        var key: UInt64
    }

    /// Simulates losing power: writes not covered by a completed flush are dropped or, with
    /// `tearing`, partly written block by block (a seeded choice per block). The device then fails
    /// every operation until ``restorePower()``. Returns after any operation in progress has stopped.
    /// - Throws: ``SpindleError/Code/unsupported`` without `volatileCache`; errors of the wrapped device
    ///   while writing torn blocks.
    @discardableResult
    public func powerCut(tearing: Bool = false) async throws -> PowerCutReport {
        guard volatileCache else {
            throw SpindleError(
                .unsupported, "power cuts need a FaultyDevice created with volatileCache: true",
                operation: "power cut", path: name)
        }
        state.withLock { $0.poweredOff = true }
        await serial.lock()
        defer { serial.unlock() }
        let (cache, tornPlan) = state.withLock { state -> ([CachedWrite], [[Bool]]) in
            let cache = state.cache
            state.cache.removeAll()
            state.statistics.powerCuts += 1
            let cut = state.statistics.powerCuts
            let block = UInt64(inner.logicalBlockBytes)
            // Each block's fate follows from the write that cached it and where the block lies, not
            // from the order of the cache.
            let plan = cache.map { write in
                (0..<(write.length / block)).map { index in
                    tearing
                        && FaultDecisions.chance(
                            0.5, key: FaultDecisions.mix(write.key, cut), salt: write.offset + index * block)
                }
            }
            return (cache, plan)
        }
        var report = PowerCutReport(unflushedWrites: cache.count, blocksDropped: 0, blocksWritten: 0)
        let block = inner.logicalBlockBytes
        let blockBuffer = AlignedBuffer(count: block)
        for (write, plan) in zip(cache, tornPlan) {
            for (index, lands) in plan.enumerated() {
                guard lands else {
                    report.blocksDropped += 1
                    continue
                }
                switch write.kind {
                case let .data(bytes):
                    blockBuffer.bytes.copyMemory(
                        from: UnsafeRawBufferPointer(bytes.slice(offset: index * block, length: block)))
                case .zeroes, .discard:
                    blockBuffer.fill(0)
                }
                try await inner.write(from: blockBuffer, at: write.offset + UInt64(index * block))
                report.blocksWritten += 1
            }
        }
        if report.blocksWritten > 0 { try await inner.flush() }
        let finalReport = report
        state.withLock { state in
            state.statistics.droppedBlocks += finalReport.blocksDropped
            state.statistics.tornBlocksWritten += finalReport.blocksWritten
        }
        return report
    }

    /// Powers the device back on after ``powerCut(tearing:)``; it holds what reached the wrapped device.
    public func restorePower() {
        state.withLock { $0.poweredOff = false }
    }

    func cacheWrite(_ write: CachedWrite) {
        state.withLock { $0.cache.append(write) }
    }

    /// Applies cached writes, oldest first, over data read from the wrapped device.
    func overlayCache(on buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        let end = offset + UInt64(buffer.count)
        state.withLock { state in
            for write in state.cache where write.offset < end && offset < write.offset + write.length {
                let start = max(write.offset, offset)
                let stop = min(write.offset + write.length, end)
                let destination = buffer.baseAddress! + Int(start - offset)
                switch write.kind {
                case let .data(bytes):
                    destination.copyMemory(
                        from: bytes.bytes.baseAddress! + Int(start - write.offset), byteCount: Int(stop - start))
                case .zeroes, .discard:
                    memset(destination, 0, Int(stop - start))
                }
            }
        }
    }

    /// Removes a range from the cached writes (a FUA write made it durable with newer data).
    func punchCache(offset: UInt64, length: UInt64) {
        let end = offset + length
        state.withLock { state in
            var kept: [CachedWrite] = []
            for write in state.cache {
                let writeEnd = write.offset + write.length
                guard write.offset < end && offset < writeEnd else {
                    kept.append(write)
                    continue
                }
                if write.offset < offset { kept.append(Self.piece(of: write, from: write.offset, to: offset)) }
                if writeEnd > end { kept.append(Self.piece(of: write, from: end, to: writeEnd)) }
            }
            state.cache = kept
        }
    }

    static func copy(_ bytes: UnsafeRawBufferPointer) -> AlignedBuffer {
        let buffer = AlignedBuffer(count: bytes.count)
        buffer.bytes.copyMemory(from: bytes)
        return buffer
    }

    private static func piece(of write: CachedWrite, from start: UInt64, to end: UInt64) -> CachedWrite {
        switch write.kind {
        case let .data(bytes):
            let slice = bytes.slice(offset: Int(start - write.offset), length: Int(end - start))
            return CachedWrite(
                offset: start, length: end - start, kind: .data(copy(UnsafeRawBufferPointer(slice))), key: write.key)
        case .zeroes, .discard:
            return CachedWrite(offset: start, length: end - start, kind: write.kind, key: write.key)
        }
    }
}
