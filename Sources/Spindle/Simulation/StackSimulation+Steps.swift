extension StackSimulation.Run {
    /// Runs the operations the seed draws, then the final checks.
    func simulate() async throws {
        var lastState = array.status.state
        for _ in 0..<options.operations {
            let state = array.status.state
            if state != lastState {
                log("(array \(state): \(array.status.slots.map { "\($0.state)" }.joined(separator: " ")))")
                lastState = state
            }
            try await step()
        }
        beginEpoch(counter + 1)
        try await finish()
    }

    /// One operation: resuming a rebuild or replacing a missing member now and then while the array
    /// is not whole, else an operation drawn by weight.
    private func step() async throws {
        counter += 1
        beginEpoch(counter)
        record.report.operations += 1
        if extended && !isWhole() && readErrorsActive == 0 && random.chance(0.1) {
            if array.status.rebuildSlot != nil {
                log("resume the rebuild")
                _ = try await array.rebuild()
                record.report.rebuilds += 1
            } else if let victim = brokenMember() {
                try await replaceAndRebuild(victim, reason: "degraded")
            }
            return
        }
        let dice = random.below(1000)
        switch dice {
        case 0..<300:
            try await write(fua: random.chance(0.1))
        case 300..<550:
            try await readAndCheck()
        case 550..<630:
            try await flush()
        case 630..<690:
            try await zeroOrDiscard()
        case 690..<740:
            try await snapshot()
        case 740..<780:
            try await createOrDelete()
        case 780..<820:
            try await resize()
        case 820..<870:
            try await readErrors()
        case 870..<900:
            try await memberFailure()
        case 900..<915 where extended:
            try await writeErrors()
        case 915..<930 where extended:
            // An idle moment: the array flushes its members and marks itself clean.
            log("idle: the array marks itself clean")
            await array.markCleanIfIdle(idleNanos: 0)
            record.report.idleCleans += 1
        default:
            try await powerCut()
        }
    }

    /// A read of up to 32 blocks (any request shape on the array itself), checked against the model.
    private func readAndCheck() async throws {
        guard let name = pickVolume(writable: false) else { return }
        let size = models[name]!.current.count
        let first: Int
        let count: Int
        if config.withPool {
            let blocks = 1 + Int(random.below(32))
            first = Int(random.below(UInt64(size / 4096 - min(blocks, size / 4096) + 1)))
            count = min(blocks, size / 4096 - first)
        } else {
            (first, count) = extent(size: size / unit, most: 0)
        }
        log("read \(name) blocks \(first)+\(count)", volume: name, blocks: first..<(first + count))
        try await check(name, first: first, count: count)
        record.report.reads += 1
    }

    /// A flush of a volume: what it holds now is committed.
    private func flush() async throws {
        guard let name = pickVolume(writable: false) else { return }
        log("flush \(name)")
        try await device(name).flush()
        commitAll()
        record.report.flushes += 1
    }

    /// Write-zeroes or a discard over a range of a volume.
    private func zeroOrDiscard() async throws {
        guard let name = pickVolume(writable: true) else { return }
        let size = models[name]!.current.count
        let (first, blocks) = extent(size: size / unit, most: 40)
        // A RAID1 or RAID5 array keeps discarded data (discard is advisory): only write-zeroes
        // says what the range holds afterwards.
        let zeroes = random.chance(0.5) || !config.withPool
        log(
            "\(zeroes ? "write-zeroes" : "discard") \(name) blocks \(first)+\(blocks)", volume: name,
            blocks: first..<(first + blocks))
        let volume = try await device(name)
        do {
            if zeroes {
                try await volume.writeZeroes(offset: UInt64(first * unit), length: UInt64(blocks * unit))
            } else {
                try await volume.discard(offset: UInt64(first * unit), length: UInt64(blocks * unit))
            }
        } catch let error as SpindleError where error.code == .noSpace && tight {
            // Zeroing part of a shared chunk copies it, which needs space.
            log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
            record.report.poolFullErrors += 1
            try await settleRefusedWrite(name, first: first, data: [UInt8](repeating: 0, count: blocks * unit))
            return
        }
        models[name]!.apply([UInt8](repeating: 0, count: blocks * unit), at: first * unit)
        record.report.discards += 1
    }

    /// A snapshot of a volume, read-only or not.
    private func snapshot() async throws {
        guard let pool, models.count < options.maximumVolumes, let name = pickVolume(writable: false) else { return }
        let snapshot = "s\(counter)"
        let readOnly = random.chance(0.3)
        log("snapshot \(name) as \(snapshot)\(readOnly ? " read-only" : "")", volume: snapshot, origin: name)
        try await pool.snapshot(volume: name, name: snapshot, readOnly: readOnly)
        var model = VolumeModel(models[name]!.current)
        model.readOnly = readOnly
        models[snapshot] = model
        commitAll()
        record.report.snapshots += 1
    }

    /// A volume deleted, or a new one created.
    private func createOrDelete() async throws {
        guard let pool else { return }
        if models.count > 1, random.chance(0.5), let name = pickVolume(writable: false) {
            log("delete \(name)", volume: name)
            try await pool.deleteVolume(name: name)
            models[name] = nil
        } else if models.count < options.maximumVolumes {
            let name = "c\(counter)"
            log("create \(name)", volume: name)
            _ = try await pool.createVolume(name: name, sizeBytes: options.volumeBytes)
            models[name] = VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))
        } else {
            return
        }
        commitAll()
        record.report.volumeChanges += 1
    }

    /// A volume shrunk or grown (also to sizes that are not whole chunks).
    private func resize() async throws {
        guard let pool, let name = pickVolume(writable: true) else { return }
        let size = Int(1 + random.below(options.volumeBytes / 65536 * 3 / 2)) * 65536 - (random.chance(0.5) ? 8192 : 0)
        log("resize \(name) to \(size)", volume: name)
        do {
            try await pool.resizeVolume(name: name, sizeBytes: UInt64(size))
        } catch let error as SpindleError where error.code == .noSpace && tight {
            // Cutting inside a shared chunk copies it first, which needs space.
            log("  refused: the pool is full", volume: name)
            record.report.poolFullErrors += 1
            let now = try await pool.volumes().first { $0.name == name }?.sizeBytes
            guard now == UInt64(models[name]!.current.count) else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): a resize of \(name) refused for want of space left it \(now.map(String.init) ?? "missing"), not \(models[name]!.current.count) bytes",
                    volume: name)
            }
            return
        }
        models[name]!.resize(to: size)
        commitAll()
        record.report.volumeChanges += 1
    }

    /// Read errors on a member start or stop; or, while degraded, read errors where no redundancy
    /// may be left.
    private func readErrors() async throws {
        // Read errors on one member: the array answers from redundancy and repairs.
        let member = members[Int(random.below(UInt64(members.count)))]
        if readErrorsActive > 0 {
            try await endFaultEpisode()
        } else if mayFault() && options.integrity && random.chance(0.75) {
            try await startSilentEpisode(on: member)
        } else if mayFault() {
            log("read errors on \(member.name)")
            member.failReads(probability: 0.05)
            readErrorsActive = 1
            record.report.injectedReadErrors += 1
        } else if widened && config.level != .raid0 && !isWhole() && array.status.rebuildSlot == nil {
            // Read errors while degraded: where no redundancy is left a read fails with an
            // I/O error; it never returns wrong data, and no member is failed for it.
            let active = array.status.slots.filter { $0.state == .active }.compactMap(\.device)
            guard let victim = members.first(where: { $0.name == active[Int(random.below(UInt64(active.count)))] })
            else { return }
            log("read errors on \(victim.name) while degraded")
            victim.failReads(probability: 0.3)
            record.report.injectedReadErrors += 1
            let before = array.status.slots.map(\.state)
            for _ in 0..<6 {
                guard let name = pickVolume(writable: false) else { break }
                let size = models[name]!.current.count / unit
                let (first, count) = extent(size: size, most: 32)
                log("read \(name) blocks \(first)+\(count)", volume: name, blocks: first..<(first + count))
                try await check(name, first: first, count: count, mayFail: true)
                record.report.reads += 1
            }
            victim.clearFaults()
            log("read errors stop")
            guard array.status.slots.map(\.state) == before else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): read errors while degraded changed the members' states from \(before) to \(array.status.slots.map(\.state))"
                )
            }
        }
    }

    /// Silent faults on one member (the level tolerates one): what only a checksum catches. Reads
    /// must still return the model's data, the array rebuilding what the member returns wrong.
    private func startSilentEpisode(on member: FaultyDevice) async throws {
        let kinds: [FaultyDevice.Silent?] = [.corruptOnRead, .corruptAtRest, .misdirect, .lose, nil]
        let kind = kinds[Int(random.below(UInt64(kinds.count)))]
        let name = kind?.rawValue ?? "rot"
        readErrorsActive = 1
        silentEpisode = name
        record.report.silentFaultEpisodes[name, default: 0] += 1
        if let kind {
            log("silent faults on \(member.name): \(name)")
            member.inject(FaultyDevice.Fault(kind, range: memberDataRange, probability: 0.1))
        } else {
            let count = 1 + Int(random.below(8))
            log("bit rot on \(member.name): \(count) blocks")
            try await member.corruptStoredBlocks(in: memberDataRange, count: count)
        }
    }

    /// Ends read errors or silent faults; after silent ones, a scrub that repairs must leave every
    /// member right (no stripe that disagrees, nothing unreadable), as the checksums tell it which
    /// copy is wrong, and the repairs are flushed.
    func endFaultEpisode() async throws {
        for device in members { device.clearFaults() }
        readErrorsActive = 0
        guard let kind = silentEpisode else {
            log("read errors stop")
            return
        }
        silentEpisode = nil
        log("\(kind) stops; scrub and repair")
        let scrub = try await array.scrub(repair: true)
        guard scrub.mismatches == 0, scrub.unreadable.isEmpty else {
            throw Mismatch(
                message:
                    "seed \(options.seed): after \(kind) on one member, a scrub found \(scrub.mismatches) stripes that disagree and \(scrub.unreadable.count) unreadable chunks; the checksums should have told the wrong member"
            )
        }
        // The repairs reach the disks: else a power cut could drop them from a member's cache and
        // tear the same stripe on another member, two faults in one stripe.
        if let pool { try await pool.commit() } else { try await array.flush() }
        commitAll()
        let again = try await array.scrub(repair: false)
        guard again.integrity.allSatisfy({ $0.corruptBlocksFound == 0 }), again.mismatches == 0 else {
            throw Mismatch(
                message:
                    "seed \(options.seed): after a scrub with repair, \(again.integrity.map(\.corruptBlocksFound).reduce(0, +)) blocks still fail their checksums"
            )
        }
    }

    /// Adds what the members' integrity layers counted to the report (before they are replaced by
    /// a reassembly, and at the end).
    func collectIntegrityCounts() {
        for member in array.readableMembers() + array.writableMembers() {
            guard let checked = member?.device as? IntegrityDevice else { continue }
            let statistics = checked.statistics
            record.report.corruptBlocksFound += Int(statistics.corruptBlocksFound)
            record.report.corruptBlocksRepaired += Int(statistics.corruptBlocksRewritten)
            record.report.blocksAcceptedAfterCrash += Int(statistics.blocksAcceptedAfterCrash)
        }
    }

    /// A member fails: it stays failed (the array runs degraded), or it is replaced and rebuilt.
    private func memberFailure() async throws {
        guard config.level != .raid0, readErrorsActive == 0 else { return }
        let lost = array.status.slots.filter { $0.state != .active }.count
        if widened && random.chance(0.5) {
            // A member fails and stays failed: the array runs degraded, down to its redundancy
            // (a mirror of four to one member), until a later step replaces them.
            guard lost < array.geometry.redundancy, array.status.rebuildSlot == nil else { return }
            let active = array.status.slots.filter { $0.state == .active }.compactMap(\.device)
            let victim = active[Int(random.below(UInt64(active.count)))]
            log("fail \(victim); the array runs degraded")
            try await array.fail(memberNamed: victim)
            record.report.memberFailures += 1
            return
        }
        // A member fails under the load, is replaced and rebuilt.
        guard mayInject() else { return }
        let victim = members[Int(random.below(UInt64(members.count)))]
        try await replaceAndRebuild(victim, reason: "fail \(victim.name)")
    }

    /// Write errors on a member during one write.
    private func writeErrors() async throws {
        // Write errors on one member: the array fails it at the first one and goes on degraded.
        guard config.level != .raid0, isWhole(), readErrorsActive == 0 else { return }
        let member = members[Int(random.below(UInt64(members.count)))]
        log("write errors on \(member.name)")
        member.failWrites(probability: 1)
        record.report.injectedWriteErrors += 1
        try await write(fua: false)
        member.clearFaults()
    }
}
