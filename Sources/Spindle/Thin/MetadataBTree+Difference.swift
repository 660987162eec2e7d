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
        while !left.isEmpty || !right.isEmpty {
            switch walk.step(left.last, right.last) {
            case .skipBoth:
                left.removeLast()
                right.removeLast()
            case .expandLeft:
                try await walk.prefetchPair(left.last, right.last, store: store)
                try await walk.expand(&left, store: store)
            case .expandRight:
                try await walk.prefetchPair(right.last, left.last, store: store)
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

    /// Before a node is expanded, when the other frontier stands at an internal node of the same
    /// level and first key (its counterpart, to be expanded next): reads both, then reads ahead at
    /// once the children that are not in both (those in both are shared subtrees, skipped unread).
    /// So a walk from a cold cache reads each level's changed nodes in one batch, not one by one.
    func prefetchPair(_ node: Item?, _ counterpart: Item?, store: some MetadataNodeStore) async throws {
        guard case let .node(block, level, low, _)? = node, level > 0,
            case let .node(otherBlock, otherLevel, otherLow, _)? = counterpart, otherLevel == level, otherLow == low,
            otherBlock != block
        else { return }
        try await store.prefetch([block, otherBlock])
        let children = try await store.node(at: block).values
        let otherChildren = try await store.node(at: otherBlock).values
        let shared = Set(children).intersection(otherChildren)
        try await store.prefetch((children + otherChildren).filter { !shared.contains($0) })
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
