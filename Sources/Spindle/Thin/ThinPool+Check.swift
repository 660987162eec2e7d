extension ThinPool {
    /// What ``check()`` found.
    public struct CheckReport: Sendable, Codable, Equatable {
        /// Each problem, precisely: the block, chunk, volume and what is wrong. Empty when clean.
        public var problems: [String]
        public var metadataBlocks: Int
        /// Mappings over all volumes (a chunk shared by two volumes counts twice).
        public var mappedChunks: UInt64
        public var allocatedChunks: UInt64
        public var volumes: Int
        /// What opening the pool worked around (``ThinPool/openNotes``), such as a damaged metadata
        /// superblock copy: not a problem of the metadata in use, but worth knowing.
        public var warnings: [String] = []
        public var isClean: Bool { problems.isEmpty }
    }

    /// Verifies the metadata as of the open transaction, as `thin_check` does: every node readable
    /// with a good checksum and in key order; the pool's own trees without sharing; each node's
    /// reference count equal to the number of trees and parents naming it; every data chunk's
    /// reference count equal to the number of leaves naming it; no allocated chunk unmapped; every
    /// chunk inside the pool; every mapping inside its volume. Reads only; changes nothing.
    public func check() async throws -> CheckReport {
        try await withState { state in
            let (area, records, chunkCount) = (state.area, state.records, state.chunkCount)
            var report = CheckReport(
                problems: [], metadataBlocks: 0, mappedChunks: 0, allocatedChunks: 0, volumes: records.count)
            report.warnings = area.openNotes
            var nodeReferences: [UInt64: UInt32] = [:]
            var leaves: [(volume: String, node: MetadataNode)] = []
            for root in [Root.volumes, .referenceCounts, .segments] {
                await Self.walk(
                    area.roots[root.rawValue], tree: "the \(root) tree", shareable: false, references: &nodeReferences,
                    report: &report, in: area
                ) { _ in }
            }
            let deleting = state.deleting.values.sorted(by: { $0.id < $1.id })
            for record in records.values.sorted(by: { $0.id < $1.id }) + deleting {
                await Self.walk(
                    record.root, tree: "volume \(record.name)'s mappings", shareable: true, references: &nodeReferences,
                    report: &report, in: area
                ) { leaf in
                    leaves.append((record.name, leaf))
                }
            }
            guard report.problems.isEmpty else { return report }  // the trees cannot be read safely
            for (block, count) in nodeReferences.sorted(by: { $0.key < $1.key })
            where area.referenceCount(of: block) != count {
                report.problems.append(
                    "metadata block \(block) is named \(count) times but counted \(area.referenceCount(of: block)) times"
                )
            }

            // Data chunks: references expected from the leaves against the reference-count tree.
            var expected: [UInt64: UInt64] = [:]
            for (volume, leaf) in leaves {
                for (key, physical) in zip(leaf.keys, leaf.values) {
                    if physical >= chunkCount {
                        report.problems.append(
                            "volume \(volume) chunk \(key) maps to chunk \(physical), past the pool's \(chunkCount) chunks (metadata block \(leaf.block))"
                        )
                    }
                    expected[physical, default: 0] += 1
                }
            }
            for record in records.values.sorted(by: { $0.id < $1.id }) + deleting {
                var mapped: UInt64 = 0
                var pastEnd: UInt64?
                try await MetadataBTree.forEach(in: 0...UInt64.max, root: record.root, store: area, prefetch: true) {
                    key, _ in
                    mapped += 1
                    if key * chunkBytes >= record.sizeBytes && pastEnd == nil { pastEnd = key }
                    return true
                }
                report.mappedChunks += mapped
                if mapped != record.mappedChunks {
                    report.problems.append(
                        "volume \(record.name) records \(record.mappedChunks) mapped chunks but maps \(mapped)")
                }
                if let pastEnd {
                    report.problems.append(
                        "volume \(record.name) maps chunk \(pastEnd), past its end (\(record.sizeBytes) bytes)")
                }
            }
            var counted = Set<UInt64>()
            try await MetadataBTree.forEach(
                in: 0...UInt64.max, root: area.roots[Root.referenceCounts.rawValue], store: area, prefetch: true
            ) { chunk, count in
                report.allocatedChunks += 1
                counted.insert(chunk)
                let named = expected[chunk] ?? 0
                if named == 0 {
                    report.problems.append(
                        "chunk \(chunk) is allocated (reference count \(count)) but nothing maps it (leaked)")
                } else if named != count {
                    report.problems.append("chunk \(chunk) has reference count \(count) but \(named) leaves name it")
                }
                return true
            }
            for chunk in expected.keys.sorted() where !counted.contains(chunk) {
                report.problems.append("chunk \(chunk) is mapped but not allocated (it could be handed out again)")
            }
            let shared = UInt64(expected.values.filter { $0 >= 2 }.count)
            if shared != state.sharedChunks {
                report.problems.append(
                    "the pool counts \(state.sharedChunks) shared chunks but \(shared) have more than one referrer")
            }
            if report.allocatedChunks != state.usedChunks {
                report.problems.append(
                    "the pool counts \(state.usedChunks) used chunks but \(report.allocatedChunks) are allocated")
            }
            return report
        }
    }

    /// Reads every node of a tree once, counting how often each is named; a node of a tree that may
    /// not share (`shareable` false) named twice is a problem.
    private static func walk(
        _ root: UInt64, tree: String, shareable: Bool, references: inout [UInt64: UInt32], report: inout CheckReport,
        in area: MetadataArea, leaf: (MetadataNode) -> Void
    ) async {
        var pending = [root]
        while let block = pending.popLast() {
            references[block, default: 0] += 1
            guard references[block] == 1 else {
                if !shareable { report.problems.append("metadata block \(block) is reachable twice (in \(tree))") }
                continue
            }
            do {
                let node = try await area.node(at: block)
                report.metadataBlocks += 1
                if node.isLeaf {
                    leaf(node)
                } else {
                    // Children many at once; one that cannot be read is reported when visited.
                    try? await area.prefetch(node.values.filter { references[$0] == nil })
                    pending.append(contentsOf: node.values)
                }
            } catch {
                report.problems.append("\(tree): \(error)")
            }
        }
    }
}
