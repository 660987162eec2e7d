/// A thin volume: a block device whose chunks come from its pool on first write.
///
/// Reads of never-written ranges return zeros. The first write to a chunk allocates one, writes the
/// whole chunk (zeros around a partial write) and only then maps it, so no reader ever sees the old
/// contents of a reused chunk. A flush makes every completed write durable and mapped (the pool's
/// commit). Discard and write-zeroes unmap whole chunks (their space returns after the next flush)
/// and zero the partial ones.
public final class ThinVolume: BlockDevice {
    public let pool: ThinPool
    public let id: UInt64
    public let volumeName: String
    public let capacityBytes: UInt64
    public var logicalBlockBytes: Int { max(4096, pool.device.logicalBlockBytes) }
    public var isReadOnly: Bool { false }
    public var discardReadsZeroes: Bool { true }
    public var name: String { "\(pool.name)/\(volumeName)" }
    private let gate = RequestGate()

    init(pool: ThinPool, id: UInt64, name: String, sizeBytes: UInt64) {
        self.pool = pool
        self.id = id
        self.volumeName = name
        self.capacityBytes = sizeBytes
    }

    /// The pieces of a request, one per chunk: (virtual chunk, offset in the chunk, offset in the request, length).
    private func pieces(offset: UInt64, length: UInt64) -> [(chunk: UInt64, within: UInt64, requestOffset: UInt64, length: UInt64)] {
        var result: [(UInt64, UInt64, UInt64, UInt64)] = []
        var position = offset
        while position < offset + length {
            let chunk = position / pool.chunkBytes
            let within = position % pool.chunkBytes
            let piece = min(pool.chunkBytes - within, offset + length - position)
            result.append((chunk, within, position - offset, piece))
            position += piece
        }
        return result
    }

    private func dataOffset(_ physical: UInt64, _ within: UInt64) -> UInt64 {
        pool.dataOffset + physical * pool.chunkBytes + within
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        for piece in pieces(offset: offset, length: UInt64(buffer.count)) {
            let destination = UnsafeMutableRawBufferPointer(
                rebasing: buffer[Int(piece.requestOffset)..<Int(piece.requestOffset + piece.length)])
            let physical = try await pool.lock.withLock { try await pool.mapping(volume: id, chunk: piece.chunk) }
            if let physical {
                try await pool.device.read(into: destination, at: dataOffset(physical, piece.within))
            } else {
                destination.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try validate(offset: offset, length: buffer.count, operation: "write")
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        for piece in pieces(offset: offset, length: UInt64(buffer.count)) {
            let source = UnsafeRawBufferPointer(rebasing: buffer[Int(piece.requestOffset)..<Int(piece.requestOffset + piece.length)])
            try await writePiece(chunk: piece.chunk, within: piece.within, source: source)
        }
        if fua { try await flush() }
    }

    private func writePiece(chunk: UInt64, within: UInt64, source: UnsafeRawBufferPointer) async throws {
        if let physical = try await pool.lock.withLock({ try await pool.mapping(volume: id, chunk: chunk) }) {
            try await pool.device.write(from: source, at: dataOffset(physical, within), fua: false)
            return
        }
        let fresh = try await pool.lock.withLock { try await pool.allocateChunk() }
        // The whole chunk, so that nothing of its previous life shows through.
        let whole = AlignedBuffer(count: Int(pool.chunkBytes))
        (whole.bytes.baseAddress! + Int(within)).copyMemory(from: source.baseAddress!, byteCount: source.count)
        do {
            try await pool.device.write(from: whole, at: dataOffset(fresh, 0))
        } catch {
            try? await pool.lock.withLock { try await pool.returnChunk(fresh) }
            throw error
        }
        let winner: UInt64? = try await pool.lock.withLock {
            if let existing = try await pool.mapping(volume: id, chunk: chunk) {
                try await pool.returnChunk(fresh)
                return existing
            }
            try await pool.map(volume: id, chunk: chunk, to: fresh)
            return nil
        }
        if let winner {
            // Another first write mapped the chunk meanwhile: write into its chunk instead.
            try await pool.device.write(from: source, at: dataOffset(winner, within), fua: false)
        }
    }

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        try await pool.commit()
    }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try await release(offset: offset, length: length, operation: "discard")
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await release(offset: offset, length: length, operation: "write-zeroes")
    }

    /// Unmaps the whole chunks of a range and zeroes the mapped parts of partial ones.
    private func release(offset: UInt64, length: UInt64, operation: String) async throws {
        try validate(offset: offset, length: length, operation: operation)
        try gate.enter(operation: operation, name: name)
        defer { gate.leave() }
        let parts = pieces(offset: offset, length: length)
        let whole = parts.filter { $0.within == 0 && $0.length == pool.chunkBytes }.map(\.chunk)
        if let first = whole.first, let last = whole.last {
            try await pool.lock.withLock { try await pool.unmap(volume: id, chunks: first...last) }
        }
        for part in parts where !(part.within == 0 && part.length == pool.chunkBytes) {
            guard let physical = try await pool.lock.withLock({ try await pool.mapping(volume: id, chunk: part.chunk) }) else { continue }
            let zeros = AlignedBuffer(count: Int(part.length))
            try await pool.device.write(from: zeros, at: dataOffset(physical, part.within))
        }
    }

    public func close() async throws {
        await gate.close()
    }
}
