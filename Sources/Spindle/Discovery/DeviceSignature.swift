/// What a device already holds, so that creating an array or a pool never silently destroys it:
/// a Spindle array superblock or pool label (read with their decoders, damaged or not), or what
/// ``ContentSignature`` finds (another known format, or any non-zero data).
public enum DeviceSignature {
    /// What a device holds, as ``find(_:)`` reports it; `description` reads as a noun phrase.
    public indirect enum Finding: Sendable, CustomStringConvertible {
        /// A Spindle array superblock: a member (``RAIDSuperblock/role`` is its slot) or a spare (role -1).
        case arrayMember(RAIDSuperblock)
        case damagedArraySuperblock(RAIDSuperblock.Problem)
        /// A Spindle thin pool label.
        case poolDevice(ThinPoolLabel)
        case damagedPoolLabel(String)
        /// A Spindle integrity layer (``IntegrityDevice``), and what it holds, if anything.
        case integrityDevice(IntegritySuperblock, holding: Finding?)
        case damagedIntegritySuperblock(IntegritySuperblock.Problem)
        /// Another known format (a file system, partition table, disk image, LVM, swap, LUKS), in words.
        case format(String)
        /// Non-zero bytes in no known format, the first at `offset`.
        case data(offset: UInt64)

        public var description: String {
            switch self {
            case let .arrayMember(superblock):
                let role = superblock.role >= 0 ? "member \(superblock.role)" : "a spare"
                return "\(role) of array '\(superblock.name)' (\(superblock.arrayUUID))"
            case let .damagedArraySuperblock(problem): return "a damaged Spindle array superblock (\(problem))"
            case let .poolDevice(label):
                return "device \(label.deviceIndex) of pool '\(label.poolName)' (\(label.poolUUID))"
            case let .damagedPoolLabel(problem): return "a damaged Spindle pool label (\(problem))"
            case let .integrityDevice(superblock, holding):
                return "a Spindle integrity layer (\(superblock.uuid))" + (holding.map { " holding \($0)" } ?? "")
            case let .damagedIntegritySuperblock(problem): return "a damaged Spindle integrity superblock (\(problem))"
            case let .format(meaning): return meaning
            case let .data(offset): return "data (a non-zero byte at offset \(offset))"
            }
        }
    }

    /// How a refusal to overwrite says which parameter destroys what a device holds; front ends
    /// that call the parameter something else put their own words in its place.
    public static let overwriteHint = "pass `overwrite: true`"

    /// Describes what `bytes` (read from `offset` of a device) show, or nil when they are all zero.
    /// Spindle's own headers are recognized by ``inspect(_:)`` with their decoders.
    public static func identify(_ bytes: [UInt8], at offset: UInt64) -> String? {
        ContentSignature.identify(bytes, at: offset)?.description
    }

    /// What the device holds, in words, or nil when every place looked at is zero.
    public static func inspect(_ device: any BlockDevice) async throws -> String? {
        try await find(device)?.description
    }

    /// What the device holds, or nil when every place looked at is zero. Spindle's headers come
    /// first, then what ``ContentSignature/scan(_:)`` finds.
    public static func find(_ device: any BlockDevice) async throws -> Finding? {
        switch try await IntegrityDevice.readSuperblock(of: device) {
        case let .success(superblock):
            // What lies inside, read through a view that writes nothing.
            let view = IntegrityDevice.view(of: device, superblock: superblock)
            defer { view.abandon() }
            let inside = (try? await find(view)).flatMap { $0 }
            return .integrityDevice(superblock, holding: inside)
        case .failure(.notFormatted), .failure(.unreadable):
            break
        case let .failure(problem):
            return .damagedIntegritySuperblock(problem)
        }
        switch try await RAIDArray.readSuperblock(of: device) {
        case let .success(superblock):
            return .arrayMember(superblock)
        case let .failure(problem) where problem != .notAMember:
            return .damagedArraySuperblock(problem)
        case .failure:
            break
        }
        do {
            if let label = try await ThinPoolLabel.read(from: device) { return .poolDevice(label) }
        } catch {
            return .damagedPoolLabel("\(error)")
        }
        switch try await ContentSignature.scan(device) {
        case let .format(meaning)?: return .format(meaning)
        case let .data(offset)?: return .data(offset: offset)
        case nil: return nil
        }
    }

    /// Throws ``SpindleError/Code/alreadyExists`` naming what the device holds, unless it holds
    /// nothing. The message ends with ``overwriteHint``.
    public static func refuseIfInUse(_ device: any BlockDevice, operation: String) async throws {
        if let found = try await inspect(device) {
            throw SpindleError(
                .alreadyExists, "the device holds \(found); refusing to overwrite it (to destroy it, \(overwriteHint))",
                operation: operation, path: device.name)
        }
    }
}
