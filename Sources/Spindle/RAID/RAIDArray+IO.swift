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
    func concurrently(_ jobs: [(slot: Int, work: @Sendable () async throws -> Void)]) async -> [(
        slot: Int, error: Error
    )] {
        @Sendable func attempt(_ job: (slot: Int, work: @Sendable () async throws -> Void)) async -> (
            slot: Int, error: Error
        )? {
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
        let readable = readableMembers()
        let failures = await concurrently(
            geometry.extents(offset: offset, length: UInt64(buffer.count)).map { extent in
                (
                    extent.member,
                    { [self] in
                        let destination = UnsafeMutableRawBufferPointer(
                            start: target.base + Int(extent.requestOffset), count: Int(extent.length))
                        try await personality.read(extent, into: destination, readable: readable, array: self)
                    }
                )
            })
        if let failure = failures.first { throw failure.error }
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
            operation: "read", path: name,
            offset: geometry.logicalOffset(member: extent.member, memberOffset: extent.memberOffset),
            length: extent.length)
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
        let source = RequestBuffer(base: UnsafeMutableRawPointer(mutating: buffer.baseAddress!))
        try await personality.write(from: source, offset: offset, length: UInt64(buffer.count), fua: fua, array: self)
        await awaitFailuresRecorded()
    }

    /// Where the bytes of one member write come from: the caller's buffer (borrowed for the whole
    /// request, as the block device contract says), or the first `length` bytes of a buffer of the
    /// array's own, which the write keeps alive until it completes.
    enum MemberWriteSource: Sendable {
        case request(RequestBuffer, length: Int)
        case owned(AlignedBuffer, length: Int)
    }

    /// Writes the same kind of request to several members; a member that fails is marked faulty, and
    /// the write fails only if the array can no longer serve the data.
    func writeMembers(
        _ writes: [(slot: Int, member: Member, source: MemberWriteSource, memberOffset: UInt64)],
        fua: Bool, operation: String, offset: UInt64?, length: UInt64
    ) async throws {
        let failures = await concurrently(
            writes.map { write in
                (
                    write.slot,
                    {
                        switch write.source {
                        case let .request(source, length):
                            try await write.member.device.write(
                                from: UnsafeRawBufferPointer(start: source.base, count: length), at: write.memberOffset,
                                fua: fua)
                        case let .owned(buffer, length):
                            try await write.member.device.write(
                                from: buffer, range: 0..<length, at: write.memberOffset, fua: fua)
                        }
                    }
                )
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

    /// How a parity write that covers part of a stripe computes the new parity.
    enum PartialStripeWrite: Sendable {
        /// Read the old data of the touched chunks and the old parity; new parity = old parity ^ old
        /// data ^ new data.
        case readModifyWrite
        /// Read the untouched data chunks; new parity = XOR of all data.
        case reconstructWrite
    }

    /// Writes logical `offset ..< offset + length` stripe by stripe, for levels that keep parity per
    /// stripe: marks the write intent of the whole stripes, locks them, and runs `writeStripe` on
    /// each stripe's pieces at once. A stripe whose write needed a member read that failed
    /// (``StripeReadFailure``) is written again without that member (in `unreadable`), as a
    /// degraded write, the member staying in the array; up to one attempt per member.
    func writeByStripe(
        offset: UInt64, length: UInt64,
        writeStripe:
            @escaping @Sendable (_ stripe: UInt64, _ pieces: [RAIDGeometry.Extent], _ unreadable: [Int: any Error])
            async throws -> Void
    ) async throws {
        let extents = geometry.extents(offset: offset, length: length)
        let stripes = extents.first!.stripe...extents.last!.stripe
        try await markWriteIntent(
            memberOffset: stripes.lowerBound * geometry.chunkBytes,
            length: UInt64(stripes.count) * geometry.chunkBytes)
        await stripeLocks.lock(stripes)
        defer { stripeLocks.unlock(stripes) }
        var byStripe: [UInt64: [RAIDGeometry.Extent]] = [:]
        for extent in extents { byStripe[extent.stripe, default: []].append(extent) }
        let attempts = geometry.memberCount
        let failures = await concurrently(
            byStripe.map { stripe, pieces in
                (
                    Int(stripe),
                    {
                        // A member that fails a read the stripe needs is failed on the spot; the stripe is
                        // then written again, degraded, without it.
                        var unreadable: [Int: any Error] = [:]
                        for attempt in 1...attempts {
                            do {
                                try await writeStripe(stripe, pieces, unreadable)
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
                    }
                )
            })
        if let failure = failures.first { throw failure.error }
    }

    // MARK: Flush, discard, zeroes, close

    public func flush() async throws {
        try gate.enter(operation: "flush", name: name)
        defer { gate.leave() }
        let writable = writableMembers()
        let failures = await concurrently(
            writable.enumerated().compactMap { slot, member in
                member.map { member in (slot, { try await member.device.flush() }) }
            })
        for failure in failures { await failMember(slot: failure.slot, because: failure.error) }
        if state.withLock({ $0.failed }) { throw failedError("flush") }
        await awaitFailuresRecorded()
    }

    /// Passed to the members or dropped, as the level says (discard is advisory).
    public func discard(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "discard")
        try await personality.discard(offset: offset, length: length, array: self)
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try validate(offset: offset, length: length, operation: "write-zeroes")
        let pieceBytes = UInt64(
            max(geometry.stripeDataBytes, 1 << 20) / geometry.stripeDataBytes * geometry.stripeDataBytes)
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
