extension RAIDArray {
    /// After an unclean shutdown: makes mirrors or parity agree again in the regions the write-intent
    /// bitmap marks (all of the array when no member's bitmap can be read). Keeps the dirty state, so
    /// a crash during resync leads to another.
    ///
    /// Without `rebuildingMember`, the member being rebuilt is left as it is (a first pass that
    /// repairs members with the integrity layer from redundancy, before their suspects are resolved).
    func resyncDirtyRegions(rebuildingMember: Bool = true) async throws -> UInt64 {
        guard geometry.redundancy > 0 else { return 0 }
        let readable = readableMembers()
        // The union of every member's bitmap: a member added or rebuilt since the bits were set
        // may not carry them, and missing one dirty region would leave its mirrors (or parity)
        // disagreeing for good.
        var bits: [UInt8]?
        for member in readable.compactMap({ $0 }) {
            let buffer = AlignedBuffer(count: Self.bitmapBytes)
            if (try? await member.device.read(into: buffer, at: Self.bitmapOffset)) != nil {
                let read = buffer.array
                bits = bits.map { zip($0, read).map { $0 | $1 } } ?? read
            }
        }
        let regionBytes = UInt64(1) << UInt64(bitmapChunkShift)
        let regionCount = Int((geometry.memberDataBytes + regionBytes - 1) / regionBytes)
        // A member being rebuilt took the writes below its checkpoint too, and the crash may have
        // dropped or torn them differently there than on the others: those parts of the dirty
        // regions are rebuilt onto it again (as md resyncs onto a recovering member); the
        // checkpoint stays where it was.
        let (rebuildSlot, checkpoint) = state.withLock { ($0.rebuildSlot, $0.rebuildCheckpointBytes) }
        let step = stepBytes
        var total: UInt64 = 0
        for region in 0..<regionCount {
            if let bits, bits[region / 8] & (1 << UInt8(region % 8)) == 0 { continue }
            let start = UInt64(region) * regionBytes
            let end = min(start + regionBytes, geometry.memberDataBytes)
            _ = try await checkRange(memberStart: start, memberEnd: end, repair: true, progress: nil)
            if rebuildSlot >= 0 && rebuildingMember {
                var position = start
                while position < min(end, checkpoint) {
                    let length = min(step, min(end, checkpoint) - position)
                    try await rebuildStep(slot: rebuildSlot, memberOffset: position, length: length)
                    position += length
                }
            }
            total += end - start
        }
        // The repairs must be on disk before anything rewrites the bitmap: the next write starts a
        // fresh one, and a crash after that would find the repaired regions unmarked.
        for member in writableMembers().compactMap({ $0 }) { try await member.device.flush() }
        return total
    }

    // MARK: Scrub

    /// What a scrub found.
    public struct ScrubReport: Sendable, Codable {
        public var checkedBytes: UInt64
        /// Logical offsets (array bytes) of stripes whose copies or parity disagreed.
        public var mismatchOffsets: [UInt64]
        public var mismatches: Int
        public var repaired: Int
        /// Chunks a member could not read, rebuilt from redundancy and rewritten.
        public var readErrorsRepaired: Int = 0
        /// Member offsets (of member data areas, with the slot) of chunks that could not be read
        /// nor rebuilt: no redundancy was left for them. The members stay in the array.
        public var unreadable: [UnreadableChunk] = []

        public struct UnreadableChunk: Sendable, Codable, Equatable {
            public var slot: Int
            public var member: String
            public var memberOffset: UInt64
        }

        /// Per member with the integrity layer: blocks the scrub found failing their checksums, and
        /// those rewritten from redundancy.
        public var integrity: [MemberIntegrity] = []

        public struct MemberIntegrity: Sendable, Codable, Equatable {
            public var slot: Int
            public var member: String
            public var corruptBlocksFound: UInt64
            public var corruptBlocksRepaired: UInt64
        }
    }

    /// Progress of a long operation (rebuild, scrub).
    public struct Progress: Sendable {
        public var doneBytes: UInt64
        public var totalBytes: UInt64
        public var bytesPerSecond: Double
        public var secondsLeft: Double?
    }

    /// Reads every stripe and checks that mirrors agree (RAID1) or that parity matches the data
    /// (RAID5); with `repair`, rewrites mirror copies from the first member or parity from the data.
    public func scrub(repair: Bool = false, progress: (@Sendable (Progress) -> Void)? = nil) async throws -> ScrubReport
    {
        guard geometry.redundancy > 0 else {
            throw SpindleError(
                .unsupported, "RAID\(geometry.level.rawValue) keeps no redundancy, so there is nothing to check",
                operation: "scrub", path: name)
        }
        guard readableMembers().allSatisfy({ $0 != nil }) else {
            throw SpindleError(
                .unsupported, "the array is degraded: with a member missing there is no second copy to compare",
                operation: "scrub", path: name)
        }
        try gate.enter(operation: "scrub", name: name)
        defer { gate.leave() }
        let checked = readableMembers().enumerated().compactMap { slot, member in
            (member?.device as? any IntegrityChecking).map { (slot, member!.name, $0, $0.statistics) }
        }
        var report = try await checkRange(
            memberStart: 0, memberEnd: geometry.memberDataBytes, repair: repair, progress: progress)
        report.integrity = checked.map { slot, name, device, before in
            let after = device.statistics
            return ScrubReport.MemberIntegrity(
                slot: slot, member: name, corruptBlocksFound: after.corruptBlocksFound - before.corruptBlocksFound,
                corruptBlocksRepaired: after.corruptBlocksRewritten - before.corruptBlocksRewritten)
        }
        return report
    }

    /// Checks (and repairs) member data range `memberStart ..< memberEnd`, stripe group by stripe group.
    func checkRange(memberStart: UInt64, memberEnd: UInt64, repair: Bool, progress: (@Sendable (Progress) -> Void)?)
        async throws -> ScrubReport
    {
        var report = ScrubReport(checkedBytes: 0, mismatchOffsets: [], mismatches: 0, repaired: 0)
        let chunk = geometry.chunkBytes
        let step = stepBytes
        let started = monotonicNanos()
        var lastReport = started
        var position = memberStart
        while position < memberEnd {
            try Task.checkCancellation()
            let length = min(step, memberEnd - position)
            let stripes = (position / chunk)...((position + length - 1) / chunk)
            await stripeLocks.lock(stripes)
            do {
                defer { stripeLocks.unlock(stripes) }
                let readable = readableMembers()
                let slots = (0..<geometry.memberCount).filter { readable[$0] != nil }
                let buffers = slots.map { _ in AlignedBuffer(count: Int(length), zeroed: false) }
                let memberOffset = Self.dataOffset + position
                let failures = await concurrently(
                    zip(slots, buffers).map { slot, buffer in
                        (slot, { try await readable[slot]!.device.read(into: buffer, at: memberOffset) })
                    })
                for failure in failures where Self.isDeviceGone(failure.error) {
                    await failMember(slot: failure.slot, because: failure.error)
                    throw failure.error
                }
                // A member that answers but cannot read some blocks keeps its place: find its bad
                // chunks, rebuild them from redundancy and rewrite them (as md's scrub does), or report them.
                var badChunks: [UInt64: Set<Int>] = [:]
                for failure in failures {
                    let index = slots.firstIndex(of: failure.slot)!
                    for stripe in stripes {
                        let within = Int((stripe * chunk) - position)
                        do {
                            try await readable[failure.slot]!.device.read(
                                into: buffers[index], range: within..<(within + Int(chunk)),
                                at: Self.dataOffset + stripe * chunk)
                        } catch {
                            if Self.isDeviceGone(error) {
                                await failMember(slot: failure.slot, because: error)
                                throw error
                            }
                            badChunks[stripe, default: []].insert(failure.slot)
                        }
                    }
                }
                for stripe in stripes {
                    let result = try await personality.check(
                        ScrubStripe(
                            stripe: stripe, slots: slots, buffers: buffers, readable: readable,
                            within: Int((stripe * chunk) - position), size: Int(chunk),
                            unreadable: badChunks[stripe] ?? []),
                        repair: repair, array: self)
                    report.readErrorsRepaired += result.readErrorsRepaired
                    for slot in result.unreadable {
                        report.unreadable.append(
                            .init(slot: slot, member: readable[slot]!.name, memberOffset: stripe * chunk))
                    }
                    guard result.mismatch else { continue }
                    report.mismatches += 1
                    if report.mismatchOffsets.count < 1000 {
                        report.mismatchOffsets.append(stripe * geometry.stripeDataBytes)
                    }
                    if result.repaired { report.repaired += 1 }
                }
            }
            position += length
            report.checkedBytes += length
            let now = monotonicNanos()
            if let progress, now - lastReport >= 1_000_000_000 || position >= memberEnd {
                lastReport = now
                let rate = Double(position - memberStart) / (Double(now - started) / 1e9)
                progress(
                    Progress(
                        doneBytes: position - memberStart, totalBytes: memberEnd - memberStart,
                        bytesPerSecond: rate, secondsLeft: rate > 0 ? Double(memberEnd - position) / rate : nil))
            }
        }
        return report
    }

    // MARK: Rebuild

    /// Steps of a rebuild kept in flight at once: reads of the next steps overlap the write of this one.
    static let rebuildStepsInFlight = 8

    /// Rebuilds the member being replaced, from its checkpoint to the end, while the array serves
    /// I/O. Several 1 MiB steps are in flight at once, each holding its stripes' locks; the checkpoint
    /// is the end of the finished prefix and is saved in the superblocks every `checkpointBytes`, and
    /// when the rebuild is cancelled, so an interrupted rebuild resumes there. Returns the bytes
    /// rebuilt (0 when nothing needed it).
    /// - Parameters:
    ///   - rateBytesPerSecond: an upper bound on the rebuild rate, to leave room for other I/O.
    ///   - progress: called about once a second and at the end.
    ///   - stopAtBytes: pause once the rebuilt prefix reaches this member offset (md's `sync_max`):
    ///     the checkpoint is saved, the array stays rebuilding, and a later call resumes.
    @discardableResult
    public func rebuild(
        rateBytesPerSecond: UInt64? = nil, checkpointBytes: UInt64 = 64 << 20, stopAtBytes: UInt64? = nil,
        progress: (@Sendable (Progress) -> Void)? = nil
    ) async throws -> UInt64 {
        await activateSpareIfPossible()
        let (slot, checkpoint) = state.withLock { ($0.rebuildSlot, $0.rebuildCheckpointBytes) }
        guard slot >= 0 else { return 0 }
        // The new member takes the write-intent bitmap as it stands: bits set before it joined are
        // not written again, and once the members that carried them are gone, a crash must still
        // find them (or regions written but unflushed would never be resynced).
        await bitmapLock.lock()
        do {
            try await writeBitmap()
        } catch {
            bitmapLock.unlock()
            throw error
        }
        bitmapLock.unlock()
        try gate.enter(operation: "rebuild", name: name)
        defer { gate.leave() }
        let step = stepBytes
        let total = geometry.memberDataBytes
        let stepCount = Int((total - checkpoint + step - 1) / step)
        // No step past the stop starts, so where a rebuild pauses (or whether it finishes) does not
        // depend on the order in which the steps in flight finish.
        let launchable =
            stopAtBytes.map { min(stepCount, max(1, Int(($0 - min($0, checkpoint) + step - 1) / step))) } ?? stepCount
        let started = monotonicNanos()
        var lastReport = started
        var lastSaved = checkpoint
        var finished = [Bool](repeating: false, count: stepCount)
        var finishedPrefix = 0
        var next = 0
        var position = checkpoint
        do {
            try await withThrowingTaskGroup(of: Int.self) { group in
                func launch(_ index: Int) {
                    let start = checkpoint + UInt64(index) * step
                    let length = min(step, total - start)
                    group.addTask {
                        try await self.rebuildStep(slot: slot, memberOffset: start, length: length)
                        return index
                    }
                }
                while next < min(Self.rebuildStepsInFlight, launchable) {
                    launch(next)
                    next += 1
                }
                while let done = try await group.next() {
                    finished[done] = true
                    while finishedPrefix < stepCount && finished[finishedPrefix] { finishedPrefix += 1 }
                    position = min(total, checkpoint + UInt64(finishedPrefix) * step)
                    state.withLock { $0.rebuildCheckpointBytes = position }
                    if position - lastSaved >= max(checkpointBytes, step) && position < total {
                        try await target(slot).flush()
                        try await commitSuperblocks()
                        lastSaved = position
                    }
                    let now = monotonicNanos()
                    if let rateBytesPerSecond, rateBytesPerSecond > 0 {
                        let elapsed = Double(now - started) / 1e9
                        let due = Double(position - checkpoint) / Double(rateBytesPerSecond)
                        if due > elapsed { try await Task.sleep(nanoseconds: UInt64((due - elapsed) * 1e9)) }
                    }
                    if let progress, now - lastReport >= 1_000_000_000 || position >= total {
                        lastReport = now
                        let rate = Double(position - checkpoint) / max(Double(monotonicNanos() - started) / 1e9, 1e-9)
                        progress(
                            Progress(
                                doneBytes: position, totalBytes: total, bytesPerSecond: rate,
                                secondsLeft: rate > 0 ? Double(total - position) / rate : nil))
                    }
                    if Task.isCancelled { throw CancellationError() }
                    if let stopAtBytes, position >= stopAtBytes, position < total { throw RebuildPaused() }
                    if next < launchable {
                        launch(next)
                        next += 1
                    }
                }
            }
        } catch is RebuildPaused {
            try await target(slot).flush()
            try await commitSuperblocks()
            return position - checkpoint
        } catch {
            if error is CancellationError || Task.isCancelled {
                // Stopped on purpose: keep the place, so the next rebuild resumes here.
                try? await target(slot).flush()
                try? await commitSuperblocks()
                throw CancellationError()
            }
            // Keep the place reached, so the next rebuild resumes there.
            if !state.withLock({ $0.failed }) {
                try? await target(slot).flush()
                try? await commitSuperblocks()
            }
            throw error
        }
        try await target(slot).flush()
        state.withLock { state in
            state.slotStates[slot] = .active
            state.rebuildSlot = -1
            state.rebuildCheckpointBytes = 0
        }
        try await commitSuperblocks()
        return total - checkpoint
    }

    private struct RebuildPaused: Error {}

    /// The unit of scrubs, resyncs and rebuilds: 1 MiB of member data, in whole chunks.
    var stepBytes: UInt64 { max(geometry.chunkBytes, (1 << 20) / geometry.chunkBytes * geometry.chunkBytes) }

    /// Rebuilds member range `memberOffset ..< memberOffset + length` of `slot` from the others.
    private func rebuildStep(slot: Int, memberOffset: UInt64, length: UInt64) async throws {
        let chunk = geometry.chunkBytes
        let stripes = (memberOffset / chunk)...((memberOffset + length - 1) / chunk)
        await stripeLocks.lock(stripes)
        defer { stripeLocks.unlock(stripes) }
        let readable = readableMembers()
        guard let target = writableMembers()[slot] else {
            throw SpindleError(
                .ioFailed, "the member being rebuilt in slot \(slot) failed", operation: "rebuild", path: name)
        }
        let result = AlignedBuffer(count: Int(length), zeroed: false)
        try await personality.rebuild(
            slot: slot, memberOffset: memberOffset, into: result, readable: readable, array: self)
        do {
            try await target.device.write(from: result, at: Self.dataOffset + memberOffset)
        } catch {
            await failMember(slot: slot, because: error)
            throw error
        }
    }

    func rebuildSourceError(slot: Int, memberOffset: UInt64, length: UInt64, errors: [String]) -> SpindleError {
        SpindleError(
            .ioFailed,
            "the rebuild of slot \(slot) stopped at member offset \(memberOffset): no source could read \(length) bytes there (\(errors.joined(separator: "; "))); the members stay in the array and a later rebuild resumes from the last checkpoint",
            operation: "rebuild", path: name, offset: memberOffset, length: length)
    }

    private func target(_ slot: Int) throws -> any BlockDevice {
        guard let member = writableMembers()[slot] else {
            throw SpindleError(
                .ioFailed, "the member being rebuilt in slot \(slot) failed", operation: "rebuild", path: name)
        }
        return member.device
    }
}
