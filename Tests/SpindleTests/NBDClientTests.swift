import Foundation
import Testing

@testable import Spindle

/// `spindle serve` in another process, stopped with SIGTERM.
final class ServeProcess {
    let process = Process()
    private let output = Pipe()
    private let errors = Pipe()
    private(set) var lines: [String] = []

    /// Starts the server and waits until it prints that it is serving.
    init(_ arguments: [String], directory: String) throws {
        process.executableURL = spindleBinary()
        process.arguments = ["serve"] + arguments + ["--dir", directory]
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        var text = ""
        let deadline = Date().addingTimeInterval(30)
        while !text.contains("serving;") {
            let data = output.fileHandleForReading.availableData
            if data.isEmpty {
                guard process.isRunning, Date() < deadline else {
                    let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                    throw SpindleError(.ioFailed, "spindle serve did not start: \(text) \(message)")
                }
                continue
            }
            text += String(decoding: data, as: UTF8.self)
        }
        lines = text.split(separator: "\n").map(String.init)
    }

    /// The printed URI that starts with `prefix`.
    func uri(_ prefix: String) -> String? {
        lines.first { $0.hasPrefix(prefix) }.map { String($0.split(separator: " ")[0]) }
    }

    /// Sends SIGTERM and waits; returns (status, rest of standard output, standard error).
    func stop() -> (status: Int32, output: String, errors: String) {
        process.terminate()
        let rest = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let log = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, rest, log)
    }
}

/// Runs a program from PATH; returns (status, output, errors).
@discardableResult
func tool(_ arguments: [String], directory: String? = nil) throws -> (status: Int32, output: String, errors: String) {
    try runProcess(URL(fileURLWithPath: "/usr/bin/env"), arguments, directory: directory)
}

@Suite("NBD with real clients (nbdinfo, nbdcopy, qemu-img, fio, nbdfuse with ext4)", .serialized)
struct NBDClientTests {
    @Test("nbdinfo lists the exports; nbdcopy and qemu-img copy in and out byte for byte; stop is clean")
    func copyInAndOut() throws {
        let folder = TemporaryFolder("nbd-clients")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        #expect(try spindle(["pool", "create", "tank", folder.file("pool.img"), "--size", "256M"] + dir).status == 0)
        #expect(try spindle(["volume", "create", "tank/vol", "--size", "64M"] + dir).status == 0)
        #expect(try spindle(["image", "create", folder.file("plain.img"), "--size", "32M"]).status == 0)
        let source = folder.file("source.bin")
        var random = SeededRandom(seed: 77)
        var bytes = [UInt8](repeating: 0, count: 64 << 20)
        for index in stride(from: 0, to: bytes.count, by: 8) where (index >> 20) % 3 != 1 {
            withUnsafeBytes(of: random.next()) { bytes.replaceSubrange(index..<(index + 8), with: $0) }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: source))

        let server = try ServeProcess(
            ["volume:tank/vol", "image:\(folder.file("plain.img"))", "--socket", folder.file("s.sock")],
            directory: folder.path)
        let volumeURI = try #require(server.uri("nbd+unix:///tank/vol"))
        let imageURI = try #require(server.uri("nbd+unix:///plain.img"))

        let list = try tool(["nbdinfo", "--list", "--json", volumeURI])
        #expect(list.status == 0, "\(list.errors)")
        #expect(
            list.output.contains("\"export-name\": \"tank/vol\"")
                && list.output.contains("\"export-name\": \"plain.img\""), "\(list.output)")
        #expect(list.output.contains("\"export-size\": 67108864") && list.output.contains("\"export-size\": 33554432"))
        let size = try tool(["nbdinfo", "--size", volumeURI])
        #expect(size.output.trimmingCharacters(in: .whitespacesAndNewlines) == "67108864")

        #expect(try tool(["nbdcopy", source, volumeURI]).status == 0)
        let back = folder.file("back.bin")
        let copied = try tool(["nbdcopy", volumeURI, back])
        #expect(copied.status == 0, "\(copied.errors)")
        #expect(try tool(["cmp", source, back]).status == 0, "nbdcopy round trip is byte-identical")

        let part = folder.file("part.bin")
        try Data(bytes[0..<(32 << 20)]).write(to: URL(fileURLWithPath: part))
        let convert = try tool(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", part, imageURI])
        #expect(convert.status == 0, "\(convert.errors)")
        let compare = try tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", part, imageURI])
        #expect(compare.status == 0, "\(compare.output) \(compare.errors)")

        let stopped = server.stop()
        #expect(stopped.status == 0, "\(stopped.errors)")
        #expect(stopped.output.contains("SIGTERM: stopping") && stopped.output.contains("stopped cleanly"))
        #expect(try spindle(["pool", "check", "tank"] + dir).status == 0)
    }

    @Test("fio verifies crc32c through NBD on a thin volume over RAID5 while a member vanishes part-way")
    func fioThroughDegradation() throws {
        let folder = TemporaryFolder("nbd-fio")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        let members = (0..<4).map { folder.file("m\($0).img") }
        #expect(try spindle(["array", "create", "r5", "--level", "5", "--size", "64M"] + members).status == 0)
        #expect(try spindle(["pool", "create", "tank", "array:r5"] + dir).status == 0)
        #expect(try spindle(["volume", "create", "tank/db", "--size", "96M"] + dir).status == 0)
        let server = try ServeProcess(
            ["volume:tank/db", "--socket", folder.file("s.sock"), "--fault", "\(members[2]):vanish-after=3000"],
            directory: folder.path)
        let uri = try #require(server.uri("nbd+unix:///tank/db"))
        let fio = try tool(
            [
                "fio", "--name=verify", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                "--size=48M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json",
            ],
            directory: folder.path)  // fio leaves a verify state file in its folder
        #expect(fio.status == 0, "\(fio.errors)")
        let stopped = server.stop()
        #expect(stopped.status == 0)
        let status = try spindle(["array", "status", "--json"] + members)
        #expect(status.output.contains("\"state\" : \"degraded\""), "the vanished member was failed: \(status.output)")
        #expect(try spindle(["pool", "check", "tank"] + dir).status == 0)
    }

    @Test(
        "a real file system: nbdfuse exposes the export, mkfs.ext4 and fuse2fs write files, the server restarts, e2fsck is clean"
    )
    func ext4OverFuse() throws {
        let folder = TemporaryFolder("nbd-ext4")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        #expect(try spindle(["pool", "create", "tank", folder.file("pool.img"), "--size", "256M"] + dir).status == 0)
        #expect(try spindle(["volume", "create", "tank/fs", "--size", "128M"] + dir).status == 0)
        let socket = folder.file("s.sock")
        let mountpoint = folder.file("nbd")
        let files = folder.file("files")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: files, withIntermediateDirectories: true)

        var server = try ServeProcess(["volume:tank/fs", "--socket", socket], directory: folder.path)
        let uri = try #require(server.uri("nbd+unix:///tank/fs"))
        // nbdfuse serves the mount in the foreground until it is unmounted.
        let nbdfuse = Process()
        nbdfuse.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        nbdfuse.arguments = ["nbdfuse", mountpoint, uri]
        try nbdfuse.run()
        let device = mountpoint + "/nbd"
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: device) && Date() < deadline { usleep(100_000) }
        try #require(FileManager.default.fileExists(atPath: device), "nbdfuse exposed the export as \(device)")

        let mkfs = try tool(["mkfs.ext4", "-F", "-q", device])
        #expect(mkfs.status == 0, "\(mkfs.errors)")
        let fuse2fs = Process()
        fuse2fs.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        fuse2fs.arguments = ["fuse2fs", "-f", device, files, "-o", "fakeroot"]
        try fuse2fs.run()
        while (try? FileManager.default.contentsOfDirectory(atPath: files))?.contains("lost+found") != true
            && Date() < deadline
        { usleep(100_000) }
        var written: [String: Data] = [:]
        var random = SeededRandom(seed: 5)
        for index in 0..<20 {
            let data = Data((0..<(1000 + index * 7919)).map { _ in UInt8(truncatingIfNeeded: random.next()) })
            written["file\(index).bin"] = data
            try data.write(to: URL(fileURLWithPath: "\(files)/file\(index).bin"))
        }
        _ = try tool(["fusermount3", "-u", files])
        fuse2fs.waitUntilExit()
        _ = try tool(["fusermount3", "-u", mountpoint])
        nbdfuse.waitUntilExit()
        #expect(server.stop().status == 0)

        // Restart the server: the file system is intact, and holds the files.
        server = try ServeProcess(["volume:tank/fs", "--socket", socket], directory: folder.path)
        let image = folder.file("fs.img")
        #expect(try tool(["nbdcopy", uri, image]).status == 0)
        #expect(server.stop().status == 0)
        let check = try tool(["e2fsck", "-fn", image])
        #expect(check.status == 0, "e2fsck: \(check.output) \(check.errors)")
        for (name, data) in written.sorted(by: { $0.key < $1.key }) {
            let dumped = folder.file("dump-\(name)")
            #expect(try tool(["debugfs", "-R", "dump /\(name) \(dumped)", image]).status == 0)
            #expect(try Data(contentsOf: URL(fileURLWithPath: dumped)) == data, "\(name) reads back through ext4")
        }
    }
}
