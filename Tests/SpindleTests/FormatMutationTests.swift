import Testing

@testable import Spindle

/// Mutates valid encodings (bit flips, byte overwrites, truncations, zeroed ranges, random bytes) with
/// a seeded generator and feeds them to every on-disk and wire parser: each must return a value or a
/// refusal, never crash or hang, and a mutated checksummed block must never decode as valid with
/// different contents.
private func mutations(of original: [UInt8], seed: UInt64, count: Int) -> [[UInt8]] {
    var random = SeededRandom(seed: seed)
    var result: [[UInt8]] = []
    for index in 0..<count {
        var bytes = original
        switch index % 5 {
        case 0:
            for _ in 0..<(1 + Int(random.below(4))) {
                let bit = Int(random.below(UInt64(bytes.count * 8)))
                bytes[bit / 8] ^= 1 << UInt8(bit % 8)
            }
        case 1:
            let at = Int(random.below(UInt64(bytes.count)))
            bytes[at] = UInt8(truncatingIfNeeded: random.next())
        case 2:
            bytes = Array(bytes.prefix(Int(random.below(UInt64(bytes.count)))))
        case 3:
            let start = Int(random.below(UInt64(bytes.count)))
            let end = min(bytes.count, start + 1 + Int(random.below(512)))
            bytes.replaceSubrange(start..<end, with: repeatElement(0, count: end - start))
        default:
            bytes = (0..<bytes.count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        }
        if bytes != original { result.append(bytes) }  // zeroing zeros changes nothing: not a mutation
    }
    return result
}

@Suite("Format parsers under mutation")
struct FormatMutationTests {
    @Test("RAID superblocks: mutated copies are refused or decode to the original", arguments: [UInt64(1), 2])
    func raidSuperblock(seed: UInt64) async throws {
        let members = try (0..<3).map {
            try MemoryDevice(capacityBytes: 4 << 20, logicalBlockBytes: 4096, name: "m\($0)")
        }
        let array = try await RAIDArray.create(name: "mut", level: .raid5, members: members)
        let buffer = AlignedBuffer(count: 4096)
        try await members[0].read(into: buffer, at: 0)
        try await array.close()
        let original = buffer.array
        let decoded = try original.withUnsafeBytes { try RAIDSuperblock.decode($0) }
        var refused = 0
        for bytes in mutations(of: original, seed: seed, count: 2000) {
            let padded = bytes.count < 4096 ? bytes + [UInt8](repeating: 0, count: 4096 - bytes.count) : bytes
            if let block = try? padded.withUnsafeBytes({ try RAIDSuperblock.decode($0) }) {
                #expect(block.encoded() == decoded.encoded(), "a mutated superblock decoded with different contents")
            } else {
                refused += 1
            }
        }
        // Bytes past the superblock's fields carry nothing and are not checksummed: changing them is
        // accepted (and harmless: the decoded superblock is the original, as checked above).
        #expect(refused > 1500, "\(refused) of 2000 refused")
    }

    @Test(
        "pool labels, metadata superblocks and B-tree nodes: mutations are refused or decode to the original",
        arguments: [UInt64(1), 2])
    func poolMetadata(seed: UInt64) async throws {
        let device = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "mutant", devices: [device])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 8 << 20)
        let data = AlignedBuffer(count: 1 << 20)
        fillRandom(data.bytes, seed: seed)
        try await volume.write(from: data, at: 0)
        try await volume.flush()
        let buffer = AlignedBuffer(count: 3 * 4096)
        try await device.read(into: buffer, at: 0)
        let label = Array(buffer.array[0..<4096])
        let superblocks = Array(buffer.array[4096..<(3 * 4096)])
        let (root, areaOffset, blockCount) = await pool.withState { state in
            (state.records[volume.id]!.root, state.area.offset, state.area.blockCount)
        }
        let nodeBuffer = AlignedBuffer(count: 4096)
        try await device.read(into: nodeBuffer, at: areaOffset + root * 4096)
        let node = nodeBuffer.array

        let labelDecoded = try ThinPoolLabel.decode(label)
        let nodeDecoded = try MetadataNode.decode(node, expectedBlock: root)
        var accepted = 0
        for bytes in mutations(of: label, seed: seed, count: 1000) {
            if let decoded = try? ThinPoolLabel.decode(bytes) {
                #expect(decoded == labelDecoded)
                accepted += 1
            }
        }
        for bytes in mutations(of: node, seed: seed &+ 1, count: 1000) {
            if let decoded = try? MetadataNode.decode(bytes, expectedBlock: root) {
                #expect(decoded == nodeDecoded)
                accepted += 1
            }
        }
        for bytes in mutations(of: Array(superblocks[0..<4096]), seed: seed &+ 2, count: 1000) where bytes.count == 4096
        {
            if case .success = MetadataArea.decodeSuperblock(bytes, blockCount: blockCount) {
                #expect(bytes == Array(superblocks[0..<4096]), "a mutated metadata superblock passed its checks")
                accepted += 1
            }
        }
        #expect(accepted < 20, "almost every mutation is refused (\(accepted) accepted)")

        // A damaged label on disk: the pool refuses to open and says why, instead of guessing.
        var damaged = label
        damaged[100] ^= 0x20
        let write = AlignedBuffer(count: 4096)
        damaged.withUnsafeBytes { write.bytes.copyMemory(from: $0) }
        try await device.write(from: write, at: 0)
        let error = await spindleError { _ = try await ThinPool.open(devices: [device]) }
        expectError(error, .corrupted, ["thin pool label at offset 0 is corrupt"])
        #expect(error?.cause as? ThinPoolLabel.Problem == .checksumMismatch)
    }

    @Test(
        "NBD requests, option data, fault specs and sizes: random text and bytes are refused cleanly",
        arguments: [UInt64(1), 2])
    func wireAndText(seed: UInt64) {
        var random = SeededRandom(seed: seed)
        let request = NBDProtocol.Request(flags: 1, type: 1, cookie: 7, offset: 4096, length: 4096).encoded()
        for bytes in mutations(of: request, seed: seed, count: 2000) {
            let decoded = bytes.withUnsafeBytes { NBDProtocol.Request.decode($0) }
            if bytes.count < NBDProtocol.Request.bytes { #expect(decoded == nil) }
        }
        let info = RawNBDClient.infoRequest("tank/vm1", items: [3, 1])
        #expect(NBDProtocol.decodeInfoRequest(info)?.name == "tank/vm1")
        for bytes in mutations(of: info, seed: seed &+ 3, count: 2000) {
            if let decoded = NBDProtocol.decodeInfoRequest(bytes) {
                #expect(decoded.name.utf8.count <= 4096)
            }
        }
        let metaContexts = NBDProtocol.metaContextRequest(name: "tank/vm1", queries: ["base:allocation", "qemu:"])
        #expect(NBDProtocol.decodeMetaContextRequest(metaContexts)?.queries == ["base:allocation", "qemu:"])
        for bytes in mutations(of: metaContexts, seed: seed &+ 5, count: 2000) {
            if let decoded = NBDProtocol.decodeMetaContextRequest(bytes) {
                #expect(decoded.queries.count <= bytes.count / 4)
            }
        }
        let alphabet = Array(
            "read-error,write-error,range=0-64M,probability=0.5,latency=2ms,vanish-after=10,=,-:KMGT 0123456789xyz")
        for _ in 0..<2000 {
            let text = String(
                (0..<Int(random.below(40))).map { _ in alphabet[Int(random.below(UInt64(alphabet.count)))] })
            _ = try? FaultSpec.parse(text)
            _ = try? ByteSize.parse(text)
        }
    }

    @Test(
        "delta files: mutated headers and tables are refused, or decode to the original (bytes no field uses)",
        arguments: [UInt64(1), 2])
    func deltaHeader(seed: UInt64) throws {
        let uuid = SpindleUUID(high: 0x1234, low: 0x5678)
        var delta = VolumeDelta(
            base: VolumeIdentity(poolUUID: uuid, volumeID: 2, createdSeconds: 1_700_000_000, name: "tank/s1"),
            target: VolumeIdentity(poolUUID: uuid, volumeID: 3, createdSeconds: 1_700_000_100, name: "tank/s2"),
            targetBytes: 64 << 20, chunkBytes: 65536,
            extents: [
                .init(offset: 0, length: 65536, kind: .data, checksum: 7),
                .init(offset: 65536, length: 1 << 20, kind: .zeros),
                .init(offset: 4 << 20, length: 1 << 20, kind: .data, checksum: 9),
            ])
        delta.placeData()
        let (header, table) = delta.encoded()
        #expect(try VolumeDelta.decode(header: header, table: table, fileBytes: delta.fileBytes) == delta)
        var refused = 0
        for bytes in mutations(of: header + table, seed: seed, count: 2000) {
            let padded = bytes.count < 8192 ? bytes + [UInt8](repeating: 0, count: 8192 - bytes.count) : bytes
            let mutatedHeader = Array(padded[0..<4096])
            guard let tableBytes = try? VolumeDelta.tableBytes(header: mutatedHeader), tableBytes <= padded.count - 4096
            else {
                refused += 1
                continue
            }
            let mutatedTable = Array(padded[4096..<(4096 + tableBytes)])
            if let decoded = try? VolumeDelta.decode(
                header: mutatedHeader, table: mutatedTable, fileBytes: delta.fileBytes)
            {
                #expect(decoded == delta, "a mutated delta decoded with different contents")
            } else {
                refused += 1
            }
        }
        #expect(refused > 1000, "most mutations change a checksummed byte")
        // Out-of-order and out-of-range extents are refused even with good checksums.
        for bad in [
            [
                VolumeDelta.Extent(offset: 65536, length: 65536, kind: .zeros),
                .init(offset: 0, length: 4096, kind: .zeros),
            ],
            [VolumeDelta.Extent(offset: 64 << 20, length: 4096, kind: .zeros)],
            [VolumeDelta.Extent(offset: 0, length: 2 << 20, kind: .data)],
        ] {
            var broken = delta
            broken.extents = bad
            broken.placeData()
            let (badHeader, badTable) = broken.encoded()
            #expect(throws: VolumeDelta.Problem.self) {
                try VolumeDelta.decode(header: badHeader, table: badTable, fileBytes: broken.fileBytes)
            }
        }
    }
}
