/// What makes a RAID level, behind one interface (as md's personalities and SPDK's RAID modules):
/// how a request's bytes and their redundancy reach the members, how a block that cannot be read is
/// answered from the others, how a stripe is checked and repaired, how a replacement member is
/// rebuilt, and how many members the level needs and may lose.
///
/// One type per level, in `RAID/Levels/`, registered in ``RAIDLevel/personality``; an array makes
/// its level's personality once, when it is created or assembled, and calls only this protocol.
/// Where the bytes lie (extents, stripes, which member holds data or parity) is ``RAIDGeometry``'s
/// arithmetic. Everything else is the array's, the same for every level: members and their states,
/// superblocks and the write-intent bitmap, failing members and activating spares, the request
/// gate, stripe locks, and the order, progress and checkpoints of scrubs, resyncs and rebuilds.
/// A level works through the array it is given: `readableMembers()` and `writableMembers()`,
/// `stripeLocks`, `markWriteIntent`, `failMember`, `concurrently`, `writeMembers` and `bufferPool`.
/// `docs/ARCHITECTURE.md` (RAID levels) says what each requirement must do and how to add a level.
protocol RAIDPersonality: Sendable {
    /// Fewest members the level takes.
    static var minimumMembers: Int { get }
    /// Members that may be missing from an array of `memberCount` while it still serves every byte.
    static func redundancy(memberCount: Int) -> Int
    /// Whether a crash during a write can leave redundancy that disagrees with the data where a
    /// degraded array cannot see it (the parity "write hole"): such an array, dirty and degraded,
    /// is assembled only with `force`.
    static var hasWriteHole: Bool { get }

    init(geometry: RAIDGeometry)

    // MARK: Reads

    /// Reads one extent of a request into `destination`: from its member when `readable` (the
    /// members readable when the request started) has it; else, or when the member's read fails,
    /// from redundancy (``reconstruct(_:into:rewrite:memberError:array:)``). The default does
    /// exactly that; a level that spreads reads over copies implements its own.
    func read(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws

    /// A degraded read: answers one extent from the other members, without its own member's data
    /// (the member is missing, or its read failed with `memberError`). With `rewrite`, writes the
    /// answer back to the member (failing it if it cannot take the write). Throws when redundancy
    /// cannot answer, counting the read in `unrecoverableReads` when members answered with errors.
    func reconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, rewrite: Bool,
        memberError: (any Error)?, array: RAIDArray
    ) async throws

    // MARK: Writes

    /// Writes `length` bytes at logical `offset` from `source` (borrowed for the call) to the members,
    /// with the data's redundancy (mirror copies, or parity by full-stripe, read-modify-write or
    /// reconstruct-write). A level with redundancy marks the write intent
    /// (``RAIDArray/markWriteIntent(memberOffset:length:)``) and takes the stripe locks of what it
    /// writes first. A member whose write fails is failed; the write fails only when the array can
    /// no longer serve the data. Called inside the request gate, on an array that is not failed.
    func write(from source: RequestBuffer, offset: UInt64, length: UInt64, fua: Bool, array: RAIDArray) async throws

    /// Passes a discard of logical `offset ..< offset + length` to the members, or drops it: a level
    /// with redundancy keeps the data (discard is advisory, and dropping it on one member would make
    /// copies or parity disagree). Called outside the request gate: a level that sends it to members
    /// enters ``RAIDArray/gate`` itself.
    func discard(offset: UInt64, length: UInt64, array: RAIDArray) async throws

    // MARK: Check, repair, rebuild

    /// Checks one stripe of a scrub or resync step (its members' chunks, as read), and repairs it:
    /// rebuilds the chunks in `stripe.unreadable` from redundancy and writes them back when it can
    /// (reporting the rest as unreadable), then compares copies or parity; on a mismatch with
    /// `repair`, rewrites copies from the first or parity from the data. Called with the stripe locked.
    func check(_ stripe: ScrubStripe, repair: Bool, array: RAIDArray) async throws -> StripeCheck

    /// One rebuild step: computes what member `slot` holds at member data offset
    /// `memberOffset ..< memberOffset + result.count` from the other members in `readable`, into
    /// `result`. The array takes the stripe locks before and writes `result` to the member after.
    /// A source that is gone is failed; a read error on one that answers stops the rebuild there
    /// (members untouched), to resume from the checkpoint.
    func rebuild(
        slot: Int, memberOffset: UInt64, into result: AlignedBuffer, readable: [RAIDArray.Member?],
        array: RAIDArray) async throws
}

extension RAIDPersonality {
    func read(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        try await readMemberOrReconstruct(extent, into: destination, readable: readable, array: array)
    }

    /// Reads `extent` from `extent.member`; when `readable` has no such member, or its read fails,
    /// from redundancy, rewriting the member's block in the second case.
    func readMemberOrReconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        if let member = readable[extent.member] {
            do {
                try await member.device.read(into: destination, at: RAIDArray.dataOffset + extent.memberOffset)
                return
            } catch {
                // Answer from redundancy, then rewrite the bad block (or fail the member).
                try await reconstruct(extent, into: destination, rewrite: true, memberError: error, array: array)
                return
            }
        }
        try await reconstruct(extent, into: destination, rewrite: false, memberError: nil, array: array)
    }
}

// MARK: Registration

extension RAIDLevel {
    /// The registration table: the one place a level's number meets its implementation. A new level
    /// adds its case to ``RAIDLevel`` (and its layout to ``RAIDGeometry``), its file in `Levels/`,
    /// and one line here.
    var personality: any RAIDPersonality.Type {
        switch self {
        case .raid0: RAID0.self
        case .raid1: RAID1.self
        case .raid5: RAID5.self
        }
    }
}

// MARK: Scrub stripes

/// One stripe of a scrub or resync step, as read from the members.
struct ScrubStripe {
    var stripe: UInt64
    /// The members that were read (the readable ones), by slot, and what they returned, in the same
    /// order. Each buffer holds the whole step; this stripe's chunk lies at `within ..< within + size`.
    var slots: [Int]
    var buffers: [AlignedBuffer]
    /// The array's readable members, by slot.
    var readable: [RAIDArray.Member?]
    var within: Int
    /// The chunk size.
    var size: Int
    /// Slots whose chunk of this stripe could not be read.
    var unreadable: Set<Int>

    /// Where the stripe's chunks lie on the members.
    var memberOffset: UInt64 { RAIDArray.dataOffset + stripe * UInt64(size) }
    var range: Range<Int> { within..<(within + size) }

    /// What member `slot` returned.
    func buffer(of slot: Int) -> AlignedBuffer { buffers[slots.firstIndex(of: slot)!] }
}

/// What checking a stripe found and did.
struct StripeCheck {
    /// Chunks that could not be read, rebuilt from redundancy and written back.
    var readErrorsRepaired = 0
    /// Slots whose chunk could be neither read nor rebuilt.
    var unreadable: [Int] = []
    /// Copies or parity disagreed.
    var mismatch = false
    /// ... and were rewritten to agree.
    var repaired = false
}

extension RAIDArray {
    /// Writes a chunk rebuilt from redundancy back to the member of `stripe` that could not read it;
    /// a member that cannot take the write is failed.
    func rewriteChunk(of stripe: ScrubStripe, slot: Int, from buffer: AlignedBuffer) async throws {
        do {
            try await stripe.readable[slot]!.device.write(from: buffer, range: stripe.range, at: stripe.memberOffset)
        } catch {
            await failMember(slot: slot, because: error)
            throw error
        }
    }
}
