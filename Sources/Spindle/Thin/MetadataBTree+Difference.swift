extension MetadataBTree {
    /// The keys in `range` whose entries differ between the trees at `first` and `second`: present in
    /// one tree only, or with another value; as runs of consecutive keys, in order.
    ///
    /// Both trees are walked together in key order, each as a frontier of nodes not yet read and
    /// entries not yet compared. Where the two frontiers stand at the same block covering the same
    /// keys, the subtree is shared and skipped unread. Copy-on-write trees that come from one
    /// another (a snapshot and its origin) share every node off the paths either has written since,
    /// so the nodes read grow with what changed, not with the trees' sizes.
    package static func differences(
        in range: ClosedRange<UInt64>, between first: UInt64, and second: UInt64, store: some MetadataNodeStore
    ) async throws -> [ClosedRange<UInt64>] {
        var walk = DifferenceWalk(range: range)
        guard first != second else { return [] }
        let firstRoot = try await store.node(at: first)
        let secondRoot = try await store.node(at: second)
        var left: [DifferenceWalk.Item] = [.node(block: first, level: firstRoot.level, low: 0, high: .max)]
        var right: [DifferenceWalk.Item] = [.node(block: second, level: secondRoot.level, low: 0, high: .max)]
        try await walk.readAhead(left, right, store: store)
        while !left.isEmpty || !right.isEmpty {
            // Two different leaves over the same keys (a leaf and its copy, as after a write since a
            // snapshot): every key they may hold is in them, so compare them directly.
            if case let .node(leftBlock, 0, low, high)? = left.last,
                case let .node(rightBlock, 0, low2, high2)? =
                    right.last, leftBlock != rightBlock, low == low2, high == high2
            {
                walk.compare(try await store.node(at: leftBlock), try await store.node(at: rightBlock))
                left.removeLast()
                right.removeLast()
                continue
            }
            switch walk.step(left.last, right.last) {
            case .skipBoth:
                left.removeLast()
                right.removeLast()
            case .expandLeft:
                try await walk.expand(&left, store: store)
            case .expandRight:
                try await walk.expand(&right, store: store)
            case .changedLeft(let key):
                walk.record(key)
                left.removeLast()
            case .changedRight(let key):
                walk.record(key)
                right.removeLast()
            case .compared(let key, let same):
                if !same { walk.record(key) }
                left.removeLast()
                right.removeLast()
            }
        }
        return walk.runs
    }
}

/// The state of one ``MetadataBTree/differences(in:between:and:store:)`` walk: the rule for each step
/// (pure, so it can be tested on its own), the expansion of a node into what it holds, and the runs
/// of changed keys found so far.
struct DifferenceWalk {
    /// What a frontier holds, last element first: a node not read yet (its level and the keys it may
    /// hold, inclusive) or an entry not compared yet.
    enum Item: Equatable {
        case node(block: UInt64, level: Int, low: UInt64, high: UInt64)
        case entry(key: UInt64, value: UInt64)

        /// Where the item starts in key order.
        var position: UInt64 {
            switch self {
            case let .node(_, _, low, _): return low
            case let .entry(key, _): return key
            }
        }
        var level: Int? {
            if case let .node(_, level, _, _) = self { return level }
            return nil
        }
    }

    enum Step: Equatable {
        case skipBoth, expandLeft, expandRight
        case changedLeft(UInt64), changedRight(UInt64)
        case compared(UInt64, same: Bool)
    }

    let range: ClosedRange<UInt64>
    private(set) var runs: [ClosedRange<UInt64>] = []

    init(range: ClosedRange<UInt64>) { self.range = range }

    /// The next step for the two frontiers' first items (nil: that frontier is done). A node is
    /// read before anything after its first key is decided, so every entry meets its counterpart
    /// (or learns it has none) in key order.
    func step(_ left: Item?, _ right: Item?) -> Step {
        if case let .node(leftBlock, _, leftLow, leftHigh)? = left,
            case let .node(rightBlock, _, rightLow, rightHigh)? =
                right, leftBlock == rightBlock, leftLow == rightLow, leftHigh == rightHigh
        {
            return .skipBoth
        }
        guard let left else {
            if case let .entry(key, _)? = right { return .changedRight(key) }
            return .expandRight
        }
        guard let right else {
            if case let .entry(key, _) = left { return .changedLeft(key) }
            return .expandLeft
        }
        if let leftLevel = left.level,
            left.position < right.position
                || (left.position == right.position && leftLevel >= (right.level ?? -1))
        {
            return .expandLeft
        }
        if right.level != nil, right.position <= left.position { return .expandRight }
        switch (left, right) {
        case let (.entry(leftKey, leftValue), .entry(rightKey, rightValue)):
            if leftKey < rightKey { return .changedLeft(leftKey) }
            if rightKey < leftKey { return .changedRight(rightKey) }
            return .compared(leftKey, same: leftValue == rightValue)
        case let (.entry(key, _), _):
            return .changedLeft(key)
        case let (_, .entry(key, _)):
            return .changedRight(key)
        default:
            preconditionFailure("two nodes are always expanded or skipped")
        }
    }

    /// Replaces the frontier's first item, a node, with what it holds in `range`: its entries (a
    /// leaf) or its children with the keys each may hold (an internal node: a child's keys run from
    /// its own first key, or the node's low bound for the first child, to the next child's first key).
    func expand(_ frontier: inout [Item], store: some MetadataNodeStore) async throws {
        guard case let .node(block, _, low, high) = frontier.removeLast() else { return }
        let node = try await store.node(at: block)
        var items: [Item] = []
        if node.isLeaf {
            for (key, value) in zip(node.keys, node.values) where range.contains(key) {
                items.append(.entry(key: key, value: value))
            }
        } else {
            for index in node.keys.indices {
                let childLow = index == 0 ? low : node.keys[index]
                let childHigh = index + 1 < node.keys.count ? node.keys[index + 1] - 1 : high
                guard childLow <= childHigh, childHigh >= range.lowerBound, childLow <= range.upperBound else {
                    continue
                }
                items.append(.node(block: node.values[index], level: node.level - 1, low: childLow, high: childHigh))
            }
        }
        frontier.append(contentsOf: items.reversed())
    }

    /// Reads ahead, one level at a time and each level in one batch, the nodes the walk will read:
    /// from the two roots down, every child (in `range`) of a node read so far that the other tree
    /// does not also have among that level's children. So a walk from a cold cache waits for the
    /// device once per level, not once per node. Shared children are left out whatever their place,
    /// which is only a guess for reading ahead (the walk itself decides by place as well). A level
    /// of more than ``readAheadLimit`` nodes is not read ahead (the walk reads what it needs).
    func readAhead(_ first: [Item], _ second: [Item], store: some MetadataNodeStore) async throws {
        var levels = (first, second)
        while true {
            var children: ([Item], [Item]) = ([], [])
            for (items, side) in [(levels.0, 0), (levels.1, 1)] {
                for case let .node(block, level, low, high) in items where level > 0 {
                    var expanded: [Item] = [.node(block: block, level: level, low: low, high: high)]
                    try await expand(&expanded, store: store)
                    if side == 0 { children.0 += expanded } else { children.1 += expanded }
                }
            }
            func blocks(_ items: [Item]) -> Set<UInt64> {
                Set(items.compactMap { if case let .node(block, _, _, _) = $0 { return block } else { return nil } })
            }
            let shared = blocks(children.0).intersection(blocks(children.1))
            levels = (
                children.0.filter { if case let .node(block, _, _, _) = $0 { !shared.contains(block) } else { false } },
                children.1.filter { if case let .node(block, _, _, _) = $0 { !shared.contains(block) } else { false } }
            )
            let next = Array(blocks(levels.0).union(blocks(levels.1)))
            guard !next.isEmpty, next.count <= Self.readAheadLimit else { return }
            try await store.prefetch(next)
        }
    }

    /// Nodes of one level read ahead at most (64 MiB).
    static let readAheadLimit = 16384

    /// Records the keys in `range` whose entries differ between two leaves, merging their sorted
    /// entries.
    mutating func compare(_ left: MetadataNode, _ right: MetadataNode) {
        var leftIndex = 0
        var rightIndex = 0
        while leftIndex < left.keys.count || rightIndex < right.keys.count {
            let leftKey = leftIndex < left.keys.count ? left.keys[leftIndex] : nil
            let rightKey = rightIndex < right.keys.count ? right.keys[rightIndex] : nil
            let key: UInt64
            let differs: Bool
            if let leftKey, rightKey == nil || leftKey < rightKey! {
                (key, differs) = (leftKey, true)
                leftIndex += 1
            } else if let rightKey, leftKey == nil || rightKey < leftKey! {
                (key, differs) = (rightKey, true)
                rightIndex += 1
            } else {
                (key, differs) = (leftKey!, left.values[leftIndex] != right.values[rightIndex])
                leftIndex += 1
                rightIndex += 1
            }
            if differs && range.contains(key) { record(key) }
        }
    }

    /// Adds a changed key (keys arrive in order).
    mutating func record(_ key: UInt64) {
        if let last = runs.last, last.upperBound &+ 1 == key {
            runs[runs.count - 1] = last.lowerBound...key
        } else {
            runs.append(key...key)
        }
    }
}
