/// A thin pool on one block device: a metadata area at its start and data chunks after it, holding
/// thin volumes that use chunks only where they were written (see docs/THIN-DESIGN.md).
///
/// This is the first slice of issue #4: volumes that allocate on first write, read zeros where never
/// written, free chunks on discard and deletion, refuse writes clearly when the pool is full, and
/// keep dm-thin's flush contract through crashes. Snapshots, resizing, several devices, `pool check`
/// and the CLI are still to come.
public final class ThinPool: @unchecked Sendable {
    // @unchecked Sendable: every access to `area` and the allocation state happens under `lock`.

    /// Trees in the metadata area.
    enum Root: Int {
        case mappings = 0, referenceCounts = 1, volumes = 2
    }

    /// Parameters in the metadata superblock.
    enum Parameter: Int {
        case magic = 0, chunkBytes = 1, dataOffset = 2, chunkCount = 3, nextVolume = 4
    }

    static let parameterMagic: UInt64 = 0x4C4F_4F50_4E49_4854  // "THINPOOL"
    /// Virtual chunks per volume: keys are volume << 40 | chunk.
    static let chunkBits: UInt64 = 40
    public static let defaultChunkBytes: UInt64 = 64 * 1024

    public let device: any BlockDevice
    public let name: String
    public let chunkBytes: UInt64
    public let dataOffset: UInt64
    public let chunkCount: UInt64
    let area: MetadataArea
    let lock = AsyncMutex()
    /// Chunks freed in the open transaction: the committed mappings may still use them.
    var pendingFree: Set<UInt64> = []
    var cursor: UInt64 = 0
    var usedChunks: UInt64 = 0

    private init(device: any BlockDevice, name: String, area: MetadataArea) {
        self.device = device
        self.name = name
        self.area = area
        chunkBytes = area.parameters[Parameter.chunkBytes.rawValue]
        dataOffset = area.parameters[Parameter.dataOffset.rawValue]
        chunkCount = area.parameters[Parameter.chunkCount.rawValue]
    }

    /// Metadata blocks for a pool: room for a mapping and a reference count per chunk, twice over
    /// for copy-on-write, at 4 KiB per 127 entries (half-full nodes), and at least 1 MiB.
    static func metadataBlocks(chunks: UInt64) -> UInt64 {
        max(256, chunks * 2 * 2 / 127 + 64)
    }

    /// Formats a pool over `device`.
    /// - Throws: ``SpindleError`` for a bad chunk size or a device too small for metadata and one chunk.
    public static func create(name: String, device: any BlockDevice, chunkBytes: UInt64 = defaultChunkBytes) async throws -> ThinPool {
        guard chunkBytes >= 64 * 1024, chunkBytes <= 1 << 20, chunkBytes & (chunkBytes - 1) == 0 else {
            throw SpindleError(.invalidArgument, "the chunk size \(chunkBytes) must be a power of two from 64 KiB to 1 MiB", path: device.name)
        }
        let roughChunks = device.capacityBytes / chunkBytes
        let blocks = metadataBlocks(chunks: roughChunks)
        let dataOffset = (blocks * UInt64(MetadataNode.blockBytes) + chunkBytes - 1) / chunkBytes * chunkBytes
        guard device.capacityBytes > dataOffset else {
            throw SpindleError(.invalidArgument, "the device is \(device.capacityBytes) bytes, too small for a pool's metadata (\(dataOffset) bytes) and data",
                               path: device.name)
        }
        let chunks = (device.capacityBytes - dataOffset) / chunkBytes
        let area = try await MetadataArea.format(
            device: device, offset: 0, blockCount: dataOffset / UInt64(MetadataNode.blockBytes),
            parameters: [parameterMagic, chunkBytes, dataOffset, chunks, 1])
        area.roots[Root.mappings.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.create(in: area)
        area.roots[Root.volumes.rawValue] = try await MetadataBTree.create(in: area)
        try await area.commit()
        return ThinPool(device: device, name: name, area: area)
    }

    /// Opens a pool, counting its used chunks.
    public static func open(name: String, device: any BlockDevice) async throws -> ThinPool {
        let buffer = AlignedBuffer(count: 8192, zeroed: false)
        try await device.read(into: buffer, at: 0)
        let blockCount: UInt64
        switch MetadataArea.decodeSuperblockBlockCount(buffer.array) {
        case let .some(count): blockCount = count
        case .none: throw SpindleError(.invalidArgument, "no thin pool metadata", operation: "open pool", path: device.name)
        }
        let area = try await MetadataArea.open(device: device, offset: 0, blockCount: blockCount)
        guard area.parameters[Parameter.magic.rawValue] == parameterMagic else {
            throw SpindleError(.invalidArgument, "the metadata area is not a thin pool's", operation: "open pool", path: device.name)
        }
        let pool = ThinPool(device: device, name: name, area: area)
        var used: UInt64 = 0
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.referenceCounts.rawValue], store: area) { _, _ in
            used += 1
            return true
        }
        pool.usedChunks = used
        return pool
    }

    // MARK: Volumes

    /// A volume's description.
    public struct VolumeInfo: Sendable, Codable, Equatable {
        public var id: UInt64
        public var name: String
        public var sizeBytes: UInt64
        public var mappedChunks: UInt64
    }

    /// Space in the pool.
    public struct Usage: Sendable, Codable, Equatable {
        public var chunkBytes: UInt64
        public var chunks: UInt64
        public var usedChunks: UInt64
        public var metadataBlocks: UInt64
        public var usedMetadataBlocks: UInt64
    }

    public var usage: Usage {
        get async {
            await lock.withLock {
                Usage(chunkBytes: chunkBytes, chunks: chunkCount, usedChunks: usedChunks,
                      metadataBlocks: area.blockCount, usedMetadataBlocks: UInt64(area.usedBlocks))
            }
        }
    }

    /// Share of the pool's chunks in use above which ``warnings()`` speaks up (LVM's default: 80%).
    public var usageWarningPercent: UInt64 = 80

    /// Conditions a person should hear about: the volumes promise more space than the pool has
    /// (over-provisioning, allowed), or use crossed ``usageWarningPercent``.
    public func warnings() async throws -> [String] {
        try await lock.withLock {
            var result: [String] = []
            let promised = try await volumesLocked().reduce(UInt64(0)) { $0 + $1.sizeBytes }
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

    /// Creates a volume of `sizeBytes` (a multiple of 4 KiB); its space is allocated on first write.
    /// Over-provisioning is allowed.
    public func createVolume(name volumeName: String, sizeBytes: UInt64) async throws -> ThinVolume {
        try checkName(volumeName)
        try checkSize(sizeBytes)
        let id: UInt64 = try await lock.withLock {
            if try await findVolume(volumeName) != nil {
                throw SpindleError(.alreadyExists, "pool \(name) has a volume named '\(volumeName)' already", path: name)
            }
            let id = area.parameters[Parameter.nextVolume.rawValue]
            area.parameters[Parameter.nextVolume.rawValue] = id + 1
            area.roots[Root.volumes.rawValue] = try await MetadataBTree.insert(
                id << 8, value: sizeBytes, root: area.roots[Root.volumes.rawValue], in: area)
            try await writeName(volumeName, volume: id)
            try await commitLocked()
            return id
        }
        return ThinVolume(pool: self, id: id, name: volumeName, sizeBytes: sizeBytes)
    }

    /// Opens an existing volume.
    public func openVolume(name volumeName: String) async throws -> ThinVolume {
        let info = try await lock.withLock { try await requireVolume(volumeName) }
        return ThinVolume(pool: self, id: info.id, name: info.name, sizeBytes: info.sizeBytes)
    }

    /// Every volume, by id.
    public func volumes() async throws -> [VolumeInfo] {
        try await lock.withLock { try await volumesLocked() }
    }

    /// Deletes a volume; its chunks return to the pool when the deletion commits (it does, before
    /// this returns).
    public func deleteVolume(name volumeName: String) async throws {
        try await lock.withLock {
            let info = try await requireVolume(volumeName)
            try await unmap(volume: info.id, chunks: 0...((UInt64(1) << Self.chunkBits) - 1))
            var root = area.roots[Root.volumes.rawValue]
            for field in 0..<9 {
                root = try await MetadataBTree.remove(info.id << 8 | UInt64(field), root: root, in: area).root
            }
            area.roots[Root.volumes.rawValue] = root
            try await commitLocked()
        }
    }

    /// Changes a volume's size. Growing adds unwritten (zero) space; shrinking frees the chunks past
    /// the new end and zeroes the rest of a chunk the new end cuts, so a later grow reads zeros there.
    /// Open ``ThinVolume`` objects keep the size they were opened with: open the volume again.
    public func resizeVolume(name volumeName: String, sizeBytes: UInt64) async throws {
        try checkSize(sizeBytes)
        try await lock.withLock {
            let info = try await requireVolume(volumeName)
            if sizeBytes < info.sizeBytes {
                let firstWhole = (sizeBytes + chunkBytes - 1) / chunkBytes
                try await unmap(volume: info.id, chunks: firstWhole...((UInt64(1) << Self.chunkBits) - 1))
                let within = sizeBytes % chunkBytes
                if within != 0, let physical = try await mapping(volume: info.id, chunk: sizeBytes / chunkBytes) {
                    let zeros = AlignedBuffer(count: Int(chunkBytes - within))
                    try await device.write(from: zeros, at: dataOffset + physical * chunkBytes + within)
                }
            }
            area.roots[Root.volumes.rawValue] = try await MetadataBTree.insert(
                info.id << 8, value: sizeBytes, root: area.roots[Root.volumes.rawValue], in: area)
            try await commitLocked()
        }
    }

    /// Renames a volume.
    public func renameVolume(name volumeName: String, to newName: String) async throws {
        try checkName(newName)
        try await lock.withLock {
            let info = try await requireVolume(volumeName)
            if try await findVolume(newName) != nil {
                throw SpindleError(.alreadyExists, "pool \(name) has a volume named '\(newName)' already", path: name)
            }
            try await writeName(newName, volume: info.id)
            try await commitLocked()
        }
    }

    private func writeName(_ volumeName: String, volume id: UInt64) async throws {
        var root = area.roots[Root.volumes.rawValue]
        var nameBytes = Array(volumeName.utf8)
        nameBytes += [UInt8](repeating: 0, count: 64 - nameBytes.count)
        for field in 0..<8 {
            let word = nameBytes[(field * 8)..<(field * 8 + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            root = try await MetadataBTree.insert(id << 8 | UInt64(field + 1), value: word, root: root, in: area)
        }
        area.roots[Root.volumes.rawValue] = root
    }

    /// Makes every completed write durable and mapped: flushes the data, then commits the metadata.
    public func commit() async throws {
        try await lock.withLock { try await commitLocked() }
    }

    // MARK: Internals (callers hold `lock`)

    func commitLocked() async throws {
        try await device.flush()
        try await area.commit()
        pendingFree.removeAll()
    }

    private func volumesLocked() async throws -> [VolumeInfo] {
        var records: [UInt64: (size: UInt64, name: [UInt64])] = [:]
        try await MetadataBTree.forEach(in: 0...UInt64.max, root: area.roots[Root.volumes.rawValue], store: area) { key, value in
            let id = key >> 8
            let field = Int(key & 0xFF)
            var record = records[id] ?? (0, [UInt64](repeating: 0, count: 8))
            if field == 0 { record.size = value } else { record.name[field - 1] = value }
            records[id] = record
            return true
        }
        var result: [VolumeInfo] = []
        for (id, record) in records.sorted(by: { $0.key < $1.key }) {
            var bytes: [UInt8] = []
            for word in record.name { for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) } }
            let nameText = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            var mapped: UInt64 = 0
            try await MetadataBTree.forEach(in: (id << Self.chunkBits)...((id << Self.chunkBits) | ((1 << Self.chunkBits) - 1)),
                                            root: area.roots[Root.mappings.rawValue], store: area) { _, _ in
                mapped += 1
                return true
            }
            result.append(VolumeInfo(id: id, name: nameText, sizeBytes: record.size, mappedChunks: mapped))
        }
        return result
    }

    private func findVolume(_ volumeName: String) async throws -> VolumeInfo? {
        try await volumesLocked().first { $0.name == volumeName }
    }

    private func requireVolume(_ volumeName: String) async throws -> VolumeInfo {
        guard let info = try await findVolume(volumeName) else {
            throw SpindleError(.notFound, "pool \(name) has no volume named '\(volumeName)'", path: name)
        }
        return info
    }

    private func checkName(_ volumeName: String) throws(SpindleError) {
        guard !volumeName.isEmpty, volumeName.utf8.count <= 64, !volumeName.contains("/") else {
            throw SpindleError(.invalidArgument, "the volume name '\(volumeName)' must be 1 to 64 bytes without '/'", path: name)
        }
    }

    private func checkSize(_ sizeBytes: UInt64) throws(SpindleError) {
        guard sizeBytes > 0, sizeBytes % 4096 == 0, sizeBytes / chunkBytes < 1 << Self.chunkBits else {
            throw SpindleError(.invalidArgument, "the volume size \(sizeBytes) must be a positive multiple of 4 KiB", path: name)
        }
    }

    func mapping(volume: UInt64, chunk: UInt64) async throws -> UInt64? {
        try await MetadataBTree.lookup(volume << Self.chunkBits | chunk, root: area.roots[Root.mappings.rawValue], in: area)
    }

    /// A free chunk, counted as used; not one freed in this transaction.
    func allocateChunk() async throws -> UInt64 {
        guard usedChunks + UInt64(pendingFree.count) < chunkCount else {
            let percent = chunkCount == 0 ? 100 : usedChunks * 100 / chunkCount
            throw SpindleError(
                .noSpace,
                "pool \(name) is full: \(usedChunks) of \(chunkCount) chunks used (\(percent)% of \(ByteSize.format(chunkCount * chunkBytes)))\(pendingFree.isEmpty ? "" : "; \(pendingFree.count) chunks freed since the last flush come back after it")",
                operation: "allocate", path: name)
        }
        let root = area.roots[Root.referenceCounts.rawValue]
        for _ in 0..<chunkCount {
            let candidate = cursor
            cursor = cursor + 1 >= chunkCount ? 0 : cursor + 1
            if pendingFree.contains(candidate) { continue }
            if try await MetadataBTree.lookup(candidate, root: root, in: area) == nil {
                area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.insert(candidate, value: 1, root: root, in: area)
                usedChunks += 1
                return candidate
            }
        }
        throw SpindleError(.noSpace, "pool \(name) has no free chunk", operation: "allocate", path: name)
    }

    /// Drops a chunk allocated in this transaction that ended up unused (a concurrent first write won).
    func returnChunk(_ chunk: UInt64) async throws {
        area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.remove(
            chunk, root: area.roots[Root.referenceCounts.rawValue], in: area).root
        usedChunks -= 1
    }

    func map(volume: UInt64, chunk: UInt64, to physical: UInt64) async throws {
        area.roots[Root.mappings.rawValue] = try await MetadataBTree.insert(
            volume << Self.chunkBits | chunk, value: physical, root: area.roots[Root.mappings.rawValue], in: area)
    }

    /// Unmaps a volume's chunks in `chunks`; each freed chunk is reusable after the next commit.
    func unmap(volume: UInt64, chunks: ClosedRange<UInt64>) async throws {
        var found: [(UInt64, UInt64)] = []
        try await MetadataBTree.forEach(
            in: (volume << Self.chunkBits | chunks.lowerBound)...(volume << Self.chunkBits | chunks.upperBound),
            root: area.roots[Root.mappings.rawValue], store: area) { key, value in
            found.append((key, value))
            return true
        }
        for (key, physical) in found {
            area.roots[Root.mappings.rawValue] = try await MetadataBTree.remove(key, root: area.roots[Root.mappings.rawValue], in: area).root
            area.roots[Root.referenceCounts.rawValue] = try await MetadataBTree.remove(
                physical, root: area.roots[Root.referenceCounts.rawValue], in: area).root
            usedChunks -= 1
            pendingFree.insert(physical)
        }
    }
}
