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
public final class ThinVolume: BlockDevice {
    public let pool: ThinPool
    public let id: UInt64
    public let volumeName: String
    public let capacityBytes: UInt64
    public let isReadOnly: Bool
    public let logicalBlockBytes: Int
    public var discardReadsZeroes: Bool { true }
    public var name: String { "\(pool.name)/\(volumeName)" }
    private let gate = RequestGate()
    private let chunkBytes: UInt64

    init(pool: ThinPool, record: VolumeRecord, ignoreReadOnly: Bool = false) {
        self.pool = pool
        id = record.id
        volumeName = record.name
        capacityBytes = record.sizeBytes
        isReadOnly = (record.readOnly && !ignoreReadOnly) || pool.isReadOnly
        chunkBytes = pool.chunkBytes
        logicalBlockBytes = max(4096, pool.devices.map(\.logicalBlockBytes).max() ?? 4096)
    }

    /// Calls `body` with each piece of a request, one per chunk: (virtual chunk, offset in the chunk,
    /// offset in the request, length).
    private func forEachPiece(
        offset: UInt64, length: UInt64, _ body: (_ chunk: UInt64, _ within: UInt64, _ requestOffset: Int, _ length: Int) async throws -> Void
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
        try await forEachPiece(offset: offset, length: UInt64(buffer.count)) { chunk, within, requestOffset, length in
            let destination = UnsafeMutableRawBufferPointer(rebasing: buffer[requestOffset..<(requestOffset + length)])
            let (location, epoch) = try await pool.withState { state async throws -> ((device: any BlockDevice, offset: UInt64)?, Int) in
                guard let found = try await state.lookup(volume: id, name: volumeName, chunk: chunk) else { return (nil, state.inFlight.enter()) }
                return (state.layout.location(of: found.physical), state.inFlight.enter())
            }
            defer { pool.inFlight.leave(epoch) }
            if let location {
                try await location.device.read(into: destination, at: location.offset + within)
            } else {
                destination.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try validate(offset: offset, length: buffer.count, operation: "write")
        try checkWritable(operation: "write", offset: offset, length: UInt64(buffer.count))
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        try await forEachPiece(offset: offset, length: UInt64(buffer.count)) { chunk, within, requestOffset, length in
            let source = UnsafeRawBufferPointer(rebasing: buffer[requestOffset..<(requestOffset + length)])
            try await writePiece(chunk: chunk, within: within, source: source)
        }
        if fua { try await pool.commit() }
    }

    private enum ChunkState {
        case unmapped
        case exclusive(device: any BlockDevice, offset: UInt64)
        case shared(physical: UInt64, device: any BlockDevice, offset: UInt64)
    }

    /// Writes within one chunk: in place when the volume owns the chunk alone, else into a new chunk
    /// (zeros or a copy of the shared one around the data) that is then mapped. Retries when a
    /// concurrent write changed the mapping first.
    /// How one chunk of the volume is mapped, and an in-flight epoch (entered under the pool's lock)
    /// that keeps a mapped chunk from being reused until the caller leaves it.
    private func chunkState(_ chunk: UInt64) async throws -> (ChunkState, epoch: Int) {
        try await pool.withState { state async throws -> (ChunkState, Int) in
            guard let found = try await state.lookup(volume: id, name: volumeName, chunk: chunk) else {
                return (.unmapped, state.inFlight.enter())
            }
            let location = state.layout.location(of: found.physical)
            // Entered last, so that a lookup that throws leaves no epoch behind.
            let epoch = state.inFlight.enter()
            if !found.shared {
                return (.exclusive(device: location.device, offset: location.offset), epoch)
            }
            return (.shared(physical: found.physical, device: location.device, offset: location.offset), epoch)
        }
    }

    private func writePiece(chunk: UInt64, within: UInt64, source: UnsafeRawBufferPointer) async throws {
        while true {
            let (state, epoch) = try await chunkState(chunk)
            if case .unmapped = state {
                pool.inFlight.leave(epoch)
                if try await writeFresh(chunk: chunk, within: within, source: source) { return }
                continue
            }
            // The whole chunk for a new mapping: zeros, or the shared chunk's data, under the write.
            let whole: AlignedBuffer
            let replacing: UInt64?
            do {
                defer { pool.inFlight.leave(epoch) }
                switch state {
                case let .exclusive(device, offset):
                    try await device.write(from: source, at: offset + within, fua: false)
                    return
                case .unmapped:
                    preconditionFailure("first writes go through writeFresh")
                case let .shared(physical, device, offset):
                    whole = AlignedBuffer(count: Int(chunkBytes), zeroed: false)
                    try await device.read(into: whole, at: offset)
                    replacing = physical
                }
            }
            whole.copy(from: UnsafeRawBufferPointer(source), at: Int(within))
            let (fresh, location) = try await pool.withState { state async throws -> (UInt64, (device: any BlockDevice, offset: UInt64)) in
                let fresh = try await state.allocateChunk().chunk
                return (fresh, state.layout.location(of: fresh))
            }
            do {
                try await location.device.write(from: whole, at: location.offset)
                let mapped = try await pool.withState { state in
                    try await state.map(volume: id, name: volumeName, chunk: chunk, to: fresh, replacing: replacing)
                }
                if mapped { return }
            } catch {
                await pool.withState { $0.returnChunk(fresh) }
                throw error
            }
            await pool.withState { $0.returnChunk(fresh) }
        }
    }

    /// A first write: the data goes to a fresh chunk, and the rest of the chunk is zeroed, so nothing
    /// of the chunk's previous life shows through. On devices that zero ranges without writing them
    /// (image files: a discard reads zeros) the zeroing runs alongside the data write, so a 4 KiB
    /// first write costs a 4 KiB write, not a whole chunk; elsewhere (arrays) the whole chunk is
    /// written in one request. Returns false when a concurrent write mapped the chunk
    /// first (the caller retries).
    private func writeFresh(chunk: UInt64, within: UInt64, source: UnsafeRawBufferPointer) async throws -> Bool {
        let (fresh, clean, location) = try await pool.withState { state async throws -> (UInt64, Bool, (device: any BlockDevice, offset: UInt64)) in
            let (fresh, clean) = try await state.allocateChunk()
            return (fresh, clean, state.layout.location(of: fresh))
        }
        do {
            let end = within + UInt64(source.count)
            let device = location.device
            let base = location.offset
            if !clean && !device.discardReadsZeroes {
                // Zeros must be written: the whole chunk in one request.
                let whole = AlignedBuffer(count: Int(chunkBytes))
                whole.copy(from: UnsafeRawBufferPointer(source), at: Int(within))
                try await device.write(from: whole, at: base)
                let mapped = try await pool.withState { state in
                    try await state.map(volume: id, name: volumeName, chunk: chunk, to: fresh, replacing: nil)
                }
                if !mapped { await pool.withState { $0.returnChunk(fresh) } }
                return mapped
            }
            if clean {
                // The chunk reads zeros already: only the data is written.
                try await device.write(from: source, at: base + within, fua: false)
                let mapped = try await pool.withState { state in
                    try await state.map(volume: id, name: volumeName, chunk: chunk, to: fresh, replacing: nil)
                }
                if !mapped { await pool.withState { $0.returnChunk(fresh) } }
                return mapped
            }
            async let head: Void = within > 0 ? device.writeZeroes(offset: base, length: within) : ()
            async let tail: Void = end < chunkBytes ? device.writeZeroes(offset: base + end, length: chunkBytes - end) : ()
            var dataError: (any Error)?
            do { try await device.write(from: source, at: base + within, fua: false) } catch { dataError = error }
            try await head
            try await tail
            if let dataError { throw dataError }
            let mapped = try await pool.withState { state in
                try await state.map(volume: id, name: volumeName, chunk: chunk, to: fresh, replacing: nil)
            }
            if mapped { return true }
        } catch {
            await pool.withState { $0.returnChunk(fresh) }
            throw error
        }
        await pool.withState { $0.returnChunk(fresh) }
        return false
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
            try await pool.withState { state in
                try await state.unmap(volume: id, name: volumeName, chunks: firstWhole...(endWhole - 1))
            }
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
        let (state, epoch) = try await chunkState(chunk)
        let covering: AlignedBuffer
        let coverStart: UInt64
        do {
            defer { pool.inFlight.leave(epoch) }
            switch state {
            case .unmapped:
                return
            case let .exclusive(device, offset):
                try await device.zeroBytes(offset: offset + within, length: length)
                return
            case let .shared(_, device, offset):
                guard copyShared else { return }
                // The volume's blocks around the bytes: read, cleared, written through copy-on-write.
                let block = UInt64(logicalBlockBytes)
                coverStart = within / block * block
                let coverEnd = (within + length + block - 1) / block * block
                covering = AlignedBuffer(count: Int(coverEnd - coverStart), zeroed: false)
                try await device.read(into: covering, at: offset + coverStart)
            }
        }
        covering.slice(offset: Int(within - coverStart), length: Int(length)).initializeMemory(as: UInt8.self, repeating: 0)
        try await writePiece(chunk: chunk, within: coverStart, source: UnsafeRawBufferPointer(covering.bytes))
        withExtendedLifetime(covering) {}
    }

    /// The virtual chunks in `range` that hold data (are mapped), in order: what a sparse-aware copy
    /// reads. Chunks past the end are never mapped.
    public func mappedChunks(in range: Range<UInt64>) async throws -> [UInt64] {
        guard !range.isEmpty else { return [] }
        return try await pool.withState { state in
            try await state.mappedChunks(volume: id, name: volumeName, in: range.lowerBound...(range.upperBound - 1))
        }
    }

    public func close() async throws {
        await gate.close()
    }
}
