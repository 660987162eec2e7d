import Synchronization

/// RAID1: every member holds every byte. Reads take turns over the in-sync mirrors, and a read
/// error is answered from another mirror, which is then copied over the bad block; writes go to
/// every writable mirror. The array serves every byte while one mirror is left.
final class RAID1: RAIDPersonality {
    static let minimumMembers = 2
    static func redundancy(memberCount: Int) -> Int { memberCount - 1 }
    /// Each mirror holds a whole version of every block, old or new: any one of them is a valid answer.
    static let hasWriteHole = false

    let geometry: RAIDGeometry
    /// Turns reads over the mirrors.
    private let rotation = Atomic<Int>(0)

    init(geometry: RAIDGeometry) {
        self.geometry = geometry
    }

    // MARK: Reads

    /// Reads one mirror, taking turns, and the others in order when it fails.
    func read(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        var turn = extent
        turn.member = Int(
            UInt(bitPattern: rotation.wrappingAdd(1, ordering: .relaxed).newValue) % UInt(geometry.memberCount))
        try await readMemberOrReconstruct(turn, into: destination, readable: readable, array: array)
    }

    /// Reads the mirrors after `extent.member` in turn until one answers, then copies its answer over
    /// the mirrors that answered with an error (the member too, with `rewrite`). A mirror that is
    /// gone is failed.
    ///
    /// Holds the extent's stripe locks throughout, as writes do: else a write landing between the
    /// read of the good mirror and the rewrite would be undone on the bad one by the older copy
    /// (the mirrors would then disagree, each one passing its checks).
    func reconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, rewrite: Bool,
        memberError: (any Error)?, array: RAIDArray
    ) async throws {
        let firstStripe = extent.memberOffset / geometry.chunkBytes
        let lastStripe = (extent.memberOffset + extent.length - 1) / geometry.chunkBytes
        let stripes = firstStripe...lastStripe
        await array.stripeLocks.lock(stripes)
        defer { array.stripeLocks.unlock(stripes) }
        let readable = array.readableMembers()
        let offset = RAIDArray.dataOffset + extent.memberOffset
        var bad: [Int] = []
        var lastError = memberError
        if let memberError {
            if RAIDArray.isDeviceGone(memberError) {
                await array.failMember(slot: extent.member, because: memberError)
            } else if rewrite {
                bad.append(extent.member)
            }
        }
        for step in 1..<geometry.memberCount {
            let slot = (extent.member + step) % geometry.memberCount
            guard let member = readable[slot] else { continue }
            do {
                try await member.device.read(into: destination, at: offset)
            } catch {
                lastError = error
                if RAIDArray.isDeviceGone(error) {
                    await array.failMember(slot: slot, because: error)
                } else {
                    bad.append(slot)
                }
                continue
            }
            for badSlot in bad {
                guard let badMember = readable[badSlot] else { continue }
                do {
                    try await badMember.device.write(from: UnsafeRawBufferPointer(destination), at: offset, fua: false)
                } catch {
                    await array.failMember(slot: badSlot, because: error)
                }
            }
            return
        }
        guard let lastError else { throw array.failedError("read", offset: extent.memberOffset, length: extent.length) }
        array.unrecoverableReads.add(1, ordering: .relaxed)
        throw SpindleError(
            .ioFailed,
            "no in-sync mirror could read these bytes (last error: \(lastError)); the members stay in the array",
            operation: "read", path: array.name, offset: extent.memberOffset, length: extent.length)
    }

    // MARK: Writes

    /// Writes every writable mirror.
    func write(from source: RequestBuffer, offset: UInt64, length: UInt64, fua: Bool, array: RAIDArray) async throws {
        let stripes = (offset / geometry.chunkBytes)...((offset + length - 1) / geometry.chunkBytes)
        try await array.markWriteIntent(memberOffset: offset, length: length)
        await array.stripeLocks.lock(stripes)
        defer { array.stripeLocks.unlock(stripes) }
        try await array.writeMembers(
            array.writableMembers().enumerated().compactMap { slot, member in
                member.map { (slot, $0, .request(source, length: Int(length)), RAIDArray.dataOffset + offset) }
            },
            fua: fua, operation: "write", offset: offset, length: length)
    }

    /// Mirrors keep the data: dropping it on some would make them disagree.
    func discard(offset: UInt64, length: UInt64, array: RAIDArray) async throws {}

    // MARK: Check, repair, rebuild

    /// Copies a good mirror's chunk over unreadable ones, then compares the in-sync mirrors (a
    /// member being rebuilt is not read: it is rebuilt again where it may differ); with `repair`,
    /// rewrites the others from the first.
    func check(_ stripe: ScrubStripe, repair: Bool, array: RAIDArray) async throws -> StripeCheck {
        var result = StripeCheck()
        if !stripe.unreadable.isEmpty {
            let good = stripe.slots.filter { !stripe.unreadable.contains($0) }
            guard let source = good.first else {
                result.unreadable = stripe.unreadable.sorted()
                return result
            }
            for slot in stripe.unreadable {
                let buffer = stripe.buffer(of: slot)
                buffer.copy(from: stripe.buffer(of: source), offset: stripe.within, length: stripe.size)
                try await array.rewriteChunk(of: stripe, slot: slot, from: buffer)
                result.readErrorsRepaired += 1
            }
        }
        guard stripe.slots.count >= 2 else { return result }
        let first = stripe.buffers[0]
        if stripe.buffers.dropFirst().allSatisfy({ $0.equals(first, offset: stripe.within, length: stripe.size) }) {
            return result
        }
        result.mismatch = true
        guard repair else { return result }
        for slot in stripe.slots.dropFirst() {
            try await stripe.readable[slot]!.device.write(from: first, range: stripe.range, at: stripe.memberOffset)
        }
        result.repaired = true
        return result
    }

    /// Copies any in-sync mirror; on a read error, tries the next.
    func rebuild(
        slot: Int, memberOffset: UInt64, into result: AlignedBuffer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        let sources = (0..<geometry.memberCount).filter { $0 != slot && readable[$0] != nil }
        var errors: [String] = []
        for source in sources {
            do {
                try await readable[source]!.device.read(into: result, at: RAIDArray.dataOffset + memberOffset)
                return
            } catch {
                if RAIDArray.isDeviceGone(error) { await array.failMember(slot: source, because: error) }
                errors.append("\(readable[source]!.name): \(error)")
            }
        }
        if sources.isEmpty { throw array.failedError("rebuild") }
        throw array.rebuildSourceError(
            slot: slot, memberOffset: memberOffset, length: UInt64(result.count), errors: errors)
    }
}
