import Foundation
import Testing

@testable import Spindle

@Suite("Delta files", .serialized)
struct DeltaTests {
    @Test(
        "a chain of deltas over 5 snapshots with writes, discards and resizes restores every snapshot byte for byte in another pool, each restored volume holding a copy its next delta applies onto"
    )
    func chain() async throws {
        let folder = TemporaryFolder("delta")
        defer { folder.remove() }
        let engine = try IOEngine()
        let source = try await ThinPool.create(
            name: "src", devices: [try MemoryDevice(capacityBytes: 128 << 20, logicalBlockBytes: 4096)])
        let target = try await ThinPool.create(
            name: "dst", devices: [try MemoryDevice(capacityBytes: 128 << 20, logicalBlockBytes: 4096)])
        var size: UInt64 = 12 << 20
        var volume = try await source.createVolume(name: "v", sizeBytes: size)
        var tokens: [UInt64: Int] = [:]
        var counter = 0
        var random = SeededRandom(seed: 44)
        for step in 1...5 {
            try await IncrementalBackupTests.churn(
                volume, size: size, tokens: &tokens, counter: &counter, random: &random, operations: 20)
            if step == 3 || step == 4 {
                size = step == 3 ? 20 << 20 : 9 << 20
                try await volume.close()
                try await source.resizeVolume(name: "v", sizeBytes: size)
                volume = try await source.openVolume(name: "v")
            }
            try await source.snapshot(volume: "v", name: "s\(step)", readOnly: true)
            if step == 1 {
                let full = folder.file("full.raw")
                _ = try await source.exportVolume("s1", toImageAt: full, engine: engine)
                _ = try await target.importImage(at: full, into: "r1", readOnly: true, engine: engine)
            } else {
                let file = folder.file("d\(step).delta")
                let written = try await source.exportDelta(
                    of: "s\(step)", since: "s\(step - 1)", toFileAt: file, engine: engine)
                let difference = try await source.difference(from: "s\(step - 1)", to: "s\(step)")
                #expect(written.totalBytes == difference.changedBytes, "the delta holds what changed")
                _ = try await target.importDelta(at: file, into: "r\(step)", base: "r\(step - 1)", engine: engine)
            }
            let original = try await source.openVolume(name: "s\(step)")
            let restored = try await target.openVolume(name: "r\(step)")
            #expect(restored.capacityBytes == original.capacityBytes && restored.isReadOnly)
            #expect(byteDifference(try await readAll(restored), try await readAll(original)) == nil, "step \(step)")
            try await original.close()
            try await restored.close()
            let holds = try #require(try await target.contentIdentity(of: "r\(step)"))
            #expect(holds.sameVolume(as: try await source.identity(of: "s\(step)")))
        }

        // Refusals: a delta onto a copy of anything but its base, a writable base, a name in use, a
        // damaged delta; none leaves a volume behind.
        let before = try await target.volumes().map(\.name)
        expectError(
            await spindleError {
                _ = try await target.importDelta(at: folder.file("d3.delta"), into: "x", base: "r1", engine: engine)
            }, .invalidArgument, ["the delta applies onto a copy of src/s2", "dst/r1 holds a copy of"])
        expectError(
            await spindleError {
                _ = try await target.importDelta(at: folder.file("d2.delta"), into: "r3", base: "r1", engine: engine)
            }, .alreadyExists, ["r3"])
        var damaged = try [UInt8](Data(contentsOf: URL(fileURLWithPath: folder.file("d2.delta"))))
        damaged[damaged.count - 1] ^= 0x40
        try Data(damaged).write(to: URL(fileURLWithPath: folder.file("damaged.delta")))
        expectError(
            await spindleError {
                _ = try await target.importDelta(
                    at: folder.file("damaged.delta"), into: "x", base: "r1", engine: engine)
            }, .corrupted, ["checksum mismatch"])
        try await target.setReadOnly(name: "r1", false)
        expectError(
            await spindleError {
                _ = try await target.importDelta(at: folder.file("d2.delta"), into: "x", base: "r1", engine: engine)
            }, .invalidArgument, ["dst/r1 is writable"])
        // Made read-only again, it is no longer a copy of s1: it may have been written meanwhile.
        try await target.setReadOnly(name: "r1", true)
        expectError(
            await spindleError {
                _ = try await target.importDelta(at: folder.file("d2.delta"), into: "x", base: "r1", engine: engine)
            }, .invalidArgument, ["dst/r1 holds a copy of dst/r1"])
        expectError(
            await spindleError {
                _ = try await source.exportDelta(of: "s2", since: "v", toFileAt: folder.file("w.delta"), engine: engine)
            }, .invalidArgument, ["src/v is writable"])
        #expect(try await target.volumes().map(\.name) == before, "refusals leave no volume behind")
        #expect(try await target.check().isClean)
        try await volume.close()
        try await source.close()
        try await target.close()
        engine.shutdown()
    }

    @Test(
        "the CLI: export --since --delta and import --delta --base restore a snapshot in another pool, across processes; bad flag combinations are refused"
    )
    func commandLine() throws {
        let folder = TemporaryFolder("delta-cli")
        defer { folder.remove() }
        func run(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
            try spindle(arguments + ["--dir", folder.path])
        }
        #expect(try run(["pool", "create", "tank", folder.file("tank.img"), "--size", "96M"]).status == 0)
        #expect(try run(["pool", "create", "spare", folder.file("spare.img"), "--size", "96M"]).status == 0)
        var random = SeededRandom(seed: 3)
        func image(_ name: String, blocks: Int) throws -> String {
            var bytes = [UInt8](repeating: 0, count: 8 << 20)
            for _ in 0..<blocks {
                let start = Int(random.below(UInt64(bytes.count / 4096))) * 4096
                for index in start..<(start + 4096) { bytes[index] = UInt8(truncatingIfNeeded: random.next() | 1) }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: folder.file(name)))
            return folder.file(name)
        }
        #expect(try run(["volume", "import", "tank/vm", try image("a.raw", blocks: 200)]).status == 0)
        #expect(try run(["volume", "snapshot", "tank/vm", "s1", "--read-only"]).status == 0)
        #expect(try run(["volume", "import", "tank/vm", try image("b.raw", blocks: 30)]).status == 0)
        #expect(try run(["volume", "snapshot", "tank/vm", "s2", "--read-only"]).status == 0)
        #expect(try run(["volume", "export", "tank/s1", folder.file("s1.raw")]).status == 0)
        let imported = try run(["volume", "import", "spare/r1", folder.file("s1.raw"), "--read-only"])
        #expect(imported.status == 0 && imported.output.contains("read-only"), "\(imported.errors)")
        let exported = try run([
            "volume", "export", "tank/s2", folder.file("s2.delta"), "--since", "tank/s1", "--delta",
        ])
        #expect(exported.status == 0 && exported.output.contains("to delta"), "\(exported.errors)")
        let applied = try run([
            "volume", "import", "spare/r2", folder.file("s2.delta"), "--delta", "--base", "spare/r1",
        ])
        #expect(applied.status == 0 && applied.output.contains("as read-only spare/r2"), "\(applied.errors)")
        #expect(try run(["volume", "export", "spare/r2", folder.file("r2.raw")]).status == 0)
        #expect(try run(["volume", "export", "tank/s2", folder.file("s2.raw")]).status == 0)
        #expect(try tool(["cmp", folder.file("r2.raw"), folder.file("s2.raw")]).status == 0)
        // A copy of r2 takes s2's identity: a delta since s2 applies onto a restore of that copy.
        #expect(try run(["pool", "check", "spare"]).status == 0)

        for (arguments, message) in [
            (["volume", "import", "spare/x", folder.file("s2.delta"), "--delta"], "--delta needs --base"),
            (["volume", "import", "spare/x", folder.file("s2.raw"), "--base", "spare/r1"], "--base goes with --delta"),
            (["volume", "export", "tank/s2", folder.file("x.delta"), "--delta"], "--delta needs --since"),
        ] {
            let refused = try run(arguments)
            #expect(refused.status == 2 && refused.errors.contains(message), "\(arguments): \(refused.errors)")
        }
        let wrongBase = try run([
            "volume", "import", "spare/x", folder.file("s2.delta"), "--delta", "--base", "spare/r2",
        ])
        #expect(
            wrongBase.status != 0 && wrongBase.errors.contains("applies onto a copy of tank/s1"), "\(wrongBase.errors)")
    }
}
