import Foundation
import Testing

@testable import Spindle

/// Damage on disk and bad input through the command line: flipped bits, zeroed and truncated
/// superblocks, bitmaps, labels and pool metadata; wrong images, the same image twice, images of
/// different arrays, files that are not images, images that hold something. Each is detected and
/// refused or worked around with a message that names the file and the problem; nothing crashes,
/// no damaged header is used in silence, data reads back exactly or not at all, and a refused
/// command changes no file.
/// `count` bytes derived from `seed`.
func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { fillRandom($0, seed: seed) }
    return bytes
}

@Suite("corruption and bad input through the CLI", .serialized)
struct CorruptionCLITests {
    /// A RAID5 array (m0–m3) holding pool tank with volume v (8 MiB of random data), and pool p2 on
    /// plain.img with volume w (4 MiB of random data), copied afresh for each case.
    final class Fixture {
        let base = TemporaryFolder("corrupt")
        let volumeData: [UInt8]
        let plainData: [UInt8]

        init() throws {
            let dir = ["--dir", base.path]
            func run(_ arguments: [String]) throws {
                let result = try spindle(arguments)
                try #require(result.status == 0, "spindle \(arguments.joined(separator: " ")): \(result.errors)")
            }
            volumeData = randomBytes(8 << 20, seed: 42)
            plainData = randomBytes(4 << 20, seed: 43)
            try Data(volumeData).write(to: URL(fileURLWithPath: base.file("v.bin")))
            try Data(plainData).write(to: URL(fileURLWithPath: base.file("w.bin")))
            try run(
                ["array", "create", "r5"] + (0..<4).map { base.file("m\($0).img") } + ["--level", "5", "--size", "24M"])
            try run(["pool", "create", "tank", "array:r5"] + dir)
            try run(["volume", "create", "tank/v", "--size", "8M"] + dir)
            try run(["volume", "import", "tank/v", base.file("v.bin")] + dir)
            try run(["pool", "create", "p2", base.file("plain.img"), "--size", "32M"] + dir)
            try run(["volume", "create", "p2/w", "--size", "4M"] + dir)
            try run(["volume", "import", "p2/w", base.file("w.bin")] + dir)
            for name in ["v.bin", "w.bin"] { try FileManager.default.removeItem(atPath: base.file(name)) }
        }

        deinit { base.remove() }

        /// A fresh copy of the images in a new folder.
        func copy() throws -> Case {
            let folder = TemporaryFolder("corrupt-case")
            #expect(system("cp --sparse=always '\(base.path)'/*.img '\(folder.path)/'") == 0)
            return Case(folder: folder)
        }
    }

    struct Case {
        let folder: TemporaryFolder
        var dir: [String] { ["--dir", folder.path] }
        var members: [String] { (0..<4).map { folder.file("m\($0).img") } }

        func bytes(_ name: String) throws -> [UInt8] {
            [UInt8](try Data(contentsOf: URL(fileURLWithPath: folder.file(name))))
        }

        func patch(_ name: String, at offset: Int, _ change: ([UInt8]) -> [UInt8], length: Int = 1) throws {
            let handle = try FileHandle(forUpdating: URL(fileURLWithPath: folder.file(name)))
            defer { try? handle.close() }
            try handle.seek(toOffset: UInt64(offset))
            let old = [UInt8](try handle.read(upToCount: length) ?? Data())
            try handle.seek(toOffset: UInt64(offset))
            try handle.write(contentsOf: Data(change(old)))
        }
        func flip(_ name: String, at offset: Int) throws { try patch(name, at: offset) { [$0[0] ^ 0x10] } }
        func zero(_ name: String, at offset: Int, length: Int) throws {
            try patch(name, at: offset, { _ in [UInt8](repeating: 0, count: length) }, length: length)
        }
        func truncate(_ name: String, to size: Int) throws {
            let handle = try FileHandle(forUpdating: URL(fileURLWithPath: folder.file(name)))
            try handle.truncate(atOffset: UInt64(size))
            try handle.close()
        }

        /// Runs spindle; requires that it did not crash.
        func run(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> (
            status: Int32, output: String, errors: String
        ) {
            let result = try spindle(arguments)
            #expect(
                [0, 1, 2].contains(result.status) && !result.errors.contains("Fatal error"),
                "spindle \(arguments.joined(separator: " ")) crashed (status \(result.status)): \(result.errors)",
                sourceLocation: sourceLocation)
            return result
        }

        /// Runs a command that must fail with `fragments` in its message and leave every file as it was.
        func refused(_ arguments: [String], _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation)
            throws
        {
            // An array member's superblocks may record the assembly that came before the refusal
            // (events, a missing member); everything from its data area on must stay as it was.
            func contents(_ name: String) throws -> [UInt8] {
                let all = try bytes(name)
                return all.starts(with: Array("SPNDLRAI".utf8)) && all.count > 1 << 20 ? Array(all[(1 << 20)...]) : all
            }
            let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
            let before = try names.map { try contents($0) }
            let result = try run(arguments, sourceLocation: sourceLocation)
            #expect(
                result.status != 0, "spindle \(arguments.joined(separator: " ")) should fail: \(result.output)",
                sourceLocation: sourceLocation)
            for fragment in fragments {
                #expect(
                    result.errors.contains(fragment), "'\(result.errors)' should mention '\(fragment)'",
                    sourceLocation: sourceLocation)
            }
            let after = try names.map { try contents($0) }
            for (index, name) in names.enumerated() where before[index] != after[index] {
                Issue.record("refused command changed \(name)", sourceLocation: sourceLocation)
            }
        }

        /// Exports a volume; returns its bytes, or nil (with the error text) when refused.
        func export(_ volume: String) throws -> (bytes: [UInt8]?, errors: String) {
            let path = folder.file("export.bin")
            try? FileManager.default.removeItem(atPath: path)
            let result = try run(["volume", "export", volume, path] + dir)
            guard result.status == 0 else { return (nil, result.errors) }
            return (try bytes("export.bin"), result.errors)
        }

        func scrubMismatches() throws -> Int? {
            let result = try run(["array", "scrub", "--json", "--scan", folder.path, "--array-name", "r5"])
            // Status 1 with a report: mismatches found; without one: the scrub failed.
            guard result.status == 0 || result.status == 1,
                let report = try? JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
            else { return nil }
            return report["mismatches"] as? Int
        }
    }

    @Test(
        "RAID superblocks: one damaged copy is outlived, two make the member refused or left out, and --force re-adds it"
    )
    func raidSuperblocks() throws {
        let fixture = try Fixture()
        // One copy damaged: the other copy serves, the array is whole.
        let one = try fixture.copy()
        defer { one.folder.remove() }
        try one.flip("m1.img", at: 100)
        #expect(try one.export("tank/v").bytes == fixture.volumeData)
        #expect(try one.scrubMismatches() == 0)

        // Both copies damaged: named when scanning, refused when given, data served from parity.
        let both = try fixture.copy()
        defer { both.folder.remove() }
        try both.flip("m1.img", at: 100)
        try both.flip("m1.img", at: 4096 + 200)
        try both.refused(["array", "assemble"] + both.members, ["m1.img", "corrupt superblock: checksum"])
        let exported = try both.export("tank/v")
        #expect(exported.bytes == fixture.volumeData)
        #expect(
            exported.errors.contains("m1.img: corrupt superblock") || exported.errors.contains("slot 1"),
            "\(exported.errors)")
        let status = try both.run(["array", "status", "--scan", both.folder.path])
        #expect(
            status.errors.contains("m1.img: corrupt superblock: checksum") && status.errors.contains("not used"),
            "\(status.errors)")
        #expect(status.output.contains("slot 1: missing"), "\(status.output)")
        // Re-adding the damaged image needs --force (it could be anything); then it is rebuilt.
        let selection = ["--scan", both.folder.path, "--array-name", "r5"]
        try both.refused(
            ["array", "add"] + selection + ["--device", both.folder.file("m1.img")],
            ["a damaged Spindle array superblock", "--force"])
        #expect(
            try both.run(["array", "add"] + selection + ["--device", both.folder.file("m1.img"), "--force"]).status == 0
        )
        #expect(try both.run(["array", "rebuild", "--wait"] + selection).status == 0)
        #expect(try both.run(["array", "status"] + selection).output.contains("raid5, clean"))
        #expect(try both.scrubMismatches() == 0)
        #expect(try both.export("tank/v").bytes == fixture.volumeData)

        // Zeroed superblocks: not a member any more; truncated members: left out with a note.
        let zeroed = try fixture.copy()
        defer { zeroed.folder.remove() }
        try zeroed.zero("m2.img", at: 0, length: 8192)
        try zeroed.refused(
            ["array", "assemble"] + zeroed.members, ["m2.img", "no Spindle array superblock (not an array member)"])
        try zeroed.truncate("m3.img", to: 2048)
        let twoGone = try zeroed.export("tank/v")
        #expect(twoGone.bytes == nil, "two of four RAID5 members gone cannot serve data")
        #expect(twoGone.errors.contains("r5"), "\(twoGone.errors)")

        let truncated = try fixture.copy()
        defer { truncated.folder.remove() }
        try truncated.truncate("m3.img", to: 12 << 20)
        let served = try truncated.export("tank/v")
        #expect(served.bytes == fixture.volumeData)
        #expect(served.errors.contains("m3.img") && served.errors.contains("truncated"), "\(served.errors)")
    }

    @Test("write-intent bitmaps: garbage on a clean array and a lost bitmap on a dirty one still end consistent")
    func bitmaps() throws {
        let fixture = try Fixture()
        let garbage = try fixture.copy()
        defer { garbage.folder.remove() }
        for member in 0..<4 {
            try garbage.patch(
                "m\(member).img", at: 8192, { _ in randomBytes(4096, seed: UInt64(member)) }, length: 4096)
        }
        #expect(try garbage.export("tank/v").bytes == fixture.volumeData)
        #expect(try garbage.scrubMismatches() == 0)

        // A dirty array (its writer killed) whose first member lost its bitmap: the other members'
        // copies still name every region to resync.
        let dirty = try fixture.copy()
        defer { dirty.folder.remove() }
        let socket = dirty.folder.file("s.sock")
        let server = try ServeProcess(["volume:tank/v", "--socket", socket], directory: dirty.folder.path)
        let client = try RawNBDClient(unixSocket: socket)
        _ = try client.go("tank/v")
        var expected = fixture.volumeData
        for index in 0..<40 {
            var data = [UInt8](repeating: 0, count: 8192)
            data.withUnsafeMutableBytes { fillRandom($0, seed: UInt64(index)) }
            let offset = (index * 197 % 1000) * 8192
            client.request(1, offset: UInt64(offset), length: 8192, cookie: UInt64(index), payload: data)
            #expect(client.reply()?.error == 0)
            expected.replaceSubrange(offset..<(offset + 8192), with: data)
        }
        client.request(3, offset: 0, length: 0, cookie: 99)
        #expect(client.reply()?.error == 0)
        kill(server.process.processIdentifier, SIGKILL)
        server.process.waitUntilExit()
        try dirty.zero("m0.img", at: 8192, length: 4096)
        #expect(try dirty.export("tank/v").bytes == expected)
        #expect(try dirty.scrubMismatches() == 0)
    }

    @Test("wrong images: the same image twice, a copy, members of different arrays, files that are not images")
    func wrongImages() throws {
        let fixture = try Fixture()
        let test = try fixture.copy()
        defer { test.folder.remove() }
        let m = test.members
        try test.refused(
            ["array", "assemble", m[0], m[1], m[2], test.folder.path + "/./m0.img"], ["the image is given twice"])
        #expect(system("cp --sparse=always '\(m[1])' '\(test.folder.file("m1-copy.img"))'") == 0)
        try test.refused(
            ["array", "assemble"] + m + [test.folder.file("m1-copy.img")],
            ["are the same member", "a copied image cannot stand in"])
        try test.refused(["volume", "list", "tank"] + test.dir, ["are the same member"])
        try FileManager.default.removeItem(atPath: test.folder.file("m1-copy.img"))

        // A second array in the same folder.
        #expect(
            try test.run([
                "array", "create", "r1", test.folder.file("x0.img"), test.folder.file("x1.img"), "--level", "1",
                "--size", "8M",
            ]).status == 0)
        try test.refused(["array", "assemble", m[0], m[1], m[2], test.folder.file("x0.img")], ["r1", "r5", "x0.img"])
        try test.refused(["array", "status", "--scan", test.folder.path], ["several arrays", "--array-name"])

        // Files that are not images.
        try Data(randomBytes(4 << 20, seed: 9)).write(to: URL(fileURLWithPath: test.folder.file("junk.bin")))
        try Data("hello\n".utf8).write(to: URL(fileURLWithPath: test.folder.file("note.txt")))
        try test.refused(
            ["array", "assemble", m[0], m[1], m[2], test.folder.file("junk.bin")], ["junk.bin", "not an array member"])
        try test.refused(
            ["array", "assemble", m[0], m[1], m[2], test.folder.file("note.txt")],
            ["note.txt", "smaller than one 512-byte block"])
        #expect(try test.export("tank/v").bytes == fixture.volumeData, "scans pass over files that are not images")
    }

    @Test("images that hold something are never overwritten without --force")
    func nothingOverwritten() throws {
        let fixture = try Fixture()
        let test = try fixture.copy()
        defer { test.folder.remove() }
        try Data(randomBytes(4 << 20, seed: 11)).write(to: URL(fileURLWithPath: test.folder.file("junk.bin")))
        try Data(count: 8 << 20).write(to: URL(fileURLWithPath: test.folder.file("late.bin")))
        try test.patch("late.bin", at: 6 << 20, { _ in [7] })
        let m = test.members
        try test.refused(
            ["pool", "create", "px", test.folder.file("junk.bin")] + test.dir,
            ["junk.bin", "holds data (a non-zero byte at offset 0)", "--force"])
        try test.refused(
            ["pool", "create", "px", test.folder.file("late.bin")] + test.dir,
            ["holds data (a non-zero byte at offset 6291456)"])
        try test.refused(
            ["array", "create", "rx", m[0], test.folder.file("new.img"), "--level", "1", "--size", "24M"],
            ["m0.img", "holds member 0 of array 'r5'"])
        try? FileManager.default.removeItem(atPath: test.folder.file("new.img"))
        try test.refused(
            ["pool", "create", "px", test.folder.file("plain.img")] + test.dir, ["holds device 0 of pool 'p2'"])
        try test.refused(
            ["pool", "extend", "p2", test.folder.file("junk.bin")] + test.dir, ["junk.bin", "holds data"])
        try test.refused(
            [
                "array", "add", "--scan", test.folder.path, "--array-name", "r5", "--device",
                test.folder.file("junk.bin"),
            ], ["holds data"])
        // A file system made by mkfs is recognized by name.
        let ext4 = test.folder.file("fs.img")
        try Data(count: 16 << 20).write(to: URL(fileURLWithPath: ext4))
        let made = try tool(["mkfs.ext4", "-q", "-F", ext4])
        try #require(made.status == 0, "\(made.errors)")
        try test.refused(["pool", "create", "px", ext4] + test.dir, ["an ext2/ext3/ext4 file system"])
        // With --force the user's intent is explicit.
        #expect(try test.run(["pool", "create", "px", test.folder.file("junk.bin"), "--force"] + test.dir).status == 0)
        #expect(try test.export("tank/v").bytes == fixture.volumeData)
        #expect(try test.export("p2/w").bytes == fixture.plainData)
    }

    @Test(
        "pool labels and metadata: damage is named, one damaged superblock copy is reported, node damage never returns wrong data"
    )
    func poolMetadata() async throws {
        let fixture = try Fixture()
        // A damaged label: the pool is not found, and the message says which file is damaged.
        let label = try fixture.copy()
        defer { label.folder.remove() }
        try label.flip("plain.img", at: 20)
        try label.refused(
            ["volume", "list", "p2"] + label.dir,
            ["no pool named 'p2'", "Damaged and not used", "plain.img", "checksum"])
        let list = try label.run(["pool", "list"] + label.dir)
        #expect(list.output.contains("tank") && list.errors.contains("plain.img"), "\(list.output) \(list.errors)")

        // The label on an array (in its first block, on member 0 behind 1 MiB of RAID metadata).
        let arrayLabel = try fixture.copy()
        defer { arrayLabel.folder.remove() }
        try arrayLabel.flip("m0.img", at: (1 << 20) + 20)
        try arrayLabel.refused(["volume", "list", "tank"] + arrayLabel.dir, ["array:r5", "damaged pool label"])

        // Metadata superblocks: the newer copy damaged is reported; both damaged is refused.
        let superblock = try fixture.copy()
        defer { superblock.folder.remove() }
        let plain = try superblock.bytes("plain.img")
        func transaction(_ copy: Int) -> UInt64 {
            plain.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4096 * (1 + copy) + 16, as: UInt64.self) }
        }
        let newer = transaction(0) > transaction(1) ? 0 : 1
        try superblock.flip("plain.img", at: 4096 * (1 + newer) + 300)
        let listed = try superblock.run(["volume", "list", "p2"] + superblock.dir)
        #expect(
            listed.errors.contains("metadata superblock copy \(newer): metadata superblock checksum mismatch ("),
            "\(listed.errors)")
        #expect(
            listed.errors.contains(" computed); opened transaction \(min(transaction(0), transaction(1)))"),
            "\(listed.errors)")
        #expect(listed.errors.contains("that commit's changes are lost"))
        let check = try superblock.run(["pool", "check", "p2", "--json"] + superblock.dir)
        let checked = try JSONSerialization.jsonObject(with: Data(check.output.utf8)) as? [String: Any]
        #expect(
            (checked?["warnings"] as? [String])?.first?.contains("metadata superblock copy \(newer)") == true,
            "\(check.output)")
        try superblock.flip("plain.img", at: 4096 * (2 - newer) + 300)
        try superblock.refused(
            ["volume", "list", "p2"] + superblock.dir, ["no valid metadata superblock", "plain.img"])

        // Every B-tree node, one at a time: a flipped bit is detected (an error naming the pool's
        // device) and never reads back as other data.
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let device = try FileDevice.open(
            path: fixture.base.file("plain.img"), engine: engine, options: FileDevice.Options(readOnly: true))
        let pool = try await ThinPool.open(devices: [device])
        let nodes = await pool.withState { state in
            (2..<UInt64(state.area.blockCount)).filter { state.area.isUsed($0) }.map { Int($0) }
        }
        try await pool.close()  // and the device, which the pool owns
        #expect(
            nodes.count >= 4,
            "the fixture's pool has a volumes tree, a count tree, segments and a mapping tree: \(nodes)")
        let area = 4096
        for block in nodes {
            let test = try fixture.copy()
            defer { test.folder.remove() }
            try test.flip("plain.img", at: area + block * 4096 + 40)
            let exported = try test.export("p2/w")
            if let bytes = exported.bytes {
                #expect(bytes == fixture.plainData, "node \(block) damaged: the export succeeded with different data")
            } else {
                #expect(exported.errors.contains("plain.img"), "node \(block): \(exported.errors)")
            }
            let check = try test.run(["pool", "check", "p2"] + test.dir)
            #expect(check.status != 0, "node \(block) damaged: pool check should fail: \(check.output)")
        }
    }
}
