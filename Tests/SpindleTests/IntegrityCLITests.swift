import Foundation
import Testing

@testable import Spindle

/// Flips one byte in the first 4 KiB block of `image` that holds `block` (the data is stored as
/// is under the integrity layer, so it can be found); returns whether one was found.
private func rot(_ block: [UInt8], in image: String) throws -> Bool {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: image))
    defer { try? handle.close() }
    let bytes = [UInt8](try handle.readToEnd() ?? Data())
    for offset in stride(from: 0, to: bytes.count - 4096, by: 4096) where bytes[offset] == block[0] {
        guard Array(bytes[offset..<(offset + 4096)]) == block else { continue }
        try handle.seek(toOffset: UInt64(offset + 100))
        try handle.write(contentsOf: Data([bytes[offset + 100] ^ 0x40]))
        return true
    }
    return false
}

@Suite("spindle integrity commands", .serialized)
struct IntegrityCLITests {
    @Test("array create --integrity, a pool on it, rot on a member: export is exact, scrub reports and repairs it")
    func arrayStory() throws {
        let folder = TemporaryFolder("cli-integrity")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        func run(_ arguments: [String]) throws -> String {
            let result = try spindle(arguments)
            #expect(result.status == 0, "spindle \(arguments.joined(separator: " ")): \(result.errors)")
            return result.output
        }
        let members = (0..<4).map { folder.file("m\($0).img") }
        let created = try run(["array", "create", "r5"] + members + ["--level", "5", "--size", "24M", "--integrity"])
        #expect(created.contains("with checksums on every member"), "\(created)")
        #expect(try run(["array", "status"] + members).contains("integrity: every member checks"))
        let info = try run(["image", "info", members[1]])
        #expect(info.contains("member of array 'r5'") && info.contains("integrity:"), "\(info)")
        _ = try run(["pool", "create", "tank", "array:r5"] + dir)
        _ = try run(["volume", "create", "tank/data", "--size", "8M"] + dir)
        let source = folder.file("source.bin")
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        var random = SeededRandom(seed: 5)
        for index in 0..<(4 << 20) { bytes[index] = UInt8(truncatingIfNeeded: random.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        _ = try run(["volume", "import", "tank/data", source] + dir)
        // Rot three blocks of the volume's data where they lie on the members.
        var rotted = 0
        for (index, block) in [0, 300, 700].enumerated() {
            let data = Array(bytes[(block * 4096)..<((block + 1) * 4096)])
            if try members.contains(where: { try rot(data, in: $0) }) {
                rotted += 1
            } else {
                Issue.record("block \(index) not found")
            }
        }
        #expect(rotted == 3)
        let exported = folder.file("out.bin")
        _ = try run(["volume", "export", "tank/data", exported] + dir)
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: exported))) == bytes)
        let scrub = try run(["array", "scrub"] + members)
        #expect(scrub.contains("0 mismatched stripes"), "\(scrub)")
        #expect(scrub.contains("blocks failed their checksums"), "\(scrub)")
        let json = try spindle(["array", "scrub", "--json"] + members)
        #expect(json.status == 0)
        let report = try JSONDecoder().decode(RAIDArray.ScrubReport.self, from: Data(json.output.utf8))
        #expect(report.integrity.count == 4 && report.integrity.allSatisfy { $0.corruptBlocksFound == 0 })
    }

    @Test("pool create --integrity on one image: rot in a volume's data is reported, never returned")
    func standalonePool() throws {
        let folder = TemporaryFolder("cli-integrity-pool")
        defer { folder.remove() }
        let dir = ["--dir", folder.path]
        let image = folder.file("solo.img")
        let create = try spindle(["pool", "create", "solo", image, "--size", "48M", "--integrity"] + dir)
        #expect(create.status == 0, "\(create.errors)")
        #expect(try spindle(["volume", "create", "solo/v", "--size", "4M"] + dir).status == 0)
        let source = folder.file("source.bin")
        var bytes = [UInt8](repeating: 0, count: 4 << 20)
        var random = SeededRandom(seed: 6)
        for index in 0..<bytes.count { bytes[index] = UInt8(truncatingIfNeeded: random.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        #expect(try spindle(["volume", "import", "solo/v", source] + dir).status == 0)
        #expect(try rot(Array(bytes[(200 * 4096)..<(201 * 4096)]), in: image))
        let export = try spindle(["volume", "export", "solo/v", folder.file("out.bin")] + dir)
        #expect(export.status != 0)
        #expect(export.errors.contains("do not match their checksums"), "\(export.errors)")
        #expect(export.errors.contains("solo.img"), "\(export.errors)")
        let misuse = try spindle(["pool", "create", "other", "array:none", "--integrity"] + dir)
        #expect(misuse.status != 0 && misuse.errors.contains("array create --integrity"), "\(misuse.errors)")
    }
}
