// The library in a few lines: an I/O engine, an image file, one block written, flushed and read back.
import ExampleSupport
import Spindle

await runExample("quick-start") { folder in
    let engine = try IOEngine()  // one ring, one reactor thread, many devices
    let disk = try FileDevice.create(path: "\(folder)/disk.img", sizeBytes: 1 << 30, engine: engine)
    let block = AlignedBuffer(count: 4096)  // aligned for O_DIRECT
    block.fill(0xAB)
    let readBack = AlignedBuffer(count: 4096)

    try await engine.run {  // run on the reactor: I/O is batched, no hand-off
        try await disk.write(from: block, at: 8192)
        try await disk.flush()  // durable now (the flush contract)
        try await disk.read(into: readBack, at: 8192)
    }
    try expect(readBack.equals(block), "the block read back differs from the one written")
    try await disk.close()
    engine.shutdown()

    // The data is in the file: open it again and read the block from there.
    let reopened = try FileDevice.open(path: "\(folder)/disk.img", options: .init(readOnly: true))
    readBack.fill(0)
    try await reopened.read(into: readBack, at: 8192)
    try expect(readBack.equals(block), "the image reopened holds other bytes at 8192")
    try await reopened.close()
}
