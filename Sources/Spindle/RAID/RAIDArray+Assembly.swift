extension RAIDArray {
    /// Reads the newest valid superblock copy of a device. The two copies are read separately, so a
    /// bad sector under one leaves the other usable.
    /// - Returns: the superblock, or the problem with the copies when neither is usable (an
    ///   ``RAIDSuperblock/Problem/unreadable(_:)`` when a copy could not be read and the other is not
    ///   usable either).
    public static func readSuperblock(of device: any BlockDevice) async throws -> Result<RAIDSuperblock, RAIDSuperblock.Problem> {
        guard device.capacityBytes >= 8192 else { return .failure(.notAMember) }
        let buffer = AlignedBuffer(count: RAIDSuperblock.blockBytes)
        var best: RAIDSuperblock?
        var problems: [RAIDSuperblock.Problem] = []
        for offset in RAIDSuperblock.copyOffsets {
            do {
                try await device.read(into: buffer, at: offset)
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                problems.append(.unreadable("the superblock copy at byte \(offset) cannot be read: \(error)"))
                continue
            }
            do {
                let block = try RAIDSuperblock.decode(buffer.readOnlyBytes)
                if best == nil || block.events > best!.events { best = block }
            } catch {
                problems.append(error)
            }
        }
        if let best { return .success(best) }
        // Report the more specific problem: a read error, then a corrupt block, over a missing magic.
        return .failure(problems.first { if case .unreadable = $0 { true } else { false } }
                        ?? problems.first { $0 != .notAMember } ?? .notAMember)
    }

    /// Assembles an array from its members, given in any order.
    ///
    /// Refuses, naming the device and the reason: a device that is not a member or has a corrupt
    /// superblock, members of different arrays, the same member twice, too few members to serve the
    /// data, and a RAID5 array that is both dirty (shut down uncleanly) and degraded unless `force`.
    /// Members that are stale (their event count shows they missed changes), truncated, or absent are
    /// left out, and the array runs degraded; ``AssemblyReport/notes`` says which and why. Devices left
    /// out stay open: they remain the caller's to close. Devices in the array are the array's. A dirty
    /// array resyncs the regions its write-intent bitmap marks before returning.
    public static func assemble(members devices: [any BlockDevice], force: Bool = false) async throws -> AssemblyReport {
        guard !devices.isEmpty else { throw SpindleError(.invalidArgument, "no member devices given") }
        var found: [(device: any BlockDevice, superblock: RAIDSuperblock)] = []
        var unreadable: [String] = []
        for device in devices {
            switch try await readSuperblock(of: device) {
            case let .success(superblock): found.append((device, superblock))
            case let .failure(.unreadable(reason)):
                // As for a missing member: left out, and the array runs degraded if it can.
                unreadable.append("\(device.name) is left out: \(reason)")
            case let .failure(problem):
                throw SpindleError(problem == .notAMember ? .invalidArgument : .ioFailed, "\(problem)", operation: "assemble", path: device.name)
            }
        }
        guard !found.isEmpty else {
            throw SpindleError(.ioFailed, "no member's superblock can be read: \(unreadable.joined(separator: "; "))", operation: "assemble")
        }
        let arrays = Dictionary(grouping: found, by: { $0.superblock.arrayUUID })
        guard arrays.count == 1 else {
            let listing = found.map { "\($0.device.name) (array '\($0.superblock.name)' \($0.superblock.arrayUUID))" }
            throw SpindleError(.invalidArgument, "the devices belong to different arrays: \(listing.joined(separator: ", "))", operation: "assemble")
        }
        let byMember = Dictionary(grouping: found, by: { $0.superblock.memberUUID })
        if let duplicate = byMember.values.first(where: { $0.count > 1 }) {
            throw SpindleError(
                .invalidArgument,
                "\(duplicate.map(\.device.name).joined(separator: " and ")) are the same member (member \(duplicate[0].superblock.memberUUID)); a copied image cannot stand in for another member",
                operation: "assemble", path: duplicate[0].device.name)
        }
        let latest = found.max { $0.superblock.events < $1.superblock.events }!.superblock
        let geometry = latest.geometry
        var notes = unreadable
        var slots = [Member?](repeating: nil, count: latest.memberCount)
        var slotStates = [RAIDMemberState](repeating: .missing, count: latest.memberCount)
        var spares: [Member] = []
        let neededBytes = dataOffset + latest.memberDataBytes
        for (slot, recorded) in latest.slots.enumerated() {
            let known = recorded.lastKnownName.isEmpty ? "" : "\(recorded.lastKnownName), "
            guard recorded.state == .active || recorded.state == .rebuilding else {
                slotStates[slot] = recorded.state == .faulty ? .faulty : .missing
                if recorded.state == .faulty {
                    // The failed member, when given, stays in its slot as faulty (not used for I/O),
                    // so that it can be named, removed or replaced.
                    if let match = byMember[recorded.member]?.first {
                        slots[slot] = Member(device: match.device, uuid: recorded.member)
                        let stale = match.superblock.events < latest.events ? "is stale and " : ""
                        notes.append("\(match.device.name) \(stale)is marked faulty in slot \(slot) (events \(match.superblock.events), the array is at \(latest.events)): it is not used; remove it, or replace it with 'array replace'")
                    } else {
                        notes.append("slot \(slot) (\(known)member \(recorded.member)) is marked faulty; replace it with 'array replace' or 'array add'")
                    }
                }
                continue
            }
            guard let match = byMember[recorded.member]?.first else {
                notes.append("slot \(slot) (\(known)member \(recorded.member)) is missing: none of the given devices holds it")
                continue
            }
            // Superblocks are written to the members side by side, and each update is on every
            // member before anything else happens: a member one update behind, which the newest
            // superblock still counts in, only missed an update a crash cut short (as mdadm's
            // event margin of 1 allows). Further behind, it missed changes.
            if match.superblock.events + 1 < latest.events {
                notes.append("\(match.device.name) is stale (events \(match.superblock.events), the array is at \(latest.events)): it missed changes, so it is not trusted; add it back to rebuild it")
                continue
            }
            if match.superblock.events < latest.events {
                notes.append("\(match.device.name) is one superblock update behind (a crash cut the update short); brought up to date")
            }
            if match.device.capacityBytes < neededBytes {
                notes.append("\(match.device.name) is truncated (\(match.device.capacityBytes) bytes, the array needs \(neededBytes)); slot \(slot) runs missing")
                continue
            }
            slots[slot] = Member(device: match.device, uuid: recorded.member)
            slotStates[slot] = recorded.state
        }
        for candidate in found where candidate.superblock.role == -1 && !latest.slots.contains(where: { $0.member == candidate.superblock.memberUUID }) {
            if candidate.device.capacityBytes >= neededBytes {
                spares.append(Member(device: candidate.device, uuid: candidate.superblock.memberUUID))
            }
        }
        for candidate in found where candidate.superblock.role >= 0 && !slots.contains(where: { $0?.uuid == candidate.superblock.memberUUID }) {
            if candidate.superblock.events < latest.events {
                if !notes.contains(where: { $0.hasPrefix("\(candidate.device.name) is stale") }) {
                    notes.append("\(candidate.device.name) is stale (events \(candidate.superblock.events), the array is at \(latest.events)): it missed changes while it was failed or missing, so it is not trusted; add it back to rebuild it")
                }
            } else if !latest.slots.contains(where: { $0.member == candidate.superblock.memberUUID }) {
                notes.append("\(candidate.device.name) was a member of this array but has been replaced; it is not used")
            }
        }
        let usable = slotStates.filter { $0 == .active }.count
        let rebuildingUsable = slotStates.filter { $0 == .rebuilding }.count
        guard usable >= latest.memberCount - geometry.redundancy else {
            throw SpindleError(
                .ioFailed,
                "too few members to assemble '\(latest.name)' (\(geometry.level)): \(usable) of \(latest.memberCount) are usable\(rebuildingUsable > 0 ? " (\(rebuildingUsable) still rebuilding)" : "")\(notes.isEmpty ? "" : "; " + notes.joined(separator: "; "))",
                operation: "assemble")
        }
        let degraded = usable < latest.memberCount
        if latest.dirty && degraded && geometry.level == .raid5 && !force {
            throw SpindleError(
                .ioFailed,
                "'\(latest.name)' was not shut down cleanly and is degraded: stripes being written at the crash may have parity that disagrees with their data, and with a member missing that cannot be checked, so the missing member's data there could be rebuilt wrong. Start it anyway with --force (or force: true) to recover what can be recovered",
                operation: "assemble")
        }
        var rebuildSlot = latest.rebuildSlot
        if rebuildSlot >= 0 && slotStates[rebuildSlot] != .rebuilding { rebuildSlot = -1 }
        let blockBytes = devices.map(\.logicalBlockBytes).max()!
        let array = RAIDArray(
            name: latest.name, uuid: latest.arrayUUID, geometry: geometry, createdSeconds: latest.createdSeconds,
            bitmapChunkShift: latest.bitmapChunkShift,
            state: State(
                slots: slots, slotStates: slotStates, spares: spares, events: latest.events, dirty: latest.dirty,
                rebuildSlot: rebuildSlot, rebuildCheckpointBytes: rebuildSlot >= 0 ? latest.rebuildCheckpointBytes : 0,
                bitmap: [UInt8](repeating: 0, count: bitmapBytes), failed: false, recordedSlots: latest.slots),
            logicalBlockBytes: blockBytes)
        var resyncedBytes: UInt64 = 0
        if latest.dirty {
            resyncedBytes = try await array.resyncDirtyRegions()
            notes.append("the array was not shut down cleanly; resynced \(ByteSize.format(resyncedBytes)) of regions being written")
        }
        try await array.commitSuperblocks()
        await array.activateSpareIfPossible()
        array.startIdleCleaner()
        return AssemblyReport(array: array, notes: notes, resyncedBytes: resyncedBytes)
    }

    /// An assembled array and what assembly found.
    public struct AssemblyReport: Sendable {
        public let array: RAIDArray
        /// Members left out and why, resyncs done.
        public let notes: [String]
        public let resyncedBytes: UInt64
    }

    /// After an unclean shutdown: makes mirrors or parity agree again in the regions the write-intent
    /// bitmap marks (all of the array when no member's bitmap can be read). Keeps the dirty state, so
    /// a crash during resync leads to another.
    func resyncDirtyRegions() async throws -> UInt64 {
        guard geometry.level != .raid0 else { return 0 }
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
            if rebuildSlot >= 0 {
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
    public func scrub(repair: Bool = false, progress: (@Sendable (Progress) -> Void)? = nil) async throws -> ScrubReport {
        guard geometry.level != .raid0 else {
            throw SpindleError(.unsupported, "RAID0 keeps no redundancy, so there is nothing to check", operation: "scrub", path: name)
        }
        guard readableMembers().allSatisfy({ $0 != nil }) else {
            throw SpindleError(.unsupported, "the array is degraded: with a member missing there is no second copy to compare", operation: "scrub", path: name)
        }
        try gate.enter(operation: "scrub", name: name)
        defer { gate.leave() }
        return try await checkRange(memberStart: 0, memberEnd: geometry.memberDataBytes, repair: repair, progress: progress)
    }

    /// Checks (and repairs) member data range `memberStart ..< memberEnd`, stripe group by stripe group.
    func checkRange(memberStart: UInt64, memberEnd: UInt64, repair: Bool, progress: (@Sendable (Progress) -> Void)?) async throws -> ScrubReport {
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
                let failures = await concurrently(zip(slots, buffers).map { slot, buffer in
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
                                into: buffers[index], range: within..<(within + Int(chunk)), at: Self.dataOffset + stripe * chunk)
                        } catch {
                            if Self.isDeviceGone(error) {
                                await failMember(slot: failure.slot, because: error)
                                throw error
                            }
                            badChunks[stripe, default: []].insert(failure.slot)
                        }
                    }
                }
                let complete = slots.count == geometry.memberCount
                for stripe in stripes {
                    let within = Int((stripe * chunk) - position)
                    let size = Int(chunk)
                    if let bad = badChunks[stripe] {
                        let good = slots.indices.filter { !bad.contains(slots[$0]) }
                        let rebuildable = geometry.level == .raid1 ? !good.isEmpty : (complete && bad.count == 1)
                        guard rebuildable else {
                            for slot in bad.sorted() {
                                report.unreadable.append(.init(slot: slot, member: readable[slot]!.name, memberOffset: stripe * chunk))
                            }
                            continue
                        }
                        for slot in bad {
                            let index = slots.firstIndex(of: slot)!
                            if geometry.level == .raid1 {
                                buffers[index].copy(from: buffers[good[0]], offset: within, length: size)
                            } else {
                                XORParity.generate(sources: good.map { buffers[$0] }, offset: within, into: buffers[index],
                                                   parityOffset: within, length: size)
                            }
                            do {
                                try await readable[slot]!.device.write(from: buffers[index], range: within..<(within + size),
                                                                        at: Self.dataOffset + stripe * chunk)
                                report.readErrorsRepaired += 1
                            } catch {
                                await failMember(slot: slot, because: error)
                                throw error
                            }
                        }
                    }
                    // RAID5 needs every member to check parity; mirrors compare whichever copies are in
                    // sync (a member being rebuilt is not read: it is rebuilt again where it may differ).
                    guard complete || (geometry.level == .raid1 && slots.count >= 2) else { continue }
                    let consistent: Bool
                    switch geometry.level {
                    case .raid1:
                        consistent = buffers.dropFirst().allSatisfy { $0.equals(buffers[0], offset: within, length: size) }
                    case .raid5:
                        consistent = XORParity.check(buffers, offset: within, length: size)
                    case .raid0:
                        consistent = true
                    }
                    if consistent { continue }
                    report.mismatches += 1
                    if report.mismatchOffsets.count < 1000 {
                        report.mismatchOffsets.append(stripe * geometry.stripeDataBytes)
                    }
                    guard repair else { continue }
                    try await repairStripe(stripe, buffers: buffers, slots: slots, within: within, readable: readable)
                    report.repaired += 1
                }
            }
            position += length
            report.checkedBytes += length
            let now = monotonicNanos()
            if let progress, now - lastReport >= 1_000_000_000 || position >= memberEnd {
                lastReport = now
                let rate = Double(position - memberStart) / (Double(now - started) / 1e9)
                progress(Progress(doneBytes: position - memberStart, totalBytes: memberEnd - memberStart,
                                  bytesPerSecond: rate, secondsLeft: rate > 0 ? Double(memberEnd - position) / rate : nil))
            }
        }
        return report
    }

    private func repairStripe(_ stripe: UInt64, buffers: [AlignedBuffer], slots: [Int], within: Int, readable: [Member?]) async throws {
        let chunk = Int(geometry.chunkBytes)
        let memberOffset = Self.dataOffset + stripe * geometry.chunkBytes
        switch geometry.level {
        case .raid1:
            for slot in slots.dropFirst() {
                try await readable[slot]!.device.write(from: buffers[0], range: within..<(within + chunk), at: memberOffset)
            }
        case .raid5:
            let parityMember = geometry.parityMember(stripe: stripe)
            let parity = AlignedBuffer(count: chunk)
            let data = slots.indices.filter { slots[$0] != parityMember }.map { buffers[$0] }
            XORParity.generate(sources: data, offset: within, into: parity, length: chunk)
            try await readable[parityMember]!.device.write(from: parity, at: memberOffset)
        case .raid0:
            break
        }
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
        let launchable = stopAtBytes.map { min(stepCount, max(1, Int(($0 - min($0, checkpoint) + step - 1) / step))) } ?? stepCount
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
                    group.addTask { try await self.rebuildStep(slot: slot, memberOffset: start, length: length); return index }
                }
                while next < min(Self.rebuildStepsInFlight, launchable) { launch(next); next += 1 }
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
                        progress(Progress(doneBytes: position, totalBytes: total, bytesPerSecond: rate,
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
            throw SpindleError(.ioFailed, "the member being rebuilt in slot \(slot) failed", operation: "rebuild", path: name)
        }
        let sources = (0..<geometry.memberCount).filter { $0 != slot && readable[$0] != nil }
        let result = AlignedBuffer(count: Int(length), zeroed: false)
        let offset = Self.dataOffset + memberOffset
        if geometry.level == .raid1 {
            // Any in-sync mirror will do: on a read error, try the next.
            var errors: [String] = []
            var done = false
            for source in sources {
                do {
                    try await readable[source]!.device.read(into: result, at: offset)
                    done = true
                    break
                } catch {
                    if Self.isDeviceGone(error) { await failMember(slot: source, because: error) }
                    errors.append("\(readable[source]!.name): \(error)")
                }
            }
            guard done else {
                if sources.isEmpty { throw failedError("rebuild") }
                throw rebuildSourceError(slot: slot, memberOffset: memberOffset, length: length, errors: errors)
            }
        } else {
            guard sources.count == geometry.memberCount - 1 else { throw failedError("rebuild") }
            let buffers = sources.map { _ in AlignedBuffer(count: Int(length), zeroed: false) }
            let failures = await concurrently(zip(sources, buffers).map { source, buffer in
                (source, { try await readable[source]!.device.read(into: buffer, at: offset) })
            })
            if !failures.isEmpty {
                // A source that is gone is failed (and the array with it); a read error on one that
                // answers stops the rebuild here, members untouched, to be resumed from the checkpoint.
                for failure in failures where Self.isDeviceGone(failure.error) {
                    await failMember(slot: failure.slot, because: failure.error)
                }
                throw rebuildSourceError(slot: slot, memberOffset: memberOffset, length: length,
                                         errors: failures.map { "\(readable[$0.slot]!.name): \($0.error)" })
            }
            XORParity.generate(sources: buffers, into: result, length: Int(length))
        }
        do {
            try await target.device.write(from: result, at: offset)
        } catch {
            await failMember(slot: slot, because: error)
            throw error
        }
    }

    private func rebuildSourceError(slot: Int, memberOffset: UInt64, length: UInt64, errors: [String]) -> SpindleError {
        SpindleError(
            .ioFailed,
            "the rebuild of slot \(slot) stopped at member offset \(memberOffset): no source could read \(length) bytes there (\(errors.joined(separator: "; "))); the members stay in the array and a later rebuild resumes from the last checkpoint",
            operation: "rebuild", path: name, offset: memberOffset, length: length)
    }

    private func target(_ slot: Int) throws -> any BlockDevice {
        guard let member = writableMembers()[slot] else {
            throw SpindleError(.ioFailed, "the member being rebuilt in slot \(slot) failed", operation: "rebuild", path: name)
        }
        return member.device
    }

    // MARK: Managing members

    /// Marks a member failed, as if the disk had died: the array carries on degraded.
    public func fail(memberNamed deviceName: String) async throws {
        guard let slot = state.withLock({ $0.slots.firstIndex { $0?.name == deviceName } }) else {
            throw SpindleError(.invalidArgument, "\(deviceName) is not an active member of \(name)", operation: "fail")
        }
        if geometry.level == .raid0 {
            throw SpindleError(.unsupported, "failing a member of a RAID0 array would lose its data", operation: "fail", path: deviceName)
        }
        let lost = state.withLock { $0.slotStates.filter { $0 != .active }.count }
        if state.withLock({ $0.slotStates[slot] }) == .active && lost + 1 > geometry.redundancy {
            throw SpindleError(
                .unsupported, "failing \(deviceName) would leave \(name) without enough members to serve its data",
                operation: "fail", path: deviceName)
        }
        await failMember(slot: slot, because: SpindleError(.ioFailed, "marked failed"))
    }

    /// Removes a faulty member from its slot (the slot becomes missing), or a spare.
    public func remove(memberNamed deviceName: String) async throws {
        let removed = state.withLock { state -> Member? in
            if let index = state.spares.firstIndex(where: { $0.name == deviceName }) {
                return state.spares.remove(at: index)
            }
            guard let slot = state.slots.firstIndex(where: { $0?.name == deviceName }) else { return nil }
            guard state.slotStates[slot] == .faulty else { return nil }
            let member = state.slots[slot]
            state.slots[slot] = nil
            state.slotStates[slot] = .missing
            state.recordedSlots[slot] = RAIDSuperblock.Slot(member: .zero, state: .missing)
            return member
        }
        guard let removed else {
            throw SpindleError(
                .invalidArgument, "\(deviceName) is not a faulty member or a spare of \(name); fail it first",
                operation: "remove")
        }
        try await commitSuperblocks()
        // The removed device no longer belongs to the array: wipe its superblocks.
        let zeros = AlignedBuffer(count: 8192)
        try? await removed.device.write(from: zeros, at: 0, fua: true)
        try? await removed.device.close()
    }

    /// Adds a device: it replaces a faulty or missing member (and must then be rebuilt with
    /// ``rebuild(rateBytesPerSecond:progress:)``), or becomes a spare when no slot needs it.
    /// - Parameter overwrite: take a device that holds something else (a member of another array,
    ///   a pool, a file system, data), destroying it. A former member of this array is always taken.
    public func add(_ device: any BlockDevice, overwrite: Bool = false) async throws {
        if !overwrite { try await refuseIfInUse(device, operation: "add") }
        guard geometry.level != .raid0 else {
            throw SpindleError(.unsupported, "RAID0 arrays have no redundancy to rebuild onto a new member", operation: "add", path: device.name)
        }
        guard device.capacityBytes >= Self.dataOffset + geometry.memberDataBytes else {
            throw SpindleError(
                .invalidArgument,
                "the device is \(device.capacityBytes) bytes; members of \(name) need \(Self.dataOffset + geometry.memberDataBytes)",
                operation: "add", path: device.name)
        }
        guard device.logicalBlockBytes <= logicalBlockBytes else {
            throw SpindleError(.invalidArgument, "its \(device.logicalBlockBytes)-byte blocks are larger than the array's", operation: "add", path: device.name)
        }
        let member = Member(device: device, uuid: .random())
        let displaced = state.withLock { state -> Member? in
            if let slot = state.slotStates.firstIndex(where: { $0 == .faulty || $0 == .missing }), state.rebuildSlot < 0 {
                let displaced = state.slots[slot]
                state.slots[slot] = member
                state.slotStates[slot] = .rebuilding
                state.rebuildSlot = slot
                state.rebuildCheckpointBytes = 0
                // A replacement brings nothing back by itself: the array stays failed if it had lost
                // more members than it survives.
                state.failed = state.slotStates.filter { $0 != .active }.count > geometry.redundancy
                return displaced
            }
            state.spares.append(member)
            return nil
        }
        try await commitSuperblocks()
        // A failed member the new one replaces leaves the array (its superblocks show it stale).
        try? await displaced?.device.close()
    }

    /// Fails `old` (if it is not failed already), puts `new` in its slot, and leaves the rebuild to
    /// ``rebuild(rateBytesPerSecond:progress:)``.
    public func replace(memberNamed oldName: String, with device: any BlockDevice, overwrite: Bool = false) async throws {
        if !overwrite { try await refuseIfInUse(device, operation: "replace") }
        let oldState = state.withLock { state in state.slots.firstIndex { $0?.name == oldName }.map { state.slotStates[$0] } }
        guard let oldState else {
            // Left out at assembly (failed, stale or gone): its slot is the faulty or missing one.
            guard state.withLock({ $0.slotStates.contains { $0 == .faulty || $0 == .missing } }) else {
                throw SpindleError(.invalidArgument, "\(oldName) is not a member of \(name)", operation: "replace")
            }
            try await add(device, overwrite: true)
            return
        }
        if oldState == .active { try await fail(memberNamed: oldName) }
        try await remove(memberNamed: oldName)
        try await add(device, overwrite: true)
    }

    /// Refuses a device that holds anything but a former member of this array.
    private func refuseIfInUse(_ device: any BlockDevice, operation: String) async throws {
        if case let .success(superblock) = try await Self.readSuperblock(of: device), superblock.arrayUUID == arrayUUID { return }
        try await DeviceSignature.refuseIfInUse(device, operation: operation)
    }
}

extension RAIDArray {
    /// What the superblocks of some devices say, without assembling or writing anything.
    public struct Inspection: Sendable, Codable {
        public struct Device: Sendable, Codable {
            public var path: String
            public var arrayName: String?
            public var arrayUUID: String?
            public var memberUUID: String?
            public var role: Int?
            public var events: UInt64?
            public var problem: String?
        }
        public var devices: [Device]
        /// The newest view of the array, from the member with the highest event count.
        public var name: String?
        public var uuid: String?
        public var level: Int?
        public var chunkBytes: UInt64?
        public var memberCount: Int?
        public var capacityBytes: UInt64?
        public var events: UInt64?
        public var dirty: Bool?
        public var slots: [SlotInfo]
        public var rebuildSlot: Int?
        public var rebuildDoneBytes: UInt64?
        public var memberDataBytes: UInt64?
        public var state: String?
    }

    /// Reads the superblocks of `devices` and describes the array they form, touching nothing.
    public static func inspect(_ devices: [any BlockDevice]) async -> Inspection {
        var entries: [Inspection.Device] = []
        var newest: RAIDSuperblock?
        var byMember: [SpindleUUID: (String, UInt64)] = [:]
        for device in devices {
            var entry = Inspection.Device(path: device.name)
            do {
                switch try await readSuperblock(of: device) {
                case let .success(block):
                    entry.arrayName = block.name
                    entry.arrayUUID = block.arrayUUID.description
                    entry.memberUUID = block.memberUUID.description
                    entry.role = block.role
                    entry.events = block.events
                    // Several copies of one member: the one with the newest changes holds it.
                    if (byMember[block.memberUUID]?.1 ?? 0) <= block.events { byMember[block.memberUUID] = (device.name, block.events) }
                    if newest == nil || block.events > newest!.events { newest = block }
                case let .failure(problem):
                    entry.problem = problem.description
                }
            } catch {
                entry.problem = "\(error)"
            }
            entries.append(entry)
        }
        var inspection = Inspection(devices: entries, slots: [])
        guard let newest else { return inspection }
        inspection.name = newest.name
        inspection.uuid = newest.arrayUUID.description
        inspection.level = newest.level.rawValue
        inspection.chunkBytes = UInt64(newest.chunkBytes)
        inspection.memberCount = newest.memberCount
        inspection.capacityBytes = newest.geometry.capacityBytes
        inspection.memberDataBytes = newest.memberDataBytes
        inspection.events = newest.events
        inspection.dirty = newest.dirty
        inspection.rebuildSlot = newest.rebuildSlot >= 0 ? newest.rebuildSlot : nil
        inspection.rebuildDoneBytes = newest.rebuildSlot >= 0 ? newest.rebuildCheckpointBytes : nil
        inspection.slots = newest.slots.enumerated().map { index, slot in
            var state = slot.state
            let holder = byMember[slot.member]
            if (state == .active || state == .rebuilding) && (holder == nil || holder!.1 < newest.events) { state = .missing }
            return SlotInfo(slot: index, device: holder?.0, memberUUID: slot.member.nonZeroDescription,
                            lastKnownName: slot.lastKnownName.nonEmpty, state: state)
        }
        let lost = inspection.slots.filter { $0.state != .active }.count
        if lost > newest.level.redundancy(memberCount: newest.memberCount) { inspection.state = "failed" }
        else if newest.rebuildSlot >= 0 { inspection.state = "rebuilding" }
        else if lost > 0 { inspection.state = "degraded" }
        else { inspection.state = newest.dirty ? "dirty (not shut down cleanly, or in use)" : "clean" }
        return inspection
    }
}
