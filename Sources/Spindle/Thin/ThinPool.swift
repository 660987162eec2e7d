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
public final class ThinPool: @unchecked Sendable {
    // @unchecked Sendable: every access to the metadata, the records and the allocation state
    // happens under `lock`.

    /// Trees whose roots the metadata superblock records.
    enum Root: Int {
        case volumes = 0, referenceCounts = 1, segments = 2
    }

    /// Parameters in the metadata superblock.
    enum Parameter: Int {
        /// chunkBytes | deviceCount << 32.
        case magic = 0, chunkBytesAndDevices = 1, chunkCount = 2, nextVolume = 3, dirtyBelow = 4, uuidHigh = 5, uuidLow = 6, usedChunks = 7
    }

    static let parameterMagic: UInt64 = 0x324C_4F50_4E49_4854  // "THINPOL2" little-endian
    public static let defaultChunkBytes: UInt64 = 64 * 1024
    /// Largest virtual size of a volume, in chunks.
    static let maximumVolumeChunks: UInt64 = 1 << 40
    /// Metadata nodes changed in one transaction above which a write commits on its own (bounding
    /// the memory of a workload that never flushes; committing early is always allowed).
    static let automaticCommitNodes = 2048

    public let name: String
    public let uuid: SpindleUUID
    /// What opening the pool found damaged but worked around (such as one damaged metadata
    /// superblock copy); empty for a healthy pool. The CLI prints these as warnings.
    public var openNotes: [String] { area.openNotes }
    public let chunkBytes: UInt64
    private(set) var devices: [any BlockDevice]
    private(set) var segments: [Segment] = []
    public private(set) var chunkCount: UInt64
    /// Whether the pool was opened on read-only devices: volumes can be read, nothing changes.
    public let isReadOnly: Bool
    let area: MetadataArea
    let lock = AsyncMutex()
    let inFlight = InFlightEpochs()
    /// Whether ``close()`` ran.
    private let closed = Locked(false)
    var records: [UInt64: VolumeRecord] = [:]
    /// Volumes whose mapping tree could not be read on open, with the error.
    var damagedVolumes: [UInt64: String] = [:]
    var dirtyRecords: Set<UInt64> = []
    /// Chunks freed in the open transaction: committed mappings may still use them.
    var pendingFree: Set<UInt64> = []
    /// Chunks handed to a first write or a copy that is not mapped yet.
    var reserved: Set<UInt64> = []
    var cursor: UInt64 = 0
    var usedChunks: UInt64
    /// Chunks whose sharing ended in the open transaction: written by copy until it commits.
    var unsharedSinceCommit: Set<UInt64> = []
    /// Chunks with more than one referrer (kept in the volumes tree under id 0).
    var sharedChunks: UInt64 = 0
    var storedSharedChunks: UInt64 = .max
    /// Chunks from here on have held no data since they were zeroed (discarded at creation or
    /// extension): a first write into one writes only its data. Recorded in the metadata and raised
    /// in batches, always ahead of ``cleanNext``, so that after a crash every chunk that may have
    /// been written counts as dirty.
    var dirtyBelow: UInt64
    /// The next never-used chunk to hand out (in memory; reopening starts at ``dirtyBelow``).
    var cleanNext: UInt64
    lazy var dataReferences = DataReferences(pool: self)

    /// A run of pool chunks stored contiguously on one device.
    struct Segment: Equatable {
        var firstChunk: UInt64
        var chunks: UInt64
        var device: Int
        /// Where the run starts on its device, in chunks.
        var deviceChunk: UInt64
    }

    /// A volume's record, kept in memory and written to the volumes tree at each commit.
    struct VolumeRecord {
        var id: UInt64
        var name: String
        var sizeBytes: UInt64
        var root: UInt64
        var mappedChunks: UInt64
        var origin: UInt64
        var readOnly: Bool
        var createdSeconds: UInt64
    }
    static let recordFields: UInt64 = 14

    private init(name: String, uuid: SpindleUUID, devices: [any BlockDevice], area: MetadataArea) {
        self.name = name
        self.uuid = uuid
        self.devices = devices
        self.area = area
        isReadOnly = devices.contains { $0.isReadOnly }
        chunkBytes = area.parameters[Parameter.chunkBytesAndDevices.rawValue] & 0xFFFF_FFFF
        chunkCount = area.parameters[Parameter.chunkCount.rawValue]
        usedChunks = area.parameters[Parameter.usedChunks.rawValue]
        dirtyBelow = area.parameters[Parameter.dirtyBelow.rawValue]
        cleanNext = dirtyBelow
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
    public static func create(
        name: String, devices: [any BlockDevice], chunkBytes: UInt64 = defaultChunkBytes, overwrite: Bool = false
    ) async throws -> ThinPool {
        try checkPoolName(name)
        guard !devices.isEmpty else { throw SpindleError(.invalidArgument, "a pool needs at least one device") }
        guard chunkBytes >= 64 * 1024, chunkBytes <= 1 << 20, chunkBytes & (chunkBytes - 1) == 0 else {
            throw SpindleError(.invalidArgument, "the chunk size \(chunkBytes) must be a power of two from 64 KiB to 1 MiB", path: devices[0].name)
        }
        for device in devices {
            if device.isReadOnly { throw SpindleError(.readOnly, "a pool cannot be created on a read-only device", path: device.name) }
            if !overwrite { try await DeviceSignature.refuseIfInUse(device, operation: "create pool") }
        }
        let roughChunks = devices.reduce(UInt64(0)) { $0 + $1.capacityBytes / chunkBytes }
        let blocks = metadataBlocks(chunks: roughChunks * 2)
        let metadataOffset = UInt64(ThinPoolLabel.bytes)
        let firstDataOffset = (metadataOffset + blocks * UInt64(MetadataNode.blockBytes) + chunkBytes - 1) / chunkBytes * chunkBytes
        guard devices[0].capacityBytes >= firstDataOffset + chunkBytes else {
            throw SpindleError(.invalidArgument, "the device is \(ByteSize.format(devices[0].capacityBytes)), too small for a pool's metadata (\(ByteSize.format(firstDataOffset))) and data",
                               operation: "create pool", path: devices[0].name)
        }
        for device in devices.dropFirst() where device.capacityBytes < 2 * chunkBytes {
            throw SpindleError(.invalidArgument, "the device is \(ByteSize.format(device.capacityBytes)), too small for a label and one \(ByteSize.format(chunkBytes)) chunk",
                               operation: "create pool", path: device.name)
        }
        var segments: [Segment] = []
        var total: UInt64 = 0
        for (index, device) in devices.enumerated() {
            let start = index == 0 ? firstDataOffset / chunkBytes : 1
            let chunks = device.capacityBytes / chunkBytes - start
            segments.append(Segment(firstChunk: total, chunks: chunks, device: index, deviceChunk: start))
            total += chunks
        }
        // Zero the data (a discard on an image file punches holes, at no cost) so that first writes
        // need not zero their chunks; on devices that would have to write the zeros, every chunk
        // starts dirty and first writes zero the rest of their chunk themselves.
        let zeroed = devices.allSatisfy(\.discardReadsZeroes)
        if zeroed {
            for segment in segments {
                try await devices[segment.device].discard(offset: segment.deviceChunk * chunkBytes, length: segment.chunks * chunkBytes)
            }
        }
        let uuid = SpindleUUID.random()
        for (index, device) in devices.enumerated() {
            let label = ThinPoolLabel(poolUUID: uuid, poolName: name, deviceIndex: index, chunkBytes: chunkBytes,
                                      metadataOffset: index == 0 ? metadataOffset : 0, metadataBlocks: index == 0 ? blocks : 0)
            try await label.write(to: device)
        }
        let area = try await MetadataArea.format(
            device: devices[0], offset: metadataOffset, blockCount: blocks,
            parameters: [parameterMagic, chunkBytes | UInt64(devices.count) << 32, total, 1, zeroed ? 0 : total, uuid.high, uuid.low, 0])
        area.roots[Root.volumes.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.segments.rawValue] = try await MetadataBTree.create(in: area)
        let pool = ThinPool(name: name, uuid: uuid, devices: devices, area: area)
        for segment in segments { try await pool.recordSegment(segment) }
        try await pool.lock.withLock { try await pool.commitLocked() }
        return pool
    }

    /// Opens the pool whose devices are given, in any order.
    /// - Throws: ``SpindleError`` when a device has no label or another pool's, a device is missing
    ///   or given twice, or the metadata is corrupt.
    public static func open(devices given: [any BlockDevice], cacheNodes: Int = 4096) async throws -> ThinPool {
        guard !given.isEmpty else { throw SpindleError(.invalidArgument, "no devices to open a pool from") }
        var labelled: [(label: ThinPoolLabel, device: any BlockDevice)] = []
        for device in given {
            guard let label = try await ThinPoolLabel.read(from: device) else {
                throw SpindleError(.invalidArgument, "no thin pool label at offset 0 (not a pool device)", operation: "open pool", path: device.name)
            }
            if let first = labelled.first, first.label.poolUUID != label.poolUUID {
                throw SpindleError(.invalidArgument, "the device belongs to pool \(label.poolName) (\(label.poolUUID)), not to pool \(first.label.poolName) (\(first.label.poolUUID)) of \(first.device.name)",
                                   operation: "open pool", path: device.name)
            }
            if let twin = labelled.first(where: { $0.label.deviceIndex == label.deviceIndex }) {
                throw SpindleError(.invalidArgument, "the device and \(twin.device.name) both claim to be device \(label.deviceIndex) of pool \(label.poolName) (the same image given twice, or a copy)",
                                   operation: "open pool", path: device.name)
            }
            labelled.append((label, device))
        }
        labelled.sort { $0.label.deviceIndex < $1.label.deviceIndex }
        let poolName = labelled[0].label.poolName
        guard labelled[0].label.deviceIndex == 0 else {
            throw SpindleError(.invalidArgument, "pool \(poolName) cannot open without its device 0, which holds the metadata", operation: "open pool")
        }
        let first = labelled[0]
        let area = try await MetadataArea.open(device: first.device, offset: first.label.metadataOffset,
                                               blockCount: first.label.metadataBlocks, cacheLimit: cacheNodes)
        guard area.parameters[Parameter.magic.rawValue] == parameterMagic else {
            throw SpindleError(.invalidArgument, "the metadata area is not a thin pool's of this format", operation: "open pool", path: first.device.name)
        }
        let uuid = SpindleUUID(high: area.parameters[Parameter.uuidHigh.rawValue], low: area.parameters[Parameter.uuidLow.rawValue])
        guard uuid == first.label.poolUUID else {
            throw SpindleError(.invalidArgument, "the metadata belongs to pool \(uuid), the label to \(first.label.poolUUID)", operation: "open pool", path: first.device.name)
        }
        let deviceCount = Int(area.parameters[Parameter.chunkBytesAndDevices.rawValue] >> 32)
        if let stray = labelled.first(where: { $0.label.deviceIndex >= deviceCount }) {
            throw SpindleError(.invalidArgument, "the device is labelled device \(stray.label.deviceIndex) of pool \(poolName), which has \(deviceCount) devices (an extend that did not finish)",
                               operation: "open pool", path: stray.device.name)
        }
        guard labelled.count == deviceCount else {
            let present = Set(labelled.map(\.label.deviceIndex))
            let missing = (0..<deviceCount).filter { !present.contains($0) }.map(String.init).joined(separator: ", ")
            throw SpindleError(.notFound, "pool \(poolName) has \(deviceCount) devices; device \(missing) is missing", operation: "open pool")
        }
        let pool = ThinPool(name: poolName, uuid: uuid, devices: labelled.map(\.device), area: area)
        try await pool.loadSegments()
        try await pool.loadRecords()
        pool.storedSharedChunks = pool.sharedChunks
        for record in pool.records.values {
            do {
                try await area.countReferences(tree: record.root)
            } catch {
                // The pool still opens, so `check` can report it and other volumes stay usable;
                // I/O that reaches the damaged node fails with the same error.
                pool.damagedVolumes[record.id] = "\(error)"
            }
        }
        return pool
    }

    /// Makes every completed write durable and mapped: flushes the data, then commits the metadata.
    public func commit() async throws {
        try await lock.withLock { try await commitLocked() }
    }

    /// Commits, then closes the pool's devices: the pool owns them from `create`, `open` or
    /// `extend` on (the ownership rule in ``BlockDevice``). The devices are closed even when the
    /// commit fails; its error is thrown after. Closing twice is harmless.
    public func close() async throws {
        guard !closed.withLock({ closed in defer { closed = true }; return closed }) else { return }
        var failure: (any Error)?
        do { try await commit() } catch { failure = error }
        for device in await lock.withLock({ devices }) {
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
            await lock.withLock {
                Usage(chunkBytes: chunkBytes, chunks: chunkCount, usedChunks: usedChunks,
                      metadataBlocks: area.blockCount, usedMetadataBlocks: UInt64(area.usedBlocks), devices: devices.count)
            }
        }
    }

    /// Share of the pool's chunks in use above which ``warnings()`` speaks up (LVM's default: 80%).
    public var usageWarningPercent: UInt64 = 80

    /// Conditions a person should hear about: the volumes promise more space than the pool has
    /// (over-provisioning, allowed), or use crossed ``usageWarningPercent``.
    public func warnings() async throws -> [String] {
        await lock.withLock {
            var result: [String] = []
            let promised = records.values.reduce(UInt64(0)) { $0 + $1.sizeBytes }
            let capacity = chunkCount * chunkBytes
            if promised > capacity {
                result.append("pool \(name) is over-provisioned: its volumes total \(ByteSize.format(promised)) on \(ByteSize.format(capacity)) of space; writes fail once the pool is full")
            }
            if chunkCount > 0 && usedChunks * 100 >= usageWarningPercent * chunkCount {
                result.append("pool \(name) is \(usedChunks * 100 / chunkCount)% full (\(usedChunks) of \(chunkCount) chunks); discard or delete data, or extend the pool")
            }
            return result
        }
    }

    // MARK: Growing

    /// Grows the pool: by the space its devices gained since it was created or last extended (an
    /// image made larger, an array that grew), and by `adding` new devices. Returns the chunks added.
    /// - Throws: ``SpindleError`` when a new device belongs to a pool, is too small, or the metadata
    ///   area (sized at creation for twice the data) cannot describe the larger pool.
    @discardableResult
    public func extend(adding newDevices: [any BlockDevice] = [], overwrite: Bool = false) async throws -> UInt64 {
        try await lock.withLock {
            let before = chunkCount
            var added: [Segment] = []
            var total = chunkCount
            for (index, device) in devices.enumerated() {
                let end = segments.filter { $0.device == index }.map { $0.deviceChunk + $0.chunks }.max() ?? 1
                let available = device.capacityBytes / chunkBytes
                if available > end {
                    added.append(Segment(firstChunk: total, chunks: available - end, device: index, deviceChunk: end))
                    total += available - end
                }
            }
            for (offset, device) in newDevices.enumerated() {
                if device.isReadOnly { throw SpindleError(.readOnly, "a read-only device cannot join pool \(name)", path: device.name) }
                if devices.contains(where: { $0 === device }) {
                    throw SpindleError(.invalidArgument, "the device is in pool \(name) already", operation: "extend pool", path: device.name)
                }
                if !overwrite {
                    // A device this pool labelled in an extend that did not commit is this pool's to reuse.
                    let ours = (try? await ThinPoolLabel.read(from: device))??.poolUUID == uuid
                    if !ours { try await DeviceSignature.refuseIfInUse(device, operation: "extend pool") }
                }
                guard device.capacityBytes >= 2 * chunkBytes else {
                    throw SpindleError(.invalidArgument, "the device is \(ByteSize.format(device.capacityBytes)), too small for a label and one chunk",
                                       operation: "extend pool", path: device.name)
                }
                let chunks = device.capacityBytes / chunkBytes - 1
                added.append(Segment(firstChunk: total, chunks: chunks, device: devices.count + offset, deviceChunk: 1))
                total += chunks
            }
            guard total > chunkCount else { return 0 }
            let capacity = Self.chunkCapacity(metadataBlocks: area.blockCount)
            guard total <= capacity else {
                throw SpindleError(.noSpace, "pool \(name)'s metadata area (\(ByteSize.format(area.blockCount * UInt64(MetadataNode.blockBytes)))) describes at most \(ByteSize.format(capacity * chunkBytes)) of data; the pool would grow to \(ByteSize.format(total * chunkBytes))",
                                   operation: "extend pool")
            }
            for (offset, device) in newDevices.enumerated() {
                let label = ThinPoolLabel(poolUUID: uuid, poolName: name, deviceIndex: devices.count + offset, chunkBytes: chunkBytes,
                                          metadataOffset: 0, metadataBlocks: 0)
                try await label.write(to: device)
            }
            devices += newDevices
            // New space is zeroed like a new pool's, or counts as dirty.
            if added.allSatisfy({ devices[$0.device].discardReadsZeroes }) && dirtyBelow <= chunkCount {
                for segment in added {
                    try await devices[segment.device].discard(offset: segment.deviceChunk * chunkBytes, length: segment.chunks * chunkBytes)
                }
            } else {
                dirtyBelow = total
                cleanNext = total
            }
            for segment in added { try await recordSegment(segment) }
            area.parameters[Parameter.chunkBytesAndDevices.rawValue] = chunkBytes | UInt64(devices.count) << 32
            try await commitLocked()
            return chunkCount - before
        }
    }

    // MARK: Internals (callers hold `lock`, except during create and open)

    func commitLocked() async throws {
        for id in dirtyRecords {
            if let record = records[id] { try await storeRecord(record) }
        }
        dirtyRecords.removeAll()
        if sharedChunks != storedSharedChunks && !isReadOnly {
            try await storePoolFields()
            storedSharedChunks = sharedChunks
        }
        area.parameters[Parameter.usedChunks.rawValue] = usedChunks
        area.parameters[Parameter.chunkCount.rawValue] = chunkCount
        area.parameters[Parameter.dirtyBelow.rawValue] = dirtyBelow
        if isReadOnly {
            guard !area.hasChanges else {
                throw SpindleError(.readOnly, "pool \(name) is open read-only", operation: "commit", path: name)
            }
            return
        }
        // Data on every device first; the metadata commit flushes device 0 before its superblock.
        if area.hasChanges {
            for device in devices.dropFirst() { try await device.flush() }
            try await area.commit()
        } else {
            for device in devices { try await device.flush() }
        }
        // Requests that looked up a mapping before the chunks in `pendingFree` were unmapped must
        // finish before those chunks can be handed out again.
        await inFlight.drain()
        pendingFree.removeAll()
        unsharedSinceCommit.removeAll()
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

    private func recordSegment(_ segment: Segment) async throws {
        area.roots[Root.segments.rawValue] = try await MetadataBTree.insert(
            segment.firstChunk, value: UInt64(segment.device) << 48 | segment.deviceChunk,
            root: area.roots[Root.segments.rawValue], in: area)
        segments.append(segment)
        chunkCount = segment.firstChunk + segment.chunks
    }

    private func loadSegments() async throws {
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.segments.rawValue], store: area) { key, value in
            found.append((key, value))
            return true
        }
        for (index, (first, value)) in found.enumerated() {
            let end = index + 1 < found.count ? found[index + 1].0 : chunkCount
            let device = Int(value >> 48)
            guard device < devices.count, end > first, first == (index == 0 ? 0 : found[index - 1].0 + segments[index - 1].chunks) else {
                throw SpindleError(.ioFailed, "pool \(name)'s segment table is corrupt at chunk \(first)", operation: "open pool", path: devices[0].name)
            }
            let segment = Segment(firstChunk: first, chunks: end - first, device: device, deviceChunk: value & ((1 << 48) - 1))
            guard (segment.deviceChunk + segment.chunks) * chunkBytes <= devices[device].capacityBytes else {
                throw SpindleError(.ioFailed, "pool \(name) keeps chunks up to \(ByteSize.format((segment.deviceChunk + segment.chunks) * chunkBytes)) on this device, but it has only \(ByteSize.format(devices[device].capacityBytes)) (did it shrink?)",
                                   operation: "open pool", path: devices[device].name)
            }
            segments.append(segment)
        }
        guard !segments.isEmpty else {
            throw SpindleError(.ioFailed, "pool \(name) has no data segments (corrupt metadata)", operation: "open pool", path: devices[0].name)
        }
    }

    static func checkPoolName(_ poolName: String) throws(SpindleError) {
        guard !poolName.isEmpty, poolName.utf8.count <= 64, !poolName.contains("/"), !poolName.contains(where: \.isWhitespace) else {
            throw SpindleError(.invalidArgument, "the pool name '\(poolName)' must be 1 to 64 bytes without '/' or spaces")
        }
    }
}

/// Data chunks' reference counts, as the mapping trees' leaves see them: a copied shared leaf adds a
/// referrer to each chunk it names, a released leaf drops one, and a chunk nobody refers to becomes
/// free once the transaction commits.
final class DataReferences: MetadataValueReferences {
    unowned let pool: ThinPool

    init(pool: ThinPool) { self.pool = pool }

    func retain(_ values: [UInt64]) async throws {
        for chunk in values { try await pool.adjustReferences(chunk, by: 1) }
    }

    func release(_ values: [UInt64]) async throws {
        for chunk in values { try await pool.adjustReferences(chunk, by: -1) }
    }
}
