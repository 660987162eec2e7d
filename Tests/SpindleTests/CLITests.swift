import Foundation
import Testing
@testable import Spindle

/// Runs the built `spindle` binary.
func spindle(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
    try runProcess(spindleBinary(), arguments)
}

/// Runs a program to its end; returns (status, output, errors).
func runProcess(_ executable: URL, _ arguments: [String], directory: String? = nil) throws -> (status: Int32, output: String, errors: String) {
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
    return (process.terminationStatus, String(decoding: outputData, as: UTF8.self), String(decoding: errorData, as: UTF8.self))
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
        #expect(again.errors == "spindle: error: create on \(path) failed: the file exists already; remove it or choose another path\n")
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
        let created = try spindle(["array", "create", "story", "--level", "5", "--chunk", "16K", "--size", "8M"] + members)
        #expect(created.status == 0, "\(created.errors)")
        #expect(created.output.contains("created array story: raid5, 3 members, 16 KiB chunks"))
        let filled = try spindle(["bench", "--array"] + members + ["--rw", "read", "--fill", "--verify", "--ops", "500", "--seed", "3"])
        #expect(filled.status == 0, "\(filled.errors)")
        let failed = try spindle(["array", "fail", "--member", members[1]] + members)
        #expect(failed.output.contains("is degraded"), "\(failed.errors)")
        let status = try spindle(["array", "status", "--json"] + members)
        let decoded = try JSONSerialization.jsonObject(with: Data(status.output.utf8)) as! [String: Any]
        #expect(decoded["state"] as? String == "degraded")
        let degradedRead = try spindle(["bench", "--array", members[0], members[2], "--verify-existing", "--seed", "3"])
        #expect(degradedRead.status == 0, "\(degradedRead.errors)")
        #expect(degradedRead.output.contains("blocks checked, all correct"))
        let replaced = try spindle(["array", "replace", "--scan", folder.path, "--old", members[1], "--new", folder.file("m3.img")])
        #expect(replaced.status == 0, "\(replaced.errors)")
        #expect(replaced.output.contains("rebuilt"))
        let scrub = try spindle(["array", "scrub", "--json", "--scan", folder.path])
        let report = try JSONSerialization.jsonObject(with: Data(scrub.output.utf8)) as! [String: Any]
        #expect(report["mismatches"] as? Int == 0, "\(scrub.errors)")
        let final = try spindle(["bench", "--array", members[0], folder.file("m3.img"), members[2], "--verify-existing", "--seed", "3"])
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
            state = (try? JSONSerialization.jsonObject(with: Data(polled.output.utf8)) as? [String: Any])?["state"] as? String ?? ""
            if state == "clean" { break }
            Thread.sleep(forTimeInterval: 0.1)
        }
        #expect(state == "clean")
        // The rebuild process may still be closing; wait for its locks to go before going on.
        for _ in 0..<100 where FileDevice.writeLockHolder(path: withNew[0]) != nil { Thread.sleep(forTimeInterval: 0.1) }
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
        let result = try spindle(["bench", path, "--size", "4M", "--rw", "randrw", "--bs", "4K", "--iodepth", "4",
                                  "--ops", "2000", "--verify", "--json"])
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
