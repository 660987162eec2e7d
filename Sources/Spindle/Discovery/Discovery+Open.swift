import Foundation

extension Discovery {
    /// How a stack opens.
    public struct OpenOptions: Sendable {
        /// Open image files read-only. Array members are always opened for writing (assembly
        /// updates their superblocks).
        public var readOnly = false
        /// Direct I/O for the image files opened.
        public var directIO = FileDevice.DirectIO.preferred
        /// Start a RAID5 array that is both dirty and degraded (data written at the crash may be wrong).
        public var force = false
        /// Faults to inject into array members, by path however written (a fault-injecting
        /// ``FaultyDevice`` is put between the member and its array).
        public var faults: [String: FaultSpec] = [:]
        /// Seed of the injected faults' randomness.
        public var faultSeed: UInt64 = 1
        /// Memory for a pool's metadata node cache (see ``ThinPool/defaultMetadataCacheBytes``).
        public var metadataCacheBytes = ThinPool.defaultMetadataCacheBytes
        /// Receives what opening worked around, one line each, naming its subject: members an
        /// assembly left out or resynced, a pool's damaged metadata copy, an image without direct I/O.
        public var notes: (@Sendable (String) -> Void)?

        public init(readOnly: Bool = false, force: Bool = false, notes: (@Sendable (String) -> Void)? = nil) {
            self.readOnly = readOnly
            self.force = force
            self.notes = notes
        }
    }

    // MARK: Arrays

    /// Assembles the array named `name` from the members found (copies and stale members too:
    /// assembly decides which to use). The array owns the members it uses; the others are closed.
    public func openArray(named name: String, engine: IOEngine? = nil, options: OpenOptions = OpenOptions())
        async throws -> RAIDArray
    {
        try await open(try array(named: name), engine: engine, options: options)
    }

    /// Assembles a discovered array (see ``openArray(named:engine:options:)``).
    public func open(_ array: DiscoveredArray, engine: IOEngine? = nil, options: OpenOptions = OpenOptions())
        async throws -> RAIDArray
    {
        try await Self.assemble(array.members.map(\.source), engine: engine, options: options)
    }

    /// Opens the image files at `paths` for writing and assembles the array they are members of,
    /// in any order. The array owns the members it uses; the others are closed. On failure every
    /// file opened is closed.
    /// - Throws: ``SpindleError`` when a path is given twice (however written), a file cannot be
    ///   opened, or assembly refuses (``RAIDArray/assemble(members:force:)``).
    public static func assembleArray(paths: [String], engine: IOEngine? = nil, options: OpenOptions = OpenOptions())
        async throws -> RAIDArray
    {
        try await assemble(paths.map { .path($0) }, engine: engine, options: options)
    }

    static func assemble(_ sources: [DeviceSource], engine: IOEngine?, options: OpenOptions) async throws -> RAIDArray {
        var seen: [String: String] = [:]
        for case let .path(path) in sources {
            if let first = seen[canonicalPath(path)] {
                throw SpindleError(
                    .invalidArgument, "the image is given twice (as \(first) and \(path))", operation: "assemble",
                    path: path)
            }
            seen[canonicalPath(path)] = path
        }
        var faults: [String: FaultSpec] = [:]
        for (path, spec) in options.faults { faults[canonicalPath(path)] = spec }
        var opened: [FileDevice] = []
        do {
            var members: [any BlockDevice] = []
            for source in sources {
                let device: any BlockDevice
                switch source {
                case let .path(path):
                    let file = try FileDevice.open(
                        path: path, engine: engine, options: FileDevice.Options(directIO: options.directIO))
                    opened.append(file)
                    device = file
                case let .device(given):
                    device = given
                }
                // Faults go under the integrity layer (which assembly opens), where a disk's faults happen.
                let injected: any BlockDevice =
                    faults[canonicalPath(source.name)].map {
                        InjectedMember(device, spec: $0, seed: options.faultSeed)
                    } ?? device
                members.append(injected)
            }
            let report = try await RAIDArray.assemble(members: members, force: options.force)
            for note in report.notes { options.notes?("\(report.array.arrayName): \(note)") }
            // Files the array left out (stale, truncated, replaced) are not the array's: close them.
            let status = report.array.status
            let used = Set(status.slots.compactMap(\.device) + status.spares)
            for file in opened where !used.contains(file.name) { try? await file.close() }
            return report.array
        } catch {
            for file in opened { try? await file.close() }
            throw error
        }
    }

    /// One spelling for a file however its path is written (relative, with '..', through symlinks).
    public static func canonicalPath(_ path: String) -> String {
        URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
    }

    // MARK: Pools and volumes

    /// Opens the pool named `name` with the stack under it: its image files (read-only with
    /// ``OpenOptions/readOnly``) and its arrays, assembled from their members.
    /// - Throws: ``SpindleError`` when there is no such pool (or several), a device cannot be opened
    ///   or assembled, or the pool refuses to open (a device missing, damaged metadata).
    public func openPool(named name: String, engine: IOEngine? = nil, options: OpenOptions = OpenOptions()) async throws
        -> OpenedPool
    {
        try await open(try pool(named: name), engine: engine, options: options)
    }

    /// Opens a discovered pool (see ``openPool(named:engine:options:)``).
    public func open(_ pool: DiscoveredPool, engine: IOEngine? = nil, options: OpenOptions = OpenOptions()) async throws
        -> OpenedPool
    {
        var devices: [any BlockDevice] = []
        var assembled: [RAIDArray] = []
        var files: [FileDevice] = []
        do {
            for device in pool.devices {
                switch device.location {
                case let .array(_, uuid):
                    guard let array = arrays.first(where: { $0.uuid == uuid }) else {
                        throw SpindleError(
                            .notFound,
                            "the array of pool \(pool.name)'s device \(device.index) is not among the devices",
                            operation: "open pool")
                    }
                    let opened = try await open(array, engine: engine, options: options)
                    assembled.append(opened)
                    devices.append(opened)
                case let .image(path):
                    if case let .device(given)? = device.source {
                        devices.append(try await IntegrityDevice.openIfFormatted(given))
                        continue
                    }
                    let file = try FileDevice.open(
                        path: path, engine: engine,
                        options: FileDevice.Options(readOnly: options.readOnly, directIO: options.directIO))
                    if let note = file.directIONote { options.notes?("\(path): \(note)") }
                    files.append(file)
                    devices.append(try await IntegrityDevice.openIfFormatted(file))
                }
            }
            let opened = try await ThinPool.open(devices: devices, metadataCacheBytes: options.metadataCacheBytes)
            for note in opened.openNotes { options.notes?("pool \(pool.name): \(note)") }
            return OpenedPool(pool: opened, arrays: assembled)
        } catch {
            for array in assembled { try? await array.close() }
            for file in files { try? await file.close() }
            throw error
        }
    }

    /// Opens volume `volume` of pool `pool` with everything under it, as one block device whose
    /// ``OpenedVolume/close()`` closes it all.
    public func openVolume(
        _ volume: String, inPool pool: String, engine: IOEngine? = nil, options: OpenOptions = OpenOptions()
    ) async throws -> OpenedVolume {
        let stack = try await openPool(named: pool, engine: engine, options: options)
        do {
            return OpenedVolume(volume: try await stack.pool.openVolume(name: volume), stack: stack)
        } catch {
            try? await stack.close()
            throw error
        }
    }
}
