import Foundation
import Synchronization

/// The part of a volume's mappings that its reads and writes find without any lock.
///
/// The table is direct-mapped (a virtual chunk has one slot; a newer mapping evicts an older one)
/// and holds what the pool's metadata said: virtual chunk → pool chunk, and whether the chunk is
/// shared. Only code that holds the pool's state (the `holding` parameter proves it) fills or
/// changes it, and it does so in the same critical section as the metadata change, so the table
/// never names a chunk the volume no longer maps nor calls a shared chunk unshared. A slot is one
/// atomic word, so a reader sees a whole old entry or a whole new one: a lookup is one load. One
/// table serves every ``ThinVolume`` object of the volume; the pool keeps a weak reference to it.
///
/// A slot's word: bit 63 set when the slot holds a mapping, bit 62 when the chunk is shared, bits
/// 40-61 the virtual chunk's bits above the slot number (its "tag"), bits 0-39 the pool chunk.
/// A mapping whose tag or pool chunk does not fit is not kept (its lookups take the locked path).
final class VolumeMappings: @unchecked Sendable {
    // @unchecked Sendable: `words` is only read and written through atomic operations; `layouts`
    // only by code holding the pool's state.
    let id: UInt64
    /// Slots of the largest table (8 bytes each: 1 MiB, mapping 8 GiB of 64 KiB chunks).
    static let maximumSlots: UInt64 = 1 << 17
    private static let present: UInt64 = 1 << 63
    private static let sharedBit: UInt64 = 1 << 62
    private static let chunkBits: UInt64 = 40
    private static let chunkMask: UInt64 = (1 << 40) - 1
    private static let tagLimit: UInt64 = 1 << 22

    /// The slots, zeroed at allocation (a zero word is an empty slot). Pages are touched only as
    /// mappings land in them.
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let slotBits: UInt64
    private let slotMask: UInt64
    /// The pool's layout, which turns a pool chunk into a device and an offset. Replaced (under the
    /// pool's state) when the pool gains a device; the layouts it replaced stay referenced in
    /// ``retired`` until the table goes, so a reader that loaded one can still use it.
    private let layout = Atomic<Unmanaged<ChunkLayout>?>(nil)
    private var retired: [ChunkLayout] = []

    init(id: UInt64, chunks: UInt64) {
        self.id = id
        var bits: UInt64 = 6
        while (1 << bits) < min(chunks, Self.maximumSlots) { bits += 1 }
        slotBits = bits
        slotMask = (1 << bits) - 1
        guard let memory = calloc(Int(1 << bits), MemoryLayout<UInt64>.stride) else {
            fatalError("out of memory for a mapping table of \(1 << bits) slots")
        }
        words = memory.bindMemory(to: Atomic<UInt64>.self, capacity: Int(1 << bits))
    }

    deinit {
        layout.load(ordering: .relaxed)?.release()
        free(words)
    }

    /// The mapping of `chunk` when the table has it.
    func find(_ chunk: UInt64) -> ThinPool.MappedChunk? {
        let word = words[Int(chunk & slotMask)].load(ordering: .acquiring)
        guard word & Self.present != 0, (word >> Self.chunkBits) & (Self.tagLimit - 1) == chunk >> slotBits,
            let layout = layout.load(ordering: .acquiring)
        else { return nil }
        let physical = word & Self.chunkMask
        let location = layout._withUnsafeGuaranteedRef { $0.location(of: physical) }
        return ThinPool.MappedChunk(
            chunk: physical, device: location.device, offset: location.offset, shared: word & Self.sharedBit != 0)
    }

    /// Records that `chunk` maps to the pool chunk `physical`.
    func remember(_ chunk: UInt64, as physical: UInt64, shared: Bool, holding state: PoolState) {
        let slot = Int(chunk & slotMask)
        let tag = chunk >> slotBits
        guard tag < Self.tagLimit, physical <= Self.chunkMask else {
            // Not kept: whatever the slot held for this chunk must go.
            forget(chunk, holding: state)
            return
        }
        let current = state.layout
        if layout.load(ordering: .acquiring)?.takeUnretainedValue() !== current {
            let old = layout.exchange(Unmanaged.passRetained(current), ordering: .sequentiallyConsistent)
            if let old {
                retired.append(old.takeUnretainedValue())
                old.release()
            }
        }
        let word = Self.present | (shared ? Self.sharedBit : 0) | tag << Self.chunkBits | physical
        words[slot].store(word, ordering: .sequentiallyConsistent)
    }

    /// Forgets the mapping of `chunk`, if the table has it.
    func forget(_ chunk: UInt64, holding _: PoolState) {
        let slot = Int(chunk & slotMask)
        let word = words[slot].load(ordering: .acquiring)
        if word & Self.present != 0, (word >> Self.chunkBits) & (Self.tagLimit - 1) == chunk >> slotBits {
            words[slot].store(0, ordering: .sequentiallyConsistent)
        }
    }

    /// Forgets every mapping (the volume was snapshotted or deleted).
    func forgetAll(holding _: PoolState) {
        for slot in 0..<Int(1 << slotBits) where words[slot].load(ordering: .relaxed) != 0 {
            words[slot].store(0, ordering: .sequentiallyConsistent)
        }
    }
}
