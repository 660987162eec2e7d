/// A block device that can tell which of its ranges may hold data, so that a sparse-aware copy
/// (``IOEngine/copy(from:to:options:progress:)``) reads only those: a thin volume (its mapped
/// chunks), an image file (its extents that are not holes).
public protocol SparseBlockDevice: BlockDevice {
    /// The parts of `range` that may hold data, in order and inside `range`; the rest reads as zeros.
    func dataRanges(in range: Range<UInt64>) async throws -> [Range<UInt64>]
}

/// Sparse-aware copies between block devices: see ``IOEngine/copy(from:to:options:progress:)``.
public enum BlockCopy {
    /// What to copy and how.
    public struct Options: Sendable {
        /// Where the copy starts on the source and on the target (multiples of both devices' blocks).
        public var sourceOffset: UInt64 = 0
        public var targetOffset: UInt64 = 0
        /// Bytes to copy (a multiple of both devices' blocks); nil copies the rest of the source.
        public var length: UInt64?
        /// The unit checked for zeros: a run of all-zero units is not written. Rounded up to a
        /// multiple of both devices' blocks.
        public var zeroUnitBytes = 4096
        /// The parts of the target written side by side, cut at multiples of this on the target:
        /// its allocation unit (a thin pool's chunk) is a good choice. Rounded up to a multiple of
        /// ``zeroUnitBytes``.
        public var segmentBytes = 64 << 10
        /// Bytes read at a time (rounded up to a multiple of ``segmentBytes``).
        public var pieceBytes = 1 << 20
        /// Whether the target reads zeros wherever the copy does not write (a new sparse image, a
        /// new thin volume): zero runs are then left alone. Otherwise they are discarded on a target
        /// whose discard reads zeros, and written as zeros on any other.
        public var targetReadsZeros = false
        /// Flush the target at the end, so that the copy is durable when the call returns.
        public var flush = true

        public init() {}
    }

    /// How far a copy is.
    public struct Progress: Sendable, Equatable {
        public var doneBytes: UInt64
        public var totalBytes: UInt64
    }

    /// What a copy did.
    public struct Result: Sendable, Equatable {
        /// Bytes copied (read as data or known to be zeros).
        public var totalBytes: UInt64
        /// Bytes written to the target.
        public var writtenBytes: UInt64
        /// Bytes of zeros not written (left as holes, discarded or zeroed without data).
        public var skippedBytes: UInt64

        public init(totalBytes: UInt64 = 0, writtenBytes: UInt64 = 0, skippedBytes: UInt64 = 0) {
            self.totalBytes = totalBytes
            self.writtenBytes = writtenBytes
            self.skippedBytes = skippedBytes
        }
    }

    /// Whether every byte of `bytes` is zero (words at a time).
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        let words = bytes.count / 8
        if let base = bytes.baseAddress {
            while index < words {
                if base.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) != 0 { return false }
                index += 1
            }
        }
        return bytes[(words * 8)...].allSatisfy { $0 == 0 }
    }

    static func roundUp(_ value: Int, to unit: Int) -> Int { (max(value, 1) + unit - 1) / unit * unit }
}

extension IOEngine {
    /// Copies `source` to `target`, sparse-aware, with the copy's tasks on this engine: ranges a
    /// ``SparseBlockDevice`` source reports empty are not read, and runs of zeros are not written
    /// (see ``BlockCopy/Options/targetReadsZeros`` for what happens to them instead). Byte for byte,
    /// the target's range then reads as the source's.
    /// - Parameter progress: called after each piece, with the bytes done and the total.
    /// - Throws: ``SpindleError/Code/misaligned`` or ``SpindleError/Code/outOfRange`` for a range
    ///   that does not fit both devices, ``SpindleError/Code/invalidArgument`` for overlapping ranges
    ///   of one device, and what the devices' reads and writes throw.
    public func copy(
        from source: any BlockDevice, to target: any BlockDevice, options: BlockCopy.Options = BlockCopy.Options(),
        progress: (@Sendable (BlockCopy.Progress) -> Void)? = nil
    ) async throws -> BlockCopy.Result {
        let total = options.length ?? source.capacityBytes - min(options.sourceOffset, source.capacityBytes)
        var result = BlockCopy.Result(totalBytes: total)
        guard total > 0 else { return result }
        try source.validate(offset: options.sourceOffset, length: total, operation: "copy from")
        try target.validate(offset: options.targetOffset, length: total, operation: "copy to")
        try target.checkWritable(operation: "copy to", offset: options.targetOffset, length: total)
        if source === target && options.sourceOffset < options.targetOffset + total
            && options.targetOffset < options.sourceOffset + total
        {
            throw SpindleError(
                .invalidArgument, "the source and target ranges overlap on one device", operation: "copy",
                path: source.name,
                offset: options.sourceOffset, length: total)
        }
        let unit = BlockCopy.roundUp(options.zeroUnitBytes, to: max(source.logicalBlockBytes, target.logicalBlockBytes))
        let segment = BlockCopy.roundUp(options.segmentBytes, to: unit)
        let piece = BlockCopy.roundUp(options.pieceBytes, to: segment)
        let buffer = AlignedBuffer(count: piece, zeroed: false)
        let sparse = source as? any SparseBlockDevice
        var done: UInt64 = 0
        while done < total {
            let length = min(UInt64(piece), total - done)
            let from = options.sourceOffset + done
            let to = options.targetOffset + done
            if let sparse, try await sparse.dataRanges(in: from..<(from + length)).isEmpty {
                if !options.targetReadsZeros { try await Self.clear(target, offset: to, length: length) }
                result.skippedBytes += length
            } else {
                try await source.read(into: buffer, range: 0..<Int(length), at: from)
                // Segments at the target's multiples of `segment`, written side by side.
                var cuts: [Range<Int>] = []
                var start = 0
                while start < Int(length) {
                    let boundary = ((to + UInt64(start)) / UInt64(segment) + 1) * UInt64(segment)
                    let end = min(Int(length), Int(boundary - to))
                    cuts.append(start..<end)
                    start = end
                }
                let counts = try await withThrowingTaskGroup(of: (written: UInt64, skipped: UInt64).self) { group in
                    for cut in cuts {
                        group.addTask(executorPreference: self) {
                            try await Self.copySegment(
                                buffer, cut, unit: unit, to: target, at: to, targetReadsZeros: options.targetReadsZeros)
                        }
                    }
                    var sum: (written: UInt64, skipped: UInt64) = (0, 0)
                    for try await counts in group {
                        sum.written += counts.written
                        sum.skipped += counts.skipped
                    }
                    return sum
                }
                result.writtenBytes += counts.written
                result.skippedBytes += counts.skipped
            }
            done += length
            progress?(BlockCopy.Progress(doneBytes: done, totalBytes: total))
        }
        withExtendedLifetime(buffer) {}
        if options.flush { try await target.flush() }
        return result
    }

    /// Writes one segment of the buffer (`cut`, placed at `base` + its start on the target): runs of
    /// non-zero units are written, runs of zero units cleared (or left, on a target that reads zeros).
    private static func copySegment(
        _ buffer: AlignedBuffer, _ cut: Range<Int>, unit: Int, to target: any BlockDevice, at base: UInt64,
        targetReadsZeros: Bool
    ) async throws -> (written: UInt64, skipped: UInt64) {
        func isZero(_ start: Int) -> Bool {
            withExtendedLifetime(buffer) {
                BlockCopy.isZero(
                    UnsafeRawBufferPointer(
                        buffer.slice(offset: start, length: min(start + unit, cut.upperBound) - start)))
            }
        }
        var written: UInt64 = 0
        var skipped: UInt64 = 0
        var start = cut.lowerBound
        while start < cut.upperBound {
            let zero = isZero(start)
            var end = min(start + unit, cut.upperBound)
            while end < cut.upperBound && isZero(end) == zero { end = min(end + unit, cut.upperBound) }
            if zero {
                if !targetReadsZeros {
                    try await clear(target, offset: base + UInt64(start), length: UInt64(end - start))
                }
                skipped += UInt64(end - start)
            } else {
                try await target.write(from: buffer, range: start..<end, at: base + UInt64(start))
                written += UInt64(end - start)
            }
            start = end
        }
        return (written, skipped)
    }

    /// Makes a range of the target read zeros: a discard where that reads zeros (it frees space),
    /// else write-zeroes.
    private static func clear(_ target: any BlockDevice, offset: UInt64, length: UInt64) async throws {
        if target.discardReadsZeroes {
            try await target.discard(offset: offset, length: length)
        } else {
            try await target.writeZeroes(offset: offset, length: length)
        }
    }
}

extension ThinVolume: SparseBlockDevice {
    /// The mapped chunks of `range`, as byte ranges cut to it.
    public func dataRanges(in range: Range<UInt64>) async throws -> [Range<UInt64>] {
        guard !range.isEmpty else { return [] }
        let chunk = pool.chunkBytes
        var ranges: [Range<UInt64>] = []
        for mapped in try await mappedChunks(in: (range.lowerBound / chunk)..<((range.upperBound + chunk - 1) / chunk))
        {
            let piece = max(mapped * chunk, range.lowerBound)..<min((mapped + 1) * chunk, range.upperBound)
            if let last = ranges.last, last.upperBound == piece.lowerBound {
                ranges[ranges.count - 1] = last.lowerBound..<piece.upperBound
            } else {
                ranges.append(piece)
            }
        }
        return ranges
    }
}

extension FileDevice: SparseBlockDevice {
    /// The file's extents in `range` that are not holes (all of it when the file system cannot tell).
    public func dataRanges(in range: Range<UInt64>) async throws -> [Range<UInt64>] {
        guard !range.isEmpty else { return [] }
        guard let extents = dataExtents(from: range.lowerBound, limitBytes: UInt64(range.count)) else { return [range] }
        return extents.compactMap { extent in
            let lower = max(extent.lowerBound, range.lowerBound)
            let upper = min(extent.upperBound, range.upperBound)
            return lower < upper ? lower..<upper : nil
        }
    }
}
