/// Where a pool's chunks are: its devices, and the runs of chunks stored contiguously on each
/// (recorded in the segments tree). Immutable; growing the pool makes a new layout that keeps
/// every existing chunk where it was, so a location found under an older layout stays right.
final class ChunkLayout: Sendable {
    /// A run of pool chunks stored contiguously on one device.
    struct Segment: Equatable, Sendable {
        var firstChunk: UInt64
        var chunks: UInt64
        var device: Int
        /// Where the run starts on its device, in chunks.
        var deviceChunk: UInt64
    }

    let chunkBytes: UInt64
    let devices: [any BlockDevice]
    let segments: [Segment]
    /// Chunks in the pool: the end of the last segment.
    let chunkCount: UInt64

    init(chunkBytes: UInt64, devices: [any BlockDevice], segments: [Segment]) {
        self.chunkBytes = chunkBytes
        self.devices = devices
        self.segments = segments
        chunkCount = segments.last.map { $0.firstChunk + $0.chunks } ?? 0
    }

    /// The device and byte offset of a pool chunk.
    func location(of chunk: UInt64) -> (device: any BlockDevice, offset: UInt64) {
        var low = 0
        var high = segments.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if segments[middle].firstChunk <= chunk { low = middle } else { high = middle - 1 }
        }
        let segment = segments[low]
        return (devices[segment.device], (segment.deviceChunk + chunk - segment.firstChunk) * chunkBytes)
    }

    /// This layout with more devices and segments.
    func adding(devices more: [any BlockDevice] = [], segments added: [Segment] = []) -> ChunkLayout {
        ChunkLayout(chunkBytes: chunkBytes, devices: devices + more, segments: segments + added)
    }

    /// Reads the segments tree of an opened pool's metadata and checks it against the devices.
    static func load(
        from area: MetadataArea, devices: [any BlockDevice], chunkBytes: UInt64, chunkCount: UInt64, poolName: String
    ) async throws -> ChunkLayout {
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(
            in: 0...UInt64.max, root: area.roots[ThinPool.Root.segments.rawValue], store: area
        ) { key, value in
            found.append((key, value))
            return true
        }
        var segments: [Segment] = []
        for (index, (first, value)) in found.enumerated() {
            let end = index + 1 < found.count ? found[index + 1].0 : chunkCount
            let device = Int(value >> 48)
            guard device < devices.count, end > first,
                first == (index == 0 ? 0 : found[index - 1].0 + segments[index - 1].chunks)
            else {
                throw SpindleError(
                    .corrupted, "pool \(poolName)'s segment table is corrupt at chunk \(first)", operation: "open pool",
                    path: devices[0].name)
            }
            let segment = Segment(
                firstChunk: first, chunks: end - first, device: device, deviceChunk: value & ((1 << 48) - 1))
            guard (segment.deviceChunk + segment.chunks) * chunkBytes <= devices[device].capacityBytes else {
                throw SpindleError(
                    .ioFailed,
                    "pool \(poolName) keeps chunks up to \(ByteSize.format((segment.deviceChunk + segment.chunks) * chunkBytes)) on this device, but it has only \(ByteSize.format(devices[device].capacityBytes)) (did it shrink?)",
                    operation: "open pool", path: devices[device].name)
            }
            segments.append(segment)
        }
        guard !segments.isEmpty else {
            throw SpindleError(
                .corrupted, "pool \(poolName) has no data segments (corrupt metadata)", operation: "open pool",
                path: devices[0].name)
        }
        return ChunkLayout(chunkBytes: chunkBytes, devices: devices, segments: segments)
    }
}

extension PoolState {
    /// Records a new segment in the segments tree and in the layout.
    func recordSegment(_ segment: ChunkLayout.Segment) async throws {
        area.roots[ThinPool.Root.segments.rawValue] = try await MetadataBTree.insert(
            segment.firstChunk, value: UInt64(segment.device) << 48 | segment.deviceChunk,
            root: area.roots[ThinPool.Root.segments.rawValue], in: area)
        layout = layout.adding(segments: [segment])
    }
}

extension ThinPool {
    /// Grows the pool: by the space its devices gained since it was created or last extended (an
    /// image made larger, an array that grew), and by `adding` new devices. Returns the chunks added.
    /// - Parameters:
    ///   - overwrite: use new devices that hold something (another pool, an array member, a file
    ///     system, any data), destroying it.
    /// - Throws: ``SpindleError`` when a new device belongs to a pool, is too small, or the metadata
    ///   area (sized at creation for twice the data) cannot describe the larger pool.
    @discardableResult
    public func extend(adding newDevices: [any BlockDevice] = [], overwrite: Bool = false) async throws -> UInt64 {
        try await withState { state in
            let layout = state.layout
            let before = layout.chunkCount
            var added: [ChunkLayout.Segment] = []
            var total = before
            for (index, device) in layout.devices.enumerated() {
                let end = layout.segments.filter { $0.device == index }.map { $0.deviceChunk + $0.chunks }.max() ?? 1
                let available = device.capacityBytes / chunkBytes
                if available > end {
                    added.append(
                        ChunkLayout.Segment(firstChunk: total, chunks: available - end, device: index, deviceChunk: end)
                    )
                    total += available - end
                }
            }
            for (offset, device) in newDevices.enumerated() {
                if device.isReadOnly {
                    throw SpindleError(.readOnly, "a read-only device cannot join pool \(name)", path: device.name)
                }
                if layout.devices.contains(where: { $0 === device }) {
                    throw SpindleError(
                        .invalidArgument, "the device is in pool \(name) already", operation: "extend pool",
                        path: device.name)
                }
                if !overwrite {
                    // A device this pool labelled in an extend that did not commit is this pool's to reuse.
                    let ours = (try? await ThinPoolLabel.read(from: device))??.poolUUID == uuid
                    if !ours { try await DeviceSignature.refuseIfInUse(device, operation: "extend pool") }
                }
                guard device.capacityBytes >= 2 * chunkBytes else {
                    throw SpindleError(
                        .invalidArgument,
                        "the device is \(ByteSize.format(device.capacityBytes)), too small for a label and one chunk",
                        operation: "extend pool", path: device.name)
                }
                let chunks = device.capacityBytes / chunkBytes - 1
                added.append(
                    ChunkLayout.Segment(
                        firstChunk: total, chunks: chunks, device: layout.devices.count + offset, deviceChunk: 1))
                total += chunks
            }
            guard total > before else { return 0 }
            let area = state.area
            let capacity = Self.chunkCapacity(metadataBlocks: area.blockCount)
            guard total <= capacity else {
                throw SpindleError(
                    .noSpace,
                    "pool \(name)'s metadata area (\(ByteSize.format(area.blockCount * UInt64(MetadataNode.blockBytes)))) describes at most \(ByteSize.format(capacity * chunkBytes)) of data; the pool would grow to \(ByteSize.format(total * chunkBytes))",
                    operation: "extend pool")
            }
            for (offset, device) in newDevices.enumerated() {
                let label = ThinPoolLabel(
                    poolUUID: uuid, poolName: name, deviceIndex: layout.devices.count + offset, chunkBytes: chunkBytes,
                    metadataOffset: 0, metadataBlocks: 0)
                try await label.write(to: device)
            }
            state.layout = layout.adding(devices: newDevices)
            let devices = state.layout.devices
            // New space is zeroed like a new pool's, or counts as dirty.
            if added.allSatisfy({ devices[$0.device].discardReadsZeroes }) && state.dirtyBelow <= before {
                for segment in added {
                    try await devices[segment.device].discard(
                        offset: segment.deviceChunk * chunkBytes, length: segment.chunks * chunkBytes)
                }
            } else {
                state.dirtyBelow = total
                state.cleanNext = total
            }
            for segment in added { try await state.recordSegment(segment) }
            area.parameters[Parameter.chunkBytesAndDevices.rawValue] = chunkBytes | UInt64(devices.count) << 32
            try await state.commit()
            return state.chunkCount - before
        }
    }
}
