import Synchronization

/// A thin pool: data chunks on one or more block devices (image files or arrays) and copy-on-write
/// metadata on the first, holding thin volumes and snapshots that use chunks only where they were
/// written. The format and the reasoning are in docs/THIN-DESIGN.md and docs/FORMATS.md.
///
/// Every device starts with a ``ThinPoolLabel`` naming the pool; the metadata area follows the label
/// on device 0. Each volume's mappings (virtual chunk → pool chunk) are a B-tree of their own; a
/// snapshot shares its origin's tree by reference and the two part node by node as either changes
/// (copy-on-write of metadata nodes, then of the shared data chunk only). Data chunks carry
/// reference counts (the number of tree leaves naming them), so deleting any volume in any order
/// frees exactly the chunks no other volume uses.
///
/// Crash contract, as dm-thin's: when a flush on a volume completes, every write completed before it
/// survives a crash; a crash never exposes another volume's or a freed chunk's old data and never
/// leaves the pool unopenable.
public final class ThinPool: Sendable {
    /// Trees whose roots the metadata superblock records.
    enum Root: Int {
        case volumes = 0, referenceCounts = 1, segments = 2
    }

    /// Parameters in the metadata superblock.
    enum Parameter: Int {
        /// chunkBytes | deviceCount << 32.
        case magic = 0, chunkBytesAndDevices = 1, chunkCount = 2, nextVolume = 3, dirtyBelow = 4, uuidHigh = 5,
            uuidLow = 6, usedChunks = 7
    }

    static let parameterMagic: UInt64 = 0x324C_4F50_4E49_4854  // "THINPOL2" little-endian
    public static let defaultChunkBytes: UInt64 = 64 * 1024
    /// The memory a pool's metadata node cache may use unless told otherwise: 256 MiB, or an eighth
    /// of the machine's memory when that is less. A pool's memory beyond its cache is small (the
    /// open volumes' mapping tables, at most 1 MiB each, and one transaction's changed nodes, about
    /// 8 MiB), so the cache budget plus 64 MiB bounds a pool's resident memory.
    public static let defaultMetadataCacheBytes: UInt64 = MetadataArea.defaultCacheBytes
    /// Largest virtual size of a volume, in chunks.
    static let maximumVolumeChunks: UInt64 = 1 << 40

    public let name: String
    public let uuid: SpindleUUID
    /// What opening the pool found damaged but worked around (such as one damaged metadata
    /// superblock copy); empty for a healthy pool. The CLI prints these as warnings.
    public let openNotes: [String]
    public let chunkBytes: UInt64
    /// Whether the pool was opened on read-only devices: volumes can be read, nothing changes.
    public let isReadOnly: Bool
    /// Requests that looked a chunk mapping up and have not finished (see ``InFlightEpochs``).
    let inFlight: InFlightEpochs
    /// Everything that changes, behind the pool's lock.
    private let state: PoolStateLock
    /// The layout as of the last change, for reading without the lock.
    private let layout: Locked<ChunkLayout>
    private let warningPercent = Atomic<UInt64>(80)
    /// Whether ``close()`` ran.
    private let closed = Locked(false)
    /// Deletions carried on after open (see ``finishInterruptedDeletions()``); close stops them.
    let deletions = Locked<Task<Void, Never>?>(nil)
    /// Mappings a deletion frees per step (``deletionBatch``; tests make it smaller).
    let deletionStep = Atomic<Int>(ThinPool.deletionBatch)

    /// Chunks in the pool.
    public var chunkCount: UInt64 { layout.withLock { $0.chunkCount } }
    /// The pool's devices, device 0 (which holds the metadata) first.
    var devices: [any BlockDevice] { layout.withLock { $0.devices } }

    private init(name: String, uuid: SpindleUUID, layout: ChunkLayout, area: MetadataArea) {
        self.name = name
        self.uuid = uuid
        openNotes = area.openNotes
        chunkBytes = layout.chunkBytes
        isReadOnly = layout.devices.contains { $0.isReadOnly }
        inFlight = InFlightEpochs()
        let published = Locked(layout)
        self.layout = published
        state = PoolStateLock(
            PoolState(name: name, layout: layout, published: published, area: area, inFlight: inFlight))
    }

    /// Runs `body` with the pool's state, holding the pool's lock.
    func withState<Result: Sendable>(_ body: (PoolState) async throws -> Result) async rethrows -> Result {
        try await state.withState(body)
    }

    /// Metadata blocks for `chunks` data chunks: a mapping and a reference count per chunk in
    /// half-full nodes (127 entries of 16 bytes per 4 KiB), twice over for copy-on-write between
    /// commits, plus room for volume records: about 0.2% of the data.
    static func metadataBlocks(chunks: UInt64) -> UInt64 {
        max(256, chunks * 2 * 2 / 127 + 64)
    }

    /// Data chunks a metadata area of `blocks` blocks can describe.
    static func chunkCapacity(metadataBlocks blocks: UInt64) -> UInt64 {
        blocks <= 64 ? 0 : (blocks - 64) * 127 / 4
    }

    /// Formats a pool over `devices`. The metadata area is sized for twice the devices' data, so the
    /// pool can be extended to double its size.
    /// - Parameters:
    ///   - overwrite: format devices that hold something already (another pool, an array member, a
    ///     file system, any data), destroying it.
    /// - Throws: ``SpindleError`` for a bad name or chunk size, a device too small, or a device that
    ///   belongs to a pool already.
    ///   - metadataCacheBytes: memory for the metadata node cache (see ``defaultMetadataCacheBytes``).
    public static func create(
        name: String, devices: [any BlockDevice], chunkBytes: UInt64 = defaultChunkBytes, overwrite: Bool = false,
        metadataCacheBytes: UInt64 = defaultMetadataCacheBytes
    ) async throws -> ThinPool {
        try checkPoolName(name)
        guard !devices.isEmpty else { throw SpindleError(.invalidArgument, "a pool needs at least one device") }
        guard chunkBytes >= 64 * 1024, chunkBytes <= 1 << 20, chunkBytes & (chunkBytes - 1) == 0 else {
            throw SpindleError(
                .invalidArgument, "the chunk size \(chunkBytes) must be a power of two from 64 KiB to 1 MiB",
                path: devices[0].name)
        }
        for device in devices {
            if device.isReadOnly {
                throw SpindleError(.readOnly, "a pool cannot be created on a read-only device", path: device.name)
            }
            if !overwrite { try await DeviceSignature.refuseIfInUse(device, operation: "create pool") }
        }
        let roughChunks = devices.reduce(UInt64(0)) { $0 + $1.capacityBytes / chunkBytes }
        let blocks = metadataBlocks(chunks: roughChunks * 2)
        let metadataOffset = UInt64(ThinPoolLabel.bytes)
        let firstDataOffset =
            (metadataOffset + blocks * UInt64(MetadataNode.blockBytes) + chunkBytes - 1) / chunkBytes * chunkBytes
        guard devices[0].capacityBytes >= firstDataOffset + chunkBytes else {
            throw SpindleError(
                .invalidArgument,
                "the device is \(ByteSize.format(devices[0].capacityBytes)), too small for a pool's metadata (\(ByteSize.format(firstDataOffset))) and data",
                operation: "create pool", path: devices[0].name)
        }
        for device in devices.dropFirst() where device.capacityBytes < 2 * chunkBytes {
            throw SpindleError(
                .invalidArgument,
                "the device is \(ByteSize.format(device.capacityBytes)), too small for a label and one \(ByteSize.format(chunkBytes)) chunk",
                operation: "create pool", path: device.name)
        }
        var segments: [ChunkLayout.Segment] = []
        var total: UInt64 = 0
        for (index, device) in devices.enumerated() {
            let start = index == 0 ? firstDataOffset / chunkBytes : 1
            let chunks = device.capacityBytes / chunkBytes - start
            segments.append(ChunkLayout.Segment(firstChunk: total, chunks: chunks, device: index, deviceChunk: start))
            total += chunks
        }
        // Zero the data (a discard on an image file punches holes, at no cost) so that first writes
        // need not zero their chunks; on devices that would have to write the zeros, every chunk
        // starts dirty and first writes zero the rest of their chunk themselves.
        let zeroed = devices.allSatisfy(\.discardReadsZeroes)
        if zeroed {
            for segment in segments {
                try await devices[segment.device].discard(
                    offset: segment.deviceChunk * chunkBytes, length: segment.chunks * chunkBytes)
            }
        }
        let uuid = SpindleUUID.random()
        for (index, device) in devices.enumerated() {
            let label = ThinPoolLabel(
                poolUUID: uuid, poolName: name, deviceIndex: index, chunkBytes: chunkBytes,
                metadataOffset: index == 0 ? metadataOffset : 0, metadataBlocks: index == 0 ? blocks : 0)
            try await label.write(to: device)
        }
        let area = try await MetadataArea.format(
            device: devices[0], offset: metadataOffset, blockCount: blocks,
            parameters: [
                parameterMagic, chunkBytes | UInt64(devices.count) << 32, total, 1, zeroed ? 0 : total, uuid.high,
                uuid.low, 0,
            ], cacheBytes: metadataCacheBytes)
        area.roots[Root.volumes.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.segments.rawValue] = try await MetadataBTree.create(in: area)
        let pool = ThinPool(
            name: name, uuid: uuid, layout: ChunkLayout(chunkBytes: chunkBytes, devices: devices, segments: []),
            area: area)
        try await pool.withState { state in
            for segment in segments { try await state.recordSegment(segment) }
            try await state.commit()
        }
        return pool
    }

    /// Opens the pool whose devices are given, in any order, with `metadataCacheBytes` of memory for
    /// its metadata node cache (see ``defaultMetadataCacheBytes``): metadata larger than the cache is
    /// read again as it is needed.
    /// - Throws: ``SpindleError`` when a device has no label or another pool's, a device is missing
    ///   or given twice, or the metadata is corrupt.
    public static func open(
        devices given: [any BlockDevice], metadataCacheBytes: UInt64 = defaultMetadataCacheBytes
    ) async throws -> ThinPool {
        guard !given.isEmpty else { throw SpindleError(.invalidArgument, "no devices to open a pool from") }
        var labelled: [(label: ThinPoolLabel, device: any BlockDevice)] = []
        for device in given {
            guard let label = try await ThinPoolLabel.read(from: device) else {
                throw SpindleError(
                    .invalidArgument, "no thin pool label at offset 0 (not a pool device)", operation: "open pool",
                    path: device.name)
            }
            if let first = labelled.first, first.label.poolUUID != label.poolUUID {
                throw SpindleError(
                    .invalidArgument,
                    "the device belongs to pool \(label.poolName) (\(label.poolUUID)), not to pool \(first.label.poolName) (\(first.label.poolUUID)) of \(first.device.name)",
                    operation: "open pool", path: device.name)
            }
            if let twin = labelled.first(where: { $0.label.deviceIndex == label.deviceIndex }) {
                throw SpindleError(
                    .invalidArgument,
                    "the device and \(twin.device.name) both claim to be device \(label.deviceIndex) of pool \(label.poolName) (the same image given twice, or a copy)",
                    operation: "open pool", path: device.name)
            }
            labelled.append((label, device))
        }
        labelled.sort { $0.label.deviceIndex < $1.label.deviceIndex }
        let poolName = labelled[0].label.poolName
        guard labelled[0].label.deviceIndex == 0 else {
            throw SpindleError(
                .invalidArgument, "pool \(poolName) cannot open without its device 0, which holds the metadata",
                operation: "open pool")
        }
        let first = labelled[0]
        let area = try await MetadataArea.open(
            device: first.device, offset: first.label.metadataOffset,
            blockCount: first.label.metadataBlocks, cacheBytes: metadataCacheBytes)
        guard area.parameters[Parameter.magic.rawValue] == parameterMagic else {
            throw SpindleError(
                .corrupted, "the metadata area is not a thin pool's of this format", operation: "open pool",
                path: first.device.name)
        }
        let uuid = SpindleUUID(
            high: area.parameters[Parameter.uuidHigh.rawValue], low: area.parameters[Parameter.uuidLow.rawValue])
        guard uuid == first.label.poolUUID else {
            throw SpindleError(
                .corrupted, "the metadata belongs to pool \(uuid), the label to \(first.label.poolUUID)",
                operation: "open pool", path: first.device.name)
        }
        let deviceCount = Int(area.parameters[Parameter.chunkBytesAndDevices.rawValue] >> 32)
        if let stray = labelled.first(where: { $0.label.deviceIndex >= deviceCount }) {
            throw SpindleError(
                .invalidArgument,
                "the device is labelled device \(stray.label.deviceIndex) of pool \(poolName), which has \(deviceCount) devices (an extend that did not finish)",
                operation: "open pool", path: stray.device.name)
        }
        guard labelled.count == deviceCount else {
            let present = Set(labelled.map(\.label.deviceIndex))
            let missing = (0..<deviceCount).filter { !present.contains($0) }.map(String.init).joined(separator: ", ")
            throw SpindleError(
                .notFound, "pool \(poolName) has \(deviceCount) devices; device \(missing) is missing",
                operation: "open pool")
        }
        let chunkBytes = area.parameters[Parameter.chunkBytesAndDevices.rawValue] & 0xFFFF_FFFF
        let layout = try await ChunkLayout.load(
            from: area, devices: labelled.map(\.device), chunkBytes: chunkBytes,
            chunkCount: area.parameters[Parameter.chunkCount.rawValue], poolName: poolName)
        let pool = ThinPool(name: poolName, uuid: uuid, layout: layout, area: area)
        try await pool.withState { state in
            try await state.loadRecords()
            state.storedSharedChunks = state.sharedChunks
            for record in state.records.values {
                do {
                    try await area.countReferences(tree: record.root)
                } catch {
                    // The pool still opens, so `check` can report it and other volumes stay usable;
                    // I/O that reaches the damaged node fails with the same error.
                    state.damagedVolumes[record.id] = "\(error)"
                }
            }
            for record in state.deleting.values.sorted(by: { $0.id < $1.id }) {
                do {
                    try await area.countReferences(tree: record.root)
                } catch {
                    // A deleted volume whose tree cannot be read: its chunks cannot be found, so
                    // they stay allocated (`check` reports them as leaked) and the record goes.
                    state.deleting[record.id] = nil
                    if !state.isReadOnly { try await state.removeRecord(record.id) }
                }
            }
        }
        // A deletion that a crash or a close interrupted carries on in the background.
        if !pool.isReadOnly, await pool.withState({ !$0.deleting.isEmpty }) {
            pool.deletions.withLock { $0 = Task { try? await pool.finishInterruptedDeletions() } }
        }
        return pool
    }

    /// Makes every completed write durable and mapped: flushes the data, then commits the metadata.
    ///
    /// Only sealing the metadata transaction (and, after, making freed chunks reusable) happens
    /// under the pool's lock: the flushes and the metadata writes (on an image file, the file
    /// system's sync of blocks written since the last flush is the slow part) go on while other
    /// requests do. One sealed commit is written at a time; a commit that finds one being written
    /// waits for it with the lock let go. If the metadata cannot be written, the pool commits nothing more until it is
    /// opened again (see ``MetadataArea/SealedTransaction/fail(_:)``).
    public func commit() async throws {
        var start = try await withState { try await $0.beginCommit() }
        while case let .busy(gate) = start {
            await gate.lock()
            gate.unlock()
            start = try await withState { try await $0.beginCommit() }
        }
        guard case let .sealed(sealed) = start else { return }
        do {
            try await sealed.write()
        } catch {
            sealed.gate.unlock()
            throw error
        }
        sealed.gate.unlock()
        // Requests still using chunks the commit freed: waited for here, not under the lock.
        await inFlight.drain()
        await withState { await $0.completeCommit(sealed.sequence, drained: true) }
    }

    /// Commits, then closes the pool's devices: the pool owns them from `create`, `open` or
    /// `extend` on (the ownership rule in ``BlockDevice``). The devices are closed even when the
    /// commit fails; its error is thrown after. Closing twice is harmless.
    public func close() async throws {
        guard
            !closed.withLock({ closed in
                defer { closed = true }
                return closed
            })
        else { return }
        // A deletion still going on stops after its current step; the next open carries on.
        let deletion = deletions.withLock { $0 }
        deletion?.cancel()
        await deletion?.value
        var failure: (any Error)?
        do { try await commit() } catch { failure = error }
        for device in devices {
            do { try await device.close() } catch { failure = failure ?? error }
        }
        if let failure { throw failure }
    }

    // MARK: Status

    /// Space in the pool.
    public struct Usage: Sendable, Codable, Equatable {
        public var chunkBytes: UInt64
        public var chunks: UInt64
        public var usedChunks: UInt64
        public var metadataBlocks: UInt64
        public var usedMetadataBlocks: UInt64
        public var devices: Int
        public var sizeBytes: UInt64 { chunks * chunkBytes }
        public var usedBytes: UInt64 { usedChunks * chunkBytes }
        public var freeBytes: UInt64 { sizeBytes - usedBytes }
    }

    public var usage: Usage {
        get async {
            await withState { state in
                Usage(
                    chunkBytes: chunkBytes, chunks: state.chunkCount, usedChunks: state.usedChunks,
                    metadataBlocks: state.area.blockCount,
                    usedMetadataBlocks: UInt64(state.area.usedBlocks), devices: state.layout.devices.count)
            }
        }
    }

    /// Share of the pool's chunks in use above which ``warnings()`` speaks up (LVM's default: 80%).
    public var usageWarningPercent: UInt64 {
        get { warningPercent.load(ordering: .relaxed) }
        set { warningPercent.store(newValue, ordering: .relaxed) }
    }

    /// Conditions a person should hear about: the volumes promise more space than the pool has
    /// (over-provisioning, allowed), or use crossed ``usageWarningPercent``.
    public func warnings() async throws -> [String] {
        let percent = usageWarningPercent
        return await withState { state in
            var result: [String] = []
            let promised = state.records.values.reduce(UInt64(0)) { $0 + $1.sizeBytes }
            let (chunkCount, usedChunks) = (state.chunkCount, state.usedChunks)
            let capacity = chunkCount * chunkBytes
            if promised > capacity {
                result.append(
                    "pool \(name) is over-provisioned: its volumes total \(ByteSize.format(promised)) on \(ByteSize.format(capacity)) of space; writes fail once the pool is full"
                )
            }
            if chunkCount > 0 && usedChunks * 100 >= percent * chunkCount {
                result.append(
                    "pool \(name) is \(usedChunks * 100 / chunkCount)% full (\(usedChunks) of \(chunkCount) chunks); discard or delete data, or extend the pool"
                )
            }
            return result
        }
    }

    static func checkPoolName(_ poolName: String) throws(SpindleError) {
        guard !poolName.isEmpty, poolName.utf8.count <= 64, !poolName.contains("/"),
            !poolName.contains(where: \.isWhitespace)
        else {
            throw SpindleError(
                .invalidArgument, "the pool name '\(poolName)' must be 1 to 64 bytes without '/' or spaces")
        }
    }
}
