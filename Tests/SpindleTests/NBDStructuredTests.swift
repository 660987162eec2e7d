import Testing

@testable import Spindle

extension RawNBDClient {
    struct Chunk {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var payload: [UInt8]
        var done: Bool { flags & 1 != 0 }
        /// The error of an error chunk.
        var error: UInt32 { type & 0x8000 != 0 ? Self.read(UInt32.self, payload, 0) : 0 }
        /// The message of an error chunk.
        var message: String {
            let length = Int(Self.read(UInt16.self, payload, 4))
            return String(decoding: payload[6..<(6 + length)], as: UTF8.self)
        }
        static func read<T: FixedWidthInteger>(_ type: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
            RawNBDClient.read(type, bytes, offset)
        }
    }

    /// One structured reply chunk, or nil when the server closed the connection.
    func chunk() -> Chunk? {
        guard let header = receive(20) else { return nil }
        #expect(Self.read(UInt32.self, header, 0) == 0x668E_33EF, "structured reply magic")
        let length = Int(Self.read(UInt32.self, header, 16))
        guard let payload = receive(length) else { return nil }
        return Chunk(
            flags: Self.read(UInt16.self, header, 4), type: Self.read(UInt16.self, header, 6),
            cookie: Self.read(UInt64.self, header, 8), payload: payload)
    }

    /// Every chunk of one reply, through the one marked done.
    func structuredReply() -> [Chunk] {
        var chunks: [Chunk] = []
        while let chunk = chunk() {
            chunks.append(chunk)
            if chunk.done { break }
        }
        return chunks
    }

    /// NBD_OPT_LIST_META_CONTEXT (9) or NBD_OPT_SET_META_CONTEXT (10): the contexts replied (id and
    /// name) and the final reply's type.
    func metaContexts(_ option: UInt32, export: String, queries: [String]) -> (
        contexts: [(id: UInt32, name: String)], final: UInt32
    ) {
        self.option(option, NBDProtocol.metaContextRequest(name: export, queries: queries))
        var contexts: [(id: UInt32, name: String)] = []
        while let reply = optionReply() {
            guard reply.type == 4 else { return (contexts, reply.type) }
            contexts.append(
                (Self.read(UInt32.self, reply.data, 0), String(decoding: reply.data[4...], as: UTF8.self)))
        }
        return (contexts, 0)
    }

    /// Greets, asks for structured replies, selects `contexts` for `export` (when any), then GO.
    func goStructured(_ export: String, contexts: [String] = []) throws -> [(id: UInt32, name: String)] {
        try greet()
        option(8, [])
        #expect(optionReply()?.type == 1, "structured replies acknowledged")
        var selected: [(id: UInt32, name: String)] = []
        if !contexts.isEmpty {
            let reply = metaContexts(10, export: export, queries: contexts)
            #expect(reply.final == 1)
            selected = reply.contexts
        }
        option(7, Self.infoRequest(export))
        var reply = optionReply()
        while let current = reply, current.type == 3 { reply = optionReply() }
        try #require(reply?.type == 1, "GO acknowledged")
        return selected
    }

    /// A structured read reply put back together: the bytes (holes as zeros), checking that the
    /// chunks cover the request exactly once; nil after an error chunk.
    func structuredRead(offset: UInt64, length: Int, cookie: UInt64) -> (data: [UInt8], holes: Int)? {
        request(0, offset: offset, length: UInt32(length), cookie: cookie)
        var data = [UInt8](repeating: 0xEE, count: length)
        var covered = [Bool](repeating: false, count: length)
        var overlaps = 0
        var holes = 0
        for chunk in structuredReply() {
            #expect(chunk.cookie == cookie)
            let start = Int(Self.read(UInt64.self, chunk.payload, 0) - offset)
            switch chunk.type {
            case 1:
                let bytes = chunk.payload[8...]
                data.replaceSubrange(start..<(start + bytes.count), with: bytes)
                for index in start..<(start + bytes.count) {
                    if covered[index] { overlaps += 1 }
                    covered[index] = true
                }
            case 2:
                let count = Int(Self.read(UInt32.self, chunk.payload, 8))
                holes += 1
                for index in start..<(start + count) {
                    if covered[index] { overlaps += 1 }
                    covered[index] = true
                    data[index] = 0
                }
            case 0:
                break
            default:
                return nil
            }
        }
        #expect(overlaps == 0, "chunks overlap")
        #expect(!covered.contains(false), "the chunks cover the read")
        return (data, holes)
    }

    /// A block status reply: for each context id, its descriptors (length, flags).
    func blockStatus(offset: UInt64, length: UInt32, cookie: UInt64, flags: UInt16 = 0) -> (
        extents: [UInt32: [(length: UInt32, flags: UInt32)]], error: Chunk?
    ) {
        request(7, offset: offset, length: length, cookie: cookie, flags: flags)
        var extents: [UInt32: [(length: UInt32, flags: UInt32)]] = [:]
        for chunk in structuredReply() {
            #expect(chunk.cookie == cookie)
            if chunk.type != 5 { return (extents, chunk) }
            #expect((chunk.payload.count - 4) % 8 == 0 && chunk.payload.count > 4)
            let id = Self.read(UInt32.self, chunk.payload, 0)
            extents[id] = stride(from: 4, to: chunk.payload.count, by: 8).map {
                (Self.read(UInt32.self, chunk.payload, $0), Self.read(UInt32.self, chunk.payload, $0 + 4))
            }
        }
        return (extents, nil)
    }
}

/// Descriptors as byte ranges with their flags, for comparing with a model.
func flagged(_ extents: [(length: UInt32, flags: UInt32)], from offset: UInt64) -> [(Range<UInt64>, UInt32)] {
    var position = offset
    return extents.map { extent in
        defer { position += UInt64(extent.length) }
        return (position..<(position + UInt64(extent.length)), extent.flags)
    }
}

/// The ranges of `extents` whose flags are `flags`, merged.
func ranges(_ extents: [(length: UInt32, flags: UInt32)], from offset: UInt64, flags: UInt32) -> [Range<UInt64>] {
    var result: [Range<UInt64>] = []
    for (range, extentFlags) in flagged(extents, from: offset) where extentFlags == flags {
        if let last = result.last, last.upperBound == range.lowerBound {
            result[result.count - 1] = last.lowerBound..<range.upperBound
        } else {
            result.append(range)
        }
    }
    return result
}

@Suite("NBD structured replies and block status", .serialized)
struct NBDStructuredTests {
    /// A thin volume `v` with data in chunks 0, 3 and 4 of 64 KiB, snapshot `s1` of that, then chunk
    /// 8 written and chunk 3 discarded; snapshot `s2`.
    static func thinPool() async throws -> (pool: ThinPool, volume: ThinVolume) {
        let device = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "p", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 16 << 20)
        let data = AlignedBuffer(count: 64 << 10)
        fillRandom(data.bytes, seed: 1)
        for chunk: UInt64 in [0, 3, 4] { try await volume.write(from: data, at: chunk << 16) }
        try await pool.snapshot(volume: "v", name: "s1", readOnly: true)
        try await volume.write(from: data, range: 0..<4096, at: 8 << 16)
        try await volume.discard(offset: 3 << 16, length: 64 << 10)
        try await pool.snapshot(volume: "v", name: "s2", readOnly: true)
        try await volume.flush()
        return (pool, volume)
    }

    @Test(
        "negotiation: structured replies first, metadata contexts listed with wildcards and selected by name, malformed and unknown queries refused or ignored as the protocol says"
    )
    func negotiation() async throws {
        let (pool, volume) = try await Self.thinPool()
        let memory = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        let test = try TestServer([
            NBDServer.Export(name: "v", device: volume), NBDServer.Export(name: "m", device: memory),
        ])
        let client = try test.client()
        try client.greet()
        #expect(client.metaContexts(9, export: "v", queries: []).final == 0x8000_0003, "needs structured replies")
        #expect(client.metaContexts(10, export: "v", queries: []).final == 0x8000_0003)
        client.option(8, [1])
        #expect(client.optionReply()?.type == 0x8000_0003, "NBD_OPT_STRUCTURED_REPLY takes no data")
        client.option(8, [])
        #expect(client.optionReply()?.type == 1)

        let all = client.metaContexts(9, export: "v", queries: [])
        #expect(all.final == 1)
        #expect(all.contexts.map(\.name) == ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"])
        #expect(all.contexts.allSatisfy { $0.id == 0 }, "list replies carry id 0")
        #expect(client.metaContexts(9, export: "v", queries: ["base:"]).contexts.map(\.name) == ["base:allocation"])
        #expect(
            client.metaContexts(9, export: "v", queries: ["qemu:"]).contexts.map(\.name) == [
                "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2",
            ])
        #expect(
            client.metaContexts(9, export: "v", queries: ["qemu:dirty-bitmap:s2", "x-other:thing", "base:nothing"])
                .contexts.map(\.name) == ["qemu:dirty-bitmap:s2"])
        #expect(client.metaContexts(9, export: "m", queries: []).contexts.map(\.name) == ["base:allocation"])
        #expect(client.metaContexts(9, export: "nope", queries: []).final == 0x8000_0006)
        #expect(client.metaContexts(9, export: "v", queries: ["no-namespace"]).final == 0x8000_0003)
        client.option(9, [0, 0, 0, 1, 118, 0, 0, 0, 5])  // a query count past the data
        #expect(client.optionReply()?.type == 0x8000_0003)

        // Selecting takes whole names only; ids are distinct and not zero.
        #expect(client.metaContexts(10, export: "v", queries: ["base:", "qemu:"]).contexts.isEmpty)
        let selected = client.metaContexts(
            10, export: "v", queries: ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:gone", "base:allocation"])
        #expect(selected.final == 1)
        #expect(selected.contexts.map(\.name) == ["qemu:dirty-bitmap:s1", "base:allocation"])
        #expect(Set(selected.contexts.map(\.id)).count == 2 && !selected.contexts.contains { $0.id == 0 })
        client.option(7, RawNBDClient.infoRequest("v"))
        var reply = client.optionReply()
        while let current = reply, current.type == 3 { reply = client.optionReply() }
        #expect(reply?.type == 1)
        let status = client.blockStatus(offset: 0, length: 16 << 20, cookie: 1)
        #expect(status.error == nil && status.extents.count == 2, "one chunk per selected context")
        #expect(test.server.connectionCount == 1)
        await test.stop()
        try await pool.close()
    }

    @Test(
        "block status: a thin volume's mapped chunks and what changed since each snapshot, REQ_ONE, and bad requests answered with EINVAL while the connection goes on"
    )
    func blockStatus() async throws {
        let (pool, volume) = try await Self.thinPool()
        let memory = try MemoryDevice(capacityBytes: 1 << 20, logicalBlockBytes: 4096)
        let test = try TestServer([
            NBDServer.Export(name: "v", device: volume), NBDServer.Export(name: "m", device: memory),
        ])
        let chunk: UInt64 = 64 << 10
        let client = try test.client()
        let contexts = try client.goStructured(
            "v", contexts: ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"])
        let ids = Dictionary(uniqueKeysWithValues: contexts.map { ($0.name, $0.id) })
        let whole = client.blockStatus(offset: 0, length: 16 << 20, cookie: 1)
        #expect(whole.error == nil)
        let allocation = try #require(whole.extents[ids["base:allocation"]!])
        #expect(
            ranges(allocation, from: 0, flags: 0) == [0..<chunk, (4 * chunk)..<(5 * chunk), (8 * chunk)..<(9 * chunk)])
        #expect(allocation.reduce(0) { $0 + UInt64($1.length) } == 16 << 20, "the descriptors cover the request")
        #expect(Set(allocation.map(\.flags)) == [0, 3], "holes read as zeros")
        let sinceFirst = try #require(whole.extents[ids["qemu:dirty-bitmap:s1"]!])
        #expect(ranges(sinceFirst, from: 0, flags: 1) == [(3 * chunk)..<(4 * chunk), (8 * chunk)..<(9 * chunk)])
        let sinceSecond = try #require(whole.extents[ids["qemu:dirty-bitmap:s2"]!])
        #expect(ranges(sinceSecond, from: 0, flags: 1).isEmpty && sinceSecond.count == 1)

        // A part of the export, not on chunk boundaries: descriptors start at the offset.
        let part = client.blockStatus(offset: 4 * chunk + 4096, length: UInt32(4 * chunk), cookie: 2)
        let partAllocation = try #require(part.extents[ids["base:allocation"]!])
        #expect(
            ranges(partAllocation, from: 4 * chunk + 4096, flags: 0) == [
                (4 * chunk + 4096)..<(5 * chunk), (8 * chunk)..<(8 * chunk + 4096),
            ])
        // REQ_ONE: one descriptor per context, no longer than the request.
        let one = client.blockStatus(offset: 0, length: 4096, cookie: 3, flags: 1 << 3)
        for id in ids.values {
            let extents = try #require(one.extents[id])
            #expect(extents.count == 1 && extents[0].length <= 4096)
        }
        #expect(one.extents[ids["base:allocation"]!]?[0].flags == 0)
        let oneHole = client.blockStatus(offset: chunk, length: UInt32(2 * chunk), cookie: 4, flags: 1 << 3)
        #expect(oneHole.extents[ids["base:allocation"]!]?.map(\.length) == [UInt32(2 * chunk)])

        // Past the end, empty, and huge: EINVAL in an error chunk with a message; the connection goes on.
        for (offset, length) in [(UInt64(16 << 20), UInt32(4096)), (0, 0), (4096, UInt32.max)] {
            let bad = client.blockStatus(offset: offset, length: length, cookie: 5)
            let error = try #require(bad.error)
            #expect(error.type == 0x8001 && error.error == 22 && error.done && !error.message.isEmpty)
        }
        #expect(client.blockStatus(offset: 0, length: 4096, cookie: 6).error == nil)

        // A baseline deleted after negotiation: an error for its context, not a dropped connection.
        try await pool.deleteVolume(name: "s2")
        let gone = client.blockStatus(offset: 0, length: 4096, cookie: 7)
        #expect(gone.error?.error == 22 && gone.error?.message.contains("s2") == true)
        #expect(client.blockStatus(offset: 0, length: 4096, cookie: 8).error?.error == 22)

        // Without a selected context, or without structured replies: EINVAL.
        let unselected = try test.client()
        _ = try unselected.goStructured("v")
        #expect(unselected.blockStatus(offset: 0, length: 4096, cookie: 1).error?.error == 22)
        let otherExport = try test.client()
        try otherExport.greet()
        otherExport.option(8, [])
        _ = otherExport.optionReply()
        #expect(otherExport.metaContexts(10, export: "m", queries: ["base:allocation"]).contexts.count == 1)
        otherExport.option(7, RawNBDClient.infoRequest("v"))
        var reply = otherExport.optionReply()
        while let current = reply, current.type == 3 { reply = otherExport.optionReply() }
        #expect(
            otherExport.blockStatus(offset: 0, length: 4096, cookie: 1).error?.error == 22,
            "contexts selected for another export")
        let simple = try test.client()
        _ = try simple.go("v")
        simple.request(7, offset: 0, length: 4096, cookie: 9)
        let simpleReply = try #require(simple.reply())
        #expect(simpleReply.error == 22 && simpleReply.cookie == 9)
        simple.request(0, offset: 0, length: 4096, cookie: 10)
        #expect(simple.reply(dataLength: 4096)?.error == 0, "simple replies go on")

        // An export that is not sparse is all data.
        let memoryClient = try test.client()
        _ = try memoryClient.goStructured("m", contexts: ["base:allocation"])
        #expect(memoryClient.blockStatus(offset: 0, length: 1 << 20, cookie: 1).extents[1]?.map(\.flags) == [0])
        #expect(test.server.connectionCount == 5)
        await test.stop()
        try await pool.close()
    }

    @Test(
        "structured reads: data and runs of zeros as holes that put back together give the bytes; errors carry the offset; zero-length reads end with NBD_REPLY_TYPE_NONE"
    )
    func reads() async throws {
        let (pool, volume) = try await Self.thinPool()
        let test = try TestServer([NBDServer.Export(name: "v", device: volume)])
        let expected = try await readAll(volume)
        let client = try test.client()
        _ = try client.goStructured("v")
        var random = SeededRandom(seed: 5)
        for cookie in UInt64(1)...40 {
            let offset = cookie == 1 ? 0 : random.below(16 << 20)
            let length = Int(min((16 << 20) - offset, cookie == 1 ? 16 << 20 : random.below(1 << 20) + 1))
            let read = try #require(client.structuredRead(offset: offset, length: length, cookie: cookie))
            #expect(
                byteDifference(read.data, Array(expected[Int(offset)..<(Int(offset) + length)])) == nil,
                "read of \(length) at \(offset)")
            if cookie == 1 { #expect(read.holes > 0, "unmapped chunks go out as holes") }
        }
        // A read of data alone is one chunk, marked done.
        client.request(0, offset: 0, length: 65536, cookie: 50)
        let single = client.structuredReply()
        #expect(single.count == 1 && single[0].type == 1 && single[0].done)
        client.request(0, offset: 0, length: 0, cookie: 51)
        let empty = client.structuredReply()
        #expect(empty.count == 1 && empty[0].type == 0 && empty[0].done && empty[0].cookie == 51)
        client.request(0, offset: 16 << 20, length: 4096, cookie: 52)
        let past = try #require(client.structuredReply().first)
        #expect(past.type == 0x8002 && past.error == 22 && past.done, "an error chunk with an offset")
        #expect(RawNBDClient.read(UInt64.self, past.payload, past.payload.count - 8) == 16 << 20)
        // Alternating data and zero blocks: at most 32 chunks, the last taking the rest as data.
        var alternating = [UInt8](repeating: 0, count: 1 << 20)
        for block in stride(from: 0, to: 256, by: 2) {
            for index in (block * 4096)..<(block * 4096 + 4096) { alternating[index] = UInt8(block % 251 + 1) }
        }
        client.request(1, offset: 4 << 20, length: 1 << 20, cookie: 54, payload: alternating)
        #expect(client.reply()?.error == 0)
        client.request(0, offset: 4 << 20, length: 1 << 20, cookie: 55)
        let capped = client.structuredReply()
        #expect(capped.count == 32 && capped.last?.type == 1 && capped.filter { $0.type == 2 }.count == 15)
        let reassembled = try #require(client.structuredRead(offset: 4 << 20, length: 1 << 20, cookie: 56))
        #expect(reassembled.data == alternating)
        // Writes are answered as before.
        client.request(1, offset: 8192, length: 4096, cookie: 53, payload: [UInt8](repeating: 9, count: 4096))
        #expect(client.reply()?.error == 0)
        await test.stop()
        try await pool.close()
    }

    @Test("base:allocation on an image file follows its holes; a read device that fails gives an error chunk")
    func imageFile() async throws {
        let folder = TemporaryFolder("nbd-structured")
        defer { folder.remove() }
        let engine = try IOEngine()
        let file = try FileDevice.create(path: folder.file("sparse.img"), sizeBytes: 8 << 20, engine: engine)
        let data = AlignedBuffer(count: 1 << 20)
        fillRandom(data.bytes, seed: 3)
        try await engine.run {
            try await file.write(from: data, at: 1 << 20)
            try await file.write(from: data, range: 0..<65536, at: 6 << 20)
            try await file.flush()
        }
        let faulty = FaultyDevice(wrapping: file, seed: 1)
        let test = try TestServer([
            NBDServer.Export(name: "f", device: file), NBDServer.Export(name: "faulty", device: faulty),
        ])
        let client = try test.client()
        _ = try client.goStructured("f", contexts: ["base:allocation"])
        let status = client.blockStatus(offset: 0, length: 8 << 20, cookie: 1)
        let extents = try #require(status.extents[1])
        let written: [Range<UInt64>] = [(1 << 20)..<(2 << 20), (6 << 20)..<((6 << 20) + 65536)]
        #expect(ranges(extents, from: 0, flags: 0) == written)
        let broken = try test.client()
        _ = try broken.goStructured("faulty")
        faulty.failReads(in: 0..<(8 << 20), probability: 1)
        broken.request(0, offset: 1 << 20, length: 65536, cookie: 2)
        let failure = try #require(broken.structuredReply().first)
        #expect(failure.type == 0x8002 && failure.error == 5 && failure.done)
        #expect(RawNBDClient.read(UInt64.self, failure.payload, failure.payload.count - 8) >= 1 << 20)
        await test.stop()
        try await file.close()
        engine.shutdown()
    }
}
