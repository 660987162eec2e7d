import Foundation
import Testing

@testable import Spindle

/// Runs the built `spindle` binary.
func spindle(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
    try runProcess(spindleBinary(), arguments)
}

/// Runs a program to its end; returns (status, output, errors).
func runProcess(_ executable: URL, _ arguments: [String], directory: String? = nil) throws -> (
    status: Int32, output: String, errors: String
) {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let output = Pipe()
    let errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    try process.run()
    let outputData = output.fileHandleForReading.readDataToEndOfFile()
    let errorData = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (
        process.terminationStatus, String(decoding: outputData, as: UTF8.self),
        String(decoding: errorData, as: UTF8.self)
    )
}

func spindleBinary() -> URL {
    // The test bundle sits in the build folder, next to the executable.
    var folder = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<3 {
        let candidate = folder.appendingPathComponent("spindle")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        folder = folder.deletingLastPathComponent()
    }
    return URL(fileURLWithPath: ".build/debug/spindle")
}

@Suite("spindle command line", .serialized)
struct CLITests {
    @Test("image create and info, for people and for scripts")
    func imageCreateAndInfo() throws {
        let folder = TemporaryFolder("cli")
        defer { folder.remove() }
        let path = folder.file("a.img")
        let created = try spindle(["image", "create", path, "--size", "64M"])
        #expect(created.status == 0, "\(created.errors)")
        #expect(created.output == "created \(path): 64 MiB (sparse), 512-byte blocks\n")
        let info = try spindle(["image", "info", path])
        #expect(info.status == 0)
        #expect(info.output.contains("size:         64 MiB (67108864 bytes)"))
        #expect(info.output.contains("write lock:   free"))
        let json = try spindle(["image", "info", path, "--json"])
        let decoded = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as! [String: Any]
        #expect(decoded["sizeBytes"] as? Int == 64 << 20)
        #expect(decoded["logicalBlockBytes"] as? Int == 512)
        #expect(decoded["allocatedBytes"] as? Int == 0)
    }

    @Test("errors go to standard error as one line, with a non-zero status")
    func errors() throws {
        let folder = TemporaryFolder("cli-errors")
        defer { folder.remove() }
        let path = folder.file("a.img")
        let badSize = try spindle(["image", "create", path, "--size", "12X"])
        #expect(badSize.status != 0)
        #expect(badSize.errors.contains("'12X' is not a size"))
        #expect(badSize.output.isEmpty)
        _ = try spindle(["image", "create", path, "--size", "1M"])
        let again = try spindle(["image", "create", path, "--size", "1M"])
        #expect(again.status == 1)
        #expect(
            again.errors
                == "spindle: error: create on \(path) failed: the file exists already; remove it or choose another path\n"
        )
        let missing = try spindle(["image", "info", folder.file("none.img")])
        #expect(missing.status == 1)
        #expect(missing.errors.contains("no such image file"))
        let noSize = try spindle(["bench", folder.file("none.img")])
        #expect(noSize.errors.contains("give --size to create it"))
        let badDepth = try spindle(["bench", path, "--iodepth", "0"])
        #expect(badDepth.status != 0 && badDepth.errors.contains("--iodepth must be from 1 to 4096"))
    }

    @Test("info names the process holding the write lock")
    func infoShowsLockHolder() async throws {
        let folder = TemporaryFolder("cli-lock")
        defer { folder.remove() }
        let path = folder.file("held.img")
        let device = try FileDevice.create(path: path, sizeBytes: 1 << 20)
        let info = try spindle(["image", "info", path])
        #expect(info.output.contains("write lock:   held by process \(getpid())"))
        let writer = try spindle(["bench", path, "--rw", "randwrite", "--ops", "10"])
        #expect(writer.status == 1 && writer.errors.contains("holds its write lock"))
        let reader = try spindle(["bench", path, "--rw", "randread", "--ops", "10"])
        #expect(reader.status == 0, "a load that only reads opens the image read-only: \(reader.errors)")
        try await device.close()
    }

    @Test("the RAID story through the CLI: create, fail, read degraded, replace with rebuild, scrub")
    func arrayStory() throws {
        let folder = TemporaryFolder("cli-array")
        defer { folder.remove() }
        let members = (0..<3).map { folder.file("m\($0).img") }
        let created = try spindle(
            ["array", "create", "story", "--level", "5", "--chunk", "16K", "--size", "8M"] + members)
        #expect(created.status == 0, "\(created.errors)")
        #expect(created.output.contains("created array story: raid5, 3 members, 16 KiB chunks"))
        let filled = try spindle(
            ["bench", "--array"] + members + ["--rw", "read", "--fill", "--verify", "--ops", "500", "--seed", "3"])
        #expect(filled.status == 0, "\(filled.errors)")
        let failed = try spindle(["array", "fail", "--member", members[1]] + members)
        #expect(failed.output.contains("is degraded"), "\(failed.errors)")
        let status = try spindle(["array", "status", "--json"] + members)
        let decoded = try JSONSerialization.jsonObject(with: Data(status.output.utf8)) as! [String: Any]
        #expect(decoded["state"] as? String == "degraded")
        let degradedRead = try spindle(["bench", "--array", members[0], members[2], "--verify-existing", "--seed", "3"])
        #expect(degradedRead.status == 0, "\(degradedRead.errors)")
        #expect(degradedRead.output.contains("blocks checked, all correct"))
        let replaced = try spindle([
            "array", "replace", "--scan", folder.path, "--old", members[1], "--new", folder.file("m3.img"),
        ])
        #expect(replaced.status == 0, "\(replaced.errors)")
        #expect(replaced.output.contains("rebuilt"))
        let scrub = try spindle(["array", "scrub", "--json", "--scan", folder.path])
        let report = try JSONSerialization.jsonObject(with: Data(scrub.output.utf8)) as! [String: Any]
        #expect(report["mismatches"] as? Int == 0, "\(scrub.errors)")
        let final = try spindle([
            "bench", "--array", members[0], folder.file("m3.img"), members[2], "--verify-existing", "--seed", "3",
        ])
        #expect(final.status == 0, "\(final.errors)")
        // A background rebuild: the command returns at once, status follows it to the end.
        let current = [members[0], folder.file("m3.img"), members[2]]
        _ = try spindle(["array", "fail", "--member", members[2]] + current)
        let added = try spindle(["array", "add", "--device", folder.file("m4.img")] + current)
        #expect(added.output.contains("as the member to rebuild"), "\(added.errors)")
        let withNew = [members[0], folder.file("m3.img"), folder.file("m4.img")]
        let background = try spindle(["array", "rebuild"] + withNew)
        #expect(background.output.contains("rebuild started in the background"), "\(background.errors)")
        var state = ""
        for _ in 0..<300 {
            let polled = try spindle(["array", "status", "--json"] + withNew)
            state =
                (try? JSONSerialization.jsonObject(with: Data(polled.output.utf8)) as? [String: Any])?["state"]
                as? String ?? ""
            if state == "clean" { break }
            Thread.sleep(forTimeInterval: 0.1)
        }
        #expect(state == "clean")
        // The rebuild process may still be closing; wait for its locks to go before going on.
        for _ in 0..<100 where FileDevice.writeLockHolder(path: withNew[0]) != nil {
            Thread.sleep(forTimeInterval: 0.1)
        }
        let afterRebuild = try spindle(["bench", "--array"] + withNew + ["--verify-existing", "--seed", "3"])
        #expect(afterRebuild.status == 0, "\(afterRebuild.errors)")
        let missing = try spindle(["array", "assemble", members[0]])
        #expect(missing.status == 1 && missing.errors.contains("too few members"))
        let notMember = try spindle(["array", "status", folder.file("none.img")])
        #expect(notMember.status == 1 && notMember.errors.contains("no such image file"))
    }

    @Test("bench creates, fills, verifies and reports as JSON")
    func benchJSON() throws {
        let folder = TemporaryFolder("cli-bench")
        defer { folder.remove() }
        let path = folder.file("b.img")
        let result = try spindle([
            "bench", path, "--size", "4M", "--rw", "randrw", "--bs", "4K", "--iodepth", "4",
            "--ops", "2000", "--verify", "--json",
        ])
        #expect(result.status == 0, "\(result.errors)")
        let decoded = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as! [String: Any]
        let report = decoded["report"] as! [String: Any]
        #expect(report["operations"] as? Int == 2000)
        #expect(report["layoutBytes"] as? Int == 4 << 20)
        #expect((report["verifiedBlocks"] as? Int ?? 0) > 0)
        let human = try spindle(["bench", path, "--rw", "read", "--bs", "64K", "--iodepth", "2", "--ops", "100"])
        #expect(human.status == 0)
        #expect(human.output.contains("read on \(path): 64 KiB requests, depth 2, 4 MiB region"))
        #expect(human.output.contains("IOPS"))
    }
}

/// Issue 11: refusals, what images hold, exit statuses and messages a script relies on.
extension CLITests {
    /// The file's words with every run of white space made one space (help text wraps anywhere).
    static func words(_ text: String) -> String { text.split(whereSeparator: \.isWhitespace).joined(separator: " ") }

    @Test("a refused array create or replace leaves no new image behind")
    func refusedCreateLeavesNothing() throws {
        let folder = TemporaryFolder("cli-refused")
        defer { folder.remove() }
        let full = folder.file("rand.img")
        try Data(repeating: 0xA5, count: 4 << 20).write(to: URL(fileURLWithPath: full))
        let refused = try spindle([
            "array", "create", "new", full, folder.file("x1.img"), "--level", "1", "--size", "8M",
        ])
        #expect(refused.status == 1 && refused.errors.contains("holds data"), "\(refused.errors)")
        #expect(!FileManager.default.fileExists(atPath: folder.file("x1.img")), "the refusal left x1.img behind")
        #expect(try Data(contentsOf: URL(fileURLWithPath: full)) == Data(repeating: 0xA5, count: 4 << 20))

        let badChunk = try spindle([
            "array", "create", "q", folder.file("q1.img"), folder.file("q2.img"), "--level", "1",
            "--chunk", "3K", "--size", "8M",
        ])
        #expect(badChunk.status == 2, "\(badChunk.errors)")
        #expect(
            !FileManager.default.fileExists(atPath: folder.file("q1.img"))
                && !FileManager.default.fileExists(atPath: folder.file("q2.img")))

        let members = [folder.file("m0.img"), folder.file("m1.img")]
        #expect(try spindle(["array", "create", "r1", "--level", "1", "--size", "4M"] + members).status == 0)
        let replace = try spindle(
            ["array", "replace", "--old", folder.file("stranger.img"), "--new", folder.file("new.img")] + members)
        #expect(replace.status != 0 && replace.errors.contains("is not a member"), "\(replace.errors)")
        #expect(
            !FileManager.default.fileExists(atPath: folder.file("new.img")), "the refused replace left new.img behind")

        // bench creates a missing image for its load; a refused load leaves none.
        let tooLarge = try spindle(["bench", folder.file("b.img"), "--size", "1M", "--bs", "2M"])
        #expect(
            tooLarge.status == 2 && tooLarge.errors.contains("smaller than one 2097152-byte block"),
            "\(tooLarge.errors)")
        let badFault = try spindle(["bench", folder.file("b.img"), "--size", "1M", "--fault", "bogus"])
        #expect(badFault.status == 2 && badFault.errors.contains("bad fault spec 'bogus'"), "\(badFault.errors)")
        #expect(
            try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == [
                "m0.img", "m1.img", "rand.img",
            ])
    }

    @Test("image info says what an image holds: member and slot, spare, pool device, foreign format, data, nothing")
    func imageInfoSaysWhatItHolds() throws {
        let folder = TemporaryFolder("cli-contents")
        defer { folder.remove() }
        let members = [folder.file("m0.img"), folder.file("m1.img")]
        #expect(try spindle(["array", "create", "r1", "--level", "1", "--size", "4M"] + members).status == 0)
        #expect(
            try spindle(["array", "add", "--device", folder.file("spare.img")] + members).output.contains("as a spare"))
        #expect(
            try spindle(["pool", "create", "tank", folder.file("pool.img"), "--size", "8M", "--dir", folder.path])
                .status == 0)
        for name in ["ext4.img", "qcow.img", "data.img", "empty.img"] {
            #expect(try spindle(["image", "create", folder.file(name), "--size", "2M"]).status == 0)
        }
        try patchFile(folder.file("ext4.img"), at: 1080, with: [0x53, 0xEF])
        try patchFile(folder.file("qcow.img"), at: 0, with: [0x51, 0x46, 0x49, 0xFB])
        try patchFile(folder.file("data.img"), at: 1 << 20, with: [1, 2, 3])

        func contents(_ name: String) throws -> (line: String, json: [String: Any]) {
            let human = try spindle(["image", "info", folder.file(name)])
            #expect(human.status == 0, "\(human.errors)")
            let line = human.output.split(separator: "\n").first { $0.hasPrefix("contents:") }.map(String.init) ?? ""
            let json = try spindle(["image", "info", folder.file(name), "--json"])
            return (line, try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as! [String: Any])
        }
        let member = try contents("m1.img")
        #expect(member.line.hasPrefix("contents:     member of array 'r1' (raid1, 2 members, "), "\(member.line)")
        #expect(member.line.hasSuffix(") in slot 1"), "\(member.line)")
        #expect(member.json["contentsKind"] as? String == "arrayMember" && member.json["arrayName"] as? String == "r1")
        #expect(member.json["arraySlot"] as? Int == 1 && (member.json["arrayUUID"] as? String)?.count == 36)
        let spare = try contents("spare.img")
        #expect(spare.line.hasPrefix("contents:     spare of array 'r1' (raid1, 2 members, "), "\(spare.line)")
        #expect(spare.json["contentsKind"] as? String == "arraySpare" && spare.json["arraySlot"] == nil)
        let pool = try contents("pool.img")
        #expect(pool.line.hasPrefix("contents:     device 0 of thin pool 'tank' ("), "\(pool.line)")
        #expect(pool.json["contentsKind"] as? String == "poolDevice" && pool.json["poolName"] as? String == "tank")
        #expect(pool.json["poolDeviceIndex"] as? Int == 0)
        let ext4 = try contents("ext4.img")
        #expect(ext4.line == "contents:     an ext2/ext3/ext4 file system (not a Spindle format)")
        #expect(
            ext4.json["contentsKind"] as? String == "format"
                && ext4.json["format"] as? String == "an ext2/ext3/ext4 file system")
        #expect(try contents("qcow.img").line == "contents:     a qcow2 disk image (not a Spindle format)")
        let data = try contents("data.img")
        #expect(
            data.line.hasPrefix("contents:     raw data") && data.line.contains("offset \(1 << 20)"), "\(data.line)")
        #expect(data.json["contentsKind"] as? String == "data")
        let empty = try contents("empty.img")
        #expect(empty.line.hasPrefix("contents:     nothing: zeros"), "\(empty.line)")
        #expect(empty.json["contentsKind"] as? String == "empty")
    }

    @Test("image create offers no block size it cannot keep; an image's block size comes from its file system")
    func imageCreateHasNoBlockSize() throws {
        let folder = TemporaryFolder("cli-block")
        defer { folder.remove() }
        let path = folder.file("a.img")
        let asked = try spindle(["image", "create", path, "--size", "1M", "--block-size", "4096"])
        #expect(asked.status == 2 && asked.errors.contains("--block-size"), "\(asked.status) \(asked.errors)")
        #expect(!FileManager.default.fileExists(atPath: path))
        let help = try spindle(["image", "create", "--help"])
        #expect(!help.output.contains("--block-size"))
        #expect(Self.words(help.output).contains("An image file records no block size"), "\(help.output)")
        let created = try spindle(["image", "create", path, "--size", "1M", "--json"])
        let made = try JSONSerialization.jsonObject(with: Data(created.output.utf8)) as! [String: Any]
        let info = try spindle(["image", "info", path, "--json"])
        let shown = try JSONSerialization.jsonObject(with: Data(info.output.utf8)) as! [String: Any]
        #expect(made["logicalBlockBytes"] as? Int == shown["logicalBlockBytes"] as? Int)
    }

    @Test("every bad argument exits 2: bad values, unknown commands and options, missing arguments")
    func badArgumentsExitTwo() throws {
        let folder = TemporaryFolder("cli-usage")
        defer { folder.remove() }
        let image = folder.file("a.img")
        let pair = [folder.file("q1.img"), folder.file("q2.img")]
        let cases: [[String]] = [
            ["image", "create", image, "--size", "foo"],
            ["image", "create", image, "--size", "16E"],
            ["image", "create", image, "--size", "1000"],
            ["image", "create", image],
            ["array", "create", "q", "--level", "7", "--size", "8M"] + pair,
            ["array", "create", "q", "--level", "1", "--chunk", "3K", "--size", "8M"] + pair,
            ["array", "create", "q", "--level", "5", "--size", "8M"] + pair,
            ["array", "status"],
            ["array", "frobnicate"],
            ["frobnicate"],
            ["image", "info", image, "--frobnicate"],
            ["bench", image, "--iodepth", "0"],
            ["serve", "nonsense"],
        ]
        for arguments in cases {
            let result = try spindle(arguments)
            #expect(
                result.status == 2,
                "spindle \(arguments.joined(separator: " ")) exited \(result.status): \(result.errors)")
            #expect(result.output.isEmpty && !result.errors.isEmpty, "spindle \(arguments.joined(separator: " "))")
        }
        #expect(
            try FileManager.default.contentsOfDirectory(atPath: folder.path).isEmpty, "a bad argument created a file")
        let help = try spindle(["array", "create", "--help"])
        #expect(help.status == 0 && help.output.contains("USAGE"))
        #expect(Self.words(try spindle(["--help"]).output).contains("exit status 2 for a bad argument"))
    }

    @Test("scrub exits 1 when it finds mismatches, reports read errors and unreadable chunks, and says so in --help")
    func scrubExitStatus() throws {
        let folder = TemporaryFolder("cli-scrub")
        defer { folder.remove() }
        let members = [folder.file("m0.img"), folder.file("m1.img")]
        #expect(try spindle(["array", "create", "r1", "--level", "1", "--size", "4M"] + members).status == 0)
        let clean = try spindle(["array", "scrub"] + members)
        #expect(
            clean.status == 0
                && clean.output.contains("0 mismatched stripes, 0 read errors repaired, 0 unreadable chunks"),
            "\(clean.output)")
        #expect(clean.errors.isEmpty, "progress lines went to a standard error that is not a terminal: \(clean.errors)")
        // One mirror's copy changed behind the array's back.
        try patchFile(members[1], at: (1 << 20) + 65536, with: [UInt8](repeating: 0xA5, count: 4096))
        let found = try spindle(["array", "scrub"] + members)
        #expect(found.status == 1 && found.output.contains("1 mismatched stripes"), "\(found.status) \(found.output)")
        let json = try spindle(["array", "scrub", "--json"] + members)
        #expect(json.status == 1)
        let report = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as! [String: Any]
        #expect(report["mismatches"] as? Int == 1 && report["readErrorsRepaired"] as? Int == 0)
        #expect((report["unreadable"] as? [Any])?.isEmpty == true)
        let repaired = try spindle(["array", "scrub", "--repair"] + members)
        #expect(
            repaired.status == 1 && repaired.output.contains("1 mismatched stripes, 1 repaired"), "\(repaired.output)")
        #expect(try spindle(["array", "scrub"] + members).status == 0)
        let help = Self.words(try spindle(["array", "scrub", "--help"]).output)
        #expect(
            help.contains("Exits with status 1 when it finds mismatched stripes or chunks that no member can provide"),
            "\(help)")
    }

    @Test("array status names images of the array it does not use: a stale copy of a member")
    func statusNamesStaleCopies() throws {
        let folder = TemporaryFolder("cli-stale")
        defer { folder.remove() }
        let members = [folder.file("m0.img"), folder.file("m1.img")]
        #expect(try spindle(["array", "create", "r1", "--level", "1", "--size", "4M"] + members).status == 0)
        // A copy of m0 taken now, named to come last in the folder, goes stale with the next change.
        try FileManager.default.copyItem(atPath: members[0], toPath: folder.file("z-copy.img"))
        #expect(try spindle(["array", "fail", "--member", members[1]] + members).status == 0)
        let replaced = try spindle(["array", "replace", "--old", members[1], "--new", folder.file("m2.img")] + members)
        #expect(replaced.status == 0, "\(replaced.errors)")
        let status = try spindle(["array", "status", "--scan", folder.path])
        #expect(status.status == 0, "\(status.errors)")
        #expect(status.output.contains("array r1: raid1, clean"), "\(status.output)")
        #expect(status.output.contains("slot 0: active  \(members[0])"), "\(status.output)")
        #expect(
            status.output.contains(
                "note: \(folder.file("z-copy.img")) is a stale copy of the member in slot 0, which \(members[0]) holds"),
            "\(status.output)")
        // The replaced member was given to the replace, which wiped its superblocks: it is no member now.
        #expect(!status.output.contains("note: \(members[1])"), "\(status.output)")
        let json = try spindle(["array", "status", "--json", "--scan", folder.path])
        let decoded = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as! [String: Any]
        #expect(decoded["state"] as? String == "clean")
        #expect((decoded["notes"] as? [String])?.count == 1, "\(json.output)")
    }

    @Test("simulate runs seeds on every level and reports the configurations it drew")
    func simulateReportsConfigurations() throws {
        let run = try spindle(["simulate", "--seeds", "2", "--operations", "40", "--json"])
        #expect(run.status == 0, "\(run.errors)")
        let decoded = try JSONSerialization.jsonObject(with: Data(run.output.utf8)) as! [String: Any]
        #expect(decoded["runs"] as? Int == 6 && decoded["mismatches"] as? Int == 0, "\(run.output)")
        let members = decoded["memberCounts"] as? [String: [Int]]
        #expect(Set(members?.keys.map { $0 } ?? []) == ["raid0", "raid1", "raid5"], "\(run.output)")
        let bad = try spindle(["simulate", "--levels", "6"])
        #expect(bad.status == 2 && bad.errors.contains("--levels takes 0, 1 and 5"), "\(bad.errors)")
    }

    @Test("a missing member is named by its last known file name")
    func missingMemberNamedByLastKnownName() throws {
        let folder = TemporaryFolder("cli-missing-name")
        defer { folder.remove() }
        let members = (0..<3).map { folder.file("m\($0).img") }
        #expect(try spindle(["array", "create", "r5", "--level", "5", "--size", "4M"] + members).status == 0)
        try FileManager.default.removeItem(atPath: members[1])
        let status = try spindle(["array", "status", "--scan", folder.path])
        #expect(status.status == 0, "\(status.errors)")
        #expect(status.output.contains("slot 1: missing  (last seen as m1.img, member "), "\(status.output)")
        let assembled = try spindle(["array", "scrub", "--scan", folder.path])
        #expect(assembled.errors.contains("slot 1 (m1.img, member"), "\(assembled.errors)")
    }

    @Test("serve logs a member failing under it, and at the stop says the array is degraded, not that all is clean")
    func serveLogsMemberFailure() throws {
        let folder = TemporaryFolder("cli-serve-fail")
        defer { folder.remove() }
        let members = [folder.file("m0.img"), folder.file("m1.img")]
        #expect(try spindle(["array", "create", "r1", "--level", "1", "--size", "8M"] + members).status == 0)
        let source = folder.file("source.bin")
        try Data(repeating: 0x5A, count: 4 << 20).write(to: URL(fileURLWithPath: source))
        // Member bytes 2M-3M hold array bytes 1M-2M: the copy's writes there fail m1.
        let server = try ServeProcess(
            ["array:r1", "--socket", folder.file("s.sock"), "--fault", "\(members[1]):write-error,range=2M-3M"],
            directory: folder.path)
        let uri = try #require(server.uri("nbd+unix:///r1"))
        let copy = try tool(["nbdcopy", source, uri])
        #expect(copy.status == 0, "the mirror survives one member: \(copy.errors)")
        Thread.sleep(forTimeInterval: 0.6)
        let stopped = server.stop()
        #expect(
            stopped.errors.contains("spindle serve: member \(members[1]) in slot 1 failed; array r1 is degraded"),
            "\(stopped.errors)")
        #expect(stopped.output.contains("array r1 is degraded: slot 1 faulty (\(members[1]))"), "\(stopped.output)")
        #expect(!stopped.output.contains("stopped cleanly"), "\(stopped.output)")
        let status = try spindle(["array", "status", "--json"] + members)
        #expect(
            (try JSONSerialization.jsonObject(with: Data(status.output.utf8)) as! [String: Any])["state"] as? String
                == "degraded")
    }
}
