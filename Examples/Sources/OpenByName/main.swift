// Open a whole stack by name through the discovery API: "volume vm1 of pool tank in this folder".
// A first part builds the stack (a pool on a RAID5 array of three images) and closes it; the second
// finds it again knowing only the folder and the names, reads the data back, serves it over NBD on a
// Unix socket, and closes it all with one close().
import ExampleSupport
import Spindle

await runExample("open-by-name") { folder in
    let engine = try IOEngine()
    let block = AlignedBuffer(count: 4096)
    block.fillPattern(seed: 7)

    // Build: three images, a RAID5 array on them, pool tank on the array, volume vm1 in the pool.
    let members = try (0..<3).map {
        try FileDevice.create(path: "\(folder)/m\($0).img", sizeBytes: 256 << 20, engine: engine)
    }
    let array = try await RAIDArray.create(name: "a5", level: .raid5, chunkBytes: 64 << 10, members: members)
    let pool = try await ThinPool.create(name: "tank", devices: [array])
    let built = try await pool.createVolume(name: "vm1", sizeBytes: 1 << 30)
    try await built.write(from: block, at: 3 << 20)
    try await built.close()
    try await pool.close()  // commits, then closes the array and, through it, the images

    // Find: what the folder holds, typed.
    let found = try await Discovery.scan(folder: folder, engine: engine)
    try expect(
        found.arrays.map(\.name) == ["a5"] && found.arrays[0].level == .raid5, "arrays: \(found.arrays.map(\.name))")
    try expect(found.pools.map(\.name) == ["tank"], "pools: \(found.pools.map(\.name))")
    try expect(found.damaged.isEmpty, "damaged headers in a healthy folder: \(found.damaged)")

    // Open volume vm1 of pool tank: the images, the array and the pool come with it.
    let vm1 = try await found.openVolume("vm1", inPool: "tank", engine: engine)
    let readBack = AlignedBuffer(count: 4096)
    try await vm1.read(into: readBack, at: 3 << 20)
    try expect(readBack.equals(block), "vm1 read back other bytes at 3 MiB")

    // Serve it over NBD on a Unix socket (clients: qemu, nbdinfo, nbd-client), then stop.
    let server = try NBDServer(exports: [NBDServer.Export(name: "vm1", device: vm1)], engine: engine)
    _ = try server.listen(unixSocket: "\(folder)/vm1.sock")
    await server.stop()
    try await vm1.close()  // the volume, pool tank, array a5 and its three images

    // Everything was closed: the images open again for writing (no write lock left behind).
    for index in 0..<3 { try await FileDevice.open(path: "\(folder)/m\(index).img", engine: engine).close() }
    engine.shutdown()
}
