/// RAID levels Spindle builds.
public enum RAIDLevel: Int, Codable, Sendable, CaseIterable, CustomStringConvertible {
    case raid0 = 0
    case raid1 = 1
    case raid5 = 5

    /// Fewest members the level takes.
    public var minimumMembers: Int { personality.minimumMembers }
    /// Members that may be missing from an array of `memberCount` while it still serves every byte:
    /// none for RAID0, one for RAID5, all but one for a mirror.
    public func redundancy(memberCount: Int) -> Int { personality.redundancy(memberCount: memberCount) }
    public var description: String { "raid\(rawValue)" }
}

/// Where an array's bytes live: pure arithmetic, no I/O, tested against a brute-force model.
///
/// Member data areas are split into chunks of ``chunkBytes``. A *stripe* is one chunk-sized row across
/// all members.
/// - RAID0: logical chunk `c` is chunk `c / n` of member `c % n`.
/// - RAID1: every member holds every byte; logical offset = member data offset.
/// - RAID5, left-symmetric (md's default): stripe `s` keeps parity on member `(n - 1) - s % n`, and its
///   data chunks `0 ..< n-1` continue on the members after the parity member, wrapping around.
public struct RAIDGeometry: Sendable, Equatable, Codable {
    public let level: RAIDLevel
    public let memberCount: Int
    public let chunkBytes: UInt64
    /// Usable data bytes on each member (a multiple of ``chunkBytes``).
    public let memberDataBytes: UInt64

    public init(level: RAIDLevel, memberCount: Int, chunkBytes: UInt64, memberDataBytes: UInt64) {
        precondition(memberCount >= level.minimumMembers)
        precondition(chunkBytes > 0 && chunkBytes & (chunkBytes - 1) == 0)
        precondition(memberDataBytes % chunkBytes == 0)
        self.level = level
        self.memberCount = memberCount
        self.chunkBytes = chunkBytes
        self.memberDataBytes = memberDataBytes
    }

    /// Members holding data in each stripe.
    public var dataMembersPerStripe: Int {
        switch level {
        case .raid0: return memberCount
        case .raid1: return 1
        case .raid5: return memberCount - 1
        }
    }

    /// Members that may be missing while the array still serves every byte.
    public var redundancy: Int { level.redundancy(memberCount: memberCount) }

    /// Stripes in the array.
    public var stripeCount: UInt64 { memberDataBytes / chunkBytes }

    /// Logical bytes in one stripe.
    public var stripeDataBytes: UInt64 { chunkBytes * UInt64(dataMembersPerStripe) }

    /// The array's logical size.
    public var capacityBytes: UInt64 { stripeCount * stripeDataBytes }

    /// The member holding stripe `stripe`'s parity (RAID5 only).
    public func parityMember(stripe: UInt64) -> Int {
        precondition(level == .raid5)
        return memberCount - 1 - Int(stripe % UInt64(memberCount))
    }

    /// The member holding data chunk `index` (0 ..< dataMembersPerStripe) of a stripe.
    public func dataMember(stripe: UInt64, index: Int) -> Int {
        switch level {
        case .raid0: return index
        case .raid1: return 0
        case .raid5: return (parityMember(stripe: stripe) + 1 + index) % memberCount
        }
    }

    /// Which data chunk of its stripe a member holds, or nil for the parity member.
    public func dataIndex(stripe: UInt64, member: Int) -> Int? {
        switch level {
        case .raid0: return member
        case .raid1: return 0
        case .raid5:
            let parity = parityMember(stripe: stripe)
            if member == parity { return nil }
            return (member - parity - 1 + memberCount) % memberCount
        }
    }

    /// A contiguous piece of a logical request that lies in one chunk of one member.
    public struct Extent: Sendable, Equatable {
        /// Stripe the piece belongs to.
        public var stripe: UInt64
        /// Data chunk index within the stripe.
        public var dataIndex: Int
        /// Member holding it (for RAID1, the first mirror; every member has it).
        public var member: Int
        /// Offset within the member's data area.
        public var memberOffset: UInt64
        /// Offset of the piece in the logical request.
        public var requestOffset: UInt64
        public var length: UInt64
    }

    /// Splits a logical range into per-chunk pieces, in logical order.
    public func extents(offset: UInt64, length: UInt64) -> [Extent] {
        precondition(offset <= capacityBytes && length <= capacityBytes - offset)
        var result: [Extent] = []
        if level == .raid1 {
            if length > 0 {
                result.append(
                    Extent(
                        stripe: offset / chunkBytes, dataIndex: 0, member: 0, memberOffset: offset,
                        requestOffset: 0, length: length))
            }
            return result
        }
        var position = offset
        let end = offset + length
        while position < end {
            let chunk = position / chunkBytes
            let within = position % chunkBytes
            let piece = min(chunkBytes - within, end - position)
            let stripe = chunk / UInt64(dataMembersPerStripe)
            let index = Int(chunk % UInt64(dataMembersPerStripe))
            result.append(
                Extent(
                    stripe: stripe, dataIndex: index, member: dataMember(stripe: stripe, index: index),
                    memberOffset: stripe * chunkBytes + within, requestOffset: position - offset, length: piece))
            position += piece
        }
        return result
    }

    /// The logical offset of a byte of a member's data area, or nil when it is parity.
    public func logicalOffset(member: Int, memberOffset: UInt64) -> UInt64? {
        let stripe = memberOffset / chunkBytes
        let within = memberOffset % chunkBytes
        switch level {
        case .raid1: return memberOffset
        case .raid0, .raid5:
            guard let index = dataIndex(stripe: stripe, member: member) else { return nil }
            return (stripe * UInt64(dataMembersPerStripe) + UInt64(index)) * chunkBytes + within
        }
    }
}
