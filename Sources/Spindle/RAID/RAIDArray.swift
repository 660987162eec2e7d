import Synchronization

/// A software RAID array (levels 0, 1 and 5): a block device made of member block devices.
///
/// Members are usually ``FileDevice``s, but any ``BlockDevice`` will do, so arrays compose: RAID10 is
/// a RAID0 array over RAID1 arrays, and a thin pool can sit on a RAID5 array.
///
/// Every member carries the array's description in two checksummed superblock copies
/// (``RAIDSuperblock``), with an event counter bumped on every change of state, so an array is
/// assembled from its members alone, in any order, and a member that missed changes (it failed and
/// came back) is recognised as stale and not trusted.
///
/// RAID1 and RAID5 keep serving every byte with one member failed or missing. A read error is
/// answered from redundancy and the block rewritten; a write error fails the member. A replacement
/// is rebuilt (``rebuild(rateBytesPerSecond:checkpointBytes:stopAtBytes:progress:)``) while the array serves I/O, with its
/// position checkpointed in the superblocks so that a restarted rebuild resumes. Writes mark their
/// region in a write-intent bitmap first, so that after a crash only those regions are resynced.
public final class RAIDArray: BlockDevice {
    /// A device in the array.
    public final class Member: Sendable {
        public let device: any BlockDevice
        public let uuid: SpindleUUID
        public var name: String { device.name }
        init(device: any BlockDevice, uuid: SpindleUUID) {
            self.device = device
            self.uuid = uuid
        }
    }

    /// Bytes reserved at the start of every member: two superblock copies, the bitmap, alignment.
    public static let dataOffset: UInt64 = 1 << 20
    static let bitmapOffset: UInt64 = 8192
    static let bitmapBytes = 4096
    /// Default chunk: 64 KiB. Small enough that common 1 MiB writes cover whole stripes (no reads
    /// for parity) on arrays of up to 16 members, large enough that a 4 KiB request touches one member.
    public static let defaultChunkBytes: UInt64 = 64 * 1024

    struct State {
        var slots: [Member?]
        var slotStates: [RAIDMemberState]
        var spares: [Member]
        var events: UInt64
        var dirty: Bool
        /// Whether the superblocks on disk say dirty (writes may proceed once this and their bits are set).
        var dirtyOnDisk = false
        var rebuildSlot: Int
        var rebuildCheckpointBytes: UInt64
        var bitmap: [UInt8]
        var failed: Bool
        /// What the superblocks record of each slot's member (UUID and last known file name), kept
        /// for slots with no device in them, so a failed or missing member is still recognised when
        /// it comes back, and can be named.
        var recordedSlots: [RAIDSuperblock.Slot] = []
    }

    public let arrayName: String
    public let arrayUUID: SpindleUUID
    public let geometry: RAIDGeometry
    /// What the level does (``RAIDPersonality``), made once from `geometry.level`.
    let personality: any RAIDPersonality
    public let logicalBlockBytes: Int
    public var capacityBytes: UInt64 { geometry.capacityBytes }
    public var isReadOnly: Bool { false }
    public var discardReadsZeroes: Bool { false }
    public var name: String { "array \(arrayName)" }
    let createdSeconds: UInt64
    let bitmapChunkShift: UInt32

    let state: Locked<State>
    /// Writes between entering `write` and completing, for the idle-clean check.
    let writesInFlight = Atomic<Int>(0)
    /// Members marked failed in memory whose failure the superblocks do not record yet. Writes and
    /// flushes that complete meanwhile (having skipped such a member) wait for the record before
    /// they report success, as md holds completions while a superblock change is pending: else a
    /// crash could bring the member back as in sync without the data it missed.
    let unrecordedFailures = Atomic<Int>(0)
    let lastWriteNanos = Atomic<UInt64>(0)
    let idleCleanNanos = Atomic<UInt64>(RAIDArray.defaultIdleCleanNanos)
    let cleaner = Locked<Task<Void, Never>?>(nil)
    /// An array with no writes for this long is marked clean on disk, as md's safe mode does, so a
    /// crash while it sits idle needs no resync.
    public static let defaultIdleCleanNanos: UInt64 = 2_000_000_000
    let stripeLocks = StripeLocks()
    /// Serializes superblock writes.
    let metadataLock = AsyncMutex()
    /// Serializes bitmap updates (taken before `metadataLock` when both are needed).
    let bitmapLock = AsyncMutex()
    let gate = RequestGate()
    /// Reads that neither a member nor redundancy could answer (each returned an error to its caller).
    let unrecoverableReads = Atomic<Int>(0)
    /// Buffers for stripe writes and reconstructed reads, reused instead of allocated per stripe.
    let bufferPool = BufferPool()
    /// Forces the partial-stripe RAID5 write path (tests only); nil chooses by the reads each needs.
    let partialStripeWriteOverride = Locked<PartialStripeWrite?>(nil)

    init(
        name: String, uuid: SpindleUUID, geometry: RAIDGeometry, createdSeconds: UInt64, bitmapChunkShift: UInt32,
        state: State, logicalBlockBytes: Int
    ) {
        arrayName = name
        arrayUUID = uuid
        self.geometry = geometry
        personality = geometry.level.personality.init(geometry: geometry)
        self.createdSeconds = createdSeconds
        self.bitmapChunkShift = bitmapChunkShift
        self.state = Locked(state)
        self.logicalBlockBytes = logicalBlockBytes
    }

    // MARK: Creating

    /// Creates an array over `devices` (in slot order), writing superblocks to each and zeroing their
    /// data areas so that parity starts consistent. Members may differ in size; the smallest sets the
    /// array's size.
    /// - Throws: ``SpindleError`` for a bad member count or chunk size, or a member too small.
    /// - Parameter integrity: put the integrity layer (``IntegrityDevice``, crash policy
    ///   ``IntegritySuperblock/CrashPolicy/redundant``) under each member, so that a block a member
    ///   returns wrong fails its checksum and is rebuilt from the others instead of served.
    public static func create(
        name: String, level: RAIDLevel, chunkBytes: UInt64 = defaultChunkBytes, members devices: [any BlockDevice],
        overwrite: Bool = false, integrity: Bool = false
    ) async throws -> RAIDArray {
        guard integrity else {
            return try await create(
                name: name, level: level, chunkBytes: chunkBytes, members: devices, overwrite: overwrite)
        }
        var names = Set<String>()
        for device in devices where !names.insert(device.name).inserted {
            throw SpindleError(.invalidArgument, "\(device.name) is given twice", path: device.name)
        }
        var checked: [IntegrityDevice] = []
        do {
            for device in devices {
                checked.append(
                    try await IntegrityDevice.format(
                        device, policy: .redundant, selfCheckedBytes: dataOffset, overwrite: overwrite))
            }
            return try await create(name: name, level: level, chunkBytes: chunkBytes, members: checked, overwrite: true)
        } catch {
            // Nothing changed hands: the caller keeps (and closes) the devices it passed.
            for device in checked { device.abandon() }
            throw error
        }
    }

    private static func create(
        name: String, level: RAIDLevel, chunkBytes: UInt64, members devices: [any BlockDevice], overwrite: Bool
    ) async throws -> RAIDArray {
        guard !name.isEmpty, name.utf8.count <= 63, !name.contains("/") else {
            throw SpindleError(.invalidArgument, "the array name '\(name)' must be 1 to 63 bytes without '/'")
        }
        guard devices.count >= level.minimumMembers, devices.count <= RAIDSuperblock.maximumMembers else {
            throw SpindleError(
                .invalidArgument,
                "\(level) needs \(level.minimumMembers) to \(RAIDSuperblock.maximumMembers) members, not \(devices.count)"
            )
        }
        guard chunkBytes >= 4096, chunkBytes <= 1 << 20, chunkBytes & (chunkBytes - 1) == 0 else {
            throw SpindleError(
                .invalidArgument, "the chunk size \(chunkBytes) must be a power of two from 4 KiB to 1 MiB")
        }
        let blockBytes = devices.map(\.logicalBlockBytes).max()!
        guard chunkBytes % UInt64(blockBytes) == 0 else {
            throw SpindleError(
                .invalidArgument,
                "the chunk size \(chunkBytes) is not a multiple of the members' \(blockBytes)-byte blocks")
        }
        var names = Set<String>()
        for device in devices {
            guard names.insert(device.name).inserted else {
                throw SpindleError(.invalidArgument, "\(device.name) is given twice", path: device.name)
            }
            guard !device.isReadOnly else {
                throw SpindleError(.readOnly, "members must be writable", path: device.name)
            }
            guard device.capacityBytes >= dataOffset + chunkBytes else {
                throw SpindleError(
                    .invalidArgument,
                    "the member is \(device.capacityBytes) bytes; a member needs at least \(dataOffset + chunkBytes) (1 MiB of metadata and one chunk)",
                    path: device.name)
            }
        }
        if !overwrite {
            for device in devices { try await DeviceSignature.refuseIfInUse(device, operation: "create array") }
        }
        let smallest = devices.map(\.capacityBytes).min()!
        let memberDataBytes = (smallest - dataOffset) / chunkBytes * chunkBytes
        let geometry = RAIDGeometry(
            level: level, memberCount: devices.count, chunkBytes: chunkBytes, memberDataBytes: memberDataBytes)
        let members = devices.map { Member(device: $0, uuid: .random()) }
        let array = RAIDArray(
            name: name, uuid: .random(), geometry: geometry, createdSeconds: UInt64(monotonicNanos() / 1_000_000_000),
            bitmapChunkShift: bitmapShift(memberDataBytes: memberDataBytes, chunkBytes: chunkBytes),
            state: State(
                slots: members, slotStates: Array(repeating: .active, count: devices.count), spares: [], events: 0,
                dirty: false, rebuildSlot: -1, rebuildCheckpointBytes: 0,
                bitmap: [UInt8](repeating: 0, count: bitmapBytes), failed: false,
                recordedSlots: members.map {
                    RAIDSuperblock.Slot(member: $0.uuid, state: .active, lastKnownName: $0.name)
                }),
            logicalBlockBytes: blockBytes)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for member in members {
                group.addTask {
                    try await member.device.writeZeroes(offset: dataOffset, length: memberDataBytes)
                    try await member.device.writeZeroes(offset: 0, length: dataOffset)
                }
            }
            try await group.waitForAll()
        }
        // Both copies, so that a fresh member never falls back to garbage.
        try await array.commitSuperblocks()
        try await array.commitSuperblocks()
        try await array.writeBitmap()
        array.startIdleCleaner()
        return array
    }

    /// Bitmap granularity: at least 64 MiB of member data per bit, and few enough bits to fit 4 KiB.
    static func bitmapShift(memberDataBytes: UInt64, chunkBytes: UInt64) -> UInt32 {
        var shift: UInt32 = 26
        while (memberDataBytes >> UInt64(shift)) >= UInt64(bitmapBytes * 8) { shift += 1 }
        return max(shift, UInt32(chunkBytes.trailingZeroBitCount))
    }

    // MARK: State

    /// The member in a slot and its state.
    public struct SlotInfo: Sendable, Codable {
        public var slot: Int
        public var device: String?
        /// The member's identity; nil for a slot whose member was removed.
        public var memberUUID: SpindleUUID?
        /// The file name the slot's member last had (from the superblocks), also when it is missing.
        public var lastKnownName: String?
        public var state: RAIDMemberState
        /// What the member's integrity layer has seen (nil for a member without one).
        public var integrity: IntegrityDevice.Statistics? = nil
    }

    /// A snapshot of the array's state, for status displays.
    /// How an array is, in one word. Its raw value is the word status displays print.
    public enum Health: String, Sendable, Codable, CustomStringConvertible {
        /// Shut down cleanly (or idle since): members agree.
        case clean
        /// Written since assembly: a crash now would need a resync of the regions being written.
        case active
        /// A member is missing or failed; every byte is still served.
        case degraded
        /// A replacement member is being rebuilt.
        case rebuilding
        /// More members are gone than the level survives.
        case failed

        public var description: String { rawValue }
    }

    public struct Status: Sendable, Codable {
        public var name: String
        public var uuid: SpindleUUID
        public var level: RAIDLevel
        public var chunkBytes: UInt64
        public var memberCount: Int
        public var capacityBytes: UInt64
        public var memberDataBytes: UInt64
        public var state: Health
        public var events: UInt64
        public var slots: [SlotInfo]
        public var spares: [String]
        public var rebuildSlot: Int?
        public var rebuildDoneBytes: UInt64?
        public var dirtyRegions: Int
        /// Reads since assembly that failed because neither the member nor redundancy could answer.
        public var unrecoverableReads: Int
    }

    public var status: Status {
        state.withLock { state in
            let missing = state.slotStates.filter { $0 != .active }.count
            var summary: Health = state.dirty ? .active : .clean
            if state.failed || missing > geometry.redundancy {
                summary = .failed
            } else if state.rebuildSlot >= 0 {
                summary = .rebuilding
            } else if missing > 0 {
                summary = .degraded
            }
            return Status(
                name: arrayName, uuid: arrayUUID, level: geometry.level,
                chunkBytes: geometry.chunkBytes, memberCount: geometry.memberCount, capacityBytes: capacityBytes,
                memberDataBytes: geometry.memberDataBytes, state: summary, events: state.events,
                slots: state.slots.enumerated().map { index, member in
                    SlotInfo(
                        slot: index, device: member?.name,
                        memberUUID: (member?.uuid ?? state.recordedSlots[index].member).nonZero,
                        lastKnownName: member.map { RAIDSuperblock.Slot.shortened($0.name) }
                            ?? state.recordedSlots[index].lastKnownName.nonEmpty,
                        state: state.slotStates[index],
                        integrity: (member?.device as? any IntegrityChecking)?.statistics)
                },
                spares: state.spares.map(\.name),
                rebuildSlot: state.rebuildSlot >= 0 ? state.rebuildSlot : nil,
                rebuildDoneBytes: state.rebuildSlot >= 0 ? state.rebuildCheckpointBytes : nil,
                dirtyRegions: state.bitmap.reduce(0) { $0 + $1.nonzeroBitCount },
                unrecoverableReads: unrecoverableReads.load(ordering: .relaxed))
        }
    }

    /// Whether the members have the integrity layer under them (arrays made with `integrity: true`).
    public var usesIntegrity: Bool {
        state.withLock { state in
            (state.slots.compactMap { $0 } + state.spares).contains { $0.device is any IntegrityChecking }
        }
    }

    /// Members that can be written (active or being rebuilt), by slot.
    func writableMembers() -> [Member?] {
        state.withLock { state in
            state.slots.enumerated().map { index, member in
                state.slotStates[index] == .active || state.slotStates[index] == .rebuilding ? member : nil
            }
        }
    }

    /// Members that can be read (active only), by slot.
    func readableMembers() -> [Member?] {
        state.withLock { state in
            state.slots.enumerated().map { index, member in state.slotStates[index] == .active ? member : nil }
        }
    }

    func failedError(_ operation: String, offset: UInt64? = nil, length: UInt64? = nil) -> SpindleError {
        let states = state.withLock { $0.slotStates }
        let lost = states.enumerated().filter { $0.element != .active }.map { "slot \($0.offset) \($0.element)" }
        return SpindleError(
            .ioFailed,
            "the \(geometry.level) array has lost more members than it can survive (\(lost.joined(separator: ", "))); it takes no writes",
            operation: operation, path: name, offset: offset, length: length)
    }
}
