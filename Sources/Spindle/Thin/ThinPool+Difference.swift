extension ThinPool {
    /// What differs between two volumes of a pool: see ``difference(from:to:)``.
    public struct VolumeDifference: Sendable, Codable, Equatable {
        /// A range of bytes.
        public struct Extent: Sendable, Codable, Equatable {
            public var offset: UInt64
            public var length: UInt64
            public var range: Range<UInt64> { offset..<(offset + length) }

            public init(offset: UInt64, length: UInt64) {
                self.offset = offset
                self.length = length
            }
        }

        public var pool: String
        /// The earlier volume (a snapshot, usually) and the later one.
        public var from: String
        public var to: String
        /// The size of `to`: every range lies inside it.
        public var sizeBytes: UInt64
        /// The unit changes are tracked in: ranges are whole chunks (the last one cut at `sizeBytes`).
        public var chunkBytes: UInt64
        /// The ranges of `to` that may read other than in `from`, in order and merged. Every other
        /// byte of `to` reads as it does in `from` (or as zeros, past the end of a smaller `from`).
        public var ranges: [Extent]
        public var changedBytes: UInt64 { ranges.reduce(0) { $0 + $1.length } }
    }

    /// The ranges of volume `newName` that differ from volume `oldName`: chunks mapped in one and not
    /// the other, or mapped to different pool chunks (a chunk written since the two parted is
    /// always a new pool chunk: shared chunks are copied on write). Found by walking both mapping
    /// trees together and skipping the subtrees they still share, so for a snapshot and its origin
    /// (or two snapshots of one chain) the time grows with what changed, not with the volumes' size.
    /// Volumes with no history in common share no subtree: then every mapped chunk of either counts.
    ///
    /// The answer is chunk-granular (a 4 KiB write marks its whole chunk) and errs only toward
    /// "changed": a chunk rewritten with the same bytes, or written and discarded again, is listed.
    /// The metadata is read under the pool's lock, so writes to the pool wait while the walk reads
    /// nodes that are not in memory.
    /// - Throws: ``SpindleError/Code/notFound`` when either volume does not exist.
    public func difference(from oldName: String, to newName: String) async throws -> VolumeDifference {
        let (sizeBytes, runs) = try await withState { state in
            let old = try state.requireVolume(oldName)
            let new = try state.requireVolume(newName)
            let chunks = (new.sizeBytes + chunkBytes - 1) / chunkBytes
            let runs = try await MetadataBTree.differences(
                in: 0...(chunks - 1), between: old.root, and: new.root, store: state.area)
            return (new.sizeBytes, runs)
        }
        return VolumeDifference(
            pool: name, from: oldName, to: newName, sizeBytes: sizeBytes, chunkBytes: chunkBytes,
            ranges: byteExtents(of: runs, in: 0..<sizeBytes))
    }

    /// The changed chunks of volume `id` against volume `baseline` whose bytes fall in `range`, as
    /// byte extents cut to `range`.
    func changedExtents(of id: UInt64, name volumeName: String, since baseline: String, in range: Range<UInt64>)
        async throws -> [VolumeDifference.Extent]
    {
        guard !range.isEmpty else { return [] }
        let runs = try await withState { state in
            let old = try state.requireVolume(baseline)
            let new = try state.requireRecord(id, name: volumeName)
            return try await MetadataBTree.differences(
                in: (range.lowerBound / chunkBytes)...((range.upperBound - 1) / chunkBytes), between: old.root,
                and: new.root, store: state.area)
        }
        return byteExtents(of: runs, in: range)
    }

    /// Runs of chunks as byte extents, cut to `range`.
    private func byteExtents(of runs: [ClosedRange<UInt64>], in range: Range<UInt64>) -> [VolumeDifference.Extent] {
        runs.compactMap { run in
            let lower = max(run.lowerBound * chunkBytes, range.lowerBound)
            let upper = min((run.upperBound + 1) * chunkBytes, range.upperBound)
            return lower < upper ? VolumeDifference.Extent(offset: lower, length: upper - lower) : nil
        }
    }
}

extension ThinVolume: ChangeTrackingDevice {
    /// Every other volume of the pool: changes are known against any of them (exactly, against a
    /// snapshot of this volume or a volume of its snapshot chain).
    public func changeBaselines() async throws -> [String] {
        try await pool.volumes().map(\.name).filter { $0 != volumeName }
    }

    public func changedRanges(since baseline: String, in range: Range<UInt64>) async throws -> [Range<UInt64>] {
        try await pool.changedExtents(of: id, name: volumeName, since: baseline, in: range).map(\.range)
    }
}
