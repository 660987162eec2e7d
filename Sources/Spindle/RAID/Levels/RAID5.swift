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
        let length = Int(extent.length)
        // The reads all return (through `concurrently`) before the buffers go back to the pool.
        let pooled = PooledBuffers(array.bufferPool)
        defer { pooled.giveBack() }
        let buffers = others.map { _ in pooled.take(length) }
        let failures = await array.concurrently(
            zip(others, buffers).map { slot, buffer in
                (
                    slot,
                    {
                        try await readable[slot]!.device.read(
                            into: buffer, range: 0..<length, at: RAIDArray.dataOffset + extent.memberOffset)
                    }
                )
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
        // A member with the integrity layer says whether what parity gives is what it last stored:
        // after a crash parity itself may be stale (the write hole), and then the rebuilt block
        // is neither its old nor its new contents, so it is neither returned nor written.
        if memberError != nil, let checked = readable[extent.member]?.device as? any IntegrityChecking,
            !(try await checked.matchesChecksums(
                UnsafeRawBufferPointer(destination), at: RAIDArray.dataOffset + extent.memberOffset))
        {
            throw array.unreadable(
                extent,
                because: [
                    (
                        extent.member,
                        SpindleError(
                            .corrupted,
                            "the block fails its checksum, and what parity rebuilds does not match it either",
                            operation: "read", path: checked.name,
                            offset: RAIDArray.dataOffset + extent.memberOffset, length: extent.length)
                    )
                ])
        }
        if rewrite, let member = readable[extent.member] {
            do {
                try await member.device.write(
                    from: UnsafeRawBufferPointer(destination), at: RAIDArray.dataOffset + extent.memberOffset,
                    fua: false)
            } catch {
                await array.failMember(slot: extent.member, because: error)
            }
        }
    }

    // MARK: Writes

    /// Writes stripe by stripe (``writeStripe(_:pieces:source:fua:avoiding:array:)``).
    func write(from source: RequestBuffer, offset: UInt64, length: UInt64, fua: Bool, array: RAIDArray) async throws {
        try await array.writeByStripe(offset: offset, length: length) { stripe, pieces, unreadable in
            try await writeStripe(stripe, pieces: pieces, source: source, fua: fua, avoiding: unreadable, array: array)
        }
    }

    /// Parity covers the data: discarding it on some members would make them disagree.
    func discard(offset: UInt64, length: UInt64, array: RAIDArray) async throws {}

    /// Writes the pieces of one stripe and its parity: a full stripe with no reads; otherwise
    /// read-modify-write or reconstruct-write, whichever reads less (or the one
    /// `partialStripeWriteOverride` forces, for tests); reconstructing a missing member's old data
    /// from parity when the array is degraded. Members in `unreadableSlots` are treated as missing.
    /// The buffers come from the array's pool and go back once every member request has returned.
    func writeStripe(
        _ stripe: UInt64, pieces: [RAIDGeometry.Extent], source: RequestBuffer, fua: Bool,
        avoiding unreadableSlots: [Int: any Error], array: RAIDArray
    ) async throws {
        let chunk = geometry.chunkBytes
        let low = pieces.map { $0.memberOffset - stripe * chunk }.min()!
        let high = pieces.map { $0.memberOffset - stripe * chunk + $0.length }.max()!
        let length = Int(high - low)
        let memberOffset = RAIDArray.dataOffset + stripe * chunk + low
        let dataCount = geometry.dataMembersPerStripe
        let parityMember = geometry.parityMember(stripe: stripe)
        let memberOf = (0..<dataCount).map { geometry.dataMember(stripe: stripe, index: $0) }
        var readableNow = array.readableMembers()
        for slot in unreadableSlots.keys { readableNow[slot] = nil }
        let readable = readableNow
        let writable = array.writableMembers()
        var touched = [RAIDGeometry.Extent?](repeating: nil, count: dataCount)
        for piece in pieces { touched[piece.dataIndex] = piece }
        func covers(_ index: Int) -> Bool {
            guard let piece = touched[index] else { return false }
            return piece.memberOffset - stripe * chunk == low && piece.length == UInt64(length)
        }
        let unreadable = (0..<dataCount).filter { readable[memberOf[$0]] == nil }
        let parityReadable = readable[parityMember] != nil
        // A missing data member can be rebuilt only from parity: two unreadable members lose the stripe.
        if !unreadable.isEmpty && (unreadable.count > 1 || !parityReadable) {
            guard !unreadableSlots.isEmpty else {
                throw array.failedError("write", offset: nil, length: UInt64(length))
            }
            // Members that answer but failed a read here stay in the array; only this write fails.
            array.unrecoverableReads.add(1, ordering: .relaxed)
            let detail = unreadableSlots.sorted { $0.key < $1.key }.map { "slot \($0.key): \($0.value)" }.joined(
                separator: "; ")
            throw SpindleError(
                .ioFailed,
                "stripe \(stripe) cannot be written: its parity needs blocks that cannot be read and no redundancy is left to rebuild them (\(detail)); the members stay in the array",
                operation: "write", path: array.name,
                offset: geometry.logicalOffset(member: memberOf[0], memberOffset: stripe * chunk + low),
                length: UInt64(length))
        }
        // Every member request below is awaited through `concurrently`, which returns only once each
        // one has: the buffers go back to the pool after the last of them, on every path out.
        let pooled = PooledBuffers(array.bufferPool)
        defer { pooled.giveBack() }
        // The new contents of each data chunk's [low, high) and of the parity's.
        let data = (0..<dataCount).map { _ in pooled.take(length) }
        let parity = pooled.take(length)

        func readMembers(_ slots: [(slot: Int, buffer: AlignedBuffer)]) async throws {
            let failures = await array.concurrently(
                slots.map { slot, buffer in
                    (slot, { try await readable[slot]!.device.read(into: buffer, range: 0..<length, at: memberOffset) })
                })
            if let failure = failures.first {
                // The stripe cannot be computed without it. A member that is gone is failed at once
                // (the caller retries degraded); another read error may pass: the caller retries,
                // and fails the member only if it keeps failing.
                if RAIDArray.isDeviceGone(failure.error) {
                    await array.failMember(slot: failure.slot, because: failure.error)
                }
                throw RAIDArray.StripeReadFailure(slot: failure.slot, error: failure.error)
            }
        }
        /// Copies the caller's piece for data chunk `index` into its place in `buffer`.
        func merge(_ index: Int, into buffer: AlignedBuffer) {
            guard let piece = touched[index] else { return }
            buffer.copy(
                from: UnsafeRawBufferPointer(start: source.base + Int(piece.requestOffset), count: Int(piece.length)),
                at: Int(piece.memberOffset - stripe * chunk - low))
        }

        let touchedIndices = (0..<dataCount).filter { touched[$0] != nil }
        let fullStripe = low == 0 && high == chunk && (0..<dataCount).allSatisfy(covers)
        if fullStripe {
            for index in 0..<dataCount { merge(index, into: data[index]) }
            XORParity.generate(sources: data, into: parity, length: length)
        } else if unreadable.isEmpty && parityReadable {
            let readModifyWriteReads = touchedIndices.count + 1
            let reconstructWriteReads = (dataCount - touchedIndices.count) + touchedIndices.filter { !covers($0) }.count
            let method =
                array.partialStripeWriteOverride.withLock { $0 }
                ?? (readModifyWriteReads < reconstructWriteReads ? .readModifyWrite : .reconstructWrite)
            switch method {
            case .readModifyWrite:
                let old = touchedIndices.map { _ in pooled.take(length) }
                let oldParity = pooled.take(length)
                try await readMembers(zip(touchedIndices, old).map { (memberOf[$0], $1) } + [(parityMember, oldParity)])
                for (position, index) in touchedIndices.enumerated() {
                    data[index].copy(from: old[position], length: length)
                    merge(index, into: data[index])
                }
                // new parity = old parity ^ old data ^ new data, over the touched members
                XORParity.generate(
                    sources: [oldParity] + old + touchedIndices.map { data[$0] }, into: parity, length: length)
            case .reconstructWrite:
                let toRead = (0..<dataCount).filter { touched[$0] == nil || !covers($0) }
                try await readMembers(toRead.map { (memberOf[$0], data[$0]) })
                for index in touchedIndices { merge(index, into: data[index]) }
                XORParity.generate(sources: data, into: parity, length: length)
            }
        } else {
            // Degraded: read everything readable, rebuild the missing member's old data, recompute.
            let present = (0..<dataCount).filter { readable[memberOf[$0]] != nil }
            var reads = present.map { (memberOf[$0], data[$0]) }
            let oldParity = pooled.take(length)
            if !unreadable.isEmpty { reads.append((parityMember, oldParity)) }
            try await readMembers(reads)
            if let missing = unreadable.first {
                XORParity.generate(sources: present.map { data[$0] } + [oldParity], into: data[missing], length: length)
            }
            for index in touchedIndices { merge(index, into: data[index]) }
            XORParity.generate(sources: data, into: parity, length: length)
        }

        var writes: [(slot: Int, member: RAIDArray.Member, source: RAIDArray.MemberWriteSource, memberOffset: UInt64)] =
            []
        let indicesToWrite = fullStripe ? Array(0..<dataCount) : touchedIndices
        for index in indicesToWrite {
            if let member = writable[memberOf[index]] {
                writes.append((memberOf[index], member, .owned(data[index], length: length), memberOffset))
            }
        }
        if let member = writable[parityMember] {
            writes.append((parityMember, member, .owned(parity, length: length), memberOffset))
        }
        try await array.writeMembers(writes, fua: fua, operation: "write", offset: nil, length: UInt64(length))
    }

    // MARK: Check, repair, rebuild

    /// Rebuilds one unreadable chunk from the others (with every member read), then checks that
    /// parity matches the data; with `repair`, rewrites the parity from the data.
    func check(_ stripe: ScrubStripe, repair: Bool, array: RAIDArray) async throws -> StripeCheck {
        var result = StripeCheck()
        let complete = stripe.slots.count == geometry.memberCount
        if !stripe.unreadable.isEmpty {
            guard complete && stripe.unreadable.count == 1 else {
                result.unreadable = stripe.unreadable.sorted()
                return result
            }
            let good = stripe.slots.filter { !stripe.unreadable.contains($0) }.map { stripe.buffer(of: $0) }
            for slot in stripe.unreadable {
                let buffer = stripe.buffer(of: slot)
                XORParity.generate(
                    sources: good, offset: stripe.within, into: buffer, parityOffset: stripe.within, length: stripe.size
                )
                // With the integrity layer the rebuilt chunk must be what the member last stored:
                // in a stripe a crash left with stale parity it is not, and writing it would put
                // garbage where the member holds its old or its new data. It stays as it is (a
                // crash's suspect blocks then keep their contents, and parity follows them).
                if let checked = stripe.readable[slot]?.device as? any IntegrityChecking,
                    !(try await checked.matchesChecksums(buffer, range: stripe.range, at: stripe.memberOffset))
                {
                    result.unreadable = [slot]
                    return result
                }
                try await array.rewriteChunk(of: stripe, slot: slot, from: buffer)
                result.readErrorsRepaired += 1
            }
        }
        // Parity is checked only with every member read.
        guard complete else { return result }
        if XORParity.check(stripe.buffers, offset: stripe.within, length: stripe.size) { return result }
        result.mismatch = true
        guard repair else { return result }
        let parityMember = geometry.parityMember(stripe: stripe.stripe)
        let parity = AlignedBuffer(count: stripe.size)
        let data = stripe.slots.indices.filter { stripe.slots[$0] != parityMember }.map { stripe.buffers[$0] }
        XORParity.generate(sources: data, offset: stripe.within, into: parity, length: stripe.size)
        try await stripe.readable[parityMember]!.device.write(from: parity, at: stripe.memberOffset)
        result.repaired = true
        return result
    }

    /// The XOR of every other member.
    func rebuild(
        slot: Int, memberOffset: UInt64, into result: AlignedBuffer, readable: [RAIDArray.Member?],
        array: RAIDArray
    ) async throws {
        let sources = (0..<geometry.memberCount).filter { $0 != slot && readable[$0] != nil }
        guard sources.count == geometry.memberCount - 1 else { throw array.failedError("rebuild") }
        let buffers = sources.map { _ in AlignedBuffer(count: result.count, zeroed: false) }
        let failures = await array.concurrently(
            zip(sources, buffers).map { source, buffer in
                (
                    source,
                    { try await readable[source]!.device.read(into: buffer, at: RAIDArray.dataOffset + memberOffset) }
                )
            })
        if !failures.isEmpty {
            // A source that is gone is failed (and the array with it); a read error on one that
            // answers stops the rebuild here, members untouched, to be resumed from the checkpoint.
            for failure in failures where RAIDArray.isDeviceGone(failure.error) {
                await array.failMember(slot: failure.slot, because: failure.error)
            }
            throw array.rebuildSourceError(
                slot: slot, memberOffset: memberOffset, length: UInt64(result.count),
                errors: failures.map { "\(readable[$0.slot]!.name): \($0.error)" })
        }
        XORParity.generate(sources: buffers, into: result, length: result.count)
    }
}
