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
        subcommands: [Create.self, List.self, Resize.self, Rename.self, Delete.self, Snapshot.self, Import.self, Export.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a thin volume (over-provisioning allowed, with a warning).")

        @Argument(help: "POOL/NAME of the new volume.")
        var volume: String

        @Option(help: "Virtual size, such as 10G (a multiple of 4K).", transform: parseSize)
        var size: UInt64

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let warnings = try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                _ = try await pool.createVolume(name: volumeName, sizeBytes: size)
                return try await pool.warnings()
            }
            print("created volume \(volume): \(ByteSize.format(size))")
            for warning in warnings { Terminal.warning(warning) }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List a pool's volumes and snapshots (changes nothing).")

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
            let entries = try await PoolStore.withPool(pool, folder: folder.path, readOnly: true) { pool, _, _ in
                try await pool.volumes().map {
                    Entry(name: $0.name, sizeBytes: $0.sizeBytes, mappedBytes: $0.mappedChunks * pool.chunkBytes, origin: $0.origin,
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
                print(entry.name.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + ByteSize.format(entry.sizeBytes).leftPadded(to: 10)
                      + "  " + ByteSize.format(entry.mappedBytes).leftPadded(to: 10) + "  " + notes.joined(separator: ", "))
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
            let old = try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                let current = try await pool.openVolume(name: volumeName).capacityBytes
                if size < current {
                    try confirm("Shrinking \(volume) from \(ByteSize.format(current)) to \(ByteSize.format(size)) loses the data past \(ByteSize.format(size)).",
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
            try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                try await pool.renameVolume(name: volumeName, to: newName)
            }
            print("renamed volume \(volume) to \(poolName)/\(newName)")
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a volume or snapshot; space no other volume shares returns to the pool. Asks for confirmation.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Flag(help: "Delete without asking.")
        var yes = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let freed = try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                let info = try await pool.openVolume(name: volumeName)
                try confirm("Deleting \(volume) (\(ByteSize.format(info.capacityBytes))) destroys its data.", yes: yes, flag: "--yes")
                let before = await pool.usage.usedChunks
                try await pool.deleteVolume(name: volumeName)
                return (before - (await pool.usage.usedChunks)) * pool.chunkBytes
            }
            print("deleted volume \(volume); \(ByteSize.format(freed)) returned to the pool")
        }
    }

    struct Snapshot: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Snapshot a volume (or a snapshot): no data is copied; chunks are copied on first write to either side.")

        @Argument(help: "POOL/NAME of the volume to snapshot.")
        var volume: String

        @Argument(help: "Name of the snapshot (without the pool).")
        var snapshotName: String

        @Flag(name: .customLong("read-only"), help: "Make the snapshot read-only.")
        var readOnly = false

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let (info, elapsed) = try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                let started = ContinuousClock.now
                let info = try await pool.snapshot(volume: volumeName, name: snapshotName, readOnly: readOnly)
                return (info, ContinuousClock.now - started)
            }
            let milliseconds = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
            print("created \(readOnly ? "read-only " : "")snapshot \(poolName)/\(snapshotName) of \(volume): \(ByteSize.format(info.sizeBytes)), sharing \(info.mappedChunks) chunks, in \(formatDecimal(milliseconds, places: 2)) ms")
        }
    }

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a file into a volume, sparse-aware: runs of zeros are not allocated.",
            discussion: "The volume is created at the file's size (rounded up to 4K) when it does not exist, or at --size.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Argument(help: "The file to copy in (a raw disk image, for example).")
        var file: String

        @Option(help: "Size of the volume to create, when larger than the file.", transform: parseSize)
        var size: UInt64?

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let source = Glibc.open(file, O_RDONLY | O_CLOEXEC)
            guard source >= 0 else {
                throw SpindleError(.notFound, "cannot open the file to import: \(String(cString: strerror(errno)))", errno: errno, operation: "import", path: file)
            }
            defer { Glibc.close(source) }
            var status = stat()
            fstat(source, &status)
            let fileBytes = UInt64(status.st_size)
            let result = try await PoolStore.withPool(poolName, folder: folder.path) { pool, _, _ in
                let target: ThinVolume
                if try await pool.volumes().contains(where: { $0.name == volumeName }) {
                    target = try await pool.openVolume(name: volumeName)
                    guard target.capacityBytes >= fileBytes else {
                        throw SpindleError(.invalidArgument, "the file is \(ByteSize.format(fileBytes)) but volume \(volume) holds \(ByteSize.format(target.capacityBytes)); resize it first",
                                           operation: "import", path: file)
                    }
                } else {
                    let wanted = max(size ?? 0, (fileBytes + 4095) / 4096 * 4096)
                    target = try await pool.createVolume(name: volumeName, sizeBytes: max(wanted, 4096))
                }
                let copied = try await VolumeCopy.importFile(source, bytes: fileBytes, into: target, label: "importing \(file) into \(volume)")
                try await target.flush()
                try await target.close()
                return copied
            }
            print("imported \(file) into \(volume): \(ByteSize.format(fileBytes)), \(ByteSize.format(result.writtenBytes)) written, \(ByteSize.format(result.skippedBytes)) of zeros left unallocated")
        }
    }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a volume to a file, sparse-aware: unwritten and zero ranges become holes.")

        @Argument(help: "POOL/NAME of the volume.")
        var volume: String

        @Argument(help: "The file to write (replaced if it exists).")
        var file: String

        @OptionGroup var folder: PoolFolder

        func run() async throws {
            let (poolName, volumeName) = try PoolStore.split(volume)
            let result = try await PoolStore.withPool(poolName, folder: folder.path, readOnly: true) { pool, _, _ in
                let source = try await pool.openVolume(name: volumeName)
                let target = Glibc.open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard target >= 0 else {
                    throw SpindleError(.ioFailed, "cannot create the file to export to: \(String(cString: strerror(errno)))", errno: errno, operation: "export", path: file)
                }
                defer { Glibc.close(target) }
                return try await VolumeCopy.exportVolume(source, to: target, path: file, label: "exporting \(volume) to \(file)")
            }
            print("exported \(volume) to \(file): \(ByteSize.format(result.totalBytes)), \(ByteSize.format(result.writtenBytes)) of data, \(ByteSize.format(result.skippedBytes)) left as holes")
        }
    }
}

/// Asks a person on a terminal to confirm; without a terminal, requires the flag.
func confirm(_ consequence: String, yes: Bool, flag: String) throws {
    if yes { return }
    guard isatty(0) == 1 else {
        throw SpindleError(.invalidArgument, "\(consequence) Add \(flag) to go ahead.")
    }
    FileHandle.standardError.write(Data("\(consequence) Continue? [y/N] ".utf8))
    guard let answer = readLine(), ["y", "yes"].contains(answer.lowercased()) else {
        throw SpindleError(.invalidArgument, "not confirmed; nothing changed")
    }
}

/// Copies between files and volumes, skipping zeros.
enum VolumeCopy {
    struct Result {
        var totalBytes: UInt64
        var writtenBytes: UInt64
        var skippedBytes: UInt64
    }

    static let pieceBytes = 1 << 20

    /// Reads the file in pieces; chunk-sized runs of zeros are discarded on the volume (they read as
    /// zeros and use no space), the rest is written.
    static func importFile(_ source: Int32, bytes: UInt64, into volume: ThinVolume, label: String) async throws -> Result {
        let chunkBytes = Int(volume.pool.chunkBytes)
        let piece = max(pieceBytes, chunkBytes)
        let buffer = AlignedBuffer(count: piece)
        var result = Result(totalBytes: bytes, writtenBytes: 0, skippedBytes: 0)
        let progress = ProgressLine(label: label, totalBytes: bytes)
        var offset: UInt64 = 0
        while offset < bytes {
            let length = Int(min(UInt64(piece), bytes - offset))
            var got = 0
            while got < length {
                let count = pread(source, buffer.bytes.baseAddress! + got, length - got, off_t(offset) + off_t(got))
                guard count > 0 else {
                    throw SpindleError(.ioFailed, count == 0 ? "the file ended early" : String(cString: strerror(errno)), operation: "import read", path: nil, offset: offset + UInt64(got))
                }
                got += count
            }
            let padded = (length + 4095) / 4096 * 4096
            if padded > length { buffer.bytes.baseAddress!.advanced(by: length).initializeMemory(as: UInt8.self, repeating: 0, count: padded - length) }
            // Each chunk of the piece at once: whole zero chunks are discarded (no space), runs of
            // zero blocks inside a chunk are written as zeros only where the chunk holds data.
            let base = offset
            let counts = try await withThrowingTaskGroup(of: (written: UInt64, skipped: UInt64).self) { group in
                for start in stride(from: 0, to: padded, by: chunkBytes) {
                    let end = min(padded, start + chunkBytes)
                    group.addTask {
                        try await importChunk(buffer, range: start..<end, dataEnd: length, at: base, into: volume)
                    }
                }
                var total: (written: UInt64, skipped: UInt64) = (0, 0)
                for try await counts in group {
                    total.written += counts.written
                    total.skipped += counts.skipped
                }
                return total
            }
            result.writtenBytes += counts.written
            result.skippedBytes += counts.skipped
            offset += UInt64(length)
            progress.update(doneBytes: offset)
        }
        progress.finish()
        return result
    }

    /// Copies one chunk's part of the buffer: nothing but a discard when it is all zeros; else its
    /// runs of non-zero 4 KiB blocks are written and its runs of zero blocks zeroed (which costs
    /// nothing where the chunk was never written).
    private static func importChunk(
        _ buffer: AlignedBuffer, range: Range<Int>, dataEnd: Int, at base: UInt64, into volume: ThinVolume
    ) async throws -> (written: UInt64, skipped: UInt64) {
        let bytes = UnsafeRawBufferPointer(buffer.bytes)
        func isZero(_ block: Int) -> Bool {
            UnsafeRawBufferPointer(rebasing: bytes[block..<(block + 4096)]).allSatisfy { $0 == 0 }
        }
        var written: UInt64 = 0
        var skipped: UInt64 = 0
        var start = range.lowerBound
        while start < range.upperBound {
            let zero = isZero(start)
            var end = start + 4096
            while end < range.upperBound && isZero(end) == zero { end += 4096 }
            let counted = UInt64(max(0, min(end, dataEnd) - start))
            if zero {
                try await volume.discard(offset: base + UInt64(start), length: UInt64(end - start))
                skipped += counted
            } else {
                try await volume.write(from: buffer, range: start..<end, at: base + UInt64(start))
                written += counted
            }
            start = end
        }
        return (written, skipped)
    }

    /// Writes the volume's data to the file; unmapped and zero ranges are left as holes.
    static func exportVolume(_ volume: ThinVolume, to target: Int32, path: String, label: String) async throws -> Result {
        let total = volume.capacityBytes
        guard ftruncate(target, off_t(total)) == 0 else {
            throw SpindleError(.ioFailed, "cannot size the file: \(String(cString: strerror(errno)))", errno: errno, operation: "export", path: path)
        }
        let chunkBytes = volume.pool.chunkBytes
        let piece = UInt64(max(pieceBytes, Int(chunkBytes)))
        let buffer = AlignedBuffer(count: Int(piece))
        var result = Result(totalBytes: total, writtenBytes: 0, skippedBytes: 0)
        let progress = ProgressLine(label: label, totalBytes: total)
        var offset: UInt64 = 0
        while offset < total {
            let length = min(piece, total - offset)
            let mapped = try await volume.mappedChunks(in: (offset / chunkBytes)..<((offset + length + chunkBytes - 1) / chunkBytes))
            if mapped.isEmpty {
                result.skippedBytes += length
            } else {
                try await volume.read(into: buffer, range: 0..<Int(length), at: offset)
                var start = 0
                while start < Int(length) {
                    let end = min(Int(length), (start / Int(chunkBytes) + 1) * Int(chunkBytes))
                    let slice = UnsafeRawBufferPointer(rebasing: buffer.bytes[start..<end])
                    if slice.allSatisfy({ $0 == 0 }) {
                        result.skippedBytes += UInt64(end - start)
                    } else {
                        var done = 0
                        while done < end - start {
                            let count = pwrite(target, slice.baseAddress! + done, end - start - done, off_t(offset) + off_t(start + done))
                            guard count > 0 else {
                                throw SpindleError(.ioFailed, String(cString: strerror(errno)), errno: errno, operation: "export write", path: path, offset: offset + UInt64(start + done))
                            }
                            done += count
                        }
                        result.writtenBytes += UInt64(end - start)
                    }
                    start = end
                }
            }
            offset += length
            progress.update(doneBytes: offset)
        }
        guard fsync(target) == 0 else {
            throw SpindleError(.ioFailed, "cannot flush the file: \(String(cString: strerror(errno)))", errno: errno, operation: "export", path: path)
        }
        progress.finish()
        return result
    }
}

/// A progress line on standard error for copies, redrawn when standard error is a terminal; scripts
/// and logs get only the result line.
final class ProgressLine {
    private let label: String
    private let totalBytes: UInt64
    private let started = ContinuousClock.now
    private var lastDraw = ContinuousClock.now

    init(label: String, totalBytes: UInt64) {
        self.label = label
        self.totalBytes = totalBytes
    }

    func update(doneBytes: UInt64) {
        let now = ContinuousClock.now
        guard Terminal.showsProgress, now - lastDraw > .milliseconds(200) || doneBytes == totalBytes else { return }
        lastDraw = now
        let percent = totalBytes == 0 ? 100 : Int(doneBytes * 100 / totalBytes)
        let elapsed = now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let rate = seconds > 0 ? Double(doneBytes) / seconds : 0
        Terminal.progress("\(label): \(ByteSize.format(doneBytes)) of \(ByteSize.format(totalBytes)) (\(percent)%), \(ByteSize.format(UInt64(rate)))/s")
    }

    func finish() {
        if Terminal.showsProgress { Terminal.endProgress() }
    }
}
