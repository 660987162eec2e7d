// A RAID5 array over image files: data written, a member failed, a replacement rebuilt while the
// array serves, a scrub, and the array assembled again from its images alone, in any order.
import ExampleSupport
import Spindle

await runExample("raid-rebuild") { folder in
    let engine = try IOEngine()
    let data = AlignedBuffer(count: 1 << 20)  // 1 MiB: a few whole stripes
    data.fillPattern(seed: 5)
    let readBack = AlignedBuffer(count: 1 << 20)

    let members = try (0..<4).map {
        try FileDevice.create(path: "\(folder)/m\($0).img", sizeBytes: 64 << 20, engine: engine)
    }
    let array = try await RAIDArray.create(name: "data", level: .raid5, members: members)  // 64 KiB chunks
    try await array.write(from: data, at: 0)
    try await array.fail(memberNamed: "\(folder)/m1.img")  // keeps serving every byte from parity
    try await array.read(into: readBack, at: 0)
    try expect(readBack.equals(data), "the degraded array read back other data")

    let spare = try FileDevice.create(path: "\(folder)/m4.img", sizeBytes: 64 << 20, engine: engine)
    try await array.replace(memberNamed: "\(folder)/m1.img", with: spare)
    try await array.rebuild { progress in print("rebuilt \(progress.doneBytes) of \(progress.totalBytes) bytes") }
    let scrub = try await array.scrub()
    try expect(scrub.mismatches == 0, "scrub found \(scrub.mismatches) mismatches after the rebuild")
    try await array.close()  // clean: no resync next time; closes the members

    // Later, from the member images alone, in any order:
    let paths = ["m3.img", "m0.img", "m4.img", "m2.img"].map { "\(folder)/\($0)" }
    let assembled = try await RAIDArray.assemble(
        members: try paths.map { try FileDevice.open(path: $0, engine: engine) })
    print(assembled.notes)  // members left out and why, resyncs done
    try expect(assembled.resyncedBytes == 0, "a cleanly closed array was resynced")
    try await assembled.array.read(into: readBack, at: 0)
    try expect(readBack.equals(data), "the assembled array read back other data")

    // The rebuilt member holds the right data: with another member failed, reads need it.
    try await assembled.array.fail(memberNamed: "\(folder)/m0.img")
    readBack.fill(0)
    try await assembled.array.read(into: readBack, at: 0)
    try expect(readBack.equals(data), "the data read through the rebuilt member differs")
    try await assembled.array.close()
    engine.shutdown()
}
