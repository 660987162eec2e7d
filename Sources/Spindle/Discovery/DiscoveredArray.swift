/// An array as its members' superblocks describe it, without assembling it: the newest superblock's
/// view, which member holds each slot, and the members that assembly would not use, with why.
public struct DiscoveredArray: Sendable {
    /// A device carrying this array's superblock.
    public struct Member: Sendable {
        /// Its path (or the name of a device the caller opened).
        public var device: String
        public var superblock: RAIDSuperblock
        let source: DeviceSource
        /// Whether the member lies under the integrity layer (an array made with `integrity: true`).
        public var checksummed = false

        /// The slot it was written for, or -1 for a spare.
        public var role: Int { superblock.role }
        public var memberUUID: SpindleUUID { superblock.memberUUID }
        public var events: UInt64 { superblock.events }
    }

    /// A slot and the member holding it, as the newest superblock and the members found say.
    public struct Slot: Sendable, Equatable {
        public var index: Int
        /// The recorded state, or ``RAIDMemberState/missing`` when no member found is up to date for it.
        public var state: RAIDMemberState
        /// The member found holding it (the newest of several copies).
        public var device: String?
        public var memberUUID: SpindleUUID?
        /// The file name its member last had, from the superblocks.
        public var lastKnownName: String?
    }

    /// The array's condition, from the newest superblock and the members found.
    public enum State: String, Sendable, Codable {
        /// Every slot active, shut down cleanly.
        case clean
        /// Every slot active, but not shut down cleanly (or in use now): assembly resyncs.
        case dirty
        /// A slot is missing, faulty or stale, within the redundancy.
        case degraded
        /// A member is being rebuilt.
        case rebuilding
        /// More slots lost than the level survives.
        case failed
    }

    /// A rebuild recorded in the superblocks.
    public struct Rebuild: Sendable, Equatable {
        public var slot: Int
        /// Bytes of the member's data area rebuilt, as of the last checkpoint.
        public var doneBytes: UInt64
    }

    /// A member found that assembly does not use as it is, and why.
    public struct MemberNote: Sendable, Equatable, CustomStringConvertible {
        public enum Kind: Sendable, Equatable {
            /// Its slot holds another member now.
            case replaced
            /// Another device holds the same member (`holder`, at `holderEvents`): a copy never
            /// stands in for a member; a stale one when its events are older.
            case copy(holder: String, holderEvents: UInt64)
            /// It missed changes while failed or missing: it must be rebuilt.
            case stale
            /// One superblock update behind (a crash cut the update short): assembly brings it up to
            /// date and uses it.
            case oneUpdateBehind
        }
        public var device: String
        public var slot: Int
        public var events: UInt64
        public var arrayEvents: UInt64
        public var kind: Kind

        public var description: String {
            let age = "events \(events), the array is at \(arrayEvents)"
            switch kind {
            case .replaced:
                return "\(device) was the member in slot \(slot) but has been replaced (\(age)); it is not used"
            case let .copy(holder, holderEvents):
                return
                    "\(device) is \(events < holderEvents ? "a stale copy" : "a copy") of the member in slot \(slot), which \(holder) holds (\(age)); a copy cannot stand in for a member, so it is not used"
            case .stale:
                return
                    "\(device) is stale (\(age)): it missed changes to slot \(slot), so it is not used; add it back to rebuild it"
            case .oneUpdateBehind:
                return
                    "\(device) is one superblock update behind (a crash cut the update short); assembly brings it up to date"
            }
        }
    }

    public var name: String
    public var uuid: SpindleUUID
    public var level: RAIDLevel
    public var chunkBytes: UInt64
    public var memberCount: Int
    public var memberDataBytes: UInt64
    public var capacityBytes: UInt64
    /// The newest superblock's event count.
    public var events: UInt64
    public var isDirty: Bool
    public var state: State
    public var slots: [Slot]
    /// Spares found (devices with this array's superblock and no slot).
    public var spares: [String]
    public var rebuild: Rebuild?
    /// Every device found with this array's superblock, in scan order (copies and stale ones too).
    public var members: [Member]
    /// Members found that are not used as they are, in scan order.
    public var notes: [MemberNote]
    /// The newest superblock found.
    public var superblock: RAIDSuperblock

    /// Whether every slot has an up-to-date member.
    public var isComplete: Bool { slots.allSatisfy { $0.state == .active } }

    /// Describes the array that `members` (all carrying its superblock, in scan order) form.
    init(members: [Member]) {
        precondition(!members.isEmpty, "an array is found from at least one member")
        var newest = members[0].superblock
        for member in members where member.events > newest.events { newest = member.superblock }
        // Several copies of one member: the one with the newest changes holds it (the later on a tie).
        var holders: [SpindleUUID: Member] = [:]
        for member in members where (holders[member.memberUUID]?.events ?? 0) <= member.events {
            holders[member.memberUUID] = member
        }
        let slots = newest.slots.enumerated().map { index, recorded in
            var state = recorded.state
            let holder = holders[recorded.member]
            if (state == .active || state == .rebuilding) && (holder == nil || holder!.events < newest.events) {
                state = .missing
            }
            return Slot(
                index: index, state: state, device: holder?.device,
                memberUUID: recorded.member == .zero ? nil : recorded.member,
                lastKnownName: recorded.lastKnownName.isEmpty ? nil : recorded.lastKnownName)
        }
        let lost = slots.filter { $0.state != .active }.count
        let state: State
        if lost > newest.level.redundancy(memberCount: newest.memberCount) {
            state = .failed
        } else if newest.rebuildSlot >= 0 {
            state = .rebuilding
        } else if lost > 0 {
            state = .degraded
        } else {
            state = newest.dirty ? .dirty : .clean
        }
        name = newest.name
        uuid = newest.arrayUUID
        level = newest.level
        chunkBytes = UInt64(newest.chunkBytes)
        memberCount = newest.memberCount
        memberDataBytes = newest.memberDataBytes
        capacityBytes = newest.geometry.capacityBytes
        events = newest.events
        isDirty = newest.dirty
        self.state = state
        self.slots = slots
        spares = members.filter { $0.role == -1 }.map(\.device)
        rebuild =
            newest.rebuildSlot >= 0 ? Rebuild(slot: newest.rebuildSlot, doneBytes: newest.rebuildCheckpointBytes) : nil
        self.members = members
        superblock = newest
        notes = Self.notes(members: members, slots: slots, arrayEvents: newest.events)
    }

    /// The images of the array that assembly does not use as they are: copies of a member, members
    /// left behind when they were replaced, members that missed changes.
    private static func notes(members: [Member], slots: [Slot], arrayEvents: UInt64) -> [MemberNote] {
        var notes: [MemberNote] = []
        for member in members where member.role >= 0 {
            func note(_ kind: MemberNote.Kind, slot: Int) {
                notes.append(
                    MemberNote(
                        device: member.device, slot: slot, events: member.events, arrayEvents: arrayEvents, kind: kind))
            }
            guard let slot = slots.first(where: { $0.memberUUID == member.memberUUID }) else {
                note(.replaced, slot: member.role)
                continue
            }
            if let holder = slot.device, holder != member.device {
                let holderEvents = members.first { $0.device == holder }?.events ?? arrayEvents
                note(.copy(holder: holder, holderEvents: holderEvents), slot: slot.index)
            } else if slot.state == .missing && member.events + 1 < arrayEvents {
                note(.stale, slot: slot.index)
            } else if slot.state == .missing && member.events < arrayEvents {
                note(.oneUpdateBehind, slot: slot.index)
            }
        }
        return notes
    }

    /// The member holding the array's first 4 KiB (where a pool label would be) and the offset on
    /// it, among members up to date with the newest superblock.
    func firstBlockHolder() -> (member: Member, offset: UInt64)? {
        guard let extent = superblock.geometry.extents(offset: 0, length: UInt64(ThinPoolLabel.bytes)).first else {
            return nil
        }
        let holder = members.first { member in
            member.role >= 0 && member.events == events && (level == .raid1 || member.role == extent.member)
        }
        return holder.map { ($0, $0.superblock.dataOffset + extent.memberOffset) }
    }
}
