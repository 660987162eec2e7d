import Glibc

/// Making and opening integrity devices: format, the superblock copies, open (with crash recovery),
/// views that write nothing, and the counts.
extension IntegrityDevice {
    // MARK: Format and open

    /// Formats `device` for the integrity layer: zeroes it (zeros match a checksum area of zeros, so
    /// this costs little on a sparse image), then writes the superblocks. Takes ownership of
    /// `device` when it returns.
    /// - Parameters:
    ///   - policy: how a crash that leaves data and checksums apart is resolved (see the type).
    ///   - selfCheckedBytes: the first bytes of the data that the owner checks itself (RAID
    ///     superblocks): after a crash they keep their data whatever the policy.
    ///   - overwrite: destroy what the device holds; otherwise a device with a Spindle header,
    ///     another format or any data is refused.
    /// - Throws: ``SpindleError`` for a device too small, read-only or in use.
    public static func format(
        _ device: any BlockDevice, policy: IntegritySuperblock.CrashPolicy = .standalone,
        selfCheckedBytes: UInt64 = 0, overwrite: Bool = false,
        checksumCacheBytes: Int = defaultChecksumCacheBytes
    ) async throws -> IntegrityDevice {
        guard !device.isReadOnly else {
            throw SpindleError(
                .readOnly, "the device is open read-only", operation: "format integrity", path: device.name)
        }
        guard IntegritySuperblock.blockBytes % device.logicalBlockBytes == 0 else {
            throw SpindleError(
                .invalidArgument,
                "the device's \(device.logicalBlockBytes)-byte blocks are larger than the 4 KiB blocks the integrity layer checks",
                operation: "format integrity", path: device.name)
        }
        guard
            let superblock = IntegritySuperblock.layout(
                underlyingBytes: device.capacityBytes, uuid: .random(), policy: policy,
                selfCheckedBytes: selfCheckedBytes, createdSeconds: UInt64(max(0, time(nil))))
        else {
            throw SpindleError(
                .invalidArgument,
                "the device is \(device.capacityBytes) bytes; the integrity layer needs at least 2 MiB",
                operation: "format integrity", path: device.name)
        }
        if !overwrite {
            if let found = try await DeviceSignature.inspect(device) {
                throw SpindleError(
                    .alreadyExists,
                    "the device holds \(found); refusing to overwrite it (to destroy it, \(DeviceSignature.overwriteHint))",
                    operation: "format integrity", path: device.name)
            }
        }
        // Everything but the superblocks first, durable, then the superblocks: an interrupted format
        // leaves no label that promises checksums the device does not have.
        let rest = IntegritySuperblock.bitmapOffset
        try await device.writeZeroes(offset: rest, length: superblock.dataOffset + superblock.dataBytes - rest)
        try await device.flush()
        let label = AlignedBuffer(count: IntegritySuperblock.headerBytes)
        superblock.encoded().withUnsafeBytes { label.bytes.copyMemory(from: $0) }
        for copy in IntegritySuperblock.copyOffsets { try await device.write(from: label, at: copy, fua: true) }
        let opened = IntegrityDevice(
            inner: device, superblock: superblock,
            bitmap: [UInt8](repeating: 0, count: IntegritySuperblock.bitmapBytes),
            checksumCacheBytes: checksumCacheBytes)
        opened.startIdleCleaner()
        return opened
    }

    /// Reads the integrity superblock of `device`: the first valid copy, or why there is none
    /// (``IntegritySuperblock/Problem/notFormatted`` when neither copy has the magic).
    public static func readSuperblock(of device: any BlockDevice) async throws -> Result<
        IntegritySuperblock, IntegritySuperblock.Problem
    > {
        guard device.capacityBytes >= 8192, IntegritySuperblock.blockBytes % device.logicalBlockBytes == 0 else {
            return .failure(.notFormatted)
        }
        var problems: [IntegritySuperblock.Problem] = []
        let buffer = AlignedBuffer(count: IntegritySuperblock.headerBytes, zeroed: false)
        for copy in IntegritySuperblock.copyOffsets {
            do {
                try await device.read(into: buffer, at: copy)
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                problems.append(.unreadable("the integrity superblock copy at byte \(copy) cannot be read: \(error)"))
                continue
            }
            do {
                return .success(
                    try IntegritySuperblock.decode(buffer.readOnlyBytes, underlyingBytes: device.capacityBytes))
            } catch {
                problems.append(error)
            }
        }
        // A copy with the magic says more than a read error, which says more than no magic.
        if let found = problems.first(where: {
            if case .unreadable = $0 { return false }
            return $0 != .notFormatted
        }) {
            return .failure(found)
        }
        return .failure(problems.first { $0 != .notFormatted } ?? .notFormatted)
    }

    /// Opens an integrity device over `device` (formatted by ``format(_:policy:selfCheckedBytes:overwrite:checksumCacheBytes:)``).
    /// A writable device whose bitmap shows an unclean shutdown resolves the suspect regions the
    /// policy lets it resolve alone (all of them when standalone; the self-checked prefix when
    /// redundant) before it returns; a read-only one applies the same rule as it reads. Takes
    /// ownership of `device` when it returns.
    /// - Throws: ``SpindleError/Code/corrupted`` for a damaged superblock, ``SpindleError/Code/invalidArgument``
    ///   for a device with none.
    /// - Parameter recover: resolve suspect regions at open (on a writable device); without it the
    ///   device writes nothing until asked to, and reads suspect blocks as a read-only open does.
    public static func open(
        _ device: any BlockDevice, recover: Bool = true, checksumCacheBytes: Int = defaultChecksumCacheBytes
    ) async throws -> IntegrityDevice {
        let superblock: IntegritySuperblock
        switch try await readSuperblock(of: device) {
        case let .success(found):
            superblock = found
        case .failure(.notFormatted):
            throw SpindleError(
                .invalidArgument, "the device has no Spindle integrity superblock", operation: "open integrity",
                path: device.name)
        case let .failure(.unreadable(reason)):
            throw SpindleError(.ioFailed, reason, operation: "open integrity", path: device.name)
        case let .failure(problem):
            throw SpindleError(
                .corrupted, problem.description, operation: "open integrity", path: device.name, cause: problem)
        }
        let bitmap = AlignedBuffer(count: IntegritySuperblock.bitmapBytes, zeroed: false)
        try await device.read(into: bitmap, at: IntegritySuperblock.bitmapOffset)
        var bits = bitmap.array
        // Bits past the last region mean nothing; a damaged bitmap marks too much, never too little.
        for region in superblock.regionCount..<(IntegritySuperblock.bitmapBytes * 8) {
            bits[region / 8] &= ~(1 << UInt8(region % 8))
        }
        let opened = IntegrityDevice(
            inner: device, superblock: superblock, bitmap: bits, checksumCacheBytes: checksumCacheBytes)
        if !device.isReadOnly && recover {
            // What this layer may decide alone: everything when standalone; when redundant, only
            // the owner's headers (the rest waits for the owner's resync from redundancy).
            if opened.hasSuspects {
                _ = try await opened.resolveSuspects(
                    acceptingRemaining: false,
                    below: superblock.policy == .standalone ? nil : superblock.selfCheckedBytes)
            }
            opened.startIdleCleaner()
        }
        return opened
    }

    /// A view for looking inside without writing (what ``DeviceSignature`` reads): every region
    /// counts as suspect, so a header a crash left apart from its checksum still shows what it is.
    /// It never flushes; let go of it with ``abandon()``, which leaves `device` open.
    static func view(of device: any BlockDevice, superblock: IntegritySuperblock) -> IntegrityDevice {
        IntegrityDevice(
            inner: device, superblock: superblock,
            bitmap: [UInt8](repeating: 0xFF, count: IntegritySuperblock.bitmapBytes), checksumCacheBytes: 1 << 20)
    }

    /// Opens the integrity layer over `device` when it is formatted for one, else returns `device`.
    public static func openIfFormatted(
        _ device: any BlockDevice, recover: Bool = true, checksumCacheBytes: Int = defaultChecksumCacheBytes
    ) async throws -> any BlockDevice {
        switch try await readSuperblock(of: device) {
        case .failure(.notFormatted), .failure(.unreadable):
            // Not formatted, or the first blocks cannot be read: the device is passed on as it is,
            // and the layer above says what it makes of it (an array leaves such a member out).
            return device
        default:
            return try await open(device, recover: recover, checksumCacheBytes: checksumCacheBytes)
        }
    }

    /// Counts so far.
    public var statistics: Statistics {
        state.withLock { state in
            var statistics = state.statistics
            statistics.cachedChecksumBlocks = state.cache.count
            statistics.suspectRegions = state.suspect.reduce(0) { $0 + $1.nonzeroBitCount }
            return statistics
        }
    }
}
