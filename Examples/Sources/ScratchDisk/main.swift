// A tool an embedder would write: "give me a 20 GiB scratch disk for a VM from the pool in this
// folder, snapshot it, serve it over NBD, tear it down". The VM is played by a small NBD client
// (NBDClient.swift) that checks what it reads; a real tool starts qemu with
// `-drive file=nbd+unix:///vm7-scratch?socket=PATH,format=raw` instead.
import ExampleSupport
import Spindle

await runExample("scratch-disk") { folder in
    let engine = try IOEngine()
    let scratch = try await ScratchPool.openOrCreate(folder: folder, engine: engine)
    let disk = try await scratch.makeDisk(name: "vm7-scratch", sizeBytes: 20 << 30)

    // A base system on the disk, written through the library: 1 MiB at the start, 64 KiB at the end.
    let base = AlignedBuffer(count: 1 << 20)
    base.fillPattern(seed: 11)
    let tail = AlignedBuffer(count: 64 << 10)
    tail.fillPattern(seed: 12)
    try await disk.write(from: base, at: 0)
    try await disk.write(from: tail, at: disk.capacityBytes - UInt64(tail.count))
    try await disk.flush()
    let snapshot = try await scratch.snapshot(disk: "vm7-scratch", name: "vm7-base")

    let socketPath = "\(folder)/nbd.sock"
    let server = try scratch.serve([disk, snapshot], socketPath: socketPath, engine: engine)

    // The VM: reads the base system, writes over its first 64 KiB, flushes. The snapshot keeps the base.
    let baseBytes = base.array
    let tailBytes = tail.array
    var update = [UInt8](repeating: 0, count: 64 << 10)
    for index in update.indices { update[index] = UInt8(truncatingIfNeeded: index * 7 + 3) }
    let written = update
    try await onOwnThread {
        let vm = try NBDClient(socketPath: socketPath, export: "vm7-scratch")
        try expect(vm.sizeBytes == 20 << 30 && !vm.isReadOnly, "served: \(vm.sizeBytes) bytes, flags \(vm.flags)")
        try expect(try vm.read(offset: 0, length: baseBytes.count) == baseBytes, "the VM reads another base system")
        try expect(
            try vm.read(offset: vm.sizeBytes - UInt64(tailBytes.count), length: tailBytes.count) == tailBytes,
            "the VM reads other data at the end of the disk")
        try expect(
            try vm.read(offset: 10 << 30, length: 4096).allSatisfy { $0 == 0 },
            "an unwritten block does not read as zeros")
        try vm.write(written, offset: 0)
        try vm.flush()
        try expect(try vm.read(offset: 0, length: written.count) == written, "the VM reads back other data")
        try vm.disconnect()

        let backup = try NBDClient(socketPath: socketPath, export: "vm7-base")
        try expect(backup.isReadOnly, "the snapshot is served writable")
        try expect(try backup.read(offset: 0, length: baseBytes.count) == baseBytes, "the snapshot lost the base")
        try expect((try? backup.write(written, offset: 0)) == nil, "the read-only snapshot took a write")
        try backup.disconnect()
    }
    await server.stop()  // finishes the requests read, flushes the exports

    // The library sees what the VM wrote; the pool holds only what was written.
    let readBack = AlignedBuffer(count: written.count)
    try await disk.read(into: readBack, at: 0)
    try expect(readBack.array == written, "the disk holds other data than the VM wrote")
    // The base, and the copy of the chunk the VM changed.
    let expected = UInt64(base.count + tail.count) / (await scratch.pool.usage.chunkBytes) + 1
    let used = await scratch.pool.usage.usedChunks
    try expect(used == expected, "the pool uses \(used) chunks for the disk and its snapshot, not \(expected)")

    // Tear down: the disks go, their space returns to the pool, the pool's metadata checks clean.
    try await snapshot.close()
    try await disk.close()
    try await scratch.remove(["vm7-base", "vm7-scratch"])
    let afterwards = await scratch.pool.usage.usedChunks
    try expect(afterwards == 0, "the pool still uses \(afterwards) chunks after the disks are deleted")
    try expect(try await scratch.pool.check().isClean, "pool check found problems")
    try await scratch.close()
    engine.shutdown()
}
