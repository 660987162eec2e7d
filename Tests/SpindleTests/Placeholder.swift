import Testing
import Glibc
@testable import Spindle

@Test func smoke() async throws {
    let engine = try IOEngine()
    let path = "/tmp/spindle-smoke-\(getpid()).img"
    unlink(path)
    let device = try FileDevice.create(path: path, sizeBytes: 1 << 20, engine: engine)
    let buffer = AlignedBuffer(count: 4096)
    buffer.fill(7)
    try await engine.run {
        try await device.write(from: buffer.readOnlyBytes, at: 8192)
        let back = AlignedBuffer(count: 4096)
        try await device.read(into: back.bytes, at: 8192)
        #expect(back.array == buffer.array)
    }
    let back = AlignedBuffer(count: 4096)
    try await device.read(into: back.bytes, at: 8192)
    #expect(back.array == buffer.array)
    print("direct", device.usesDirectIO, device.logicalBlockBytes, engine.ringFlags)
    try await device.close()
    engine.shutdown()
    unlink(path)
}
