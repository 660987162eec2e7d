extension StackSimulation.Run {
    /// A power cut: unflushed writes on every member dropped or torn, the array reassembled and the
    /// pool reopened; every block of every volume must hold what the flush contract allows (its
    /// contents at the last commit or a version written since), and that becomes the model.
    func powerCut() async throws {
        if !mayInject() {
            // Dirty and degraded is RAID5's write hole, which assembly refuses (as md does):
            // let the cut come after the array has been idle long enough to be clean.
            guard extended else { return }
            if config.level == .raid5 {
                log("idle: the array marks itself clean")
                await array.markCleanIfIdle(idleNanos: 0)
                record.report.idleCleans += 1
            }
        }
        // The cut is a fault on every member: one member's silent faults end (and are repaired)
        // first, so that no stripe meets two at once.
        if silentEpisode != nil { try await endFaultEpisode() }
        collectIntegrityCounts()
        log("power cut")
        for device in members {
            device.clearFaults()
            try await device.powerCut(tearing: true)
        }
        readErrorsActive = 0
        for device in members { device.restorePower() }
        let assembly = try await RAIDArray.assemble(members: members)
        array = assembly.array
        array.setIdleCleanDelay(nanoseconds: .max)
        quietIntegrity()
        for member in array.writableMembers() + array.readableMembers() {
            if let checked = member?.device as? IntegrityDevice, checked.hasSuspects {
                throw Mismatch(
                    message:
                        "seed \(options.seed): after reassembly \(checked.name) still has suspect regions (\(checked.statistics))"
                )
            }
        }
        if config.withPool {
            let reopened = try await ThinPool.open(devices: [array])
            pool = reopened
            let present = Set(try await reopened.volumes().map(\.name))
            guard present == Set(models.keys) else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): after a power cut the pool has volumes \(present.sorted()), the model \(models.keys.sorted())"
                )
            }
        }
        for (name, model) in models.sorted(by: { $0.key < $1.key }) {
            let volume = try await device(name)
            let buffer = AlignedBuffer(count: model.current.count, zeroed: false)
            try await volume.read(into: buffer, at: 0)
            let bytes = buffer.array
            for block in 0..<(bytes.count / unit) {
                let range = (block * unit)..<((block + 1) * unit)
                let got = Array(bytes[range])
                if got != Array(model.durable[range]) && !model.versions[block].contains(got) {
                    throw Mismatch(
                        message:
                            "seed \(options.seed): after a power cut \(name) block \(block) holds data the flush contract does not allow (neither its committed contents nor a version written since)",
                        volume: name, block: block)
                }
            }
            var settled = VolumeModel(bytes, blockBytes: unit)
            settled.readOnly = model.readOnly
            models[name] = settled
        }
        if let pool {
            let check = try await pool.check()
            guard check.isClean else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): pool check after a power cut: \(check.problems.prefix(3).joined(separator: "; "))"
                )
            }
        }
        record.report.powerCuts += 1
    }

    /// The end of a run: faults cleared and a degraded array made whole, then the pool checked, every
    /// byte read back against the model, and mirrors and parity scrubbed.
    func finish() async throws {
        if silentEpisode != nil { try await endFaultEpisode() }
        for device in members { device.clearFaults() }
        if extended && !isWhole() {
            // Finish what is pending so the scrub below sees every member.
            if array.status.rebuildSlot != nil {
                log("resume the rebuild")
                _ = try await array.rebuild()
                record.report.rebuilds += 1
            }
            while let victim = brokenMember() {
                try await replaceAndRebuild(victim, reason: "degraded at the end")
                if array.status.rebuildSlot != nil { _ = try await array.rebuild() }
            }
        }
        if let pool {
            try await pool.commit()
            let check = try await pool.check()
            guard check.isClean else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): pool check at the end: \(check.problems.prefix(3).joined(separator: "; "))"
                )
            }
        }
        // Every byte reads back as the model says, then mirrors and parity agree.
        for (name, model) in models.sorted(by: { $0.key < $1.key }) {
            try await check(name, first: 0, count: model.current.count / unit)
        }
        if config.level != .raid0 {
            let scrub = try await array.scrub()
            guard scrub.mismatches == 0 else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): scrub found \(scrub.mismatches) stripes whose parity disagrees with the data"
                )
            }
            guard scrub.integrity.allSatisfy({ $0.corruptBlocksFound == 0 }) else {
                throw Mismatch(
                    message:
                        "seed \(options.seed): at the end, \(scrub.integrity.map(\.corruptBlocksFound).reduce(0, +)) blocks fail their checksums"
                )
            }
        }
        collectIntegrityCounts()
        try await array.close()
    }
}
