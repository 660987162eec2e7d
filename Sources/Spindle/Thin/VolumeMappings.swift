/// The part of a volume's mappings that its reads and writes find without the pool's lock.
///
/// The table is direct-mapped (a virtual chunk has one slot; a newer mapping evicts an older one)
/// and holds what the pool's metadata said: virtual chunk → pool chunk, and whether the chunk is
/// shared. Only code that holds the pool's state (the `holding` parameter proves it) fills or
/// changes it, and it does so in the same critical section as the metadata change, so the table
/// never names a chunk the volume no longer maps nor calls a shared chunk unshared. Readers take
/// only the table's own mutex, for a few loads, never across an `await`. One table serves every
/// ``ThinVolume`` object of the volume; the pool keeps a weak reference to it.
final class VolumeMappings: Sendable {
    let id: UInt64
    private let table: Locked<Table>
    /// Slots of the largest table (16 bytes each: 2 MiB, mapping 8 GiB of 64 KiB chunks).
    static let maximumSlots: UInt64 = 1 << 17

    private struct Table {
        /// One entry per slot, allocated with the first mapping.
        var entries: [Entry] = []
        var layout: ChunkLayout?
    }

    /// A slot: both words in one cache line, as a lookup is a random access.
    private struct Entry {
        /// The virtual chunk + 1; 0 marks an empty slot.
        var key: UInt64
        /// The pool chunk << 1 | shared.
        var value: UInt64
    }

    /// Slots for a volume of `chunks` chunks: one per chunk up to ``maximumSlots``.
    private let slots: Int

    init(id: UInt64, chunks: UInt64) {
        self.id = id
        var slots: UInt64 = 64
        while slots < min(chunks, Self.maximumSlots) { slots <<= 1 }
        self.slots = Int(slots)
        table = Locked(Table())
    }

    /// The mapping of `chunk` when the table has it.
    func find(_ chunk: UInt64) -> ThinPool.MappedChunk? {
        let slot = Int(chunk & UInt64(slots - 1))
        let found = table.withLock { table -> (UInt64, ChunkLayout)? in
            guard slot < table.entries.count, case let entry = table.entries[slot], entry.key == chunk &+ 1, let layout = table.layout else {
                return nil
            }
            return (entry.value, layout)
        }
        guard let (value, layout) = found else { return nil }
        let location = layout.location(of: value >> 1)
        return ThinPool.MappedChunk(chunk: value >> 1, device: location.device, offset: location.offset, shared: value & 1 != 0)
    }

    /// Records that `chunk` maps to the pool chunk `physical`.
    func remember(_ chunk: UInt64, as physical: UInt64, shared: Bool, holding state: PoolState) {
        let slot = Int(chunk & UInt64(slots - 1))
        let layout = state.layout
        table.withLock { table in
            if table.entries.isEmpty { table.entries = [Entry](repeating: Entry(key: 0, value: 0), count: slots) }
            if table.layout !== layout { table.layout = layout }
            table.entries[slot] = Entry(key: chunk &+ 1, value: physical << 1 | (shared ? 1 : 0))
        }
    }

    /// Forgets the mapping of `chunk`, if the table has it.
    func forget(_ chunk: UInt64, holding _: PoolState) {
        let slot = Int(chunk & UInt64(slots - 1))
        table.withLock { table in
            if slot < table.entries.count && table.entries[slot].key == chunk &+ 1 { table.entries[slot].key = 0 }
        }
    }

    /// Forgets every mapping (the volume was snapshotted or deleted).
    func forgetAll(holding _: PoolState) {
        table.withLock { table in
            table.entries = []
        }
    }
}
