import ArgumentParser
import Foundation
import Spindle

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "Create and manage thin volumes and snapshots in a pool.",
        discussion: """
            Volumes are named POOL/NAME; the pool is found by name in --dir (default $SPINDLE_DIR or the \
            current folder). Volumes use pool space only where written; snapshots share their origin's \
            space until either side is written.
            """,
        subcommands: [
            Create.self, List.self, Resize.self, Rename.self, Delete.self, Snapshot.self, Diff.self, Import.self,
            Export.self,
        ]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a thin volume (over-provisioning allowed, with a warning).")

        @Argument(help: "POOL/NAME of the new volume.")
        var volume: String

        @Option(help: "Virtual size, such as 10G (a multiple of 4K).", transform: parseSize)
        var size: UInt64

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let warnings = try await PoolStore.withPool(poolName, folder: folder) { pool, _ in
                _ = try await pool.createVolume(name: volumeName, sizeBytes: size)
                return try await pool.warnings()
            }
            print("created volume \(volume): \(ByteSize.format(size))")
            for warning in warnings { Terminal.warning(warning) }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List a pool's volumes and snapshots (changes nothing).")

        @Argument(help: "Name of the pool.")
        var pool: String

        @OptionGroup var folder: PoolFolder

        @Flag(help: "Print the result as JSON.")
        var json = false

        struct Entry: Codable {
            var name: String
            var sizeBytes: UInt64
            var mappedBytes: UInt64
            var origin: String?
            var readOnly: Bool
            var createdSeconds: UInt64
        }

        func run() async throws {
            let entries = try await PoolStore.withPool(pool, folder: folder, readOnly: true) { pool, _ in
                try await pool.volumes().map {
                    Entry(
                        name: $0.name, sizeBytes: $0.sizeBytes, mappedBytes: $0.mappedChunks * pool.chunkBytes,
                        origin: $0.origin,
                        readOnly: $0.readOnly, createdSeconds: $0.createdSeconds)
                }
            }
            if json {
                try Terminal.printJSON(entries)
                return
            }
            if entries.isEmpty {
                print("pool \(pool) has no volumes")
                return
            }
            let width = max(4, entries.map(\.name.count).max()!)
            print("NAME".padding(toLength: width, withPad: " ", startingAt: 0) + "        SIZE      MAPPED  NOTES")
            for entry in entries {
                var notes: [String] = []
                if let origin = entry.origin { notes.append("snapshot of \(origin)") }
                if entry.readOnly { notes.append("read-only") }
                print(
                    entry.name.padding(toLength: width, withPad: " ", startingAt: 0) + "  "
                        + ByteSize.format(entry.sizeBytes).leftPadded(to: 10)
                        + "  " + ByteSize.format(entry.mappedBytes).leftPadded(to: 10) + "  "
                        + notes.joined(separator: ", "))
            }
        }
    }

    struct Resize: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Grow or shrink a volume. Shrinking frees the space past the new end and asks for confirmation.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Option(help: "New virtual size, such as 20G (a multiple of 4K).", transform: parseSize)
        var size: UInt64

        @Flag(help: "Shrink without asking.")
        var yes = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let old = try await PoolStore.withPool(poolName, folder: folder) { pool, _ in
                let current = try await pool.openVolume(name: volumeName).capacityBytes
                if size < current {
                    try confirm(
                        "Shrinking \(volume) from \(ByteSize.format(current)) to \(ByteSize.format(size)) loses the data past \(ByteSize.format(size)).",
                        yes: yes, flag: "--yes")
                }
                try await pool.resizeVolume(name: volumeName, sizeBytes: size)
                return current
            }
            print("resized volume \(volume) from \(ByteSize.format(old)) to \(ByteSize.format(size))")
        }
    }

    struct Rename: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Rename a volume.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Argument(help: "New name (without the pool).")
        var newName: String

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            try await PoolStore.withPool(poolName, folder: folder) { pool, _ in
                try await pool.renameVolume(name: volumeName, to: newName)
            }
            print("renamed volume \(volume) to \(poolName)/\(newName)")
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Delete a volume or snapshot; space no other volume shares returns to the pool. Asks for confirmation.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Flag(help: "Delete without asking.")
        var yes = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let freed = try await PoolStore.withPool(poolName, folder: folder) { pool, _ in
                let info = try await pool.openVolume(name: volumeName)
                try confirm(
                    "Deleting \(volume) (\(ByteSize.format(info.capacityBytes))) destroys its data.", yes: yes,
                    flag: "--yes")
                let before = await pool.usage.usedChunks
                try await pool.deleteVolume(name: volumeName)
                return (before - (await pool.usage.usedChunks)) * pool.chunkBytes
            }
            print("deleted volume \(volume); \(ByteSize.format(freed)) returned to the pool")
        }
    }

    struct Snapshot: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Snapshot a volume (or a snapshot): no data is copied; chunks are copied on first write to either side."
        )

        @Argument(help: "POOL/NAME of the volume to snapshot.")
        var volume: String

        @Argument(help: "Name of the snapshot (without the pool).")
        var snapshotName: String

        @Flag(name: .customLong("read-only"), help: "Make the snapshot read-only.")
        var readOnly = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let (info, elapsed) = try await PoolStore.withPool(poolName, folder: folder) { pool, _ in
                let started = ContinuousClock.now
                let info = try await pool.snapshot(volume: volumeName, name: snapshotName, readOnly: readOnly)
                return (info, ContinuousClock.now - started)
            }
            let milliseconds = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
            print(
                "created \(readOnly ? "read-only " : "")snapshot \(poolName)/\(snapshotName) of \(volume): \(ByteSize.format(info.sizeBytes)), sharing \(info.mappedChunks) chunks, in \(formatDecimal(milliseconds, places: 2)) ms"
            )
        }
    }

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a file into a volume, sparse-aware: runs of zeros are not allocated.",
            discussion: """
                The volume is created at the file's size (rounded up to 4K) when it does not exist, or at \
                --size. With --delta, FILE is a delta (`volume export --since ... --delta`): NAME is created \
                as a read-only copy of the delta's target, from --base, a read-only volume holding a copy of \
                the delta's base (that snapshot itself, or a volume restored from a copy of it with \
                `import --read-only` or an earlier delta).
                """)

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Argument(help: "The file to copy in (a raw disk image, for example), or a delta with --delta.")
        var file: String

        @Option(help: "Size of the volume to create, when larger than the file.", transform: parseSize)
        var size: UInt64?

        @Flag(name: .customLong("read-only"), help: "Make the volume read-only (a restored copy deltas apply onto).")
        var readOnly = false

        @Flag(help: "FILE is a delta file: apply it onto --base into a new volume.")
        var delta = false

        @Option(help: "With --delta: POOL/VOLUME holding a copy of the delta's base.")
        var base: String?

        @OptionGroup var folder: PoolFolder

        func validate() throws {
            if delta && base == nil {
                throw ValidationError("--delta needs --base POOL/VOLUME: the copy to apply it onto")
            }
            if !delta && base != nil { throw ValidationError("--base goes with --delta") }
            if delta && size != nil {
                throw ValidationError("--size does not go with --delta: the delta gives the size")
            }
        }

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let baseName = try base.map { try PoolStore.volume($0, inPool: poolName, option: "--base") }
            let progress = ProgressLine(label: "importing \(file) into \(volume)")
            let result = try await PoolStore.withPool(poolName, folder: folder) { pool, session in
                if let baseName {
                    return try await pool.importDelta(
                        at: file, into: volumeName, base: baseName, engine: session.engine,
                        progress: { progress.update($0) })
                }
                return try await pool.importImage(
                    at: file, into: volumeName, sizeBytes: size, readOnly: readOnly, engine: session.engine,
                    progress: { progress.update($0) })
            }
            progress.finish()
            if let base {
                print(
                    "applied delta \(file) onto \(base) as read-only \(volume): \(ByteSize.format(result.writtenBytes)) of data written, \(ByteSize.format(result.skippedBytes)) of zeros"
                )
                return
            }
            print(
                "imported \(file) into \(volume): \(ByteSize.format(result.totalBytes)), \(ByteSize.format(result.writtenBytes)) written, \(ByteSize.format(result.skippedBytes)) of zeros left unallocated\(readOnly ? "; read-only" : "")"
            )
        }
    }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a volume to a file, sparse-aware: unwritten and zero ranges become holes.",
            discussion: """
                The file records which volume it copies (an extended attribute). With --since, FILE must be a \
                copy of that read-only snapshot: only the ranges that changed since it are written, and FILE \
                becomes a copy of the volume given (an incremental backup; see `volume diff`). With --since \
                and --delta, the changes go to a new delta file instead, which `volume import --delta` applies.
                """)

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Argument(help: "The file to write (replaced if it exists, unless --since).")
        var file: String

        @Option(help: "POOL/SNAPSHOT that FILE is a copy of: write only what changed since it.")
        var since: String?

        @Flag(help: "With --since: write the changes to a new delta file FILE instead (see `volume import --delta`).")
        var delta = false

        @OptionGroup var folder: PoolFolder

        func validate() throws {
            if delta && since == nil { throw ValidationError("--delta needs --since POOL/SNAPSHOT: the delta's base") }
        }

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let baseName = try since.map { try PoolStore.volume($0, inPool: poolName, option: "--since") }
            let progress = ProgressLine(
                label: baseName == nil
                    ? "exporting \(volume) to \(file)" : "exporting changes since \(since!) to \(file)")
            let result = try await PoolStore.withPool(poolName, folder: folder, readOnly: true) { pool, session in
                if let baseName, delta {
                    return try await pool.exportDelta(
                        of: volumeName, since: baseName, toFileAt: file, engine: session.engine,
                        progress: { progress.update($0) })
                }
                if let baseName {
                    return try await pool.exportChanges(
                        of: volumeName, since: baseName, toImageAt: file, engine: session.engine,
                        progress: { progress.update($0) })
                }
                return try await pool.exportVolume(
                    volumeName, toImageAt: file, engine: session.engine, progress: { progress.update($0) })
            }
            progress.finish()
            if let since, delta {
                print(
                    "wrote the changes of \(volume) since \(since) to delta \(file): \(ByteSize.format(result.totalBytes)) changed, \(ByteSize.format(result.writtenBytes)) of data"
                )
                return
            }
            if let since {
                print(
                    "exported changes of \(volume) since \(since) to \(file): \(ByteSize.format(result.totalBytes)) changed, \(ByteSize.format(result.writtenBytes)) of data written, \(ByteSize.format(result.skippedBytes)) left as holes; \(file) is now a copy of \(volume)"
                )
                return
            }
            print(
                "exported \(volume) to \(file): \(ByteSize.format(result.totalBytes)), \(ByteSize.format(result.writtenBytes)) of data, \(ByteSize.format(result.skippedBytes)) left as holes"
            )
        }
    }
}

/// Asks a person on a terminal to confirm; without a terminal, requires the flag.
func confirm(_ consequence: String, yes: Bool, flag: String) throws {
    if yes { return }
    guard ProcessControl.inputIsTerminal else {
        throw SpindleError(.invalidArgument, "\(consequence) Add \(flag) to go ahead.")
    }
    FileHandle.standardError.write(Data("\(consequence) Continue? [y/N] ".utf8))
    guard let answer = readLine(), ["y", "yes"].contains(answer.lowercased()) else {
        throw SpindleError(.invalidArgument, "not confirmed; nothing changed")
    }
}

/// A progress line on standard error for copies, redrawn when standard error is a terminal; scripts
/// and logs get only the result line.
final class ProgressLine: Sendable {
    private let label: String
    private let started = ContinuousClock.now
    private let lastDraw = LockedValue(ContinuousClock.now)

    init(label: String) {
        self.label = label
    }

    /// Redraws the line (at most five times a second, and at the end).
    func update(_ progress: BlockCopy.Progress) {
        guard Terminal.showsProgress else { return }
        let now = ContinuousClock.now
        let last = lastDraw.exchange(now)
        guard now - last > .milliseconds(200) || progress.doneBytes == progress.totalBytes else {
            _ = lastDraw.exchange(last)
            return
        }
        let percent = progress.totalBytes == 0 ? 100 : Int(progress.doneBytes * 100 / progress.totalBytes)
        let elapsed = now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let rate = seconds > 0 ? Double(progress.doneBytes) / seconds : 0
        Terminal.progress(
            "\(label): \(ByteSize.format(progress.doneBytes)) of \(ByteSize.format(progress.totalBytes)) (\(percent)%), \(ByteSize.format(UInt64(rate)))/s"
        )
    }

    func finish() {
        if Terminal.showsProgress { Terminal.endProgress() }
    }
}
