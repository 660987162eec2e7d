import Foundation

/// What a folder or a set of devices holds, read from Spindle's headers without writing anything:
/// the arrays their members form (complete, degraded, with stale copies), the thin pools their
/// labels name (on image files or on arrays), and every damaged header with its reason — a damaged
/// header is reported, never skipped in silence. Devices with no Spindle header are passed over.
///
/// From a discovery, a whole stack opens by name as one handle:
/// ```swift
/// let found = try await Discovery.scan(folder: "/srv/disks", engine: engine)
/// let vm1 = try await found.openVolume("vm1", inPool: "tank", engine: engine)
/// // ... read and write vm1, serve it over NBD ...
/// try await vm1.close()  // the volume, the pool, the arrays and the image files under it
/// ```
public struct Discovery: Sendable {
    /// Every device looked at, in order (a folder's regular files by name), with its header.
    public var devices: [ScannedDevice]
    /// The arrays the members form, by name.
    public var arrays: [DiscoveredArray]
    /// The pools the labels name, by name.
    public var pools: [DiscoveredPool]
    /// Damaged Spindle headers: array superblocks and pool labels on the devices, then pool labels
    /// at the start of arrays. Nothing here is used.
    public var damaged: [DamagedHeader]
    /// The folder scanned, when a folder was.
    public var folder: String?

    /// Scans the regular files of `folder`, reading them without taking write locks. Files that
    /// cannot be opened as images (too small, unreadable) are passed over.
    /// - Throws: ``SpindleError/Code/notFound`` when the folder cannot be listed.
    public static func scan(folder: String, engine: IOEngine? = nil) async throws -> Discovery {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: folder) else {
            throw SpindleError(.notFound, "cannot list the folder", operation: "scan", path: folder)
        }
        var opened: [(device: any BlockDevice, source: DeviceSource)] = []
        for entry in entries.sorted() {
            let path = (folder as NSString).appendingPathComponent(entry)
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
                let device = try? FileDevice.open(path: path, engine: engine, options: readOptions)
            else { continue }
            opened.append((device, .path(path)))
        }
        var found = try await scan(opened, closing: true)
        found.folder = folder
        return found
    }

    /// Scans the image files at `paths`, reading them without taking write locks.
    /// - Throws: ``SpindleError`` when a file cannot be opened (missing, not a regular file, too small).
    public static func scan(paths: [String], engine: IOEngine? = nil) async throws -> Discovery {
        var opened: [(device: any BlockDevice, source: DeviceSource)] = []
        do {
            for path in paths {
                opened.append((try FileDevice.open(path: path, engine: engine, options: readOptions), .path(path)))
            }
        } catch {
            for (device, _) in opened { try? await device.close() }
            throw error
        }
        return try await scan(opened, closing: true)
    }

    /// Scans devices the caller opened; they stay the caller's (and open) until a stack opened from
    /// this discovery takes them (see ``openPool(named:engine:options:)``).
    public static func scan(devices: [any BlockDevice]) async throws -> Discovery {
        try await scan(devices.map { (device: $0, source: DeviceSource.device($0)) }, closing: false)
    }

    /// How scans open image files: read-only (no write lock), through the page cache.
    static let readOptions = FileDevice.Options(readOnly: true, directIO: .disabled)

    private static func scan(_ entries: [(device: any BlockDevice, source: DeviceSource)], closing: Bool) async throws
        -> Discovery
    {
        do {
            let found = try await read(entries)
            if closing { for entry in entries { try? await entry.device.close() } }
            return found
        } catch {
            if closing { for entry in entries { try? await entry.device.close() } }
            throw error
        }
    }

    private static func read(_ entries: [(device: any BlockDevice, source: DeviceSource)]) async throws -> Discovery {
        var scanned: [ScannedDevice] = []
        var damaged: [DamagedHeader] = []
        var labelled: [(label: ThinPoolLabel, location: DiscoveredPool.Device.Location, source: DeviceSource?)] = []
        var members: [SpindleUUID: [DiscoveredArray.Member]] = [:]
        var memberDevices: [String: any BlockDevice] = [:]
        for (raw, source) in entries {
            // An image with the integrity layer is read through it (writing nothing): its header
            // lies inside.
            let device: any BlockDevice
            switch try await IntegrityDevice.readSuperblock(of: raw) {
            case .failure(.notFormatted), .failure(.unreadable):
                device = raw
            case let .failure(problem):
                damaged.append(DamagedHeader(location: .device(source.name), reason: .integritySuperblock(problem)))
                scanned.append(
                    ScannedDevice(name: source.name, header: .damaged(.integritySuperblock(problem)), source: source))
                continue
            case .success:
                device = try await IntegrityDevice.open(raw, recover: false)
            }
            let header = try await ScannedDevice.readHeader(of: device)
            scanned.append(ScannedDevice(name: source.name, header: header, source: source))
            switch header {
            case let .arrayMember(superblock):
                members[superblock.arrayUUID, default: []].append(
                    DiscoveredArray.Member(
                        device: source.name, superblock: superblock, source: source,
                        checksummed: device is IntegrityDevice))
                memberDevices[source.name] = device
            case let .poolDevice(label):
                labelled.append((label, .image(source.name), source))
            case let .damaged(reason):
                damaged.append(DamagedHeader(location: .device(source.name), reason: reason))
            case .none:
                break
            }
        }
        let arrays = members.values.map { DiscoveredArray(members: $0) }.sorted {
            ($0.name, $0.uuid.description) < ($1.name, $1.uuid.description)
        }
        // A pool on an array: its label is the array's first 4 KiB, on the member the geometry says.
        for array in arrays {
            guard let start = array.firstBlockHolder(), let device = memberDevices[start.member.device] else {
                continue
            }
            switch try await DamagedHeader.readLabel(of: device, at: start.offset) {
            case let .success(label?):
                labelled.append((label, .array(name: array.name, uuid: array.uuid), nil))
            case .success(nil):
                break
            case let .failure(reason):
                damaged.append(
                    DamagedHeader(
                        location: .arrayStart(array: array.name, uuid: array.uuid, member: start.member.device),
                        reason: reason))
            }
        }
        var pools: [SpindleUUID: DiscoveredPool] = [:]
        for (label, location, source) in labelled {
            pools[
                label.poolUUID,
                default: DiscoveredPool(
                    name: label.poolName, uuid: label.poolUUID, chunkBytes: label.chunkBytes, devices: [])
            ]
            .devices.append(
                DiscoveredPool.Device(index: label.deviceIndex, location: location, label: label, source: source))
        }
        let sortedPools = pools.values.map { pool in
            var sorted = pool
            sorted.devices.sort { $0.index < $1.index }
            return sorted
        }.sorted { ($0.name, $0.uuid.description) < ($1.name, $1.uuid.description) }
        return Discovery(devices: scanned, arrays: arrays, pools: sortedPools, damaged: damaged, folder: nil)
    }

    // MARK: Finding by name

    /// The array named `name`.
    /// - Throws: ``SpindleError/Code/notFound`` when there is none, ``SpindleError/Code/invalidArgument``
    ///   when several arrays have that name.
    public func array(named name: String) throws -> DiscoveredArray {
        let matches = arrays.filter { $0.name == name }
        guard let first = matches.first else {
            let others = arrays.map { "'\($0.name)'" }
            throw SpindleError(
                .notFound,
                "no array named '\(name)' among the devices\(others.isEmpty ? " (they hold no array members)" : "; they hold \(others.joined(separator: ", "))")\(damagedNote)",
                operation: "find array", path: folder)
        }
        guard matches.count == 1 else {
            throw SpindleError(
                .invalidArgument,
                "\(matches.count) arrays are named '\(name)' (\(matches.map(\.uuid.description).joined(separator: ", "))); scan the members of one",
                operation: "find array", path: folder)
        }
        return first
    }

    /// The pool named `name`.
    /// - Throws: ``SpindleError/Code/notFound`` when there is none (naming the damaged headers, which
    ///   may be its), ``SpindleError/Code/invalidArgument`` when several pools have that name.
    public func pool(named name: String) throws -> DiscoveredPool {
        let matches = pools.filter { $0.name == name }
        guard let first = matches.first else {
            let others = pools.map(\.name)
            throw SpindleError(
                .notFound,
                "no pool named '\(name)' among the devices\(others.isEmpty ? " (they hold no pools)" : "; they hold \(others.joined(separator: ", "))")\(damagedNote)",
                operation: "find pool", path: folder)
        }
        guard matches.count == 1 else {
            throw SpindleError(
                .invalidArgument,
                "\(matches.count) pools are named '\(name)' (\(matches.map(\.uuid.description).joined(separator: ", "))); scan the devices of one",
                operation: "find pool", path: folder)
        }
        return first
    }

    private var damagedNote: String {
        damaged.isEmpty ? "" : ". Damaged and not used: " + damaged.map(\.description).joined(separator: "; ")
    }
}

/// Where a scanned device came from: a path (a stack opened from the discovery opens it again, for
/// writing) or a device the caller opened (the stack takes that one).
enum DeviceSource: Sendable {
    case path(String)
    case device(any BlockDevice)

    var name: String {
        switch self {
        case let .path(path): return path
        case let .device(device): return device.name
        }
    }
}

/// One device a discovery looked at.
public struct ScannedDevice: Sendable {
    /// Its path (or the name of a device the caller opened).
    public var name: String
    public var header: Header
    let source: DeviceSource

    /// The Spindle header a device starts with.
    public enum Header: Sendable {
        /// An array superblock: a member (``RAIDSuperblock/role`` is its slot) or a spare (role -1).
        case arrayMember(RAIDSuperblock)
        /// A thin pool label.
        case poolDevice(ThinPoolLabel)
        /// A damaged superblock or label (also in ``Discovery/damaged``).
        case damaged(DamagedHeader.Reason)
        /// No Spindle header.
        case none
    }

    /// What the device's superblock says: the superblock, or why there is none.
    public var superblock: Result<RAIDSuperblock, RAIDSuperblock.Problem> {
        switch header {
        case let .arrayMember(superblock): return .success(superblock)
        case let .damaged(.arraySuperblock(problem)): return .failure(problem)
        default: return .failure(.notAMember)
        }
    }

    /// Reads the superblock copies, then (for a device that is no member) the pool label.
    static func readHeader(of device: any BlockDevice) async throws -> Header {
        switch try await RAIDArray.readSuperblock(of: device) {
        case let .success(superblock): return .arrayMember(superblock)
        case let .failure(problem) where problem != .notAMember: return .damaged(.arraySuperblock(problem))
        case .failure: break
        }
        switch try await DamagedHeader.readLabel(of: device, at: 0) {
        case let .success(label?): return .poolDevice(label)
        case .success(nil): return .none
        case let .failure(reason): return .damaged(reason)
        }
    }
}

/// A Spindle header that is there but cannot be used, and why.
public struct DamagedHeader: Sendable, Equatable, CustomStringConvertible {
    /// Where the header is.
    public enum Location: Sendable, Equatable {
        /// At the start of a device (its path, or the name of a device the caller opened).
        case device(String)
        /// A pool label at the start of an array, which lives on one member.
        case arrayStart(array: String, uuid: SpindleUUID, member: String)
    }

    /// What is wrong with it.
    public enum Reason: Error, Sendable, Equatable, CustomStringConvertible {
        case arraySuperblock(RAIDSuperblock.Problem)
        case poolLabel(ThinPoolLabel.Problem)
        case integritySuperblock(IntegritySuperblock.Problem)
        /// The label's block could not be read.
        case poolLabelUnreadable(String)

        public var description: String {
            switch self {
            case let .arraySuperblock(problem): return problem.description
            case let .poolLabel(problem): return problem.description
            case let .integritySuperblock(problem): return problem.description
            case let .poolLabelUnreadable(message): return message
            }
        }
    }

    public var location: Location
    public var reason: Reason

    public var description: String {
        switch location {
        case let .device(name): return "\(name): \(reason)"
        case let .arrayStart(array, _, member):
            return "array \(array) (its first block, on \(member)): damaged pool label: \(reason)"
        }
    }

    /// Reads a pool label at `offset`: the label, nil when there is none, or what is wrong with it.
    static func readLabel(of device: any BlockDevice, at offset: UInt64) async throws -> Result<ThinPoolLabel?, Reason>
    {
        guard device.capacityBytes >= offset + UInt64(ThinPoolLabel.bytes) else { return .success(nil) }
        let buffer = AlignedBuffer(count: ThinPoolLabel.bytes, zeroed: false)
        do {
            try await device.read(into: buffer, at: offset)
        } catch is CancellationError {
            throw CancellationError()
        } catch let error as SpindleError {
            return .failure(.poolLabelUnreadable(error.message))
        } catch {
            return .failure(.poolLabelUnreadable("\(error)"))
        }
        do {
            return .success(try ThinPoolLabel.decode(buffer.array))
        } catch .notALabel {
            return .success(nil)
        } catch {
            return .failure(.poolLabel(error))
        }
    }
}
