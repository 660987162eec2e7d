// A thin pool on a RAID5 array: a volume that allocates on first write, a read-only snapshot that
// keeps the old data while the volume changes, usage, resize, delete, a metadata check, and the
// pool opened again from the array's member images.
import ExampleSupport
import Spindle

await runExample("thin-snapshots") { folder in
    let engine = try IOEngine()
    let block = AlignedBuffer(count: 64 << 10)
    block.fillPattern(seed: 1)
    let before = AlignedBuffer(count: block.count)
    before.copy(from: block)
    let readBack = AlignedBuffer(count: block.count)

    let members = try (0..<3).map {
        try FileDevice.create(path: "\(folder)/m\($0).img", sizeBytes: 128 << 20, engine: engine)
    }
    let array = try await RAIDArray.create(name: "data", level: .raid5, members: members)

    // A pool takes a device that holds nothing (the new array); one that holds data is refused
    // unless `overwrite: true` says to destroy it.
    let pool = try await ThinPool.create(name: "tank", devices: [array])  // 64 KiB chunks
    let volume = try await pool.createVolume(name: "vm1", sizeBytes: 100 << 30)  // over-provisioning allowed
    try await volume.write(from: block, at: 1 << 20)  // allocates a chunk on first write
    try await volume.flush()  // data flushed, then the metadata committed
    try await pool.snapshot(volume: "vm1", name: "before-upgrade", readOnly: true)  // no copying
    block.fillPattern(seed: 2)
    try await volume.write(from: block, at: 1 << 20)  // copies that one chunk; the snapshot keeps the old data
    print(try await pool.volumeUsage())  // exclusive and shared chunks per volume

    let snapshot = try await pool.openVolume(name: "before-upgrade")
    try await snapshot.read(into: readBack, at: 1 << 20)
    try expect(readBack.equals(before), "the snapshot does not hold the data it was taken with")
    try await volume.read(into: readBack, at: 1 << 20)
    try expect(readBack.equals(block), "vm1 does not hold its new data")
    let usage = try await pool.volumeUsage()
    try expect(usage.map(\.exclusiveChunks) == [1, 1], "each side should own one chunk: \(usage)")
    try await snapshot.close()
    try await volume.close()

    try await pool.resizeVolume(name: "vm1", sizeBytes: 200 << 30)
    try await pool.deleteVolume(name: "before-upgrade")  // any order; shared chunks stay with vm1
    print(try await pool.check().problems)  // [] when the metadata is consistent
    try expect(try await pool.check().isClean, "pool check found problems")
    try await pool.close()  // commits, then closes the array: the pool owns its devices

    // Later: the array from its images, then the pool from its devices (their labels say which is which).
    let assembled = try await RAIDArray.assemble(
        members: try (0..<3).map { try FileDevice.open(path: "\(folder)/m\($0).img", engine: engine) })
    let reopened = try await ThinPool.open(devices: [assembled.array])
    let volumes = try await reopened.volumes()
    try expect(volumes.map(\.name) == ["vm1"] && volumes[0].sizeBytes == 200 << 30, "after reopening: \(volumes)")
    let vm1 = try await reopened.openVolume(name: "vm1")
    try await vm1.read(into: readBack, at: 1 << 20)
    try expect(readBack.equals(block), "vm1 lost its data across the reopen")
    try await vm1.read(into: readBack, at: 0)
    try expect(readBack.array.allSatisfy { $0 == 0 }, "an unwritten range of vm1 does not read as zeros")
    try await vm1.close()
    try await reopened.close()  // and the assembled array under it
    engine.shutdown()
}
