/// RAID0: chunks striped across the members, no redundancy. Every member is needed; a missing one
/// or a read error fails the request, and discards pass through to the members.
struct RAID0: RAIDPersonality {
    static let minimumMembers = 2
    static func redundancy(memberCount: Int) -> Int { 0 }
    static let hasWriteHole = false

    let geometry: RAIDGeometry

    init(geometry: RAIDGeometry) {
        self.geometry = geometry
    }

    // MARK: Reads

    /// No redundancy answers for a member: its error, or its absence, is the request's.
    func reconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, rewrite: Bool,
        memberError: (any Error)?, array: RAIDArray
    ) async throws {
        if let memberError { throw memberError }
        throw SpindleError(
            .ioFailed, "slot \(extent.member) of the RAID0 array is not available", operation: "read", path: array.name,
            offset: geometry.logicalOffset(member: extent.member, memberOffset: extent.memberOffset), length: extent.length)
    }
}
