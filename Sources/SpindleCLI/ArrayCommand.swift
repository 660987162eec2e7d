import ArgumentParser
import Foundation
import Spindle

struct ArrayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "array",
        abstract: "Create and manage RAID 0, 1 and 5 arrays of image files.",
        discussion: """
            An array lives in its member images: every command finds it from the images you list, or \
            from a folder with --scan, in any order. Commands that change the array take each image's \
            write lock, so two of them cannot change one array at once.
            """,
        subcommands: [
            Create.self, Status.self, Assemble.self, Fail.self, Remove.self, Add.self, Replace.self,
            Rebuild.self, Scrub.self,
        ]
    )

    /// Which array a command works on: its member images, or a folder to scan for them.
    struct Selection: ParsableArguments {
        @Argument(help: "Member images of the array, in any order.")
        var images: [String] = []

        @Option(help: "Find the members by scanning this folder instead of listing them.")
        var scan: String?

        @Option(name: .customLong("array-name"), help: "Which array to use when the folder holds several.")
        var arrayName: String?

        func validate() throws {
            if images.isEmpty && scan == nil {
                throw ValidationError("list the array's member images, or give --scan FOLDER")
            }
        }

        /// The array a scan selects from what `discovery` found in the folder, in the command
        /// line's words when there is none or several.
        static func choose(_ name: String?, in discovery: Discovery, folder: String) throws -> DiscoveredArray {
            let matches = discovery.arrays.filter { name == nil || $0.name == name }
            guard let first = matches.first else {
                throw SpindleError(
                    .notFound, "no array members\(name.map { " of '\($0)'" } ?? "") found", operation: "scan",
                    path: folder)
            }
            guard matches.count == 1 else {
                let listing = matches.map { "'\($0.name)'" }.sorted().joined(separator: ", ")
                throw SpindleError(
                    .invalidArgument, "the folder holds several arrays (\(listing)); choose one with --array-name",
                    operation: "scan", path: folder)
            }
            return first
        }

        /// Scans the folder of --scan, warning about damaged superblocks, and chooses the array.
        func scanned() async throws -> (discovery: Discovery, array: DiscoveredArray) {
            guard let scan else { preconditionFailure("scanned() needs --scan") }
            let discovery = try await Discovery.scan(folder: scan)
            for damaged in discovery.damaged {
                if case .arraySuperblock = damaged.reason { Terminal.warning(PoolStore.describe(damaged)) }
            }
            return (discovery, try Self.choose(arrayName, in: discovery, folder: scan))
        }

        /// The member image paths: those listed, or the members found by the scan.
        func memberPaths() async throws -> [String] {
            guard scan != nil else { return images }
            return try await scanned().array.members.map(\.device)
        }
    }

    /// Opens the selected array's member images for writing and assembles it (printing what
    /// assembly worked around, unless `quiet`).
    static func assemble(_ selection: Selection, engine: IOEngine, force: Bool = false, quiet: Bool = false)
        async throws -> RAIDArray
    {
        var options = PoolStore.openOptions(quiet: quiet)
        options.force = force
        guard selection.scan != nil else {
            return try await Discovery.assembleArray(paths: selection.images, engine: engine, options: options)
        }
        let (discovery, array) = try await selection.scanned()
        return try await discovery.open(array, engine: engine, options: options)
    }

    /// Assembles the selected array, runs `body`, and closes the array cleanly whether `body`
    /// succeeds or throws (ending any progress line first).
    static func withArray<Result>(
        _ selection: Selection, force: Bool = false, quiet: Bool = false,
        _ body: (RAIDArray, IOEngine) async throws -> Result
    ) async throws -> Result {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let array = try await assemble(selection, engine: engine, force: force, quiet: quiet)
        let result: Result
        do {
            result = try await body(array, engine)
        } catch {
            if Terminal.showsProgress { Terminal.endProgress() }
            try? await array.close()
            throw error
        }
        if Terminal.showsProgress { Terminal.endProgress() }
        try await array.close()
        return result
    }

    /// Draws a progress line when standard error is a terminal; else nil (scripts and logs get none).
    static func progressPrinter(_ label: String) -> (@Sendable (RAIDArray.Progress) -> Void)? {
        guard Terminal.showsProgress else { return nil }
        return { progress in
            let percent = progress.totalBytes == 0 ? 100 : Int(progress.doneBytes * 100 / progress.totalBytes)
            let eta = progress.secondsLeft.map { ", \(formatDecimal($0, places: 0)) s left" } ?? ""
            Terminal.progress(
                "\(label): \(ByteSize.format(progress.doneBytes)) of \(ByteSize.format(progress.totalBytes)) (\(percent)%), \(ByteSize.format(UInt64(progress.bytesPerSecond)))/s\(eta)"
            )
        }
    }

    // MARK: Commands

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an array over image files.",
            discussion:
                "Images that do not exist are created with --size. Members may differ in size; the smallest sets the array's size."
        )

        @Argument(help: "Name of the array (1 to 63 bytes, no '/').")
        var name: String

        @Argument(help: "Member images, in slot order.")
        var images: [String]

        @Option(help: "RAID level: 0, 1 or 5.")
        var level: Int

        @Option(help: "Chunk size, a power of two from 4K to 1M.", transform: parseSize)
        var chunk: UInt64 = RAIDArray.defaultChunkBytes

        @Option(help: "Size of each image to create when it does not exist, such as 1G.", transform: parseSize)
        var size: UInt64?

        @Flag(
            help:
                "Use existing images even if they hold something (another array, a pool, a file system, data), destroying it."
        )
        var force = false

        @Flag(
            help:
                "Put the integrity layer under each member: a CRC32C per 4 KiB block, so a block a disk returns wrong is rebuilt from redundancy instead of served (4 KiB logical blocks; about 0.1% of each image holds checksums)."
        )
        var integrity = false

        @Flag(help: "Print the result as JSON.")
        var json = false

        func validate() throws {
            guard let level = RAIDLevel(rawValue: level) else { throw ValidationError("--level must be 0, 1 or 5") }
            guard images.count >= level.minimumMembers else {
                throw ValidationError(
                    "RAID\(level.rawValue) needs at least \(level.minimumMembers) member images; \(images.count) given")
            }
        }

        func run() async throws {
            let engine = try IOEngine()
            defer { engine.shutdown() }
            var devices: [FileDevice] = []
            let created = CreatedImages()
            do {
                for path in images {
                    devices.append(
                        try openImage(
                            path, engine: engine, size: size, hint: "give --size to create it", created: created))
                }
                let array = try await RAIDArray.create(
                    name: name, level: RAIDLevel(rawValue: level)!, chunkBytes: chunk, members: devices,
                    overwrite: force, integrity: integrity)
                let status = array.status
                try await array.close()
                if json {
                    try Terminal.printJSON(status)
                } else {
                    print(
                        "created array \(name): raid\(level), \(images.count) members, \(ByteSize.format(chunk)) chunks, \(ByteSize.format(status.capacityBytes)) usable\(integrity ? ", with checksums on every member" : "")"
                    )
                }
            } catch {
                for device in devices { try? await device.close() }
                created.removeIfRefused(by: error)
                throw error
            }
        }
    }

    struct Assemble: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Assemble an array, resync what an unclean shutdown left, and close it cleanly.")

        @OptionGroup var selection: Selection

        @Flag(help: "Start a RAID5 array that is both dirty and degraded (data written at the crash may be wrong).")
        var force = false

        func run() async throws {
            let status = try await ArrayCommand.withArray(selection, force: force) { array, _ in array.status }
            print("array \(status.name): \(status.level), \(status.state), \(ByteSize.format(status.capacityBytes))")
        }
    }

    struct Rebuild: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Rebuild the member being replaced, resuming from its checkpoint.",
            discussion:
                "Without --wait the rebuild runs in a background process and this command returns at once; follow it with 'array status'. An interrupted rebuild resumes where it stopped."
        )

        @OptionGroup var selection: Selection

        @Option(help: "Limit the rebuild rate, such as 100M (bytes per second).", transform: parseSize)
        var rate: UInt64?

        @Flag(help: "Rebuild in the foreground and return when done, showing progress.")
        var wait = false

        @Flag(help: "Start even if the array is dirty and degraded.")
        var force = false

        func run() async throws {
            if !wait {
                try await spawnInBackground()
                return
            }
            let status = try await ArrayCommand.withArray(selection, force: force) { array, _ in
                let started = monotonicNanos()
                let rebuilt = try await array.rebuild(
                    rateBytesPerSecond: rate, progress: ArrayCommand.progressPrinter("rebuilding"))
                if Terminal.showsProgress { Terminal.endProgress() }
                let seconds = Double(monotonicNanos() - started) / 1e9
                if rebuilt == 0 {
                    print("array \(array.arrayName): nothing to rebuild")
                } else {
                    print(
                        "rebuilt \(ByteSize.format(rebuilt)) in \(formatDecimal(seconds, places: 1)) s (\(ByteSize.format(UInt64(Double(rebuilt) / max(seconds, 1e-9))))/s)"
                    )
                }
                return array.status
            }
            print("array \(status.name) is \(status.state)")
        }

        /// Starts this command again with --wait, as a detached process.
        private func spawnInBackground() async throws {
            let members = try await selection.memberPaths()
            let folder = (members[0] as NSString).deletingLastPathComponent
            let logPath = ((folder.isEmpty ? "." : folder) as NSString).appendingPathComponent("spindle-rebuild.log")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL
            process.arguments = Array(CommandLine.arguments.dropFirst()) + ["--wait"]
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
            let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
            process.standardOutput = log
            process.standardError = log
            process.standardInput = FileHandle.nullDevice
            try process.run()
            print(
                "rebuild started in the background (process \(process.processIdentifier)), logging to \(logPath); follow it with 'spindle array status'"
            )
        }
    }

    struct Scrub: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check that mirrors agree or parity matches the data; with --repair, fix what differs.",
            discussion: """
                A chunk a member cannot read is rebuilt from redundancy and rewritten, and counted. Exits with \
                status 1 when it finds mismatched stripes or chunks that no member can provide (also with \
                --repair, after repairing them: scrub again to confirm), and 0 when everything agrees.
                """)

        @OptionGroup var selection: Selection

        @Flag(help: "Rewrite mirror copies (from the first member) or parity (from the data) where they disagree.")
        var repair = false

        @Flag(help: "Print the report as JSON.")
        var json = false

        func run() async throws {
            let (report, name) = try await ArrayCommand.withArray(selection, quiet: json) { array, _ in
                (
                    try await array.scrub(
                        repair: repair,
                        progress: json ? nil : ArrayCommand.progressPrinter(repair ? "repairing" : "checking")),
                    array.arrayName
                )
            }
            if json {
                try Terminal.printJSON(report)
            } else {
                for line in Self.describe(report, arrayName: name, repair: repair) { print(line) }
            }
            if Self.foundProblems(report) { throw ExitCode(1) }
        }

        /// Whether the scrub found something wrong (the exit status is then 1): stripes that
        /// disagreed, or chunks no member could provide. Read errors repaired from redundancy are not.
        static func foundProblems(_ report: RAIDArray.ScrubReport) -> Bool {
            report.mismatches > 0 || !report.unreadable.isEmpty
        }

        /// The report for people, one line each; long lists are cut at 20 entries.
        static func describe(_ report: RAIDArray.ScrubReport, arrayName: String, repair: Bool) -> [String] {
            var lines = [
                "scrubbed array \(arrayName): \(ByteSize.format(report.checkedBytes)) per member, \(report.mismatches) mismatched stripes\(repair ? ", \(report.repaired) repaired" : ""), \(report.readErrorsRepaired) read errors repaired, \(report.unreadable.count) unreadable chunks"
            ]
            for offset in report.mismatchOffsets.prefix(20) {
                lines.append("  mismatch in the stripe at array offset \(offset)")
            }
            if report.mismatches > 20 { lines.append("  ... and \(report.mismatches - 20) more") }
            for chunk in report.unreadable.prefix(20) {
                lines.append(
                    "  unreadable: slot \(chunk.slot) (\(chunk.member)) at offset \(chunk.memberOffset) of its data area, with no redundancy left to rebuild it"
                )
            }
            if report.unreadable.count > 20 {
                lines.append("  ... and \(report.unreadable.count - 20) more unreadable chunks")
            }
            for member in report.integrity {
                lines.append(
                    "  slot \(member.slot) (\(member.member)): \(member.corruptBlocksFound) blocks failed their checksums, \(member.corruptBlocksRepaired) rewritten from redundancy"
                )
            }
            return lines
        }
    }
}

/// Opens an image to add to an array, creating it (in `created`) at the size the array's members need.
func openOrCreate(_ path: String, for array: RAIDArray, engine: IOEngine, created: CreatedImages) throws -> FileDevice {
    var needed = RAIDArray.dataOffset + array.geometry.memberDataBytes
    if array.usesIntegrity { needed = IntegritySuperblock.underlyingBytes(forDataBytes: needed) }
    return try openImage(path, engine: engine, size: (needed + 4095) / 4096 * 4096, hint: "", created: created)
}

/// The name under which an array knows the member image at `path` (however the path is written).
func resolveMember(_ path: String, in array: RAIDArray) -> String {
    let status = array.status
    let names = status.slots.compactMap(\.device) + status.spares
    return names.first { Discovery.canonicalPath($0) == Discovery.canonicalPath(path) } ?? path
}

/// A value shared between tasks, behind a lock.
final class LockedValue<Value: Sendable>: @unchecked Sendable {
    // @unchecked: every access goes through `lock`.
    private var value: Value
    private let lock = NSLock()
    init(_ value: Value) { self.value = value }
    func exchange(_ newValue: Value) -> Value {
        lock.lock()
        defer { lock.unlock() }
        let old = value
        value = newValue
        return old
    }
}
