import ArgumentParser
import Foundation
import Spindle

struct PoolCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Create and manage thin pools over image files and arrays.",
        discussion: """
            A pool lives in its devices: each carries a label with the pool's name, so commands find a \
            pool by name in a folder (--dir, default $SPINDLE_DIR or the current folder). A device is an \
            image file, or array:NAME for an array whose member images are in that folder.
            """,
        subcommands: [Create.self, Status.self, List.self, Extend.self, Check.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a pool over image files or arrays.",
            discussion:
                "Images that do not exist are created with --size. The metadata area is sized so the pool can grow to twice its size."
        )

        @Argument(help: "Name of the pool (1 to 64 bytes, no '/' or spaces).")
        var name: String

        @Argument(help: "Devices: image files, or array:NAME.")
        var devices: [String]

        @Option(help: "Chunk size, a power of two from 64K to 1M.", transform: parseSize)
        var chunk: UInt64 = ThinPool.defaultChunkBytes

        @Option(help: "Size of each image to create when it does not exist, such as 1G.", transform: parseSize)
        var size: UInt64?

        @Flag(
            help: "Use devices that hold something (another pool, an array member, a file system, data), destroying it."
        )
        var force = false

        @OptionGroup var folder: PoolFolder

        @Flag(
            help:
                "Put the integrity layer under each image: a CRC32C per 4 KiB block, so a volume reports a block the disk returns wrong instead of serving it (arrays take it from `array create --integrity`, which also repairs)."
        )
        var integrity = false

        @Flag(help: "Print the result as JSON.")
        var json = false

        func validate() throws {
            guard !devices.isEmpty else {
                throw ValidationError("give at least one device: an image file or array:NAME")
            }
            if integrity && devices.allSatisfy({ $0.hasPrefix("array:") }) {
                throw ValidationError(
                    "--integrity applies to image files; for an array, create it with `spindle array create --integrity`"
                )
            }
        }

        func run() async throws {
            let engine = try IOEngine()
            defer { engine.shutdown() }
            let discovery = try await PoolStore.scan(folder.path)
            if discovery.pools.contains(where: { $0.name == name }) {
                throw SpindleError(
                    .alreadyExists, "a pool named '\(name)' exists in the folder already", operation: "create pool",
                    path: folder.path)
            }
            var opened: [any BlockDevice] = []
            var formatted: [IntegrityDevice] = []
            let created = CreatedImages()
            do {
                for spec in devices {
                    opened.append(
                        try await PoolStore.openDevice(
                            spec: spec, discovery: discovery, folder: folder.path, engine: engine, size: size,
                            created: created))
                }
                var poolDevices = opened
                if integrity {
                    for (index, device) in opened.enumerated() where device is FileDevice {
                        let checked = try await IntegrityDevice.format(device, policy: .standalone, overwrite: force)
                        formatted.append(checked)
                        poolDevices[index] = checked
                    }
                }
                let pool = try await ThinPool.create(
                    name: name, devices: poolDevices, chunkBytes: chunk, overwrite: force || integrity)
                let usage = await pool.usage
                try await pool.close()
                if json {
                    try Terminal.printJSON(usage)
                } else {
                    print(
                        "created pool \(name): \(ByteSize.format(usage.sizeBytes)) of data in \(ByteSize.format(chunk)) chunks on \(devices.count) device\(devices.count == 1 ? "" : "s"), \(ByteSize.format(usage.metadataBlocks * 4096)) of metadata"
                    )
                }
            } catch {
                // Refused or failed: the devices are still this command's to close.
                for device in formatted { device.abandon() }
                for device in opened { try? await device.close() }
                created.removeIfRefused(by: error)
                throw error
            }
        }
    }

    /// What `pool status --json` prints.
    struct StatusReport: Codable {
        var name: String
        var uuid: String
        var devices: [String]
        var usage: ThinPool.Usage
        var sizeBytes: UInt64
        var usedBytes: UInt64
        var freeBytes: UInt64
        var volumes: [VolumeReport]
        var warnings: [String]
    }

    struct VolumeReport: Codable {
        var name: String
        var sizeBytes: UInt64
        var mappedBytes: UInt64
        var exclusiveBytes: UInt64
        var sharedBytes: UInt64
        var origin: String?
        var readOnly: Bool
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Show a pool's size, use, metadata use and each volume's exclusive and shared space (changes nothing).")

        @Argument(help: "Name of the pool.")
        var name: String

        @OptionGroup var folder: PoolFolder

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let report: StatusReport = try await PoolStore.withPool(name, folder: folder, readOnly: true) {
                pool, session in
                let usage = await pool.usage
                let infos = try await pool.volumes()
                let split = try await pool.volumeUsage()
                let volumes = zip(infos, split).map { info, space in
                    VolumeReport(
                        name: info.name, sizeBytes: info.sizeBytes, mappedBytes: space.mappedChunks * usage.chunkBytes,
                        exclusiveBytes: space.exclusiveChunks * usage.chunkBytes,
                        sharedBytes: space.sharedChunks * usage.chunkBytes,
                        origin: info.origin, readOnly: info.readOnly)
                }
                return StatusReport(
                    name: pool.name, uuid: pool.uuid.description,
                    devices: session.found.devices.map { PoolStore.describe($0, in: session.discovery) },
                    usage: usage, sizeBytes: usage.sizeBytes, usedBytes: usage.usedBytes, freeBytes: usage.freeBytes,
                    volumes: volumes, warnings: try await pool.warnings())
            }
            if json {
                try Terminal.printJSON(report)
                return
            }
            let usage = report.usage
            let percent = usage.chunks == 0 ? 0 : usage.usedChunks * 100 / usage.chunks
            print("pool \(report.name) (\(report.uuid))")
            print("  devices:  \(report.devices.joined(separator: ", "))")
            print(
                "  size:     \(ByteSize.format(report.sizeBytes)) in \(usage.chunks) chunks of \(ByteSize.format(usage.chunkBytes))"
            )
            print(
                "  used:     \(ByteSize.format(report.usedBytes)) (\(percent)%), free \(ByteSize.format(report.freeBytes))"
            )
            print(
                "  metadata: \(ByteSize.format(usage.usedMetadataBlocks * 4096)) of \(ByteSize.format(usage.metadataBlocks * 4096)) used"
            )
            if report.volumes.isEmpty {
                print("  no volumes")
            } else {
                print("  volumes:")
                let width = max(4, report.volumes.map(\.name.count).max()!)
                print(
                    "    " + "NAME".padding(toLength: width, withPad: " ", startingAt: 0)
                        + "        SIZE      MAPPED   EXCLUSIVE      SHARED  NOTES")
                for volume in report.volumes {
                    var notes: [String] = []
                    if let origin = volume.origin { notes.append("snapshot of \(origin)") }
                    if volume.readOnly { notes.append("read-only") }
                    let columns = [volume.sizeBytes, volume.mappedBytes, volume.exclusiveBytes, volume.sharedBytes]
                        .map { ByteSize.format($0).leftPadded(to: 10) }.joined(separator: "  ")
                    print(
                        "    " + volume.name.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + columns
                            + "  " + notes.joined(separator: ", "))
                }
            }
            for warning in report.warnings { Terminal.warning(warning) }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the pools in the folder and their devices (reads labels only).")

        @OptionGroup var folder: PoolFolder

        @Flag(help: "Print the result as JSON.")
        var json = false

        struct Entry: Codable {
            var name: String
            var uuid: String
            var devices: [String]
        }

        func run() async throws {
            let discovery = try await PoolStore.scan(folder.path)
            let entries = discovery.pools.map { pool in
                Entry(
                    name: pool.name, uuid: pool.uuid.description,
                    devices: pool.devices.map { PoolStore.describe($0, in: discovery) })
            }
            if json {
                try Terminal.printJSON(entries)
            } else if entries.isEmpty {
                print("no pools in \(folder.path)")
            } else {
                for entry in entries { print("\(entry.name)  \(entry.uuid)  \(entry.devices.joined(separator: ", "))") }
            }
        }
    }

    struct Extend: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Grow a pool: by space its devices gained (an image made larger, an array that grew) and by new devices."
        )

        @Argument(help: "Name of the pool.")
        var name: String

        @Argument(help: "New devices to add: image files, or array:NAME.")
        var devices: [String] = []

        @Option(help: "Size of each new image to create when it does not exist, such as 1G.", transform: parseSize)
        var size: UInt64?

        @Flag(
            help:
                "Use new devices that hold something (another pool, an array member, a file system, data), destroying it."
        )
        var force = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let created = CreatedImages()
            let result = try await PoolStore.withPool(name, folder: folder) { pool, session in
                var added: [any BlockDevice] = []
                let chunks: UInt64
                do {
                    for spec in devices {
                        added.append(
                            try await PoolStore.openDevice(
                                spec: spec, discovery: session.discovery, folder: folder.path,
                                engine: session.engine, size: size, created: created))
                    }
                    // Once extended, the pool owns the new devices (and closes them with itself).
                    chunks = try await pool.extend(adding: added, overwrite: force)
                } catch {
                    for device in added { try? await device.close() }
                    created.removeIfRefused(by: error)
                    throw error
                }
                return (chunks: chunks, chunkBytes: pool.chunkBytes, sizeBytes: await pool.usage.sizeBytes)
            }
            if result.chunks == 0 {
                print("pool \(name) is unchanged: its devices have no new space and none were given")
            } else {
                print(
                    "extended pool \(name) by \(ByteSize.format(result.chunks * result.chunkBytes)) to \(ByteSize.format(result.sizeBytes))"
                )
            }
        }
    }

    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Verify a pool's metadata like thin_check: checksums, reference counts, leaks, mappings (changes nothing).",
            discussion: "Exits with status 1 and lists every problem when the metadata is not clean.")

        @Argument(help: "Name of the pool.")
        var name: String

        @OptionGroup var folder: PoolFolder

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let report = try await PoolStore.withPool(name, folder: folder, readOnly: true) { pool, _ in
                try await pool.check()
            }
            if json {
                try Terminal.printJSON(report)
            } else if report.isClean {
                print(
                    "pool \(name) is clean: \(report.volumes) volumes, \(report.mappedChunks) mappings, \(report.allocatedChunks) chunks allocated, \(report.metadataBlocks) metadata blocks checked"
                )
            } else {
                print("pool \(name) has \(report.problems.count) problem\(report.problems.count == 1 ? "" : "s"):")
                for problem in report.problems { print("  \(problem)") }
            }
            if !report.isClean { throw ExitCode(1) }
        }
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}
