import Testing

@testable import Spindle

@Suite("Differences between volumes")
struct VolumeDifferenceTests {
    /// Consecutive keys as runs, as ``MetadataBTree/differences(in:between:and:store:)`` returns them.
    static func runs(_ keys: [UInt64]) -> [ClosedRange<UInt64>] {
        var result: [ClosedRange<UInt64>] = []
        for key in keys.sorted() {
            if let last = result.last, last.upperBound + 1 == key {
                result[result.count - 1] = last.lowerBound...key
            } else {
                result.append(key...key)
            }
        }
        return result
    }

    @Test(
        "two trees that share history differ exactly where a model says, in either order, and any key range gives its part",
        arguments: Array(UInt64(1)...24))
    func treesAgainstModel(seed: UInt64) async throws {
        var random = SeededRandom(seed: seed)
        let store = MemoryNodeStore()
        let keySpace = UInt64([300, 5_000, 1 << 20, UInt64.max / 2][Int(seed % 4)])
        let count = [0, 1, 200, 20_000][Int(seed / 4 % 4)]
        var first = try await MetadataBTree.create(in: store)
        var firstModel: [UInt64: UInt64] = [:]
        for _ in 0..<count {
            let key = random.next() % keySpace
            let value = random.next() % 1000 + 1
            first = try await MetadataBTree.insert(key, value: value, root: first, in: store)
            firstModel[key] = value
        }
        store.commit()
        // A snapshot: the second tree is the first's root, shared.
        store.addReference(to: first)
        var second = first
        var secondModel = firstModel
        store.commit()
        let readsBefore = store.reads
        #expect(
            try await MetadataBTree.differences(in: 0...UInt64.max, between: first, and: second, store: store) == [])
        #expect(store.reads == readsBefore, "identical trees are not read")

        // Changes on either side: overwrites, new keys, removals, a value set back to the same.
        let changes = [1, 5, 40, 400][Int(seed % 3)]
        for _ in 0..<changes {
            let onFirst = random.next() % 4 == 0
            let existing = Array(onFirst ? firstModel.keys : secondModel.keys)
            let key =
                !existing.isEmpty && random.next() % 2 == 0
                ? existing[Int(random.next() % UInt64(existing.count))] : random.next() % keySpace
            switch random.next() % 3 {
            case 0:
                if onFirst {
                    first = try await MetadataBTree.remove(key, root: first, in: store).root
                    firstModel[key] = nil
                } else {
                    second = try await MetadataBTree.remove(key, root: second, in: store).root
                    secondModel[key] = nil
                }
            default:
                let value =
                    random.next() % 3 == 0
                    ? (onFirst ? firstModel[key] : secondModel[key]) ?? 7 : random.next() % 1000 + 1
                if onFirst {
                    first = try await MetadataBTree.insert(key, value: value, root: first, in: store)
                    firstModel[key] = value
                } else {
                    second = try await MetadataBTree.insert(key, value: value, root: second, in: store)
                    secondModel[key] = value
                }
            }
        }
        store.commit()
        let differing = Set(firstModel.keys).union(secondModel.keys).filter { firstModel[$0] != secondModel[$0] }
        let found = try await MetadataBTree.differences(in: 0...UInt64.max, between: first, and: second, store: store)
        #expect(found == Self.runs(Array(differing)), "seed \(seed)")
        // The order does not matter.
        #expect(
            try await MetadataBTree.differences(in: 0...UInt64.max, between: second, and: first, store: store) == found)
        // A key range gives the differences inside it.
        for _ in 0..<4 {
            let lower = random.next() % keySpace
            let upper = min(keySpace, lower + random.next() % (keySpace / 3 + 1))
            let part = try await MetadataBTree.differences(in: lower...upper, between: first, and: second, store: store)
            #expect(part == Self.runs(differing.filter { (lower...upper).contains($0) }), "\(lower)...\(upper)")
        }
    }

    @Test("the walk reads the nodes on the paths that changed, not the trees: 4 changes in 2 x 30,000 keys")
    func costFollowsChanges() async throws {
        let store = MemoryNodeStore()
        var first = try await MetadataBTree.create(in: store)
        for key in UInt64(0)..<30_000 {
            first = try await MetadataBTree.insert(key * 3, value: key, root: first, in: store)
        }
        store.commit()
        store.addReference(to: first)
        var second = first
        store.commit()
        for key: UInt64 in [300, 45_000, 89_997] {
            second = try await MetadataBTree.insert(key, value: 1, root: second, in: store)
        }
        second = try await MetadataBTree.remove(60_000, root: second, in: store).root
        store.commit()
        let nodes = try await MetadataBTree.blocks(root: first, store: store).count
        let start = store.reads
        let found = try await MetadataBTree.differences(in: 0...UInt64.max, between: first, and: second, store: store)
        let read = store.reads - start
        #expect(found == [300...300, 45_000...45_000, 60_000...60_000, 89_997...89_997])
        #expect(nodes > 115, "\(nodes) nodes")
        // 2 roots, then each changed leaf and its parent in both trees: about 2 + 4 x 2 x 2.
        #expect(read <= 24, "read \(read) of \(2 * nodes) nodes")
    }

    /// What a volume holds, chunk by chunk, as the model sees it: a token per written chunk (each
    /// write gives a new one), none where the chunk reads zeros without being mapped.
    typealias ChunkModel = [UInt64: Int]

    @Test(
        "a chain of 5 snapshots under random writes, discards, write-zeroes and resizes: every pair's difference is what the model says, and applying it to a copy of the older gives the newer byte for byte",
        arguments: Array(UInt64(1)...6))
    func snapshotChain(seed: UInt64) async throws {
        var random = SeededRandom(seed: seed)
        let chunkBytes: UInt64 = [64 << 10, 128 << 10, 256 << 10][Int(seed % 3)]
        let device = try MemoryDevice(capacityBytes: 96 << 20, logicalBlockBytes: 4096)
        let pool = try await ThinPool.create(name: "diff", devices: [device], chunkBytes: chunkBytes)
        var size: UInt64 = 8 << 20
        var volume = try await pool.createVolume(name: "v", sizeBytes: size)
        var models: [String: ChunkModel] = ["v": [:]]
        var sizes: [String: UInt64] = ["v": size]
        var token = 0
        func chunks(_ offset: UInt64, _ length: UInt64) -> ClosedRange<UInt64> {
            (offset / chunkBytes)...((offset + length - 1) / chunkBytes)
        }
        for step in 0...5 {
            if step > 0 {
                try await pool.snapshot(volume: "v", name: "s\(step)", readOnly: true)
                models["s\(step)"] = models["v"]
                sizes["s\(step)"] = size
            }
            for _ in 0..<12 {
                let offset = random.next() % (size / 4096) * 4096
                let length = min(size - offset, (random.next() % 96 + 1) * 4096)
                switch random.next() % 10 {
                case 0...5:
                    let data = AlignedBuffer(count: Int(length))
                    fillRandom(data.bytes, seed: random.next())
                    try await volume.write(from: data, at: offset)
                    for chunk in chunks(offset, length) {
                        token += 1
                        models["v"]![chunk] = token
                    }
                case 6, 7:
                    if random.next() % 2 == 0 {
                        try await volume.discard(offset: offset, length: length)
                    } else {
                        try await volume.writeZeroes(offset: offset, length: length)
                    }
                    for chunk in chunks(offset, length) {
                        let whole = chunk * chunkBytes >= offset && (chunk + 1) * chunkBytes <= offset + length
                        if whole {
                            models["v"]![chunk] = nil
                        } else if models["v"]![chunk] != nil {
                            token += 1
                            models["v"]![chunk] = token  // zeroed in part: mapped, rewritten
                        }
                    }
                default:
                    let newSize = (random.next() % 12 + 4) << 20 + (random.next() % 4) * 4096
                    try await volume.close()
                    try await pool.resizeVolume(name: "v", sizeBytes: newSize)
                    if newSize < size {
                        let cut = newSize / chunkBytes
                        if newSize % chunkBytes != 0, models["v"]![cut] != nil {
                            token += 1
                            models["v"]![cut] = token
                        }
                        let firstGone = (newSize + chunkBytes - 1) / chunkBytes
                        models["v"] = models["v"]!.filter { $0.key < firstGone }
                    }
                    size = newSize
                    sizes["v"] = size
                    volume = try await pool.openVolume(name: "v")
                }
            }
            try await volume.flush()
            let names = ["v"] + (0...step).dropFirst().map { "s\($0)" }
            for old in names {
                for new in names {
                    let difference = try await pool.difference(from: old, to: new)
                    let newChunks = (sizes[new]! + chunkBytes - 1) / chunkBytes
                    let expected = (0..<newChunks).filter { models[old]![$0] != models[new]![$0] }
                    let got = difference.ranges.flatMap { chunks($0.offset, $0.length) }
                    #expect(got == expected, "seed \(seed) step \(step): \(new) since \(old)")
                    #expect(difference.ranges.allSatisfy { $0.offset + $0.length <= sizes[new]! })
                }
            }
            // The incremental backup property, from the newest snapshot back to the first.
            if step >= 2 {
                let older = try await pool.openVolume(name: "s1")
                let newer = try await pool.openVolume(name: "s\(step)")
                var copy = try await readAll(older)
                let target = try await readAll(newer)
                copy =
                    Array(copy.prefix(target.count)) + [UInt8](repeating: 0, count: max(0, target.count - copy.count))
                for range in try await pool.difference(from: "s1", to: "s\(step)").ranges {
                    let span = Int(range.offset)..<Int(range.offset + range.length)
                    copy.replaceSubrange(span, with: target[span])
                }
                #expect(byteDifference(copy, target) == nil, "seed \(seed) step \(step)")
                try await older.close()
                try await newer.close()
            }
        }
        try await volume.close()
        #expect(try await pool.check().isClean)
        try await pool.close()
    }

    @Test("a difference names its volumes; a missing one is an error naming the pool's volumes")
    func missingVolume() async throws {
        let pool = try await ThinPool.create(
            name: "named", devices: [try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)])
        _ = try await pool.createVolume(name: "a", sizeBytes: 1 << 20)
        expectError(
            await spindleError { _ = try await pool.difference(from: "nope", to: "a") }, .notFound,
            ["pool named has no volume named 'nope'", "it has a"])
        let same = try await pool.difference(from: "a", to: "a")
        #expect(same.ranges.isEmpty && same.from == "a" && same.to == "a" && same.sizeBytes == 1 << 20)
        try await pool.close()
    }
}
