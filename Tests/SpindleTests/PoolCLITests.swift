import Foundation
import Testing

@testable import Spindle

@Suite("spindle pool and volume commands", .serialized)
struct PoolCLITests {
    @Test("the whole story on a RAID5 array: pool, volumes, import, snapshot, export, resize, delete, check, extend")
    func story() throws {
        let folder = TemporaryFolder("cli-pool")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        func run(_ arguments: [String], _ comment: String = "") throws -> String {
            let result = try spindle(arguments + dir)
            #expect(result.status == 0, "spindle \(arguments.joined(separator: " ")): \(result.errors)")
            return result.output
        }
        let members = (0..<4).map { folder.file("m\($0).img") }
        _ = try spindle(["array", "create", "r5"] + members + ["--level", "5", "--size", "48M"])
        #expect(try run(["pool", "create", "tank", "array:r5"]).contains("created pool tank:"))
        #expect(try run(["pool", "list"]).contains("tank "))
        _ = try run(["volume", "create", "tank/data", "--size", "16M"])

        // A file with data and zero runs goes in sparse and comes back identical.
        let source = folder.file("source.bin")
        var bytes = [UInt8](repeating: 0, count: 16 << 20)
        var random = SeededRandom(seed: 3)
        for index in 0..<(3 << 20) { bytes[index] = UInt8(truncatingIfNeeded: random.next()) }
        for index in (9 << 20)..<(10 << 20) { bytes[index] = 0x5A }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        let imported = try run(["volume", "import", "tank/data", source])
        #expect(imported.contains("16 MiB, 4 MiB written, 12 MiB of zeros left unallocated"), "\(imported)")
        let snapshot = try run(["volume", "snapshot", "tank/data", "before", "--read-only"])
        #expect(
            snapshot.contains("created read-only snapshot tank/before of tank/data: 16 MiB, sharing 64 chunks"),
            "\(snapshot)")

        // Change the origin after the snapshot: the snapshot still exports the original.
        let other = folder.file("other.bin")
        try Data(repeating: 0xC3, count: 1 << 20).write(to: URL(fileURLWithPath: other))
        _ = try run(["volume", "import", "tank/data", other])
        let exported = folder.file("exported.bin")
        let export = try run(["volume", "export", "tank/before", exported])
        #expect(export.contains("16 MiB, 4 MiB of data, 12 MiB left as holes"), "\(export)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: exported)) == Data(bytes))
        let attributes = try FileManager.default.attributesOfItem(atPath: exported)
        #expect((attributes[.size] as? Int) == 16 << 20)

        // Status shows exclusive and shared space per volume, for people and for scripts.
        let status = try spindle(["pool", "status", "tank", "--json"] + dir)
        let decoded = try JSONSerialization.jsonObject(with: Data(status.output.utf8)) as! [String: Any]
        let volumes = decoded["volumes"] as! [[String: Any]]
        let data = volumes.first { $0["name"] as? String == "data" }!
        let before = volumes.first { $0["name"] as? String == "before" }!
        #expect(data["sharedBytes"] as? Int == 3 << 20, "the chunks the origin did not rewrite are shared: \(data)")
        #expect(before["exclusiveBytes"] as? Int == 1 << 20 && before["origin"] as? String == "data")
        #expect(try run(["pool", "status", "tank"]).contains("snapshot of data, read-only"))

        // Shrinking and deleting ask first; with --yes they go ahead.
        let refused = try spindle(["volume", "resize", "tank/data", "--size", "8M"] + dir)
        #expect(refused.status != 0 && refused.errors.contains("loses the data past 8 MiB. Add --yes"))
        _ = try run(["volume", "resize", "tank/data", "--size", "8M", "--yes"])
        _ = try run(["volume", "rename", "tank/data", "current"])
        let listing = try spindle(["volume", "list", "tank", "--json"] + dir)
        let entries = try JSONSerialization.jsonObject(with: Data(listing.output.utf8)) as! [[String: Any]]
        #expect(entries.map { $0["name"] as! String } == ["current", "before"])
        #expect(entries[0]["sizeBytes"] as? Int == 8 << 20)
        // The snapshot alone holds its first MiB, and the MiB of 0x5A past the shrunk origin's end.
        #expect(
            try run(["volume", "delete", "tank/before", "--yes"]).contains(
                "deleted volume tank/before; 2 MiB returned to the pool"))
        #expect(try run(["pool", "check", "tank"]).contains("pool tank is clean: 1 volumes"))

        // A second device makes the pool larger.
        let extended = try run(["pool", "extend", "tank", folder.file("more.img"), "--size", "32M"])
        #expect(extended.contains("extended pool tank by 31.94 MiB"), "\(extended)")
        #expect(try run(["pool", "list"]).contains("array:r5 (4 members), \(folder.file("more.img"))"))

        // Errors name what is wrong.
        let missing = try spindle(["volume", "create", "nope/x", "--size", "1M"] + dir)
        #expect(missing.errors.contains("no pool named 'nope' in the folder; it holds tank"), "\(missing.errors)")
        let badPath = try spindle(["volume", "create", "tank", "--size", "1M"] + dir)
        #expect(badPath.errors.contains("write the volume as POOL/NAME"), "\(badPath.errors)")
        let noVolume = try spindle(["volume", "snapshot", "tank/ghost", "s"] + dir)
        #expect(noVolume.errors.contains("pool tank has no volume named 'ghost'; it has current"), "\(noVolume.errors)")
    }

    @Test("a refused pool create or extend leaves no new image behind")
    func refusedCreateLeavesNothing() throws {
        let folder = TemporaryFolder("cli-pool-refused")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        let full = folder.file("rand.img")
        try Data(repeating: 0xA5, count: 4 << 20).write(to: URL(fileURLWithPath: full))
        let create = try spindle(["pool", "create", "tank", folder.file("new.img"), full, "--size", "8M"] + dir)
        #expect(create.status == 1 && create.errors.contains("holds data"), "\(create.errors)")
        #expect(
            !FileManager.default.fileExists(atPath: folder.file("new.img")), "the refused create left new.img behind")
        #expect(try spindle(["pool", "create", "tank", folder.file("pool.img"), "--size", "8M"] + dir).status == 0)
        let extend = try spindle(["pool", "extend", "tank", folder.file("more.img"), full, "--size", "8M"] + dir)
        #expect(extend.status == 1 && extend.errors.contains("holds data"), "\(extend.errors)")
        #expect(
            !FileManager.default.fileExists(atPath: folder.file("more.img")), "the refused extend left more.img behind")
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["pool.img", "rand.img"])
        #expect(try spindle(["pool", "check", "tank"] + dir).status == 0)
    }
}
