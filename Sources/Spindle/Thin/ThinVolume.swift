/// A thin volume or snapshot: a block device whose chunks come from its pool on first write.
///
/// Reads of never-written ranges return zeros. The first write to a chunk reserves a free one, writes
/// the whole chunk (zeros around a partial write) and only then maps it, so no reader ever sees the
/// old contents of a reused chunk. A write to a chunk shared with a snapshot or origin copies that
/// chunk (only that one) to a new one with the write applied, then remaps. A flush makes every
/// completed write durable and mapped (the pool's commit). Discard and write-zeroes unmap whole
/// chunks (their space returns after the next flush, when no other volume shares them) and zero the
/// mapped parts of partial ones (copying a partial chunk shared with a snapshot). At any byte
/// alignment, ``zeroBytes(offset:length:)`` does the same, and ``discardBytes(offset:length:)`` (what
/// an NBD trim calls) never takes a chunk, so it works on a full pool.
///
/// The volume asks its pool for chunks through a narrow interface (find, reserve, map, release,
/// unmap, commit; see `ThinPool+Chunks.swift`) and knows nothing of the metadata behind it.
public final class ThinVolume: BlockDevice {
    public let pool: ThinPool
    public let id: UInt64
    public let volumeName: String
    public let capacityBytes: UInt64
    public let isReadOnly: Bool
    public let logicalBlockBytes: Int
    public var discardReadsZeroes: Bool { true }
    public var name: String { "\(pool.name)/\(volumeName)" }
    /// The volume's mappings as its I/O finds them (one table for every object of the volume).
    let mappings: VolumeMappings
    private let gate = RequestGate()
    private let chunkBytes: UInt64

    init(pool: ThinPool, mappings: VolumeMappings, name: String, sizeBytes: UInt64, readOnly: Bool) {
        self.pool = pool
        self.mappings = mappings
        id = mappings.id
        volumeName = name
        capacityBytes = sizeBytes
        isReadOnly = readOnly || pool.isReadOnly
        chunkBytes = pool.chunkBytes
        logicalBlockBytes = max(4096, pool.devices.map(\.logicalBlockBytes).max() ?? 4096)
    }

    /// Calls `body` with each piece of a request, one per chunk: (virtual chunk, offset in the chunk,
    /// offset in the request, length).
    private func forEachPiece(
        offset: UInt64, length: UInt64,
        _ body: (_ chunk: UInt64, _ within: UInt64, _ requestOffset: Int, _ length: Int) async throws -> Void
    ) async throws {
        var position = offset
        while position < offset + length {
            let within = position % chunkBytes
            let piece = min(chunkBytes - within, offset + length - position)
            try await body(position / chunkBytes, within, Int(position - offset), Int(piece))
            position += piece
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        // The steady state (a request within one mapped chunk) goes straight to the device.
        let within = offset % chunkBytes
        if within + UInt64(buffer.count) <= chunkBytes,
            let pinned = pool.pinMapped(volume: self, chunk: offset / chunkBytes, writing: false)
        {
            defer { pool.unpin(pinned.epoch) }
            try await pinned.mapped.device.read(into: buffer, at: pinned.mapped.offset + within)
            return
        }
        try await forEachPiece(offset: offset, length: UInt64(buffer.count)) { chunk, within, requestOffset, length in
            let destination = UnsafeMutableRawBufferPointer(rebasing: buffer[requestOffset..<(requestOffset + length)])
            try await pool.findChunk(volume: self, chunk: chunk, writing: false) { mapped in
                if let mapped {
                    try await mapped.device.read(into: destination, at: mapped.offset + within)
                } else {
                    destination.initializeMemory(as: UInt8.self, repeating: 0)
                }
            }
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try validate(offset: offset, length: buffer.count, operation: "write")
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        // The steady state (a request within one mapped chunk the volume owns alone) is written in
        // place.
        let within = offset % chunkBytes
        if within + UInt64(buffer.count) <= chunkBytes,
            let pinned = pool.pinMapped(volume: self, chunk: offset / chunkBytes, writing: true)
        {
            // Unpinned before a commit, which may wait for the pinned requests of its epoch.
            do {
                try await pinned.mapped.device.write(from: buffer, at: pinned.mapped.offset + within, fua: false)
            } catch {
                pool.unpin(pinned.epoch)
                throw error
            }
            pool.unpin(pinned.epoch)
            if fua { try await pool.commit() }
            return
        }
        try await forEachPiece(offset: offset, length: UInt64(buffer.count)) { chunk, within, requestOffset, length in
            let source = UnsafeRawBufferPointer(rebasing: buffer[requestOffset..<(requestOffset + length)])
            try await writePiece(chunk: chunk, within: within, source: source)
        }
        if fua { try await pool.commit() }
    }

    /// What a write found in its chunk.
    private enum Found {
        /// Nothing mapped: a first write.
        case unmapped
        /// The volume's own chunk, written in place.
        case written
        /// A shared chunk, read whole (`data`): the write goes to a copy.
        case shared(chunk: UInt64, data: AlignedBuffer)
    }

    /// Writes within one chunk: in place when the volume owns the chunk alone, else into a new chunk
    /// (zeros or a copy of the shared one around the data) that is then mapped. Retries when a
    /// concurrent write changed the mapping first.
    private func writePiece(chunk: UInt64, within: UInt64, source: UnsafeRawBufferPointer) async throws {
        while true {
            let found = try await pool.findChunk(volume: self, chunk: chunk, writing: true) { mapped -> Found in
                guard let mapped else { return .unmapped }
                if !mapped.shared {
                    try await mapped.device.write(from: source, at: mapped.offset + within, fua: false)
                    return .written
                }
                let whole = AlignedBuffer(count: Int(chunkBytes), zeroed: false)
                try await mapped.device.read(into: whole, at: mapped.offset)
                return .shared(chunk: mapped.chunk, data: whole)
            }
            switch found {
            case .written:
                return
            case .unmapped:
                if try await mapNewChunk(
                    chunk, replacing: nil, fill: { try await writeFirst(into: $0, within: within, source: source) })
                {
                    return
                }
            case let .shared(physical, whole):
                whole.copy(from: UnsafeRawBufferPointer(source), at: Int(within))
                if try await mapNewChunk(
                    chunk, replacing: physical, fill: { try await $0.device.write(from: whole, at: $0.offset) })
                {
                    return
                }
            }
        }
    }

    /// Reserves a chunk, lets `fill` write it, and maps it in place of `replacing`. Returns false
    /// when a concurrent write changed the mapping first (the chunk goes back; the caller retries).
    private func mapNewChunk(
        _ chunk: UInt64, replacing: UInt64?, fill: (ThinPool.ReservedChunk) async throws -> Void
    ) async throws -> Bool {
        let fresh = try await pool.reserveChunk()
        do {
            try await fill(fresh)
            if try await pool.map(volume: self, chunk: chunk, to: fresh, replacing: replacing) { return true }
        } catch {
            await pool.release(reserved: fresh)
            throw error
        }
        await pool.release(reserved: fresh)
        return false
    }

    /// A first write into a fresh chunk: the data, and zeros in the rest of the chunk, so nothing of
    /// the chunk's previous life shows through. A clean chunk reads zeros already, so only the data
    /// is written. On devices that zero ranges without writing them (image files: a discard reads
    /// zeros) the zeroing runs alongside the data write, so a 4 KiB first write costs a 4 KiB
    /// write, not a whole chunk; elsewhere (arrays) the whole chunk is written in one request.
    private func writeFirst(into fresh: ThinPool.ReservedChunk, within: UInt64, source: UnsafeRawBufferPointer)
        async throws
    {
        let device = fresh.device
        let base = fresh.offset
        let end = within + UInt64(source.count)
        if fresh.clean {
            try await device.write(from: source, at: base + within, fua: false)
        } else if !device.discardReadsZeroes {
            let whole = AlignedBuffer(count: Int(chunkBytes))
            whole.copy(from: source, at: Int(within))
            try await device.write(from: whole, at: base)
        } else {
            async let head: Void = within > 0 ? device.writeZeroes(offset: base, length: within) : ()
            async let tail: Void =
                end < chunkBytes ? device.writeZeroes(offset: base + end, length: chunkBytes - end) : ()
            var dataError: (any Error)?
            do { try await device.write(from: source, at: base + within, fua: false) } catch { dataError = error }
            try await head
            try await tail
            if let dataError { throw dataError }
        }
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        try await pool.commit()
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "discard")
        try await release(offset: offset, length: length, copyShared: true, operation: "discard")
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "write-zeroes")
        try await release(offset: offset, length: length, copyShared: true, operation: "write-zeroes")
    }

    /// Discards any byte range, as an advisory request that never takes space: whole chunks are
    /// unmapped (their space returns after the next flush unless a snapshot shares them) and the
    /// bytes of partial chunks the volume owns alone are zeroed in place. Never-written chunks read
    /// zeros already; a partial chunk shared with a snapshot keeps its data (unlike
    /// ``discard(offset:length:)``, which copies it to zero it). So it works on a full pool.
    public func discardBytes(offset: UInt64, length: UInt64) async throws {
        try validateByteRange(offset: offset, length: length, operation: "discard")
        try await release(offset: offset, length: length, copyShared: false, operation: "discard")
    }

    /// Zeroes any byte range: whole chunks are unmapped, the bytes of mapped partial chunks are
    /// zeroed (a chunk shared with a snapshot is copied first, which takes a chunk), and never-written
    /// chunks are left alone (they read zeros).
    public func zeroBytes(offset: UInt64, length: UInt64) async throws {
        try validateByteRange(offset: offset, length: length, operation: "write-zeroes")
        try await release(offset: offset, length: length, copyShared: true, operation: "write-zeroes")
    }

    /// Unmaps the whole chunks of a range and zeroes the mapped parts of partial ones: all of them
    /// when `copyShared`, only those the volume owns alone otherwise.
    private func release(offset: UInt64, length: UInt64, copyShared: Bool, operation: String) async throws {
        try checkWritable(operation: operation, offset: offset, length: length)
        try gate.enter(operation: operation, name: name)
        defer { gate.leave() }
        let firstWhole = (offset + chunkBytes - 1) / chunkBytes
        let endWhole = (offset + length) / chunkBytes
        if firstWhole < endWhole {
            try await pool.unmap(volume: self, chunks: firstWhole...(endWhole - 1))
        }
        try await forEachPiece(offset: offset, length: length) { chunk, within, _, pieceLength in
            guard within != 0 || UInt64(pieceLength) != chunkBytes else { return }
            try await zeroPiece(chunk: chunk, within: within, length: UInt64(pieceLength), copyShared: copyShared)
        }
    }

    /// Zeroes `length` bytes at `within` in one mapped chunk, at any alignment: in place when the
    /// volume owns the chunk alone; when it is shared (or was until the open transaction) and
    /// `copyShared`, by copying it with the zeros applied, else not at all. An unmapped chunk reads
    /// zeros already.
    private func zeroPiece(chunk: UInt64, within: UInt64, length: UInt64, copyShared: Bool) async throws {
        let sizeOfBlock = UInt64(logicalBlockBytes)
        let coverStart = within / sizeOfBlock * sizeOfBlock
        let covering = try await pool.findChunk(volume: self, chunk: chunk, writing: true) { mapped -> AlignedBuffer? in
            guard let mapped else { return nil }
            if !mapped.shared {
                try await mapped.device.zeroBytes(offset: mapped.offset + within, length: length)
                return nil
            }
            guard copyShared else { return nil }
            // The volume's blocks around the bytes: read, cleared, written through copy-on-write.
            let coverEnd = (within + length + sizeOfBlock - 1) / sizeOfBlock * sizeOfBlock
            let covering = AlignedBuffer(count: Int(coverEnd - coverStart), zeroed: false)
            try await mapped.device.read(into: covering, at: mapped.offset + coverStart)
            return covering
        }
        guard let covering else { return }
        covering.slice(offset: Int(within - coverStart), length: Int(length)).initializeMemory(
            as: UInt8.self, repeating: 0)
        try await writePiece(chunk: chunk, within: coverStart, source: UnsafeRawBufferPointer(covering.bytes))
        withExtendedLifetime(covering) {}
    }

    /// The virtual chunks in `range` that hold data (are mapped), in order: what a sparse-aware copy
    /// reads. Chunks past the end are never mapped.
    public func mappedChunks(in range: Range<UInt64>) async throws -> [UInt64] {
        guard !range.isEmpty else { return [] }
        return try await pool.mappedChunks(volume: self, in: range.lowerBound...(range.upperBound - 1))
    }

    public func close() async throws {
        await gate.close()
    }
}
