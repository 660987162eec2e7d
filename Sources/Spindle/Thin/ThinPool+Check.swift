extension ThinPool {
    /// What ``check()`` found.
    public struct CheckReport: Sendable, Codable, Equatable {
        /// Each problem, precisely: the block, chunk, volume and what is wrong. Empty when clean.
        public var problems: [String]
        public var metadataBlocks: Int
        public var mappedChunks: UInt64
        public var allocatedChunks: UInt64
        public var isClean: Bool { problems.isEmpty }
    }

    /// Verifies the committed and pending metadata, as `thin_check` does: every node readable with a
    /// good checksum and in key order, no block in two places, every mapped chunk allocated with a
    /// reference count equal to its number of mappings, no allocated chunk unmapped, every chunk
    /// inside the pool, every mapping belonging to a volume. Reads only; changes nothing.
    public func check() async throws -> CheckReport {
        try await lock.withLock {
            var report = CheckReport(problems: [], metadataBlocks: 0, mappedChunks: 0, allocatedChunks: 0)
            var seen = Set<UInt64>()
            for root in [Root.mappings, .referenceCounts, .volumes] {
                await walk(area.roots[root.rawValue], tree: "\(root)", seen: &seen, report: &report)
            }
            guard report.problems.isEmpty else { return report }  // the trees cannot be read safely

            var mappingsPerChunk: [UInt64: UInt64] = [:]
            var volumesWithMappings = Set<UInt64>()
            try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.mappings.rawValue], store: area) { key, physical in
                report.mappedChunks += 1
                let volume = key >> Self.chunkBits
                volumesWithMappings.insert(volume)
                if physical >= chunkCount {
                    report.problems.append("volume \(volume) chunk \(key & ((1 << Self.chunkBits) - 1)) maps to chunk \(physical), past the pool's \(chunkCount) chunks")
                }
                mappingsPerChunk[physical, default: 0] += 1
                return true
            }
            var counted = Set<UInt64>()
            try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.referenceCounts.rawValue], store: area) { chunk, count in
                report.allocatedChunks += 1
                counted.insert(chunk)
                let mapped = mappingsPerChunk[chunk] ?? 0
                if mapped == 0 {
                    report.problems.append("chunk \(chunk) is allocated (reference count \(count)) but nothing maps it (leaked)")
                } else if mapped != count {
                    report.problems.append("chunk \(chunk) has reference count \(count) but \(mapped) mappings")
                }
                return true
            }
            for chunk in mappingsPerChunk.keys.sorted() where !counted.contains(chunk) {
                report.problems.append("chunk \(chunk) is mapped but not allocated (it could be handed out again)")
            }
            let known = Set(try await volumesLockedIDs())
            for volume in volumesWithMappings.sorted() where !known.contains(volume) {
                report.problems.append("chunks are mapped for volume \(volume), which has no record")
            }
            if report.allocatedChunks != usedChunks {
                report.problems.append("the pool counts \(usedChunks) used chunks but \(report.allocatedChunks) are allocated")
            }
            return report
        }
    }

    private func walk(_ root: UInt64, tree: String, seen: inout Set<UInt64>, report: inout CheckReport) async {
        var pending = [root]
        while let block = pending.popLast() {
            guard seen.insert(block).inserted else {
                report.problems.append("metadata block \(block) is reachable twice (in the \(tree) tree)")
                continue
            }
            do {
                let node = try await area.node(at: block)
                report.metadataBlocks += 1
                if !node.isLeaf { pending.append(contentsOf: node.values) }
            } catch {
                report.problems.append("\(tree) tree: \(error)")
            }
        }
    }

    private func volumesLockedIDs() async throws -> [UInt64] {
        var ids: [UInt64] = []
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.volumes.rawValue], store: area) { key, _ in
            if key & 0xFF == 0 { ids.append(key >> 8) }
            return true
        }
        return ids
    }
}
