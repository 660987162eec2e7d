/// A caller's buffer, shared with the child tasks of one request.
///
/// @unchecked Sendable: the buffer is borrowed for the whole request, every child task finishes
/// before the request returns, and child tasks touch disjoint parts of it.
struct RequestBuffer: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
}

extension RAIDArray {
    /// Runs member requests at once (one task each; inline when there is only one) and reports each
    /// one's error by slot, in the order of the jobs.
    func concurrently(_ jobs: [(slot: Int, work: @Sendable () async throws -> Void)]) async -> [(slot: Int, error: Error)] {
        @Sendable func attempt(_ job: (slot: Int, work: @Sendable () async throws -> Void)) async -> (slot: Int, error: Error)? {
            do { try await job.work() } catch { return (job.slot, error) }
            return nil
        }
        switch jobs.count {
        case 0:
            return []
        case 1:
            return await attempt(jobs[0]).map { [$0] } ?? []
        case 2:
            // The common small-write case (data and parity, or two mirrors): `async let` children live
            // in the task's own allocator, cheaper than a task group.
            async let first = attempt(jobs[0])
            async let second = attempt(jobs[1])
            return [await first, await second].compactMap { $0 }
        default:
            break
        }
        return await withTaskGroup(of: (Int, Error?).self) { group in
            for (index, job) in jobs.enumerated() {
                group.addTask {
                    do {
                        try await job.work()
                        return (index, nil)
                    } catch {
                        return (index, error)
                    }
                }
            }
            var failures: [(index: Int, error: Error)] = []
            for await (index, error) in group { if let error { failures.append((index, error)) } }
            // In the order of the jobs, not of their completion: the error a request reports does not
            // depend on which member answered first.
            return failures.sorted { $0.index < $1.index }.map { (jobs[$0.index].slot, $0.error) }
        }
    }

    // MARK: Reads

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try validate(offset: offset, length: buffer.count, operation: "read")
        try gate.enter(operation: "read", name: name)
        defer { gate.leave() }
        let target = RequestBuffer(base: buffer.baseAddress!)
        let length = UInt64(buffer.count)
        switch geometry.level {
        case .raid1:
            try await readMirrored(into: target, offset: offset, length: UInt64(buffer.count))
        case .raid0, .raid5:
            let extents = geometry.extents(offset: offset, length: UInt64(buffer.count))
            let readable = readableMembers()
            let failures = await concurrently(extents.map { extent in
                (extent.member, { [self] in
                    let destination = UnsafeMutableRawBufferPointer(
                        start: target.base + Int(extent.requestOffset), count: Int(extent.length))
                    if let member = readable[extent.member] {
                        do {
                            try await member.device.read(into: destination, at: Self.dataOffset + extent.memberOffset)
                            return
                        } catch where geometry.level == .raid5 {
                            // Answer from parity, then rewrite the bad block (or fail the member).
                            try await reconstruct(extent, into: destination, rewrite: true, memberError: error)
                            return
                        }
                    }
                    guard geometry.level == .raid5 else {
                        throw SpindleError(.ioFailed, "slot \(extent.member) of the RAID0 array is not available",
                                           operation: "read", path: name, offset: offset, length: length)
                    }
                    try await reconstruct(extent, into: destination, rewrite: false)
                })
            })
            if let failure = failures.first { throw failure.error }
        }
    }

    /// Reads one mirror, trying the others on error and rewriting the bad one from a good copy.
    private func readMirrored(into target: RequestBuffer, offset: UInt64, length: UInt64) async throws {
        let readable = readableMembers()
        let order: [Int] = state.withLock { state in
            state.readRotation &+= 1
            let start = state.readRotation % geometry.memberCount
            return (0..<geometry.memberCount).map { ($0 + start) % geometry.memberCount }
        }
        let destination = UnsafeMutableRawBufferPointer(start: target.base, count: Int(length))
        var bad: [Int] = []
        var lastError: Error?
        for slot in order {
            guard let member = readable[slot] else { continue }
            do {
                try await member.device.read(into: destination, at: Self.dataOffset + offset)
            } catch {
                lastError = error
                if Self.isDeviceGone(error) {
                    await failMember(slot: slot, because: error)
                } else {
                    bad.append(slot)
                }
                continue
            }
            for badSlot in bad {
                guard let badMember = readable[badSlot] else { continue }
                do {
                    try await badMember.device.write(from: UnsafeRawBufferPointer(destination), at: Self.dataOffset + offset, fua: false)
                } catch {
                    await failMember(slot: badSlot, because: error)
                }
            }
            return
        }
        guard let lastError else { throw failedError("read", offset: offset, length: length) }
        unrecoverableReads.add(1, ordering: .relaxed)
        throw SpindleError(
            .ioFailed, "no in-sync mirror could read these bytes (last error: \(lastError)); the members stay in the array",
            operation: "read", path: name, offset: offset, length: length)
    }

    /// Rebuilds one extent of a RAID5 stripe from the other members (data and parity).
    /// - Parameter memberError: the error of the member's own read, when it answered with one.
    func reconstruct(
        _ extent: RAIDGeometry.Extent, into destination: UnsafeMutableRawBufferPointer, rewrite: Bool, memberError: (any Error)? = nil
    ) async throws {
        await stripeLocks.lock(extent.stripe...extent.stripe)
        defer { stripeLocks.unlock(extent.stripe...extent.stripe) }
        let readable = readableMembers()
        let others = (0..<geometry.memberCount).filter { $0 != extent.member }
        guard others.allSatisfy({ readable[$0] != nil }) else {
            // Degraded, and this member cannot read the block: no redundancy is left for it.
            if let memberError { throw unreadable(extent, because: [(extent.member, memberError)]) }
            throw failedError("read", offset: nil, length: extent.length)
        }
        let buffers = others.map { _ in AlignedBuffer(count: Int(extent.length), zeroed: false) }
        let failures = await concurrently(zip(others, buffers).map { slot, buffer in
            (slot, { try await readable[slot]!.device.read(into: buffer, at: Self.dataOffset + extent.memberOffset) })
        })
        if !failures.isEmpty {
            // A member that has gone away is failed; a read error on one that still answers only
            // costs this request (no redundancy is left to answer it from), as md fails the read
            // and keeps the member.
            for failure in failures where Self.isDeviceGone(failure.error) {
                await failMember(slot: failure.slot, because: failure.error)
            }
            throw unreadable(extent, because: failures)
        }
        XORParity.generate(sources: buffers, into: destination)
        if rewrite, let member = readable[extent.member] {
            do {
                try await member.device.write(from: UnsafeRawBufferPointer(destination), at: Self.dataOffset + extent.memberOffset, fua: false)
            } catch {
                await failMember(slot: extent.member, because: error)
            }
        }
    }

    /// Whether an error says the device itself is gone (as opposed to a bad block on a device that
    /// still answers): only then is a member failed on a read.
    static func isDeviceGone(_ error: Error) -> Bool {
        (error as? SpindleError)?.code == .deviceGone
    }

    /// Counts and describes a read that neither the member nor redundancy could answer.
    func unreadable(_ extent: RAIDGeometry.Extent, because failures: [(slot: Int, error: Error)]) -> SpindleError {
        unrecoverableReads.add(1, ordering: .relaxed)
        let detail = failures.map { "slot \($0.slot): \($0.error)" }.joined(separator: "; ")
        return SpindleError(
            .ioFailed,
            "\(extent.length) bytes of stripe \(extent.stripe) on slot \(extent.member) cannot be read or rebuilt from redundancy (\(detail)); the members stay in the array",
            operation: "read", path: name, offset: geometry.logicalOffset(member: extent.member, memberOffset: extent.memberOffset), length: extent.length)
    }

    // MARK: Writes

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try validate(offset: offset, length: buffer.count, operation: "write")
        try gate.enter(operation: "write", name: name)
        defer { gate.leave() }
        writesInFlight.add(1, ordering: .sequentiallyConsistent)
        defer {
            lastWriteNanos.store(monotonicNanos(), ordering: .relaxed)
            writesInFlight.subtract(1, ordering: .sequentiallyConsistent)
        }
        if state.withLock({ $0.failed }) { throw failedError("write", offset: offset, length: UInt64(buffer.count)) }
        try await writeToMembers(from: buffer, at: offset, fua: fua)
        await awaitFailuresRecorded()
    }

    private func writeToMembers(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        let source = RequestBuffer(base: UnsafeMutableRawPointer(mutating: buffer.baseAddress!))
        let length = UInt64(buffer.count)
        switch geometry.level {
        case .raid0:
            let extents = geometry.extents(offset: offset, length: length)
            let writable = writableMembers()
            let failures = await concurrently(extents.map { extent in
                (extent.member, {
                    guard let member = writable[extent.member] else {
                        throw SpindleError(.ioFailed, "slot \(extent.member) of the RAID0 array is not available", operation: "write")
                    }
                    try await member.device.write(
                        from: UnsafeRawBufferPointer(start: source.base + Int(extent.requestOffset), count: Int(extent.length)),
                        at: Self.dataOffset + extent.memberOffset, fua: fua)
                })
            })
            if let failure = failures.first { throw failure.error }
        case .raid1:
            let stripes = (offset / geometry.chunkBytes)...((offset + length - 1) / geometry.chunkBytes)
            try await markWriteIntent(memberOffset: offset, length: length)
            await stripeLocks.lock(stripes)
            defer { stripeLocks.unlock(stripes) }
            try await writeMembers(
                writableMembers().enumerated().compactMap { slot, member in
                    member.map { (slot, $0, .request(source, length: Int(length)), Self.dataOffset + offset) }
                },
                fua: fua, operation: "write", offset: offset, length: length)
        case .raid5:
            let extents = geometry.extents(offset: offset, length: length)
            let stripes = extents.first!.stripe...extents.last!.stripe
            try await markWriteIntent(memberOffset: stripes.lowerBound * geometry.chunkBytes,
                                      length: UInt64(stripes.count) * geometry.chunkBytes)
            await stripeLocks.lock(stripes)
            defer { stripeLocks.unlock(stripes) }
            var byStripe: [UInt64: [RAIDGeometry.Extent]] = [:]
            for extent in extents { byStripe[extent.stripe, default: []].append(extent) }
            let attempts = geometry.memberCount
            let failures = await concurrently(byStripe.map { stripe, pieces in
                (Int(stripe), {
                    // A member that fails a read the stripe needs is failed on the spot; the stripe is
                    // then written again, degraded, without it.
                    var unreadable: [Int: any Error] = [:]
                    for attempt in 1...attempts {
                        do {
                            try await self.writeStripe(stripe, pieces: pieces, source: source, fua: fua, avoiding: unreadable)
                            return
                        } catch let failure as StripeReadFailure {
                            if attempt == attempts || self.state.withLock({ $0.failed }) { throw failure.error }
                            // Compute this stripe without that member's block (from parity and the
                            // others), as a degraded write does; the member stays in the array.
                            unreadable[failure.slot] = failure.error
                        } catch {
                            if attempt == attempts || self.state.withLock({ $0.failed }) { throw error }
                        }
                    }
                })
            })
            if let failure = failures.first { throw failure.error }
        }
    }

    /// Where the bytes of one member write come from: the caller's buffer (borrowed for the whole
    /// request, as the block device contract says), or a buffer of the array's own, which the write
    /// keeps alive until it completes.
    enum MemberWriteSource: Sendable {
        case request(RequestBuffer, length: Int)
        case owned(AlignedBuffer)
    }

    /// Writes the same kind of request to several members; a member that fails is marked faulty, and
    /// the write fails only if the array can no longer serve the data.
    private func writeMembers(
        _ writes: [(slot: Int, member: Member, source: MemberWriteSource, memberOffset: UInt64)],
        fua: Bool, operation: String, offset: UInt64?, length: UInt64
    ) async throws {
        let failures = await concurrently(writes.map { write in
            (write.slot, {
                switch write.source {
                case let .request(source, length):
                    try await write.member.device.write(
                        from: UnsafeRawBufferPointer(start: source.base, count: length), at: write.memberOffset, fua: fua)
                case let .owned(buffer):
                    try await write.member.device.write(from: buffer, at: write.memberOffset, fua: fua)
                }
            })
        })
        for failure in failures { await failMember(slot: failure.slot, because: failure.error) }
        if state.withLock({ $0.failed }) || writes.count == failures.count {
            throw failedError(operation, offset: offset, length: length)
        }
    }

    /// A member read a partial-stripe write needed failed.
    struct StripeReadFailure: Error {
        var slot: Int
        var error: any Error
    }

    /// How a RAID5 write that covers part of a stripe computes the new parity.
    enum PartialStripeWrite: Sendable {
        /// Read the old data of the touched chunks and the old parity; new parity = old parity ^ old
        /// data ^ new data.
        case readModifyWrite
        /// Read the untouched data chunks; new parity = XOR of all data.
        case reconstructWrite
    }

    /// Writes the pieces of one RAID5 stripe and its parity: a full stripe with no reads; otherwise
    /// read-modify-write or reconstruct-write, whichever reads less (or the one
    /// ``partialStripeWriteOverride`` forces, for tests); reconstructing a missing member's old data
    /// from parity when the array is degraded.
    private func writeStripe(
        _ stripe: UInt64, pieces: [RAIDGeometry.Extent], source: RequestBuffer, fua: Bool, avoiding unreadableSlots: [Int: any Error] = [:]
    ) async throws {
        let chunk = geometry.chunkBytes
        let low = pieces.map { $0.memberOffset - stripe * chunk }.min()!
        let high = pieces.map { $0.memberOffset - stripe * chunk + $0.length }.max()!
        let length = Int(high - low)
        let memberOffset = Self.dataOffset + stripe * chunk + low
        let dataCount = geometry.dataMembersPerStripe
        let parityMember = geometry.parityMember(stripe: stripe)
        let memberOf = (0..<dataCount).map { geometry.dataMember(stripe: stripe, index: $0) }
        var readableNow = readableMembers()
        for slot in unreadableSlots.keys { readableNow[slot] = nil }
        let readable = readableNow
        let writable = writableMembers()
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
            guard !unreadableSlots.isEmpty else { throw failedError("write", offset: nil, length: UInt64(length)) }
            // Members that answer but failed a read here stay in the array; only this write fails.
            unrecoverableReads.add(1, ordering: .relaxed)
            let detail = unreadableSlots.sorted { $0.key < $1.key }.map { "slot \($0.key): \($0.value)" }.joined(separator: "; ")
            throw SpindleError(
                .ioFailed,
                "stripe \(stripe) cannot be written: its parity needs blocks that cannot be read and no redundancy is left to rebuild them (\(detail)); the members stay in the array",
                operation: "write", path: name, offset: geometry.logicalOffset(member: memberOf[0], memberOffset: stripe * chunk + low), length: UInt64(length))
        }
        // The new contents of each data chunk's [low, high) and of the parity's.
        let data = (0..<dataCount).map { _ in AlignedBuffer(count: length, zeroed: false) }
        let parity = AlignedBuffer(count: length, zeroed: false)

        func readMembers(_ slots: [(slot: Int, buffer: AlignedBuffer)]) async throws {
            let failures = await concurrently(slots.map { slot, buffer in
                (slot, { try await readable[slot]!.device.read(into: buffer, at: memberOffset) })
            })
            if let failure = failures.first {
                // The stripe cannot be computed without it. A member that is gone is failed at once
                // (the caller retries degraded); another read error may pass: the caller retries,
                // and fails the member only if it keeps failing.
                if Self.isDeviceGone(failure.error) {
                    await failMember(slot: failure.slot, because: failure.error)
                }
                throw StripeReadFailure(slot: failure.slot, error: failure.error)
            }
        }
        /// Copies the caller's piece for data chunk `index` into its place in `buffer`.
        func merge(_ index: Int, into buffer: AlignedBuffer) {
            guard let piece = touched[index] else { return }
            buffer.slice(offset: Int(piece.memberOffset - stripe * chunk - low), length: Int(piece.length))
                .copyMemory(from: UnsafeRawBufferPointer(start: source.base + Int(piece.requestOffset), count: Int(piece.length)))
        }

        let touchedIndices = (0..<dataCount).filter { touched[$0] != nil }
        let fullStripe = low == 0 && high == chunk && (0..<dataCount).allSatisfy(covers)
        if fullStripe {
            for index in 0..<dataCount { merge(index, into: data[index]) }
            XORParity.generate(sources: data, into: parity, length: length)
        } else if unreadable.isEmpty && parityReadable {
            let readModifyWriteReads = touchedIndices.count + 1
            let reconstructWriteReads = (dataCount - touchedIndices.count) + touchedIndices.filter { !covers($0) }.count
            let method = partialStripeWriteOverride.withLock { $0 }
                ?? (readModifyWriteReads < reconstructWriteReads ? .readModifyWrite : .reconstructWrite)
            switch method {
            case .readModifyWrite:
                let old = touchedIndices.map { _ in AlignedBuffer(count: length, zeroed: false) }
                let oldParity = AlignedBuffer(count: length, zeroed: false)
                try await readMembers(zip(touchedIndices, old).map { (memberOf[$0], $1) } + [(parityMember, oldParity)])
                for (position, index) in touchedIndices.enumerated() {
                    data[index].copy(from: old[position])
                    merge(index, into: data[index])
                }
                // new parity = old parity ^ old data ^ new data, over the touched members
                XORParity.generate(sources: [oldParity] + old + touchedIndices.map { data[$0] }, into: parity, length: length)
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
            let oldParity = AlignedBuffer(count: length, zeroed: false)
            if !unreadable.isEmpty { reads.append((parityMember, oldParity)) }
            try await readMembers(reads)
            if let missing = unreadable.first {
                XORParity.generate(sources: present.map { data[$0] } + [oldParity], into: data[missing], length: length)
            }
            for index in touchedIndices { merge(index, into: data[index]) }
            XORParity.generate(sources: data, into: parity, length: length)
        }

        var writes: [(slot: Int, member: Member, source: MemberWriteSource, memberOffset: UInt64)] = []
        let indicesToWrite = fullStripe ? Array(0..<dataCount) : touchedIndices
        for index in indicesToWrite {
            if let member = writable[memberOf[index]] {
                writes.append((memberOf[index], member, .owned(data[index]), memberOffset))
            }
        }
        if let member = writable[parityMember] {
            writes.append((parityMember, member, .owned(parity), memberOffset))
        }
        try await writeMembers(writes, fua: fua, operation: "write", offset: nil, length: UInt64(length))
    }

    // MARK: Flush, discard, zeroes, close

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        let writable = writableMembers()
        let failures = await concurrently(writable.enumerated().compactMap { slot, member in
            member.map { member in (slot, { try await member.device.flush() }) }
        })
        for failure in failures { await failMember(slot: failure.slot, because: failure.error) }
        if state.withLock({ $0.failed }) { throw failedError("flush") }
        await awaitFailuresRecorded()
    }

    /// RAID0 passes discards to its members; RAID1 and RAID5 keep the data (discard is advisory, and
    /// dropping it on one member would make mirrors or parity disagree).
    public func discard(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "discard")
        guard geometry.level == .raid0 else { return }
        try gate.enter(operation: "discard", name: name)
        defer { gate.leave() }
        let writable = writableMembers()
        for extent in geometry.extents(offset: offset, length: length) {
            try await writable[extent.member]?.device.discard(offset: Self.dataOffset + extent.memberOffset, length: extent.length)
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "write-zeroes")
        let pieceBytes = UInt64(max(geometry.stripeDataBytes, 1 << 20) / geometry.stripeDataBytes * geometry.stripeDataBytes)
        let zeros = AlignedBuffer(count: Int(min(pieceBytes, length)))
        var position = offset
        while position < offset + length {
            let piece = min(UInt64(zeros.count), offset + length - position)
            try await write(from: zeros, range: 0..<Int(piece), at: position)
            position += piece
        }
    }

    /// Waits for requests in flight, flushes, marks the array clean (an array closed this way needs
    /// no resync), and closes the members.
    public func close() async throws {
        guard await gate.close() else { return }
        cleaner.withLock { $0?.cancel() }
        // Wait out a clean in progress, so its writes finish before the members close.
        await bitmapLock.lock()
        bitmapLock.unlock()
        let writable = writableMembers()
        for member in writable.compactMap({ $0 }) { try? await member.device.flush() }
        let wasDirty = state.withLock { state -> Bool in
            let dirty = state.dirty
            state.dirty = false
            state.dirtyOnDisk = false
            state.bitmap = [UInt8](repeating: 0, count: Self.bitmapBytes)
            return dirty
        }
        if wasDirty {
            try? await writeBitmap()
            try? await commitSuperblocks()
        }
        let everyone = state.withLock { state in state.slots.compactMap { $0 } + state.spares }
        for member in everyone { try? await member.device.close() }
    }
}
