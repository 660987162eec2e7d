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
        subcommands: [Create.self, Status.self, Assemble.self, Fail.self, Remove.self, Add.self, Replace.self,
                      Rebuild.self, Scrub.self]
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

        /// The member image paths.
        func memberPaths() async throws -> [String] {
            guard let scan else { return images }
            let found = try await ImageScan(scan, labels: false)
            for problem in found.damaged { Terminal.warning(problem) }
            var groups: [String: (name: String, paths: [String])] = [:]
            for (path, block) in found.members where arrayName == nil || block.name == arrayName {
                groups[block.arrayUUID.description, default: (block.name, [])].paths.append(path)
            }
            guard !groups.isEmpty else {
                throw SpindleError(.notFound, "no array members\(arrayName.map { " of '\($0)'" } ?? "") found", operation: "scan", path: scan)
            }
            guard groups.count == 1 else {
                let listing = groups.values.map { "'\($0.name)'" }.sorted().joined(separator: ", ")
                throw SpindleError(.invalidArgument, "the folder holds several arrays (\(listing)); choose one with --array-name", operation: "scan", path: scan)
            }
            return groups.values.first!.paths
        }
    }

    /// Opens member images for writing and assembles the array.
    static func assemble(_ selection: Selection, engine: IOEngine, force: Bool = false, quiet: Bool = false) async throws -> RAIDArray {
        try await assemble(paths: try await selection.memberPaths(), engine: engine, force: force, quiet: quiet)
    }

    /// Opens the given member images for writing and assembles the array; `faults` wraps the named
    /// members in fault injectors.
    static func assemble(
        paths: [String], engine: IOEngine, force: Bool = false, quiet: Bool = false, faults: [String: FaultSpec] = [:], seed: UInt64 = 1
    ) async throws -> RAIDArray {
        var seen: [String: String] = [:]
        for path in paths {
            if let first = seen[canonicalPath(path)] {
                throw SpindleError(.invalidArgument, "the image is given twice (as \(first) and \(path))", operation: "assemble", path: path)
            }
            seen[canonicalPath(path)] = path
        }
        var devices: [FileDevice] = []
        do {
            for path in paths { devices.append(try FileDevice.open(path: path, engine: engine)) }
            let members: [any BlockDevice] = devices.map { device in
                guard let spec = faults[device.path] else { return device }
                let faulty = FaultyDevice(wrapping: device, seed: seed, name: device.path)
                spec.apply(to: faulty)
                return faulty
            }
            let report = try await RAIDArray.assemble(members: members, force: force)
            if !quiet { for note in report.notes { Terminal.warning("\(report.array.arrayName): \(note)") } }
            return report.array
        } catch {
            for device in devices { try? await device.close() }
            throw error
        }
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
            Terminal.progress("\(label): \(ByteSize.format(progress.doneBytes)) of \(ByteSize.format(progress.totalBytes)) (\(percent)%), \(ByteSize.format(UInt64(progress.bytesPerSecond)))/s\(eta)")
        }
    }

    // MARK: Commands

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an array over image files.",
            discussion: "Images that do not exist are created with --size. Members may differ in size; the smallest sets the array's size.")

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

        @Flag(help: "Use existing images even if they hold something (another array, a pool, a file system, data), destroying it.")
        var force = false

        @Flag(help: "Print the result as JSON.")
        var json = false

        func validate() throws {
            guard let level = RAIDLevel(rawValue: level) else { throw ValidationError("--level must be 0, 1 or 5") }
            guard images.count >= level.minimumMembers else {
                throw ValidationError("RAID\(level.rawValue) needs at least \(level.minimumMembers) member images; \(images.count) given")
            }
        }

        func run() async throws {
            let engine = try IOEngine()
            defer { engine.shutdown() }
            var devices: [FileDevice] = []
            let created = CreatedImages()
            do {
                for path in images {
                    if FileManager.default.fileExists(atPath: path) {
                        devices.append(try FileDevice.open(path: path, engine: engine))
                    } else {
                        guard let size else {
                            throw SpindleError(.notFound, "no such image file; give --size to create it", operation: "open", path: path)
                        }
                        devices.append(try created.create(path: path, sizeBytes: size, engine: engine))
                    }
                }
                let array = try await RAIDArray.create(name: name, level: RAIDLevel(rawValue: level)!, chunkBytes: chunk, members: devices, overwrite: force)
                let status = array.status
                try await array.close()
                if json {
                    try Terminal.printJSON(status)
                } else {
                    print("created array \(name): raid\(level), \(images.count) members, \(ByteSize.format(chunk)) chunks, \(ByteSize.format(status.capacityBytes)) usable")
                }
            } catch {
                for device in devices { try? await device.close() }
                created.removeIfRefused(by: error)
                throw error
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show an array's state, its members and any rebuild, from the superblocks (changes nothing).")

        @OptionGroup var selection: Selection

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let paths = try await selection.memberPaths()
            var devices: [FileDevice] = []
            for path in paths {
                devices.append(try FileDevice.open(path: path, options: FileDevice.Options(readOnly: true, directIO: .disabled)))
            }
            var inspection = await RAIDArray.inspect(devices)
            // Of several images holding one member, inspect takes the last as its holder: list the
            // older copies first so that the newest holds it (and the others show as stale copies).
            let order = devices.indices.sorted { (inspection.devices[$0].events ?? 0, $0) < (inspection.devices[$1].events ?? 0, $1) }
            if order != Array(devices.indices) {
                let listed = inspection.devices
                inspection = await RAIDArray.inspect(order.map { devices[$0] })
                inspection.devices = listed
            }
            for device in devices { try? await device.close() }
            let notes = Self.unusedImageNotes(inspection)
            if json {
                try Terminal.printJSON(Report(inspection: inspection, notes: notes))
                return
            }
            for device in inspection.devices where device.problem != nil {
                Terminal.warning("\(device.path): \(device.problem!)")
            }
            guard let name = inspection.name else {
                throw SpindleError(.invalidArgument, "none of the images is an array member")
            }
            print("array \(name): raid\(inspection.level!), \(inspection.state!)")
            print("  size: \(ByteSize.format(inspection.capacityBytes!)), \(inspection.memberCount!) members, \(ByteSize.format(inspection.chunkBytes!)) chunks, events \(inspection.events!)")
            for slot in inspection.slots {
                let holder = slot.device.map { "  \($0)" }
                    ?? slot.lastKnownName.map { "  (last seen as \($0)\(slot.memberUUID.map { ", member \($0)" } ?? ""))" } ?? ""
                print("  slot \(slot.slot): \(slot.state)\(holder)")
            }
            for device in inspection.devices where device.role == -1 && device.arrayUUID == inspection.uuid {
                print("  spare: \(device.path)")
            }
            if let slot = inspection.rebuildSlot, let done = inspection.rebuildDoneBytes, let total = inspection.memberDataBytes {
                print("  rebuild of slot \(slot): \(ByteSize.format(done)) of \(ByteSize.format(total)) (\(done * 100 / max(total, 1))%), as of the last checkpoint")
            }
            for note in notes { print("  note: \(note)") }
        }

        /// What `array status --json` prints: the inspection, and `notes` on images it does not use.
        struct Report: Encodable {
            var inspection: RAIDArray.Inspection
            var notes: [String]
            enum Key: String, CodingKey { case notes }
            func encode(to encoder: any Encoder) throws {
                try inspection.encode(to: encoder)
                var container = encoder.container(keyedBy: Key.self)
                try container.encode(notes, forKey: .notes)
            }
        }

        /// The images of this array that it does not use, and why: stale copies of a member, members
        /// left behind when they were replaced, members that missed changes.
        static func unusedImageNotes(_ inspection: RAIDArray.Inspection) -> [String] {
            guard let uuid = inspection.uuid, let arrayEvents = inspection.events else { return [] }
            var notes: [String] = []
            for device in inspection.devices where device.arrayUUID == uuid {
                guard let role = device.role, role >= 0, let memberUUID = device.memberUUID, let events = device.events else { continue }
                let age = "events \(events), the array is at \(arrayEvents)"
                guard let slot = inspection.slots.first(where: { $0.memberUUID == memberUUID }) else {
                    notes.append("\(device.path) was the member in slot \(role) but has been replaced (\(age)); it is not used")
                    continue
                }
                if let holder = slot.device, holder != device.path {
                    let holderEvents = inspection.devices.first { $0.path == holder }?.events ?? arrayEvents
                    notes.append("\(device.path) is \(events < holderEvents ? "a stale copy" : "a copy") of the member in slot \(slot.slot), which \(holder) holds (\(age)); a copy cannot stand in for a member, so it is not used")
                } else if slot.state == .missing && events + 1 < arrayEvents {
                    notes.append("\(device.path) is stale (\(age)): it missed changes to slot \(slot.slot), so it is not used; add it back to rebuild it")
                } else if slot.state == .missing && events < arrayEvents {
                    notes.append("\(device.path) is one superblock update behind (a crash cut the update short); assembly brings it up to date")
                }
            }
            return notes
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
            print("array \(status.name): raid\(status.level), \(status.state), \(ByteSize.format(status.capacityBytes))")
        }
    }

    struct Fail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Mark a member failed, as if its disk had died.")

        @OptionGroup var selection: Selection

        @Option(help: "The member image to fail.")
        var member: String

        func run() async throws {
            let status = try await ArrayCommand.withArray(selection) { array, _ in
                try await array.fail(memberNamed: resolveMember(member, in: array))
                return array.status
            }
            print("failed \(member); array \(status.name) is \(status.state)")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a failed member or a spare from an array.")

        @OptionGroup var selection: Selection

        @Option(help: "The failed member or spare image to remove.")
        var member: String

        func run() async throws {
            let name = try await ArrayCommand.withArray(selection) { array, _ in
                try await array.remove(memberNamed: resolveMember(member, in: array))
                return array.arrayName
            }
            print("removed \(member) from array \(name)")
        }
    }

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add an image: it replaces a failed or missing member (rebuild it with 'array rebuild'), or becomes a spare.")

        @OptionGroup var selection: Selection

        @Option(help: "The image to add; created when missing, as large as the members need.")
        var device: String

        @Flag(help: "Use the image even if it holds something (another array, a pool, a file system, data), destroying it.")
        var force = false

        func run() async throws {
            let created = CreatedImages()
            let status: RAIDArray.Status
            do {
                status = try await ArrayCommand.withArray(selection) { array, engine in
                    try await array.add(try openOrCreate(device, for: array, engine: engine, created: created), overwrite: force)
                    return array.status
                }
            } catch {
                created.removeIfRefused(by: error)
                throw error
            }
            let role = status.spares.contains(device) ? "a spare" : "the member to rebuild"
            print("added \(device) to array \(status.name) as \(role); array is \(status.state)")
        }
    }

    struct Replace: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace a member with a new image and rebuild onto it.")

        @OptionGroup var selection: Selection

        @Option(help: "The member image to replace.")
        var old: String

        @Option(help: "The new image; created when missing, as large as the members need.")
        var new: String

        @Option(help: "Limit the rebuild rate, such as 100M (bytes per second).", transform: parseSize)
        var rate: UInt64?

        @Flag(help: "Only swap the member; rebuild later with 'array rebuild'.")
        var noRebuild = false

        @Flag(help: "Use the new image even if it holds something (another array, a pool, a file system, data), destroying it.")
        var force = false

        func run() async throws {
            let created = CreatedImages()
            let status = try await ArrayCommand.withArray(selection) { array, engine in
                let device = try openOrCreate(new, for: array, engine: engine, created: created)
                do {
                    try await array.replace(memberNamed: resolveMember(old, in: array), with: device, overwrite: force)
                } catch {
                    created.removeIfRefused(by: error)
                    throw error
                }
                print("replaced \(old) with \(new) in array \(array.arrayName)")
                if !noRebuild {
                    let rebuilt = try await array.rebuild(rateBytesPerSecond: rate, progress: ArrayCommand.progressPrinter("rebuilding \(new)"))
                    if Terminal.showsProgress { Terminal.endProgress() }
                    print("rebuilt \(ByteSize.format(rebuilt)) onto \(new)")
                }
                return array.status
            }
            print("array \(status.name) is \(status.state)")
        }
    }

    struct Rebuild: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Rebuild the member being replaced, resuming from its checkpoint.",
            discussion: "Without --wait the rebuild runs in a background process and this command returns at once; follow it with 'array status'. An interrupted rebuild resumes where it stopped.")

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
                let rebuilt = try await array.rebuild(rateBytesPerSecond: rate, progress: ArrayCommand.progressPrinter("rebuilding"))
                if Terminal.showsProgress { Terminal.endProgress() }
                let seconds = Double(monotonicNanos() - started) / 1e9
                if rebuilt == 0 {
                    print("array \(array.arrayName): nothing to rebuild")
                } else {
                    print("rebuilt \(ByteSize.format(rebuilt)) in \(formatDecimal(seconds, places: 1)) s (\(ByteSize.format(UInt64(Double(rebuilt) / max(seconds, 1e-9))))/s)")
                }
                return array.status
            }
            print("array \(status.name) is \(status.state)")
        }

        /// Starts `spindle array rebuild --wait` with the same selection as a detached process.
        private func spawnInBackground() async throws {
            let members = try await selection.memberPaths()
            var arguments = ["array", "rebuild", "--wait"] + selection.images
            if let scan = selection.scan { arguments += ["--scan", scan] }
            if let name = selection.arrayName { arguments += ["--array-name", name] }
            if let rate { arguments += ["--rate", String(rate)] }
            if force { arguments.append("--force") }
            let folder = (members[0] as NSString).deletingLastPathComponent
            let logPath = ((folder.isEmpty ? "." : folder) as NSString).appendingPathComponent("spindle-rebuild.log")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL
            process.arguments = arguments
            _ = FileManager.default.createFile(atPath: logPath, contents: nil)
            let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
            process.standardOutput = log
            process.standardError = log
            process.standardInput = FileHandle.nullDevice
            try process.run()
            print("rebuild started in the background (process \(process.processIdentifier)), logging to \(logPath); follow it with 'spindle array status'")
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
                (try await array.scrub(repair: repair, progress: json ? nil : ArrayCommand.progressPrinter(repair ? "repairing" : "checking")),
                 array.arrayName)
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
            var lines = ["scrubbed array \(arrayName): \(ByteSize.format(report.checkedBytes)) per member, \(report.mismatches) mismatched stripes\(repair ? ", \(report.repaired) repaired" : ""), \(report.readErrorsRepaired) read errors repaired, \(report.unreadable.count) unreadable chunks"]
            for offset in report.mismatchOffsets.prefix(20) { lines.append("  mismatch in the stripe at array offset \(offset)") }
            if report.mismatches > 20 { lines.append("  ... and \(report.mismatches - 20) more") }
            for chunk in report.unreadable.prefix(20) {
                lines.append("  unreadable: slot \(chunk.slot) (\(chunk.member)) at offset \(chunk.memberOffset) of its data area, with no redundancy left to rebuild it")
            }
            if report.unreadable.count > 20 { lines.append("  ... and \(report.unreadable.count - 20) more unreadable chunks") }
            return lines
        }
    }
}

/// Opens an image to add to an array, creating it (in `created`) at the size the array's members need.
func openOrCreate(_ path: String, for array: RAIDArray, engine: IOEngine, created: CreatedImages) throws -> FileDevice {
    if FileManager.default.fileExists(atPath: path) { return try FileDevice.open(path: path, engine: engine) }
    let needed = RAIDArray.dataOffset + array.geometry.memberDataBytes
    return try created.create(path: path, sizeBytes: (needed + 4095) / 4096 * 4096, engine: engine)
}

/// The name under which an array knows the member image at `path` (however the path is written).
func resolveMember(_ path: String, in array: RAIDArray) -> String {
    let status = array.status
    let names = status.slots.compactMap(\.device) + status.spares
    return names.first { canonicalPath($0) == canonicalPath(path) } ?? path
}

/// One spelling for a file however its path is written (relative, with '..', through symlinks).
func canonicalPath(_ path: String) -> String {
    URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
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
