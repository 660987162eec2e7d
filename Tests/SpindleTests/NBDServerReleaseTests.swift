import Testing

@testable import Spindle

/// What a thin pool stands on in these tests.
enum PoolBackend: String, CaseIterable, Sendable {
    case memory, raid5
}

/// A thin volume over a pool of 64 KiB chunks, on a memory device or on a 3-member RAID5 array.
private struct ThinSetup {
    let pool: ThinPool
    let volume: ThinVolume
    var chunkBytes: UInt64 { pool.chunkBytes }

    /// - Parameter poolMultiple: the volume's size as a multiple of the pool's (2: over-provisioned);
    ///   nil gives a 16 MiB volume.
    init(_ backend: PoolBackend, poolMultiple: UInt64? = nil) async throws {
        let device: any BlockDevice
        switch backend {
        case .memory:
            device = try MemoryDevice(capacityBytes: 32 << 20, logicalBlockBytes: 4096)
        case .raid5:
            let members = try (0..<3).map {
                try MemoryDevice(capacityBytes: 14 << 20, logicalBlockBytes: 4096, name: "m\($0)")
            }
            device = try await RAIDArray.create(name: "r", level: .raid5, chunkBytes: 16 << 10, members: members)
        }
        let pool = try await ThinPool.create(name: "p", devices: [device])
        let poolBytes = pool.chunkCount * pool.chunkBytes
        self.pool = pool
        volume = try await pool.createVolume(name: "v", sizeBytes: poolMultiple.map { $0 * poolBytes } ?? 16 << 20)
    }

    /// Writes random bytes to the first `bytes` of the volume, flushes, and returns the volume's model.
    func fill(_ bytes: UInt64, seed: UInt64) async throws -> [UInt8] {
        let data = AlignedBuffer(count: Int(bytes))
        fillRandom(data.bytes, seed: seed)
        try await volume.write(from: data, at: 0)
        try await volume.flush()
        return data.array + [UInt8](repeating: 0, count: Int(volume.capacityBytes - bytes))
    }

    var usedChunks: UInt64 { get async { await pool.usage.usedChunks } }
}

private let trimCommand: UInt16 = 4
private let writeZeroesCommand: UInt16 = 6

private func commandName(_ command: UInt16) -> String { command == trimCommand ? "trim" : "write-zeroes" }

extension RawNBDClient {
    /// Sends a trim or write-zeroes and returns the reply's error (nil when the server closed).
    func release(_ command: UInt16, offset: UInt64, length: UInt64, cookie: UInt64) -> UInt32? {
        request(command, offset: offset, length: UInt32(length), cookie: cookie)
        return reply()?.error
    }
}

private func zero(_ model: inout [UInt8], _ offset: UInt64, _ length: UInt64) {
    model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
}

/// Trim and write-zeroes at any alignment (issue 11, bug 4): they free whole chunks, zero only mapped
/// partial ones, and a trim never takes pool space.
extension NBDServerTests {
    @Test(
        "an unaligned trim or write-zeroes on a filled thin volume frees every whole chunk it covers and zeroes exactly its bytes",
        arguments: [trimCommand, writeZeroesCommand], PoolBackend.allCases)
    func unalignedReleaseFreesWholeChunks(command: UInt16, backend: PoolBackend) async throws {
        let thin = try await ThinSetup(backend)
        #expect(thin.chunkBytes == 64 << 10, "the whole-chunk counts below assume 64 KiB chunks")
        var model = try await thin.fill(thin.volume.capacityBytes, seed: 11)
        var used = thin.volume.capacityBytes / thin.chunkBytes
        #expect(await thin.usedChunks == used)
        let test = try TestServer([NBDServer.Export(name: "v", device: thin.volume)])
        let client = try test.client()
        _ = try client.go("v")
        let requests: [(offset: UInt64, length: UInt64, wholeChunks: UInt64)] = [
            (1 << 20, (10 << 20) + 1000, 160),  // the case: ends 1000 bytes into chunk 176
            ((12 << 20) + 3 * 4096 + 123, 2 * 65536 + 999, 1),  // both edges inside blocks of mapped chunks
            ((14 << 20) + 5000, 100, 0),  // inside one block
            ((15 << 20) + 4000, 200, 0),  // across a block boundary inside one chunk
        ]
        for (index, request) in requests.enumerated() {
            #expect(client.release(command, offset: request.offset, length: request.length, cookie: UInt64(index)) == 0)
            zero(&model, request.offset, request.length)
            used -= request.wholeChunks
            #expect(
                await thin.usedChunks == used,
                "\(commandName(command)) of \(request.length) bytes at \(request.offset) frees \(request.wholeChunks) chunks"
            )
        }
        // An edge read back through the export: zeros from the request's first byte on.
        let edge = (12 << 20) + 3 * 4096 + 123 - 50
        client.request(0, offset: UInt64(edge), length: 100, cookie: 99)
        #expect(client.reply(dataLength: 100)?.data == Array(model[edge..<(edge + 100)]))
        #expect(
            model[edge..<(edge + 50)].contains { $0 != 0 } && model[(edge + 50)..<(edge + 100)].allSatisfy { $0 == 0 })
        client.request(3, offset: 0, length: 0, cookie: 100)
        #expect(client.reply()?.error == 0)
        #expect(await thin.usedChunks == used)
        #expect(byteDifference(try await readAll(thin.volume), model) == nil)
        await test.stop()
    }

    @Test(
        "an unaligned trim or write-zeroes on never-written chunks takes no pool space",
        arguments: [trimCommand, writeZeroesCommand], PoolBackend.allCases)
    func unalignedReleaseOnEmptyVolume(command: UInt16, backend: PoolBackend) async throws {
        let thin = try await ThinSetup(backend)
        let test = try TestServer([NBDServer.Export(name: "v", device: thin.volume)])
        let client = try test.client()
        _ = try client.go("v")
        let requests: [(offset: UInt64, length: UInt64)] = [
            (4 << 20, 1000),  // the case
            ((1 << 20) + 1, 3 << 20),
            ((5 << 20) + 65536 - 10, 20),  // across a chunk boundary
        ]
        for (index, request) in requests.enumerated() {
            #expect(client.release(command, offset: request.offset, length: request.length, cookie: UInt64(index)) == 0)
            #expect(
                await thin.usedChunks == 0, "\(commandName(command)) of \(request.length) bytes at \(request.offset)")
        }
        client.request(3, offset: 0, length: 0, cookie: 100)
        #expect(client.reply()?.error == 0)
        #expect(await thin.usedChunks == 0)
        #expect(try await readAll(thin.volume).allSatisfy { $0 == 0 })
        await test.stop()
    }

    @Test(
        "on a full pool an unaligned trim or write-zeroes succeeds, frees its whole chunks and takes none",
        arguments: [trimCommand, writeZeroesCommand], PoolBackend.allCases)
    func unalignedReleaseOnFullPool(command: UInt16, backend: PoolBackend) async throws {
        let thin = try await ThinSetup(backend, poolMultiple: 2)
        let chunk = thin.chunkBytes
        let poolChunks = thin.pool.chunkCount
        var model = try await thin.fill(poolChunks * chunk, seed: 12)
        #expect(await thin.usedChunks == poolChunks, "the pool is full")
        let test = try TestServer([NBDServer.Export(name: "v", device: thin.volume)])
        let client = try test.client()
        _ = try client.go("v")
        let full = poolChunks
        let requests: [(offset: UInt64, length: UInt64, wholeChunks: UInt64)] = [
            // From inside the last-but-one mapped chunk into never-written ones: one mapped chunk is whole.
            ((full - 2) * chunk + 100, 4 * chunk, 1),
            ((full - 4) * chunk + 7, chunk + 10, 0),  // the end of one mapped chunk and the start of the next
            ((full + 5) * chunk + 1, 1000, 0),  // never written
        ]
        var used = full
        for (index, request) in requests.enumerated() {
            #expect(
                client.release(command, offset: request.offset, length: request.length, cookie: UInt64(index)) == 0,
                "\(commandName(command)) of \(request.length) bytes at \(request.offset) on a full pool")
            zero(&model, request.offset, request.length)
            used -= request.wholeChunks
            #expect(await thin.usedChunks == used)
        }
        #expect(byteDifference(try await readAll(thin.volume), model) == nil)
        await test.stop()
    }

    @Test("a trim never copies a chunk shared with a snapshot (it works on a full pool); write-zeroes copies it")
    func releaseOfSharedChunks() async throws {
        let thin = try await ThinSetup(.memory, poolMultiple: 1)
        let chunk = thin.chunkBytes
        let full = thin.pool.chunkCount
        var model = try await thin.fill(full * chunk, seed: 13)
        let original = model
        try await thin.pool.snapshot(volume: "v", name: "s")
        #expect(await thin.usedChunks == full)
        let test = try TestServer([NBDServer.Export(name: "v", device: thin.volume)])
        let client = try test.client()
        _ = try client.go("v")

        // Chunks 2 and 3 leave the volume (the snapshot keeps them); the shared edges in chunks 1 and
        // 4 stay as they are: zeroing them would take a chunk, and a trim is advisory.
        #expect(client.release(trimCommand, offset: chunk + 100, length: 3 * chunk, cookie: 1) == 0)
        zero(&model, 2 * chunk, 2 * chunk)
        #expect(await thin.usedChunks == full)
        // Write-zeroes must copy a shared chunk, and the pool has no room for the copy.
        #expect(client.release(writeZeroesCommand, offset: chunk + 100, length: 50, cookie: 2) == 28)
        #expect(byteDifference(try await readAll(thin.volume), model) == nil)
        let snapshot = try await thin.pool.openVolume(name: "s")
        #expect(byteDifference(try await readAll(snapshot), original) == nil)
        try await snapshot.close()

        // Alone again, the volume's partial chunks are zeroed in place, by both.
        try await thin.pool.deleteVolume(name: "s")
        #expect(await thin.usedChunks == full - 2)
        #expect(client.release(writeZeroesCommand, offset: chunk + 100, length: 50, cookie: 3) == 0)
        zero(&model, chunk + 100, 50)
        #expect(client.release(trimCommand, offset: 4 * chunk + 5, length: 10, cookie: 4) == 0)
        zero(&model, 4 * chunk + 5, 10)
        #expect(await thin.usedChunks == full - 2)
        #expect(byteDifference(try await readAll(thin.volume), model) == nil)
        await test.stop()
    }

    @Test(
        "image and array exports: an unaligned trim releases only the whole blocks it covers, write-zeroes zeroes exactly its bytes"
    )
    func unalignedReleaseOnImageAndArray() async throws {
        let folder = TemporaryFolder("nbd-release")
        defer { folder.remove() }
        let image = try FileDevice.create(path: folder.file("image.img"), sizeBytes: 8 << 20)
        let members = try (0..<2).map { try MemoryDevice(capacityBytes: 9 << 20, name: "m\($0)") }
        let array = try await RAIDArray.create(name: "mirror", level: .raid1, members: members)
        var models: [[UInt8]] = []
        for (index, device) in [image as any BlockDevice, array].enumerated() {
            let data = AlignedBuffer(count: Int(device.capacityBytes))
            fillRandom(data.bytes, seed: 20 + UInt64(index))
            try await device.write(from: data, at: 0)
            try await device.flush()
            models.append(data.array)
        }
        let test = try TestServer([
            NBDServer.Export(name: "image", device: image), NBDServer.Export(name: "array", device: array),
        ])

        // The image: the trim punches a hole where it covers whole blocks and leaves its partial
        // blocks as they were (no read-modify-write for an advisory request).
        let imageClient = try test.client()
        _ = try imageClient.go("image")
        let allocatedBefore = try image.allocatedBytes()
        #expect(imageClient.release(trimCommand, offset: (1 << 20) + 100, length: 4 << 20, cookie: 1) == 0)
        let block = UInt64(image.logicalBlockBytes)
        let firstWhole = ((1 << 20) + 100 + block - 1) / block * block
        zero(&models[0], firstWhole, (5 << 20) - firstWhole)  // the whole blocks inside: up to 5 MiB
        #expect(
            try image.allocatedBytes() <= allocatedBefore - (4 << 20) + (64 << 10),
            "the trimmed blocks went back to the file system")
        #expect(imageClient.release(writeZeroesCommand, offset: (6 << 20) + 7, length: (1 << 20) + 13, cookie: 2) == 0)
        zero(&models[0], (6 << 20) + 7, (1 << 20) + 13)
        #expect(imageClient.release(writeZeroesCommand, offset: 300, length: 100, cookie: 3) == 0)
        zero(&models[0], 300, 100)
        #expect(byteDifference(try await readAll(image), models[0]) == nil)

        // The mirror: a discard releases nothing on its members, so a trim changes no byte; write-zeroes
        // zeroes exactly.
        let arrayClient = try test.client()
        _ = try arrayClient.go("array")
        #expect(arrayClient.release(trimCommand, offset: 100, length: 1 << 20, cookie: 1) == 0)
        #expect(arrayClient.release(writeZeroesCommand, offset: (2 << 20) + 3, length: 5000, cookie: 2) == 0)
        zero(&models[1], (2 << 20) + 3, 5000)
        #expect(byteDifference(try await readAll(array), models[1]) == nil)
        await test.stop()
        try await array.close()
        try await image.close()
    }
}
