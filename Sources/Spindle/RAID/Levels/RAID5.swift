/// RAID5: chunks striped across the members with one parity chunk per stripe (XOR of its data
/// chunks), rotating left-symmetric as md's default (``RAIDGeometry``). A missing or unreadable
/// chunk is rebuilt from the others and the parity; the array serves every byte with one member
/// missing. Discards are dropped: they would make parity disagree.
struct RAID5: RAIDPersonality {
    static let minimumMembers = 3
    static func redundancy(memberCount: Int) -> Int { 1 }
    /// A crash between the data and the parity write leaves a stripe whose parity disagrees; with a
    /// member missing, the missing chunk would be rebuilt wrong from it.
    static let hasWriteHole = true

    let geometry: RAIDGeometry

    init(geometry: RAIDGeometry) {
        self.geometry = geometry
    }

    // MARK: Reads

    /// Rebuilds one extent of a stripe from the other members (data and parity).
    func reconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, rewrite: Bool,
        memberError: (any Error)?, array: RAIDArray
    ) async throws {
        await array.stripeLocks.lock(extent.stripe...extent.stripe)
        defer { array.stripeLocks.unlock(extent.stripe...extent.stripe) }
        let readable = array.readableMembers()
        let others = (0..<geometry.memberCount).filter { $0 != extent.member }
        guard others.allSatisfy({ readable[$0] != nil }) else {
            // Degraded, and this member cannot read the block: no redundancy is left for it.
            if let memberError { throw array.unreadable(extent, because: [(extent.member, memberError)]) }
            throw array.failedError("read", offset: nil, length: extent.length)
        }
        let buffers = others.map { _ in AlignedBuffer(count: Int(extent.length), zeroed: false) }
        let failures = await array.concurrently(zip(others, buffers).map { slot, buffer in
            (slot, { try await readable[slot]!.device.read(into: buffer, at: RAIDArray.dataOffset + extent.memberOffset) })
        })
        if !failures.isEmpty {
            // A member that has gone away is failed; a read error on one that still answers only
            // costs this request (no redundancy is left to answer it from), as md fails the read
            // and keeps the member.
            for failure in failures where RAIDArray.isDeviceGone(failure.error) {
                await array.failMember(slot: failure.slot, because: failure.error)
            }
            throw array.unreadable(extent, because: failures)
        }
        XORParity.generate(sources: buffers, into: destination)
        if rewrite, let member = readable[extent.member] {
            do {
                try await member.device.write(
                    from: UnsafeRawBufferPointer(destination), at: RAIDArray.dataOffset + extent.memberOffset, fua: false)
            } catch {
                await array.failMember(slot: extent.member, because: error)
            }
        }
    }
}
