// A mirror whose legs check a CRC32C per 4 KiB block: a block rotted on one leg (no error from the
// disk) is never served; the array rebuilds it from the other leg, and a scrub with repair leaves
// both legs right (md would copy the first leg over the second, rot and all).
import ExampleSupport
import Glibc
import Spindle

await runExample("silent-corruption") { folder in
    let engine = try IOEngine()
    let data = AlignedBuffer(count: 1 << 20)
    data.fillPattern(seed: 8)
    let readBack = AlignedBuffer(count: 1 << 20)

    let legs = try (0..<2).map {
        try FileDevice.create(path: "\(folder)/leg\($0).img", sizeBytes: 32 << 20, engine: engine)
    }
    let mirror = try await RAIDArray.create(name: "safe", level: .raid1, members: legs, integrity: true)
    try await mirror.write(from: data, at: 0)
    try await mirror.close()  // flushed, clean; closes the legs

    // Bit rot on leg 0, behind every layer's back: one byte of the first block of data, flipped.
    let rotAt = try await IntegrityDevice.open(try FileDevice.open(path: "\(folder)/leg0.img", engine: engine))
    let position = off_t(rotAt.superblock.dataOffset + RAIDArray.dataOffset + 100)
    try await rotAt.close()
    let descriptor = open("\(folder)/leg0.img", O_RDWR)
    var byte: UInt8 = 0
    _ = pread(descriptor, &byte, 1, position)
    byte ^= 0x10
    _ = pwrite(descriptor, &byte, 1, position)
    close(descriptor)

    let report = try await RAIDArray.assemble(
        members: try (0..<2).map { try FileDevice.open(path: "\(folder)/leg\($0).img", engine: engine) })
    let array = report.array
    try await array.read(into: readBack, at: 0)  // whichever leg answers, the data is right
    try expect(readBack.equals(data), "the mirror returned rotted data")
    let scrub = try await array.scrub(repair: true)
    print(scrub.integrity.map { "\($0.member): \($0.corruptBlocksFound) bad blocks found" })
    try expect(scrub.mismatches == 0, "the legs disagree where the checksums say which is right")
    let leg0 = array.status.slots[0].integrity!
    try expect(leg0.corruptBlocksFound == leg0.corruptBlocksRewritten, "a bad block was left unrepaired")
    try expect(leg0.corruptBlocksFound == 1, "one rotted block, found \(leg0.corruptBlocksFound)")
    // Leg 1 alone now serves the data, and so does leg 0 alone.
    try await array.fail(memberNamed: "\(folder)/leg1.img")
    try await array.read(into: readBack, at: 0)
    try expect(readBack.equals(data), "leg 0 still holds bad data after the repair")
    try await array.close()
    engine.shutdown()
}
