extension RAIDArray {
    /// Reads the newest valid superblock copy of a device. The two copies are read separately, so a
    /// bad sector under one leaves the other usable.
    /// - Returns: the superblock, or the problem with the copies when neither is usable (an
    ///   ``RAIDSuperblock/Problem/unreadable(_:)`` when a copy could not be read and the other is not
    ///   usable either).
    public static func readSuperblock(of device: any BlockDevice) async throws -> Result<
        RAIDSuperblock, RAIDSuperblock.Problem
    > {
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
        return .failure(
            problems.first { if case .unreadable = $0 { true } else { false } }
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
    ///
    /// Members with the integrity layer (arrays made with `integrity: true`) are opened through it.
    public static func assemble(members devices: [any BlockDevice], force: Bool = false) async throws -> AssemblyReport
    {
        var wrappers: [IntegrityDevice] = []
        do {
            var members: [any BlockDevice] = []
            for device in devices {
                let member = try await IntegrityDevice.openIfFormatted(device)
                if let wrapper = member as? IntegrityDevice, wrapper !== device { wrappers.append(wrapper) }
                members.append(member)
            }
            let report = try await assembleMembers(members, force: force)
            // A member left out is the caller's again, without the layer this call put over it.
            let used = report.array.state.withLock { state in
                Set((state.slots.compactMap { $0 } + state.spares).map { ObjectIdentifier($0.device) })
            }
            for wrapper in wrappers where !used.contains(ObjectIdentifier(wrapper)) { wrapper.abandon() }
            return report
        } catch {
            for wrapper in wrappers { wrapper.abandon() }
            throw error
        }
    }

    private static func assembleMembers(_ devices: [any BlockDevice], force: Bool) async throws -> AssemblyReport {
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
                throw SpindleError(
                    problem == .notAMember ? .invalidArgument : .corrupted, "\(problem)", operation: "assemble",
                    path: device.name,
                    cause: problem)
            }
        }
        guard !found.isEmpty else {
            throw SpindleError(
                .ioFailed, "no member's superblock can be read: \(unreadable.joined(separator: "; "))",
                operation: "assemble")
        }
        let arrays = Dictionary(grouping: found, by: { $0.superblock.arrayUUID })
        guard arrays.count == 1 else {
            let listing = found.map { "\($0.device.name) (array '\($0.superblock.name)' \($0.superblock.arrayUUID))" }
            throw SpindleError(
                .invalidArgument, "the devices belong to different arrays: \(listing.joined(separator: ", "))",
                operation: "assemble")
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
                        notes.append(
                            "\(match.device.name) \(stale)is marked faulty in slot \(slot) (events \(match.superblock.events), the array is at \(latest.events)): it is not used; remove it (`remove(memberNamed:)`) or replace it (`replace(memberNamed:with:)`)"
                        )
                    } else {
                        notes.append(
                            "slot \(slot) (\(known)member \(recorded.member)) is marked faulty; replace it (`replace(memberNamed:with:)`, or `add(_:)` a new device)"
                        )
                    }
                }
                continue
            }
            guard let match = byMember[recorded.member]?.first else {
                notes.append(
                    "slot \(slot) (\(known)member \(recorded.member)) is missing: none of the given devices holds it")
                continue
            }
            // Superblocks are written to the members side by side, and each update is on every
            // member before anything else happens: a member one update behind, which the newest
            // superblock still counts in, only missed an update a crash cut short (as mdadm's
            // event margin of 1 allows). Further behind, it missed changes.
            if match.superblock.events + 1 < latest.events {
                notes.append(
                    "\(match.device.name) is stale (events \(match.superblock.events), the array is at \(latest.events)): it missed changes, so it is not trusted; add it back to rebuild it"
                )
                continue
            }
            if match.superblock.events < latest.events {
                notes.append(
                    "\(match.device.name) is one superblock update behind (a crash cut the update short); brought up to date"
                )
            }
            if match.device.capacityBytes < neededBytes {
                notes.append(
                    "\(match.device.name) is truncated (\(match.device.capacityBytes) bytes, the array needs \(neededBytes)); slot \(slot) runs missing"
                )
                continue
            }
            slots[slot] = Member(device: match.device, uuid: recorded.member)
            slotStates[slot] = recorded.state
        }
        for candidate in found
        where candidate.superblock.role == -1
            && !latest.slots.contains(where: { $0.member == candidate.superblock.memberUUID })
        {
            if candidate.device.capacityBytes >= neededBytes {
                spares.append(Member(device: candidate.device, uuid: candidate.superblock.memberUUID))
            }
        }
        for candidate in found
        where candidate.superblock.role >= 0 && !slots.contains(where: { $0?.uuid == candidate.superblock.memberUUID })
        {
            if candidate.superblock.events < latest.events {
                if !notes.contains(where: { $0.hasPrefix("\(candidate.device.name) is stale") }) {
                    notes.append(
                        "\(candidate.device.name) is stale (events \(candidate.superblock.events), the array is at \(latest.events)): it missed changes while it was failed or missing, so it is not trusted; add it back to rebuild it"
                    )
                }
            } else if !latest.slots.contains(where: { $0.member == candidate.superblock.memberUUID }) {
                notes.append(
                    "\(candidate.device.name) was a member of this array but has been replaced; it is not used")
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
        if latest.dirty && degraded && geometry.level.personality.hasWriteHole && !force {
            throw SpindleError(
                .ioFailed,
                "'\(latest.name)' was not shut down cleanly and is degraded: stripes being written at the crash may have parity that disagrees with their data, and with a member missing that cannot be checked, so the missing member's data there could be rebuilt wrong. To recover what can be recovered, assemble it anyway by passing `force: true`",
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
        if latest.dirty && array.membersHaveSuspects {
            // Members with the integrity layer first take what redundancy can give them; what is
            // left keeps its contents; then the resync below makes parity agree with that.
            _ = try await array.resyncDirtyRegions(rebuildingMember: false)
        }
        notes += try await array.resolveMemberSuspects()
        if latest.dirty {
            resyncedBytes = try await array.resyncDirtyRegions()
            notes.append(
                "the array was not shut down cleanly; resynced \(ByteSize.format(resyncedBytes)) of regions being written"
            )
        }
        try await array.commitSuperblocks()
        await array.activateSpareIfPossible()
        array.startIdleCleaner()
        return AssemblyReport(array: array, notes: notes, resyncedBytes: resyncedBytes)
    }

    /// After a crash, members with the integrity layer hold suspect regions: blocks whose data and
    /// checksum a power cut left apart. The resync above rewrote from redundancy those it could
    /// (they read as corrupted, as any bad block); what is left had no good copy (a stripe torn on
    /// two members, a degraded array), so each keeps its data, which is its old or its new
    /// contents. The resync after this makes parity agree with it again.
    var membersHaveSuspects: Bool {
        let members = state.withLock { state in (state.slots.compactMap { $0 } + state.spares) }
        return members.contains { ($0.device as? any IntegrityChecking)?.hasSuspects == true }
    }

    func resolveMemberSuspects() async throws -> [String] {
        let members = state.withLock { state in (state.slots.compactMap { $0 } + state.spares) }
        var notes: [String] = []
        for member in members {
            guard let checked = member.device as? any IntegrityChecking, checked.hasSuspects, !checked.isReadOnly else {
                continue
            }
            let resolution = try await checked.resolveSuspects(acceptingRemaining: true)
            if resolution.blocksAccepted > 0 {
                notes.append(
                    "\(member.name): \(resolution.blocksAccepted) blocks written at the crash had no good copy left and keep their contents"
                )
            }
        }
        return notes
    }

    /// An assembled array and what assembly found.
    public struct AssemblyReport: Sendable {
        public let array: RAIDArray
        /// Members left out and why, resyncs done.
        public let notes: [String]
        public let resyncedBytes: UInt64
    }
}

extension RAIDArray {
    /// What the superblocks of some devices say, without assembling or writing anything.
    public struct Inspection: Sendable, Codable {
        public struct Device: Sendable, Codable {
            public var path: String
            public var arrayName: String?
            public var arrayUUID: SpindleUUID?
            public var memberUUID: SpindleUUID?
            public var role: Int?
            public var events: UInt64?
            public var problem: String?
        }
        public var devices: [Device]
        /// The newest view of the array, from the member with the highest event count.
        public var name: String?
        public var uuid: SpindleUUID?
        public var level: RAIDLevel?
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
        for raw in devices {
            var entry = Inspection.Device(path: raw.name)
            do {
                // Through the integrity layer when the device has one, writing nothing.
                var device = raw
                if case let .success(superblock) = try await IntegrityDevice.readSuperblock(of: raw) {
                    device = IntegrityDevice.view(of: raw, superblock: superblock)
                }
                switch try await readSuperblock(of: device) {
                case let .success(block):
                    entry.arrayName = block.name
                    entry.arrayUUID = block.arrayUUID
                    entry.memberUUID = block.memberUUID
                    entry.role = block.role
                    entry.events = block.events
                    // Several copies of one member: the one with the newest changes holds it.
                    if (byMember[block.memberUUID]?.1 ?? 0) <= block.events {
                        byMember[block.memberUUID] = (device.name, block.events)
                    }
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
        inspection.uuid = newest.arrayUUID
        inspection.level = newest.level
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
            if (state == .active || state == .rebuilding) && (holder == nil || holder!.1 < newest.events) {
                state = .missing
            }
            return SlotInfo(
                slot: index, device: holder?.0, memberUUID: slot.member.nonZero,
                lastKnownName: slot.lastKnownName.nonEmpty, state: state)
        }
        let lost = inspection.slots.filter { $0.state != .active }.count
        if lost > newest.level.redundancy(memberCount: newest.memberCount) {
            inspection.state = "failed"
        } else if newest.rebuildSlot >= 0 {
            inspection.state = "rebuilding"
        } else if lost > 0 {
            inspection.state = "degraded"
        } else {
            inspection.state = newest.dirty ? "dirty (not shut down cleanly, or in use)" : "clean"
        }
        return inspection
    }
}
