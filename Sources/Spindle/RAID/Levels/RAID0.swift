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
            offset: geometry.logicalOffset(member: extent.member, memberOffset: extent.memberOffset),
            length: extent.length)
    }

    // MARK: Writes

    func write(from source: RequestBuffer, offset: UInt64, length: UInt64, fua: Bool, array: RAIDArray) async throws {
        let writable = array.writableMembers()
        let failures = await array.concurrently(
            geometry.extents(offset: offset, length: length).map { extent in
                (
                    extent.member,
                    {
                        guard let member = writable[extent.member] else {
                            throw SpindleError(
                                .ioFailed, "slot \(extent.member) of the RAID0 array is not available",
                                operation: "write")
                        }
                        try await member.device.write(
                            from: UnsafeRawBufferPointer(
                                start: source.base + Int(extent.requestOffset), count: Int(extent.length)),
                            at: RAIDArray.dataOffset + extent.memberOffset, fua: fua)
                    }
                )
            })
        if let failure = failures.first { throw failure.error }
    }

    func discard(offset: UInt64, length: UInt64, array: RAIDArray) async throws {
        try array.gate.enter(operation: "discard", name: array.name)
        defer { array.gate.leave() }
        let writable = array.writableMembers()
        for extent in geometry.extents(offset: offset, length: length) {
            try await writable[extent.member]?.device.discard(
                offset: RAIDArray.dataOffset + extent.memberOffset, length: extent.length)
        }
    }

    // MARK: Check, repair, rebuild

    /// Nothing to compare; a chunk that cannot be read cannot be rebuilt.
    func check(_ stripe: ScrubStripe, repair: Bool, array: RAIDArray) async throws -> StripeCheck {
        StripeCheck(unreadable: stripe.unreadable.sorted())
    }

    func rebuild(
        slot: Int, memberOffset: UInt64, into result: AlignedBuffer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        throw SpindleError(
            .unsupported, "RAID0 keeps no redundancy to rebuild a member from", operation: "rebuild", path: array.name)
    }
}
