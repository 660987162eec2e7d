extension RAIDArray {
    // MARK: Failing members

    /// Marks a member faulty after an I/O error, and records it on the other members.
    func failMember(slot: Int, because error: Error) async {
        // A cancelled request says nothing about the disk.
        if error is CancellationError { return }
        let changed = state.withLock { state -> Bool in
            guard state.slotStates[slot] != .faulty && state.slotStates[slot] != .missing else { return false }
            state.slotStates[slot] = .faulty
            if state.rebuildSlot == slot {
                state.rebuildSlot = -1
                state.rebuildCheckpointBytes = 0
            }
            let lost = state.slotStates.filter { $0 != .active }.count
            if lost > geometry.redundancy { state.failed = true }
            // Counted under the state lock, with the mark: a request that sees the member
            // faulty sees the count.
            unrecordedFailures.add(1, ordering: .sequentiallyConsistent)
            return true
        }
        guard changed else { return }
        try? await commitSuperblocks()
        unrecordedFailures.subtract(1, ordering: .sequentiallyConsistent)
        await activateSpareIfPossible()
    }

    /// Returns once every member failure marked in memory is recorded in the superblocks (at once,
    /// unless a failure is being recorded right now).
    func awaitFailuresRecorded() async {
        while unrecordedFailures.load(ordering: .sequentiallyConsistent) > 0 {
            try? await Task.sleep(nanoseconds: 1_000_000)
        }
    }

    /// A spare takes the place of a faulty or missing member; the rebuild is then the caller's
    /// (``rebuild(rateBytesPerSecond:checkpointBytes:stopAtBytes:progress:)``).
    func activateSpareIfPossible() async {
        let (changed, displaced) = state.withLock { state -> (Bool, Member?) in
            guard geometry.redundancy > 0, !state.failed, state.rebuildSlot < 0, !state.spares.isEmpty,
                let slot = state.slotStates.firstIndex(where: { $0 == .faulty || $0 == .missing })
            else { return (false, nil) }
            let displaced = state.slots[slot]
            state.slots[slot] = state.spares.removeFirst()
            state.slotStates[slot] = .rebuilding
            state.rebuildSlot = slot
            state.rebuildCheckpointBytes = 0
            return (true, displaced)
        }
        if changed { try? await commitSuperblocks() }
        // The failed member the spare replaces leaves the array (its superblocks show it stale).
        try? await displaced?.device.close()
    }

    // MARK: Managing members

    /// Marks a member failed, as if the disk had died: the array carries on degraded.
    public func fail(memberNamed deviceName: String) async throws {
        guard let slot = state.withLock({ $0.slots.firstIndex { $0?.name == deviceName } }) else {
            throw SpindleError(.invalidArgument, "\(deviceName) is not an active member of \(name)", operation: "fail")
        }
        if geometry.redundancy == 0 {
            throw SpindleError(
                .unsupported, "failing a member of a RAID\(geometry.level.rawValue) array would lose its data",
                operation: "fail", path: deviceName)
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
    /// ``rebuild(rateBytesPerSecond:checkpointBytes:stopAtBytes:progress:)``), or becomes a spare when no slot needs it.
    /// - Parameter overwrite: take a device that holds something else (a member of another array,
    ///   a pool, a file system, data), destroying it. A former member of this array is always taken.
    ///
    /// In an array with the integrity layer (``usesIntegrity``), a device without one is formatted
    /// for it first (a former member that has one keeps it).
    public func add(_ device: any BlockDevice, overwrite: Bool = false) async throws {
        var device = device
        var formattedHere: IntegrityDevice?
        if usesIntegrity && !(device is any IntegrityChecking) {
            if case .success = try await IntegrityDevice.readSuperblock(of: device) {
                // Formatted already: a former member, or something else the checks below refuse.
                let opened = try await IntegrityDevice.open(device)
                formattedHere = opened
                device = opened
            }
        }
        do {
            try await add(
                checking: device, overwrite: overwrite,
                formatting: usesIntegrity && formattedHere == nil && !(device is any IntegrityChecking))
        } catch {
            // Nothing changed hands: the caller keeps the device it passed.
            formattedHere?.abandon()
            throw error
        }
    }

    private func add(checking device: any BlockDevice, overwrite: Bool, formatting: Bool) async throws {
        var device = device
        if !overwrite { try await refuseIfInUse(device, operation: "add") }
        let usableBytes: UInt64
        if formatting {
            usableBytes =
                IntegritySuperblock.layout(
                    underlyingBytes: device.capacityBytes, uuid: .zero, policy: .redundant,
                    selfCheckedBytes: Self.dataOffset, createdSeconds: 0)?.dataBytes ?? 0
        } else {
            usableBytes = device.capacityBytes
        }
        guard geometry.redundancy > 0 else {
            throw SpindleError(
                .unsupported, "RAID\(geometry.level.rawValue) arrays have no redundancy to rebuild onto a new member",
                operation: "add", path: device.name)
        }
        guard usableBytes >= Self.dataOffset + geometry.memberDataBytes else {
            throw SpindleError(
                .invalidArgument,
                "the device is \(device.capacityBytes) bytes\(formatting ? " (\(usableBytes) under the integrity layer)" : ""); members of \(name) need \(Self.dataOffset + geometry.memberDataBytes)",
                operation: "add", path: device.name)
        }
        if formatting {
            device = try await IntegrityDevice.format(
                device, policy: .redundant, selfCheckedBytes: Self.dataOffset, overwrite: true)
        }
        guard device.logicalBlockBytes <= logicalBlockBytes else {
            throw SpindleError(
                .invalidArgument, "its \(device.logicalBlockBytes)-byte blocks are larger than the array's",
                operation: "add", path: device.name)
        }
        let member = Member(device: device, uuid: .random())
        let displaced = state.withLock { state -> Member? in
            if let slot = state.slotStates.firstIndex(where: { $0 == .faulty || $0 == .missing }), state.rebuildSlot < 0
            {
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
    /// ``rebuild(rateBytesPerSecond:checkpointBytes:stopAtBytes:progress:)``.
    public func replace(memberNamed oldName: String, with device: any BlockDevice, overwrite: Bool = false) async throws
    {
        if !overwrite { try await refuseIfInUse(device, operation: "replace") }
        let oldState = state.withLock { state in
            state.slots.firstIndex { $0?.name == oldName }.map { state.slotStates[$0] }
        }
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
        if case let .success(superblock) = try await Self.readSuperblock(of: device), superblock.arrayUUID == arrayUUID
        {
            return
        }
        try await DeviceSignature.refuseIfInUse(device, operation: operation)
    }
}
