import ArgumentParser
import Foundation
import Spindle

/// The folder where the CLI finds pools: their devices are image files there, or arrays whose
/// member images are there. Nothing else is kept: a pool is found by reading the labels its devices
/// carry, so there is no side database to drift.
struct PoolFolder: ParsableArguments {
    @Option(name: .customLong("dir"), help: "Folder holding the pools' images and array members (default: $SPINDLE_DIR, else the current folder).")
    var directory: String?

    var path: String { directory ?? ProcessInfo.processInfo.environment["SPINDLE_DIR"] ?? "." }
}

/// A pool device found in a folder.
enum FoundDevice: CustomStringConvertible {
    case image(path: String)
    case array(name: String, paths: [String])

    var description: String {
        switch self {
        case let .image(path): return path
        case let .array(name, paths): return "array:\(name) (\(paths.count) members)"
        }
    }
}

struct FoundPool {
    var name: String
    var uuid: SpindleUUID
    var devices: [(index: Int, device: FoundDevice)]
}

/// A pool opened by the CLI with the devices under it; ``close()`` commits and closes them all.
final class OpenPool {
    let pool: ThinPool
    private var files: [FileDevice]
    private(set) var arrays: [RAIDArray]

    init(pool: ThinPool, files: [FileDevice], arrays: [RAIDArray]) {
        self.pool = pool
        self.files = files
        self.arrays = arrays
    }

    /// Devices added to the pool (extend) to close with it.
    func adopt(files newFiles: [FileDevice], arrays newArrays: [RAIDArray]) {
        files += newFiles
        arrays += newArrays
    }

    func close() async throws {
        var failure: (any Error)?
        do { try await pool.close() } catch { failure = error }
        for array in arrays {
            do { try await array.close() } catch { failure = failure ?? error }
        }
        for file in files {
            do { try await file.close() } catch { failure = failure ?? error }
        }
        if let failure { throw failure }
    }
}

enum PoolStore {
    /// Every pool whose devices are in `folder`: plain images with a pool label, and arrays (found
    /// from their members) whose first block holds one. Reads only.
    static func scan(_ folder: String) async throws -> [FoundPool] {
        let (pools, damaged) = try await scanReport(folder)
        for problem in damaged { Terminal.warning(problem) }
        return pools
    }

    /// The pools in `folder`, and what looked like a pool's or an array's but is damaged (each
    /// "PATH: what is wrong; not used"): a damaged header is reported, never skipped in silence.
    static func scanReport(_ folder: String) async throws -> (pools: [FoundPool], damaged: [String]) {
        let images = try await ImageScan(folder, labels: true)
        var damaged = images.damaged
        var labelled: [(label: ThinPoolLabel, device: FoundDevice)] = images.labelled.map { ($0.label, .image(path: $0.path)) }
        let members = Dictionary(grouping: images.members.map { (path: $0.path, block: $0.superblock) }, by: { $0.block.arrayUUID })
        // An array's first 4 KiB live on one member, at a place its superblock's geometry says.
        for group in members.values {
            guard let newest = group.max(by: { $0.block.events < $1.block.events })?.block else { continue }
            guard let extent = newest.geometry.extents(offset: 0, length: UInt64(ThinPoolLabel.bytes)).first else { continue }
            let holders = group.filter { newest.level == .raid1 || $0.block.role == extent.member }
                .filter { $0.block.events == newest.events }
            guard let holder = holders.first,
                  let device = try? FileDevice.open(path: holder.path, options: FileDevice.Options(readOnly: true, directIO: .disabled)) else { continue }
            let buffer = AlignedBuffer(count: ThinPoolLabel.bytes, zeroed: false)
            if (try? await device.read(into: buffer, at: holder.block.dataOffset + extent.memberOffset)) != nil {
                do {
                    labelled.append((try ThinPoolLabel.decode(buffer.array), .array(name: newest.name, paths: group.map(\.path))))
                } catch ThinPoolLabel.Problem.notALabel {
                } catch {
                    damaged.append("array:\(newest.name) (its first block, on \(holder.path)): damaged pool label: \(error); not used")
                }
            }
            try? await device.close()
        }
        var pools: [SpindleUUID: FoundPool] = [:]
        for (label, device) in labelled {
            pools[label.poolUUID, default: FoundPool(name: label.poolName, uuid: label.poolUUID, devices: [])]
                .devices.append((label.deviceIndex, device))
        }
        let found = pools.values.map { pool in
            var sorted = pool
            sorted.devices.sort { $0.index < $1.index }
            return sorted
        }.sorted { $0.name < $1.name }
        return (found, damaged)
    }

    /// Finds the pool named `name` in `folder`.
    static func find(_ name: String, in folder: String) async throws -> FoundPool {
        let (all, damaged) = try await scanReport(folder)
        let pools = all.filter { $0.name == name }
        guard let pool = pools.first else {
            let others = all.map(\.name)
            let problems = damaged.isEmpty ? "" : ". Damaged and not used: " + damaged.joined(separator: "; ")
            throw SpindleError(.notFound, "no pool named '\(name)' in the folder\(others.isEmpty ? " (it holds no pools)" : "; it holds \(others.joined(separator: ", "))")\(problems)",
                               operation: "find pool", path: folder)
        }
        for problem in damaged { Terminal.warning(problem) }
        guard pools.count == 1 else {
            throw SpindleError(.invalidArgument, "the folder holds \(pools.count) pools named '\(name)' (\(pools.map(\.uuid.description).joined(separator: ", "))); move one away",
                               operation: "find pool", path: folder)
        }
        return pool
    }

    /// Opens the devices of a found pool for writing (assembling arrays) and the pool on them.
    /// `memberFaults` wraps array members (by path) in fault injectors.
    static func open(
        _ name: String, folder: String, engine: IOEngine, readOnly: Bool = false, memberFaults: [String: FaultSpec] = [:]
    ) async throws -> OpenPool {
        let found = try await find(name, in: folder)
        var files: [FileDevice] = []
        var arrays: [RAIDArray] = []
        do {
            var devices: [any BlockDevice] = []
            for (_, device) in found.devices {
                let opened = try await openDevice(device, engine: engine, readOnly: readOnly, memberFaults: memberFaults)
                devices.append(opened.device)
                files += opened.files
                arrays += opened.arrays
            }
            let pool = try await ThinPool.open(devices: devices)
            for note in pool.openNotes { Terminal.warning("pool \(name): \(note)") }
            return OpenPool(pool: pool, files: files, arrays: arrays)
        } catch {
            for array in arrays { try? await array.close() }
            for file in files { try? await file.close() }
            throw error
        }
    }

    /// Opens a device as a create or extend command names it: `array:NAME` (an array whose members
    /// are in the folder) or an image path (created, in `created`, at `size` when missing and a size is given).
    static func openDevice(
        spec: String, folder: String, engine: IOEngine, size: UInt64?, created: CreatedImages
    ) async throws -> (device: any BlockDevice, files: [FileDevice], arrays: [RAIDArray]) {
        if spec.hasPrefix("array:") {
            let arrayName = String(spec.dropFirst("array:".count))
            let selection = try ArrayCommand.Selection.parse(["--scan", folder, "--array-name", arrayName])
            return try await openDevice(.array(name: arrayName, paths: try await selection.memberPaths()), engine: engine, readOnly: false)
        }
        if !FileManager.default.fileExists(atPath: spec) {
            guard let size else {
                throw SpindleError(.notFound, "no such image file; give --size to create it (or write array:NAME for an array)", operation: "open", path: spec)
            }
            let file = try created.create(path: spec, sizeBytes: size, engine: engine)
            return (file, [file], [])
        }
        return try await openDevice(.image(path: spec), engine: engine, readOnly: false)
    }

    private static func openDevice(
        _ device: FoundDevice, engine: IOEngine, readOnly: Bool, memberFaults: [String: FaultSpec] = [:]
    ) async throws -> (device: any BlockDevice, files: [FileDevice], arrays: [RAIDArray]) {
        switch device {
        case let .image(path):
            let file = try FileDevice.open(path: path, engine: engine, options: FileDevice.Options(readOnly: readOnly))
            if let note = file.directIONote { Terminal.warning("\(path): \(note)") }
            return (file, [file], [])
        case let .array(_, paths):
            var faults: [String: FaultSpec] = [:]
            for path in paths {
                if let spec = memberFaults[URL(fileURLWithPath: path).standardizedFileURL.path] { faults[path] = spec }
            }
            let array = try await ArrayCommand.assemble(paths: paths, engine: engine, faults: faults)
            return (array, [], [array])
        }
    }

    /// Splits `POOL/VOLUME`.
    static func split(_ path: String) throws -> (pool: String, volume: String) {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw ValidationError("write the volume as POOL/NAME, such as tank/data (got '\(path)')")
        }
        return (String(parts[0]), String(parts[1]))
    }

    /// Opens the pool, runs `body`, and closes everything (committing) whether `body` succeeds or not.
    static func withPool<Result>(
        _ name: String, folder: String, readOnly: Bool = false, _ body: (ThinPool, IOEngine, OpenPool) async throws -> Result
    ) async throws -> Result {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let opened = try await open(name, folder: folder, engine: engine, readOnly: readOnly)
        let result: Result
        do {
            result = try await body(opened.pool, engine, opened)
        } catch {
            if Terminal.showsProgress { Terminal.endProgress() }
            try? await opened.close()
            throw error
        }
        if Terminal.showsProgress { Terminal.endProgress() }
        try await opened.close()
        return result
    }
}
