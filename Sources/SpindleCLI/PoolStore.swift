import ArgumentParser
import Foundation
import Spindle

/// The folder where the CLI finds pools: their devices are image files there, or arrays whose
/// member images are there. Nothing else is kept: a pool is found by reading the labels its devices
/// carry, so there is no side database to drift.
struct PoolFolder: ParsableArguments {
    @Option(
        name: .customLong("dir"),
        help: "Folder holding the pools' images and array members (default: $SPINDLE_DIR, else the current folder).")
    var directory: String?

    @Option(
        name: .customLong("metadata-cache"),
        help: ArgumentHelp(
            "Memory for the pool's metadata node cache, such as 512M (default: 256M, or an eighth of the machine's memory when less).",
            valueName: "size"),
        transform: parseSize)
    var metadataCacheBytes: UInt64?

    var path: String { directory ?? ProcessInfo.processInfo.environment["SPINDLE_DIR"] ?? "." }
}

/// A pool opened for a command: what the folder holds, the pool found there, and the pool opened
/// with the stack under it.
struct PoolSession {
    let discovery: Discovery
    let found: DiscoveredPool
    let opened: OpenedPool
    let engine: IOEngine
    var pool: ThinPool { opened.pool }
}

/// Finding and opening pools in a folder, in the command line's words.
enum PoolStore {
    /// Scans `folder`, warning about every damaged header found.
    static func scan(_ folder: String) async throws -> Discovery {
        let found = try await Discovery.scan(folder: folder)
        for damaged in found.damaged { Terminal.warning(describe(damaged)) }
        return found
    }

    /// A damaged header as the command line says it: "PATH: what is wrong; not used".
    static func describe(_ damaged: DamagedHeader) -> String {
        switch damaged.location {
        case let .device(path): return "\(path): \(damaged.reason); not used"
        case let .arrayStart(array, _, member):
            return "array:\(array) (its first block, on \(member)): damaged pool label: \(damaged.reason); not used"
        }
    }

    /// A pool device as the command line names it: its path, or array:NAME with its members found.
    static func describe(_ device: DiscoveredPool.Device, in discovery: Discovery) -> String {
        switch device.location {
        case let .image(path): return path
        case let .array(name, uuid):
            let members = discovery.arrays.first { $0.uuid == uuid }?.members.count ?? 0
            return "array:\(name) (\(members) members)"
        }
    }

    /// The pool named `name` in the folder `discovery` scanned; warns about damaged headers once it
    /// is found, and names them in the error when it is not.
    static func find(_ name: String, in discovery: Discovery, folder: String) throws -> DiscoveredPool {
        let pools = discovery.pools.filter { $0.name == name }
        let damaged = discovery.damaged.map(describe)
        guard let pool = pools.first else {
            let others = discovery.pools.map(\.name)
            let problems = damaged.isEmpty ? "" : ". Damaged and not used: " + damaged.joined(separator: "; ")
            throw SpindleError(
                .notFound,
                "no pool named '\(name)' in the folder\(others.isEmpty ? " (it holds no pools)" : "; it holds \(others.joined(separator: ", "))")\(problems)",
                operation: "find pool", path: folder)
        }
        for problem in damaged { Terminal.warning(problem) }
        guard pools.count == 1 else {
            throw SpindleError(
                .invalidArgument,
                "the folder holds \(pools.count) pools named '\(name)' (\(pools.map(\.uuid.description).joined(separator: ", "))); move one away",
                operation: "find pool", path: folder)
        }
        return pool
    }

    /// How commands open stacks: what opening works around is printed as a warning.
    static func openOptions(readOnly: Bool = false, quiet: Bool = false, metadataCacheBytes: UInt64? = nil)
        -> Discovery.OpenOptions
    {
        var options = Discovery.OpenOptions(readOnly: readOnly)
        if let metadataCacheBytes { options.metadataCacheBytes = metadataCacheBytes }
        if !quiet { options.notes = { Terminal.warning($0) } }
        return options
    }

    /// Opens a device as a create or extend command names it: `array:NAME` (an array whose members
    /// are in the folder) or an image path (created, in `created`, at `size` when missing and a size is given).
    static func openDevice(
        spec: String, discovery: Discovery, folder: String, engine: IOEngine, size: UInt64?, created: CreatedImages
    ) async throws -> any BlockDevice {
        if spec.hasPrefix("array:") {
            let array = try ArrayCommand.Selection.choose(
                String(spec.dropFirst("array:".count)), in: discovery, folder: folder)
            return try await discovery.open(array, engine: engine, options: openOptions())
        }
        return try openImage(
            spec, engine: engine, size: size, hint: "give --size to create it (or write array:NAME for an array)",
            created: created)
    }

    /// Splits `POOL/VOLUME`.
    static func split(_ path: String) throws -> (pool: String, volume: String) {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw ValidationError("write the volume as POOL/NAME, such as tank/data (got '\(path)')")
        }
        return (String(parts[0]), String(parts[1]))
    }

    /// The volume name of `path` (POOL/NAME), which an option names and which must be in `pool`.
    static func volume(_ path: String, inPool pool: String, option: String) throws -> String {
        let (otherPool, name) = try split(path)
        guard otherPool == pool else {
            throw ValidationError("\(option) must name a volume of pool \(pool), not of '\(otherPool)'")
        }
        return name
    }

    /// Opens the pool, runs `body`, and closes everything (committing) whether `body` succeeds or not.
    static func withPool<Result>(
        _ name: String, folder pools: PoolFolder, readOnly: Bool = false,
        _ body: (ThinPool, PoolSession) async throws -> Result
    ) async throws -> Result {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let folder = pools.path
        let discovery = try await Discovery.scan(folder: folder)
        let found = try find(name, in: discovery, folder: folder)
        let opened = try await discovery.open(
            found, engine: engine,
            options: openOptions(readOnly: readOnly, metadataCacheBytes: pools.metadataCacheBytes))
        let session = PoolSession(discovery: discovery, found: found, opened: opened, engine: engine)
        let result: Result
        do {
            result = try await body(session.pool, session)
        } catch {
            if Terminal.showsProgress { Terminal.endProgress() }
            try? await session.opened.close()
            throw error
        }
        if Terminal.showsProgress { Terminal.endProgress() }
        try await session.opened.close()
        return result
    }
}
