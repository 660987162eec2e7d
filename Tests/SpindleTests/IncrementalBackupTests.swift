import Foundation
import Testing

@testable import Spindle

/// Debian's Python, which has libnbd's bindings (python3-libnbd), whatever `python3` is on PATH.
let systemPython = "/usr/bin/python3"

/// The `--map --json` descriptors nbdinfo prints for `context` at `uri`: (range, flags).
func nbdinfoMap(_ uri: String, context: String = "base:allocation") throws -> [(Range<UInt64>, UInt32)] {
    let run = try tool(["nbdinfo", "--map=\(context)", "--json", uri])
    try #require(run.status == 0, "nbdinfo: \(run.errors)")
    let entries = try #require(
        try JSONSerialization.jsonObject(with: Data(run.output.utf8)) as? [[String: Any]],
        "nbdinfo printed \(run.output)")
    return entries.map { entry in
        let offset = (entry["offset"] as? NSNumber)?.uint64Value ?? 0
        let length = (entry["length"] as? NSNumber)?.uint64Value ?? 0
        return (offset..<(offset + length), (entry["type"] as? NSNumber)?.uint32Value ?? 99)
    }
}

/// Ranges merged where they touch.
func merged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
    var result: [Range<UInt64>] = []
    for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !range.isEmpty {
        if let last = result.last, last.upperBound >= range.lowerBound {
            result[result.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
        } else {
            result.append(range)
        }
    }
    return result
}

/// Bytes a file takes on disk.
func allocatedBytes(_ path: String) -> UInt64 {
    var info = stat()
    return stat(path, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
}

@Suite("Sparse and incremental copies with real clients (nbdinfo, qemu-img, nbdcopy, libnbd)", .serialized)
struct IncrementalBackupTests {
    static let chunk: UInt64 = 64 << 10

    /// Random writes, discards and write-zeroes on a volume, with the model: each mapped chunk's
    /// token, a new one from `counter` whenever the chunk is written (or zeroed in part while
    /// mapped); a chunk unmapped whole has none.
    static func churn(
        _ volume: ThinVolume, size: UInt64, tokens: inout [UInt64: Int], counter: inout Int,
        random: inout SeededRandom, operations: Int
    ) async throws {
        for _ in 0..<operations {
            let offset = random.below(size / 4096) * 4096
            let length = min(size - offset, (random.below(48) + 1) * 4096)
            let chunks = (offset / chunk)...((offset + length - 1) / chunk)
            switch random.below(8) {
            case 0...4:
                let data = AlignedBuffer(count: Int(length))
                fillRandom(data.bytes, seed: random.next())
                try await volume.write(from: data, at: offset)
                for index in chunks {
                    counter += 1
                    tokens[index] = counter
                }
            default:
                if random.below(2) == 0 {
                    try await volume.discard(offset: offset, length: length)
                } else {
                    try await volume.zeroBytes(offset: offset, length: length)
                }
                for index in chunks {
                    if index * chunk >= offset && (index + 1) * chunk <= offset + length {
                        tokens[index] = nil
                    } else if tokens[index] != nil {
                        counter += 1
                        tokens[index] = counter
                    }
                }
            }
        }
        try await volume.flush()
    }

    /// The byte ranges of chunks, merged and cut to `size`.
    static func chunkRanges(_ chunks: some Sequence<UInt64>, size: UInt64) -> [Range<UInt64>] {
        merged(chunks.map { ($0 * chunk)..<min(($0 + 1) * chunk, size) })
    }

    @Test(
        "nbdinfo --map and qemu-img map over spindle serve match a model: a thin volume after writes, discards, write-zeroes and a snapshot, a sparse image file, an array"
    )
    func maps() async throws {
        let folder = TemporaryFolder("map")
        defer { folder.remove() }
        // The stack is made on image files in the folder, closed, then served by `spindle serve`.
        let engine = try IOEngine()
        let device = try FileDevice.create(path: folder.file("pool.img"), sizeBytes: 256 << 20, engine: engine)
        let pool = try await ThinPool.create(name: "p", devices: [device])
        let size: UInt64 = 48 << 20
        let volume = try await pool.createVolume(name: "v", sizeBytes: size)
        var tokens: [UInt64: Int] = [:]
        var counter = 0
        var random = SeededRandom(seed: 21)
        try await Self.churn(volume, size: size, tokens: &tokens, counter: &counter, random: &random, operations: 60)
        try await pool.snapshot(volume: "v", name: "snap", readOnly: true)
        let snapshotMapped = Set(tokens.keys)
        try await Self.churn(volume, size: size, tokens: &tokens, counter: &counter, random: &random, operations: 40)
        let mapped = Set(tokens.keys)
        try await volume.close()
        try await pool.close()

        let file = try FileDevice.create(path: folder.file("sparse.img"), sizeBytes: 32 << 20, engine: engine)
        let data = AlignedBuffer(count: 1 << 20)
        fillRandom(data.bytes, seed: 4)
        let written: [Range<UInt64>] = [
            (2 << 20)..<(3 << 20), (9 << 20)..<((9 << 20) + 65536), (31 << 20)..<(32 << 20),
        ]
        try await engine.run {
            for range in written { try await file.write(from: data, range: 0..<range.count, at: range.lowerBound) }
            try await file.flush()
        }
        try await file.close()
        let members = try (0..<3).map {
            try FileDevice.create(path: folder.file("m\($0).img"), sizeBytes: 8 << 20, engine: engine)
        }
        let array = try await RAIDArray.create(name: "a", level: .raid5, members: members)
        let arrayBytes = array.capacityBytes
        try await array.close()
        engine.shutdown()

        let socket = folder.file("s.sock")
        let server = try ServeProcess(
            ["volume:p/v", "volume:p/snap", "image:\(folder.file("sparse.img"))", "array:a", "--socket", socket],
            directory: folder.path)
        func uri(_ name: String) -> String { "nbd+unix:///\(name)?socket=\(socket)" }
        for (name, model) in [("p/v", mapped), ("p/snap", snapshotMapped)] {
            let map = try nbdinfoMap(uri(name))
            #expect(map.first?.0.lowerBound == 0 && map.last?.0.upperBound == size, "the map covers the volume")
            #expect(Set(map.map(\.1)).isSubset(of: [0, 3]))
            #expect(merged(map.filter { $0.1 == 0 }.map(\.0)) == Self.chunkRanges(model, size: size), "\(name)")
            let qemu = try tool(["qemu-img", "map", "--output=json", "-f", "raw", uri(name)])
            try #require(qemu.status == 0, "qemu-img map: \(qemu.errors)")
            let entries = try #require(
                try JSONSerialization.jsonObject(with: Data(qemu.output.utf8)) as? [[String: Any]])
            let qemuData = entries.filter { ($0["data"] as? Bool) == true }.map { entry -> Range<UInt64> in
                let start = (entry["start"] as? NSNumber)?.uint64Value ?? 0
                return start..<(start + ((entry["length"] as? NSNumber)?.uint64Value ?? 0))
            }
            #expect(merged(qemuData) == Self.chunkRanges(model, size: size), "qemu-img map of \(name)")
        }
        #expect(merged(try nbdinfoMap(uri("sparse.img")).filter { $0.1 == 0 }.map(\.0)) == written)
        let arrayMap = try nbdinfoMap(uri("a"))
        #expect(arrayMap.count == 1 && arrayMap[0].1 == 0 && arrayMap[0].0 == 0..<arrayBytes)
        let stopped = server.stop()
        #expect(stopped.status == 0, "\(stopped.errors)")
    }

    @Test(
        "nbdcopy and qemu-img convert of a mostly empty 1 GiB volume give a byte-identical destination that is sparse"
    )
    func sparseCopies() async throws {
        let folder = TemporaryFolder("sparse-copy")
        defer { folder.remove() }
        let device = try MemoryDevice(capacityBytes: 128 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "p", devices: [device])
        let size: UInt64 = 1 << 30
        let volume = try await pool.createVolume(name: "v", sizeBytes: size)
        // The same data in a sparse reference file, compared with cmp (the copies are 1 GiB).
        let reference = folder.file("reference.raw")
        #expect(FileManager.default.createFile(atPath: reference, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: reference))
        try handle.truncate(atOffset: size)
        let data = AlignedBuffer(count: 1 << 20)
        var random = SeededRandom(seed: 8)
        var offsets = Set<UInt64>()
        while offsets.count < 6 { offsets.insert(random.below(size / (1 << 20)) << 20) }
        for offset in offsets {
            fillRandom(data.bytes, seed: random.next())
            try await volume.write(from: data, at: offset)
            try handle.seek(toOffset: offset)
            handle.write(Data(data.bytes))
        }
        try handle.close()
        try await volume.flush()
        let test = try TestServer([NBDServer.Export(name: "v", device: volume)])
        let uri = "nbd+unix:///v?socket=\(test.socketPath)"
        let nbdcopyTarget = folder.file("nbdcopy.raw")
        let qemuTarget = folder.file("qemu.raw")
        let copy = try tool(["nbdcopy", uri, nbdcopyTarget])
        #expect(copy.status == 0, "nbdcopy: \(copy.errors)")
        let convert = try tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, qemuTarget])
        #expect(convert.status == 0, "qemu-img convert: \(convert.errors)")
        for target in [nbdcopyTarget, qemuTarget] {
            let same = try tool(["cmp", reference, target])
            #expect(same.status == 0, "\(target) differs: \(same.output)")
            let allocated = allocatedBytes(target)
            #expect(
                allocated >= 6 << 20 && allocated <= 8 << 20, "\(target) takes \(allocated) bytes for 6 MiB of data")
        }
        await test.stop()
        try await volume.close()
        try await pool.close()
    }

    @Test(
        "incremental backup over a chain of 5 snapshots with random writes, discards and resizes: qemu:dirty-bitmap and volume diff report exactly the model's changed chunks, and copying only those onto the full copy gives each snapshot byte for byte"
    )
    func incrementalChain() async throws {
        let folder = TemporaryFolder("incremental")
        defer { folder.remove() }
        let device = try MemoryDevice(capacityBytes: 256 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "p", devices: [device])
        var size: UInt64 = 24 << 20
        var volume = try await pool.createVolume(name: "v", sizeBytes: size)
        var tokens: [UInt64: Int] = [:]
        var counter = 0
        var random = SeededRandom(seed: 33)
        let backup = folder.file("backup.raw")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Tools/incremental-backup.py").path
        var previous: (name: String, tokens: [UInt64: Int])?
        for step in 1...6 {
            try await Self.churn(
                volume, size: size, tokens: &tokens, counter: &counter, random: &random, operations: 25)
            if step % 2 == 0 {
                let newSize = (random.below(24) + 8) << 20
                try await volume.close()
                try await pool.resizeVolume(name: "v", sizeBytes: newSize)
                volume = try await pool.openVolume(name: "v")
                if newSize < size { tokens = tokens.filter { $0.key < newSize / Self.chunk } }
                size = newSize
            }
            let name = "s\(step)"
            try await pool.snapshot(volume: "v", name: name, readOnly: true)
            let snapshot = try await pool.openVolume(name: name)
            let test = try TestServer([NBDServer.Export(name: name, device: snapshot)])
            let uri = "nbd+unix:///\(name)?socket=\(test.socketPath)"
            if let previous {
                // What changed, three ways: the model, the NBD context, the library.
                let changedChunks = (0..<((size + Self.chunk - 1) / Self.chunk)).filter {
                    tokens[$0] != previous.tokens[$0]
                }
                let expected = Self.chunkRanges(changedChunks, size: size)
                let dirty = try nbdinfoMap(uri, context: "qemu:dirty-bitmap:\(previous.name)")
                #expect(merged(dirty.filter { $0.1 == 1 }.map(\.0)) == expected, "step \(step): dirty bitmap")
                #expect(dirty.last?.0.upperBound == size)
                let difference = try await pool.difference(from: previous.name, to: name)
                #expect(difference.ranges.map(\.range) == expected, "step \(step): volume diff")
                let run = try tool([systemPython, script, uri, backup, "--since", previous.name])
                #expect(run.status == 0, "incremental-backup.py: \(run.errors)")
            } else {
                let copy = try tool(["nbdcopy", uri, backup])
                #expect(copy.status == 0, "nbdcopy: \(copy.errors)")
            }
            let copied = try [UInt8](Data(contentsOf: URL(fileURLWithPath: backup)))
            #expect(byteDifference(copied, try await readAll(snapshot)) == nil, "step \(step): the backup is \(name)")
            await test.stop()
            try await snapshot.close()
            previous = (name, tokens)
        }
        try await volume.close()
        try await pool.close()
    }

    @Test(
        "the CLI: volume diff in text and JSON, export --since writing only the changes and refusing a copy of anything but the base, a writable base, or an interrupted update to another volume"
    )
    func commandLine() async throws {
        let folder = TemporaryFolder("incremental-cli")
        defer { folder.remove() }
        func run(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
            try spindle(arguments + ["--dir", folder.path])
        }
        #expect(try run(["pool", "create", "tank", folder.file("pool.img"), "--size", "128M"]).status == 0)
        // Two images that differ: chunks 0-15 in the first, 8-11 and 20 in the second.
        var random = SeededRandom(seed: 12)
        func image(_ name: String, chunks: [Int]) throws -> String {
            var bytes = [UInt8](repeating: 0, count: 4 << 20)
            for chunk in chunks {
                for index in (chunk * 65536)..<((chunk + 1) * 65536) {
                    bytes[index] = UInt8(truncatingIfNeeded: random.next() | 1)
                }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: folder.file(name)))
            return folder.file(name)
        }
        let first = try image("first.raw", chunks: Array(0..<16))
        let second = try image("second.raw", chunks: [8, 9, 10, 11, 20])
        #expect(try run(["volume", "import", "tank/vm", first]).status == 0)
        #expect(try run(["volume", "snapshot", "tank/vm", "s1", "--read-only"]).status == 0)
        #expect(try run(["volume", "import", "tank/vm", second]).status == 0)
        #expect(try run(["volume", "snapshot", "tank/vm", "s2", "--read-only"]).status == 0)

        let text = try run(["volume", "diff", "tank/s1", "tank/s2"])
        #expect(text.status == 0, "\(text.errors)")
        #expect(text.output.contains("tank/s2 since tank/s1: 1.06 MiB changed in 2 ranges"), "\(text.output)")
        let json = try run(["volume", "diff", "tank/s1", "tank/s2", "--json"])
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as? [String: Any])
        let listed = try #require(parsed["ranges"] as? [[String: UInt64]])
        #expect(listed == [["offset": 0, "length": 16 << 16], ["offset": 20 << 16, "length": 1 << 16]])
        #expect(parsed["changedBytes"] as? UInt64 == 17 << 16 && parsed["chunkBytes"] as? UInt64 == 65536)
        #expect(try run(["volume", "diff", "tank/s2", "tank/s2", "--json"]).output.contains("\"ranges\" : [\n\n  ]"))

        let backup = folder.file("backup.raw")
        #expect(try run(["volume", "export", "tank/s1", backup]).status == 0)
        let update = try run(["volume", "export", "tank/s2", backup, "--since", "tank/s1"])
        #expect(update.status == 0, "\(update.errors)")
        #expect(update.output.contains("1.06 MiB changed") && update.output.contains("now a copy of tank/s2"))
        #expect(try run(["volume", "export", "tank/s2", folder.file("full.raw")]).status == 0)
        #expect(try tool(["cmp", backup, folder.file("full.raw")]).status == 0, "the updated copy is s2")

        // Refusals, each naming the file and what is wrong; the copy is left as it was.
        let again = try run(["volume", "export", "tank/s2", backup, "--since", "tank/s1"])
        #expect(again.status != 0)
        #expect(
            again.errors.contains("backup.raw")
                && again.errors.contains("not a copy of tank/s1: it holds a copy of tank/s2"))
        let writable = try run(["volume", "export", "tank/s2", backup, "--since", "tank/vm"])
        #expect(writable.errors.contains("tank/vm is writable"), "\(writable.errors)")
        let plain = try run(["volume", "export", "tank/s2", second, "--since", "tank/s1"])
        #expect(plain.errors.contains("no record of what it copies"), "\(plain.errors)")
        let otherPool = try run(["volume", "export", "tank/s2", backup, "--since", "other/s1"])
        #expect(otherPool.status == 2 && otherPool.errors.contains("--since must name a volume of pool tank"))
        let missing = try run(["volume", "export", "tank/s2", folder.file("nothing.raw"), "--since", "tank/s1"])
        #expect(missing.errors.contains("nothing.raw") && missing.errors.contains("no such file"), "\(missing.errors)")
        #expect(try tool(["cmp", backup, folder.file("full.raw")]).status == 0, "refusals change nothing")

        // An update to s3 that was cut off: only that update may continue.
        #expect(try run(["volume", "snapshot", "tank/vm", "s3", "--read-only"]).status == 0)
        try CopyRecord.write(
            CopyRecord.updatingAttribute, "1 00000000-0000-0000-0000-000000000001 99 0 tank/s9", of: backup)
        let interrupted = try run(["volume", "export", "tank/s3", backup, "--since", "tank/s2"])
        #expect(
            interrupted.errors.contains("an update of this copy to tank/s9 was interrupted"), "\(interrupted.errors)")
        CopyRecord.remove(CopyRecord.updatingAttribute, of: backup)
        #expect(try run(["volume", "export", "tank/s3", backup, "--since", "tank/s2"]).status == 0)
        #expect(try run(["volume", "diff", "tank/s2", "tank/s3"]).output.contains("0 B changed in 0 ranges"))
    }
}
