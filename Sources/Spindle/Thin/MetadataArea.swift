import Foundation

/// A transactional store of metadata nodes in a region of a block device: the persistence under
/// the thin pool's B-trees (see docs/THIN-DESIGN.md).
///
/// Blocks 0 and 1 of the region hold two superblocks, written alternately; every other block is a
/// ``MetadataNode``. A transaction collects new nodes in memory; ``commit()`` writes them, flushes,
/// and then writes the next superblock (FUA) naming the new roots. Because ``MetadataBTree`` never
/// changes a node reachable from a committed root, a crash at any point leaves either the previous
/// transaction or the new one, whole.
///
/// Not safe for concurrent use: callers serialize access (the pool holds a lock around changes).
package final class MetadataArea: MetadataNodeStore {
    /// The node cache's memory budget unless the owner gives another: 256 MiB, or an eighth of
    /// the machine's memory when that is less (see ``NodeCache/bytesPerNode``).
    package static let defaultCacheBytes: UInt64 = min(256 << 20, ProcessInfo.processInfo.physicalMemory / 8)
    package static let rootCount = 8
    static let magic: UInt64 = 0x4154_4D4C_444E_5053  // "SPNDLMTA" little-endian
    static let formatVersion: UInt32 = 1

    package let device: any BlockDevice
    /// Byte offset of the region on the device.
    package let offset: UInt64
    /// Blocks in the region, the two superblocks included.
    package let blockCount: UInt64
    /// Roots of the trees, as the next commit will record them (0 = none).
    package var roots: [UInt64]
    /// Eight values for the area's owner (the pool's parameters), recorded with the roots.
    package var parameters: [UInt64] = [UInt64](repeating: 0, count: 8)
    /// What opening found wrong but could work around (a damaged superblock copy), for the owner
    /// to report.
    package private(set) var openNotes: [String] = []
    package internal(set) var transaction: UInt64
    var committedRoots: [UInt64] = []
    var committedParameters: [UInt64] = []

    /// Whether the open transaction changed anything (a commit without changes writes nothing).
    package var hasChanges: Bool {
        !pending.isEmpty || !releasedNow.isEmpty || roots != committedRoots || parameters != committedParameters
    }
    /// Most nodes kept in memory besides those of the open transaction.
    package var cacheCapacity: Int { cache.withLock { $0.nodes.capacity } }

    var used: [UInt64]  // bitmap: committed blocks and blocks allocated in this transaction
    /// References to each block in the open transaction: parents in trees, plus one per tree root.
    /// Shared subtrees (snapshots) have counts above one. Rebuilt by walking the trees on open.
    private var references: [UInt32]
    var allocatedNow: Set<UInt64> = []
    var releasedNow: [UInt64] = []
    var pending: [UInt64: MetadataNode] = [:]
    /// What is shared with work done outside the owner's lock (see ``SharedNodes``).
    let cache: Locked<SharedNodes>
    /// Blocks released by sealed transactions and not yet marked free (``reclaimReleased()``).
    var sealedReleased = 0
    private var cursor: UInt64 = 2

    private init(
        device: any BlockDevice, offset: UInt64, blockCount: UInt64, roots: [UInt64], transaction: UInt64,
        cacheBytes: UInt64
    ) {
        self.device = device
        self.offset = offset
        self.blockCount = blockCount
        self.roots = roots
        self.transaction = transaction
        cache = Locked(SharedNodes(nodes: NodeCache(budgetBytes: cacheBytes)))
        used = [UInt64](repeating: 0, count: Int((blockCount + 63) / 64))
        references = [UInt32](repeating: 0, count: Int(blockCount))
        markUsed(0)
        markUsed(1)
    }

    /// Writes an empty area (both superblocks at transaction 0, no roots).
    package static func format(
        device: any BlockDevice, offset: UInt64, blockCount: UInt64, parameters: [UInt64] = [],
        cacheBytes: UInt64 = defaultCacheBytes
    ) async throws -> MetadataArea {
        try validate(device: device, offset: offset, blockCount: blockCount)
        precondition(parameters.count <= 8)
        let area = MetadataArea(
            device: device, offset: offset, blockCount: blockCount,
            roots: [UInt64](repeating: 0, count: rootCount), transaction: 1, cacheBytes: cacheBytes)
        area.parameters = parameters + [UInt64](repeating: 0, count: 8 - parameters.count)
        try await area.writeSuperblock(transaction: 0, fua: false)
        try await area.writeSuperblock(transaction: 1, fua: false)
        try await device.flush()
        area.transaction = 2
        return area
    }

    /// Opens an area: takes the newest valid superblock and marks every block its trees use.
    /// - Throws: ``SpindleError`` when neither superblock is valid, or a node is corrupt.
    package static func open(
        device: any BlockDevice, offset: UInt64, blockCount: UInt64, cacheBytes: UInt64 = defaultCacheBytes
    ) async throws -> MetadataArea {
        try validate(device: device, offset: offset, blockCount: blockCount)
        let buffer = AlignedBuffer(count: 2 * MetadataNode.blockBytes, zeroed: false)
        try await device.read(into: buffer, at: offset)
        var best: (transaction: UInt64, roots: [UInt64], parameters: [UInt64])?
        var problems: [(copy: Int, problem: SuperblockProblem)] = []
        for copy in 0..<2 {
            let bytes = Array(buffer.slice(offset: copy * MetadataNode.blockBytes, length: MetadataNode.blockBytes))
            switch decodeSuperblock(bytes, blockCount: blockCount) {
            case let .success(found):
                if best == nil || found.transaction > best!.transaction { best = found }
            case let .failure(problem):
                problems.append((copy, problem))
            }
        }
        guard let best else {
            throw SpindleError(
                .corrupted,
                "no valid metadata superblock (\(problems.map { "copy \($0.copy): \($0.problem)" }.joined(separator: "; ")))",
                operation: "open metadata", path: device.name, offset: offset, cause: problems.last?.problem)
        }
        let area = MetadataArea(
            device: device, offset: offset, blockCount: blockCount, roots: best.roots,
            transaction: best.transaction + 1, cacheBytes: cacheBytes)
        area.parameters = best.parameters
        if !problems.isEmpty {
            area.openNotes.append(
                "metadata superblock \(problems.map { "copy \($0.copy): \($0.problem)" }.joined(separator: "; ")); opened transaction \(best.transaction) from the other copy. "
                    + "If the damaged copy held a later commit (a crash while committing, or damage), that commit's changes are lost; the next commit rewrites the damaged copy"
            )
        }
        area.committedRoots = best.roots
        area.committedParameters = best.parameters
        for root in best.roots where root != 0 {
            try await area.countReferences(tree: root)
        }
        return area
    }

    /// Counts one more reference to the tree at `root` and, the first time a node is met, to each of
    /// its children: how the owner registers trees whose roots it keeps outside ``roots`` (a thin
    /// pool's volumes). Shared subtrees are walked once.
    package func countReferences(tree root: UInt64) async throws {
        // Leaves are counted without being read: only internal nodes name other blocks.
        var pending: [(block: UInt64, isLeaf: Bool)] = [(root, false)]
        while let (block, isLeaf) = pending.popLast() {
            guard block >= 2 && block < blockCount else {
                throw SpindleError(
                    .corrupted, "a tree names metadata block \(block), outside the area (\(blockCount) blocks)",
                    operation: "open metadata", path: device.name)
            }
            references[Int(block)] += 1
            if references[Int(block)] > 1 { continue }
            markUsed(block)
            if isLeaf { continue }
            let node = try await node(at: block)
            if !node.isLeaf { pending.append(contentsOf: node.values.map { ($0, node.level == 1) }) }
        }
    }

    private static func validate(device: any BlockDevice, offset: UInt64, blockCount: UInt64) throws {
        guard blockCount >= 3, offset % UInt64(MetadataNode.blockBytes) == 0,
            MetadataNode.blockBytes % device.logicalBlockBytes == 0,
            offset + blockCount * UInt64(MetadataNode.blockBytes) <= device.capacityBytes
        else {
            throw SpindleError(
                .invalidArgument,
                "a metadata area of \(blockCount) blocks at offset \(offset) does not fit on the device's \(device.capacityBytes) bytes (was it truncated?)",
                operation: "open metadata", path: device.name)
        }
    }

    // MARK: MetadataNodeStore

    package func node(at block: UInt64) async throws -> MetadataNode {
        if let node = pending[block] { return node }
        if let cached = cache.withLock({ $0.sealed[block] ?? $0.nodes.node(at: block) }) { return cached }
        guard block >= 2 && block < blockCount else {
            throw SpindleError(
                .corrupted, "metadata block \(block) is outside the area (\(blockCount) blocks)",
                operation: "read metadata", path: device.name)
        }
        let buffer = AlignedBuffer(count: MetadataNode.blockBytes, zeroed: false)
        try await device.read(into: buffer, at: byteOffset(block))
        let node: MetadataNode
        do {
            node = try MetadataNode.decode(buffer.array, expectedBlock: block)
        } catch {
            throw SpindleError(
                .corrupted, "\(error)", operation: "read metadata", path: device.name, offset: byteOffset(block),
                length: UInt64(MetadataNode.blockBytes), cause: error)
        }
        remember(node)
        return node
    }

    package func store(_ node: MetadataNode) async throws {
        precondition(
            allocatedNow.contains(node.block), "metadata block \(node.block) was not allocated in this transaction")
        pending[node.block] = node
    }

    package func allocateBlock() throws -> UInt64 {
        reclaimReleased()
        for _ in 0..<blockCount {
            let block = cursor
            cursor = cursor + 1 >= blockCount ? 2 : cursor + 1
            if !isUsed(block) {
                markUsed(block)
                references[Int(block)] = 1
                allocatedNow.insert(block)
                return block
            }
        }
        throw SpindleError(
            .ioFailed, "the metadata area is full (\(blockCount) blocks)", operation: "allocate metadata",
            path: device.name)
    }

    package func referenceCount(of block: UInt64) -> UInt32 {
        block < blockCount ? references[Int(block)] : 0
    }

    package func addReference(to block: UInt64) {
        references[Int(block)] += 1
    }

    package func releaseBlock(_ block: UInt64) {
        precondition(references[Int(block)] > 0, "metadata block \(block) released more often than referenced")
        references[Int(block)] -= 1
        guard references[Int(block)] == 0 else { return }
        if allocatedNow.remove(block) != nil {
            pending[block] = nil
            markFree(block)
        } else {
            releasedNow.append(block)
        }
        cache.withLock { $0.nodes.remove(block) }
    }

    // MARK: Transactions

    /// Blocks in use after the open transaction would commit.
    package var usedBlocks: Int {
        reclaimReleased()
        return used.reduce(0) { $0 + $1.nonzeroBitCount } - releasedNow.count - sealedReleased
    }

    // MARK: Internals

    func byteOffset(_ block: UInt64) -> UInt64 { offset + block * UInt64(MetadataNode.blockBytes) }

    func isUsed(_ block: UInt64) -> Bool { used[Int(block / 64)] & (1 << (block % 64)) != 0 }
    private func markUsed(_ block: UInt64) { used[Int(block / 64)] |= 1 << (block % 64) }
    func markFree(_ block: UInt64) { used[Int(block / 64)] &= ~(1 << (block % 64)) }

    func remember(_ node: MetadataNode) { cache.withLock { $0.nodes.insert(node) } }

    /// Nodes read since open and kept (bounded by ``cacheCapacity``), for tests and status.
    package var cachedNodes: Int { cache.withLock { $0.nodes.count } }
    /// Nodes the cache dropped to make room since open: above zero, the metadata in use is larger
    /// than the cache.
    package var cacheEvictions: UInt64 { cache.withLock { $0.nodes.evictions } }

    /// The area size recorded by whichever superblock copy (of the first 8 KiB) is valid, or nil.
    static func decodeSuperblockBlockCount(_ bytes: [UInt8]) -> UInt64? {
        for copy in 0..<2 {
            let block = Array(bytes[(copy * MetadataNode.blockBytes)..<((copy + 1) * MetadataNode.blockBytes)])
            let count = block.littleEndian(UInt64.self, at: 24)
            if case .success = decodeSuperblock(block, blockCount: count) { return count }
        }
        return nil
    }

    /// Why a block is not a usable metadata superblock (the cause of a ``SpindleError/Code/corrupted``).
    package enum SuperblockProblem: Error, Equatable, Sendable, CustomStringConvertible {
        case noMagic
        case unsupportedVersion(UInt32)
        case checksumMismatch(stored: UInt32, computed: UInt32)
        /// The superblock describes an area of another size or root count.
        case otherAreaSize(blocks: UInt64, roots: UInt32)
        case rootOutsideArea(UInt64)

        package var description: String {
            switch self {
            case .noMagic: return "no metadata superblock magic"
            case let .unsupportedVersion(version):
                return
                    "metadata format version \(version) is not supported (this Spindle reads version \(MetadataArea.formatVersion))"
            case let .checksumMismatch(stored, computed):
                return "metadata superblock checksum mismatch (\(hex(stored)) stored, \(hex(computed)) computed)"
            case let .otherAreaSize(blocks, roots):
                return "metadata superblock describes another area size (\(blocks) blocks, \(roots) roots)"
            case let .rootOutsideArea(root): return "metadata superblock names a root outside the area (block \(root))"
            }
        }
    }

    static func decodeSuperblock(_ bytes: [UInt8], blockCount: UInt64) -> Result<
        (transaction: UInt64, roots: [UInt64], parameters: [UInt64]), SuperblockProblem
    > {
        func get<T: FixedWidthInteger>(_ type: T.Type, _ offset: Int) -> T { bytes.littleEndian(type, at: offset) }
        guard get(UInt64.self, 0) == magic else { return .failure(.noMagic) }
        guard get(UInt32.self, 8) == formatVersion else { return .failure(.unsupportedVersion(get(UInt32.self, 8))) }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<4092])) }
        guard get(UInt32.self, 4092) == computed else {
            return .failure(.checksumMismatch(stored: get(UInt32.self, 4092), computed: computed))
        }
        guard get(UInt64.self, 24) == blockCount, Int(get(UInt32.self, 32)) == rootCount else {
            return .failure(.otherAreaSize(blocks: get(UInt64.self, 24), roots: get(UInt32.self, 32)))
        }
        let roots = (0..<rootCount).map { get(UInt64.self, 64 + $0 * 8) }
        if let outside = roots.first(where: { $0 != 0 && !($0 >= 2 && $0 < blockCount) }) {
            return .failure(.rootOutsideArea(outside))
        }
        return .success((get(UInt64.self, 16), roots, (0..<8).map { get(UInt64.self, 128 + $0 * 8) }))
    }
}
