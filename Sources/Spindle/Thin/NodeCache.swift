/// The committed metadata nodes a ``MetadataArea`` keeps in memory, bounded by a number of nodes
/// and evicted by CLOCK (second chance): a hit sets the node's reference bit; inserting into a full
/// cache moves the hand forward, clearing bits, to the first node not used since the hand last
/// passed it, and puts the new node in its slot. Lookups, inserts, removals and evictions are all
/// O(1) (amortized for the sweep), whatever the size, so a cache of a million nodes costs what one
/// of a thousand does per operation.
///
/// Not safe for concurrent use: its area serializes access.
struct NodeCache {
    /// Memory a cached node is budgeted at: a full node's keys and values (4,064 bytes) with the
    /// arrays' headers, the slot and the index entry. Leaves written by random inserts are about
    /// two-thirds full, so a cache uses somewhat less than `capacity` times this.
    static let bytesPerNode = 4352

    private struct Slot {
        var block: UInt64
        var node: MetadataNode?
        var referenced: Bool
    }

    /// Nodes the cache holds at most.
    let capacity: Int
    private var slots: [Slot] = []
    private var index: [UInt64: Int] = [:]
    /// Slots emptied by ``remove(_:)``, filled before anything is evicted.
    private var emptySlots: [Int] = []
    private var hand = 0
    /// Nodes evicted to make room, since the cache was made.
    private(set) var evictions: UInt64 = 0

    /// A cache of at most `capacity` nodes (at least 16: a tree's path and its siblings).
    init(capacity: Int) {
        self.capacity = max(16, capacity)
    }

    /// A cache that fits `bytes` of memory (see ``bytesPerNode``).
    init(budgetBytes bytes: UInt64) {
        self.init(capacity: Int(min(bytes / UInt64(Self.bytesPerNode), UInt64(Int32.max))))
    }

    var count: Int { index.count }

    /// The node kept for `block`, marking it used.
    mutating func node(at block: UInt64) -> MetadataNode? {
        guard let slot = index[block] else { return nil }
        slots[slot].referenced = true
        return slots[slot].node
    }

    /// Whether a node is kept for `block` (without marking it used).
    func contains(_ block: UInt64) -> Bool { index[block] != nil }

    /// Keeps `node`, replacing what was kept for its block; evicts one node when full.
    mutating func insert(_ node: MetadataNode) {
        if let slot = index[node.block] {
            slots[slot].node = node
            slots[slot].referenced = true
            return
        }
        let slot: Int
        if let empty = emptySlots.popLast() {
            slot = empty
        } else if slots.count < capacity {
            slots.append(Slot(block: 0, node: nil, referenced: false))
            slot = slots.count - 1
        } else {
            slot = evict()
        }
        // Not referenced yet: a node read once (a scan) goes before one read again.
        slots[slot] = Slot(block: node.block, node: node, referenced: false)
        index[node.block] = slot
    }

    /// Forgets the node kept for `block`, if any.
    mutating func remove(_ block: UInt64) {
        guard let slot = index.removeValue(forKey: block) else { return }
        slots[slot] = Slot(block: 0, node: nil, referenced: false)
        emptySlots.append(slot)
    }

    /// Frees the slot of the first node, from the hand on, whose reference bit is clear (clearing
    /// the bits it passes), and returns it. Only called when every slot holds a node.
    private mutating func evict() -> Int {
        while true {
            let slot = hand
            hand = hand + 1 == slots.count ? 0 : hand + 1
            if slots[slot].referenced {
                slots[slot].referenced = false
                continue
            }
            index[slots[slot].block] = nil
            slots[slot].node = nil
            evictions += 1
            return slot
        }
    }
}
