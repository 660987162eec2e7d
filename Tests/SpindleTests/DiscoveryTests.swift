import Foundation
import Testing

@testable import Spindle

/// A folder of images built through the library, then discovered and opened by name.
///
/// - r5: a complete RAID5 array (r5-0..2) holding pool tank, with volume vm1 (4 MiB of data at 1 MiB).
/// - mir: a RAID1 array (mir-0, mir-1) and mir-z, a copy of mir-0 taken before the array changed.
/// - deg: a RAID1 array whose member deg-1 was away while the array was written: it missed changes.
/// - dmg: a RAID1 array whose member dmg-1 has both superblock copies damaged.
/// - plain: a pool on two images (pp-0, pp-1) with volume w (2 MiB of data).
/// - lone.img: the only device of pool lone, its label damaged.
/// - junk.bin (random data, no header) and tiny.txt (smaller than a block: not an image).
final class DiscoveryFixture {
    let folder = TemporaryFolder("discovery")
    let engine: IOEngine
    var vm1 = [UInt8](repeating: 0, count: 8 << 20)
    var plainData: [UInt8] = []
    var r5: (uuid: SpindleUUID, capacity: UInt64) = (.zero, 0)

    private init() throws { engine = try IOEngine() }

    deinit {
        engine.shutdown()
        folder.remove()
    }

    func path(_ name: String) -> String { folder.file(name) }

    private func image(_ name: String, _ size: UInt64) throws -> FileDevice {
        try FileDevice.create(path: path(name), sizeBytes: size, engine: engine)
    }

    static func make() async throws -> DiscoveryFixture {
        let fixture = try DiscoveryFixture()
        try await fixture.build()
        return fixture
    }

    private func build() async throws {
        let r5 = try await RAIDArray.create(
            name: "r5", level: .raid5, members: try (0..<3).map { try image("r5-\($0).img", 12 << 20) })
        self.r5 = (r5.arrayUUID, r5.capacityBytes)
        let tank = try await ThinPool.create(name: "tank", devices: [r5])
        let volume = try await tank.createVolume(name: "vm1", sizeBytes: 8 << 20)
        let data = AlignedBuffer(count: 4 << 20)
        fillRandom(data.bytes, seed: 11)
        try await volume.write(from: data, at: 1 << 20)
        vm1.replaceSubrange((1 << 20)..<(5 << 20), with: data.array)
        try await tank.close()  // and, by the ownership rule, r5 and its three images

        let mir = try await RAIDArray.create(
            name: "mir", level: .raid1, members: [try image("mir-0.img", 4 << 20), try image("mir-1.img", 4 << 20)])
        try await mir.close()
        try FileManager.default.copyItem(atPath: path("mir-0.img"), toPath: path("mir-z.img"))
        try await Discovery.assembleArray(paths: [path("mir-0.img"), path("mir-1.img")], engine: engine).close()

        let deg = try await RAIDArray.create(
            name: "deg", level: .raid1, members: [try image("deg-0.img", 4 << 20), try image("deg-1.img", 4 << 20)])
        try await deg.close()
        let aside = TemporaryFolder("discovery-aside")
        defer { aside.remove() }
        try FileManager.default.moveItem(atPath: path("deg-1.img"), toPath: aside.file("deg-1.img"))
        let alone = try await Discovery.assembleArray(paths: [path("deg-0.img")], engine: engine)
        let block = AlignedBuffer(count: 4096)
        block.fill(0x3C)
        try await alone.write(from: block, at: 0)
        try await alone.flush()
        try await alone.close()
        try FileManager.default.moveItem(atPath: aside.file("deg-1.img"), toPath: path("deg-1.img"))

        let dmg = try await RAIDArray.create(
            name: "dmg", level: .raid1, members: [try image("dmg-0.img", 4 << 20), try image("dmg-1.img", 4 << 20)])
        try await dmg.close()
        try patchFile(path("dmg-1.img"), at: 100, with: [0xFF, 0xEE])
        try patchFile(path("dmg-1.img"), at: 4096 + 100, with: [0xFF, 0xEE])

        let plain = try await ThinPool.create(
            name: "plain", devices: [try image("pp-0.img", 16 << 20), try image("pp-1.img", 8 << 20)])
        let w = try await plain.createVolume(name: "w", sizeBytes: 2 << 20)
        let wData = AlignedBuffer(count: 2 << 20)
        fillRandom(wData.bytes, seed: 12)
        try await w.write(from: wData, at: 0)
        plainData = wData.array
        try await plain.close()

        try await ThinPool.create(name: "lone", devices: [try image("lone.img", 8 << 20)]).close()
        try patchFile(path("lone.img"), at: 20, with: [0x77])

        try Data(randomBytes(1 << 20, seed: 13)).write(to: URL(fileURLWithPath: path("junk.bin")))
        try Data("hello\n".utf8).write(to: URL(fileURLWithPath: path("tiny.txt")))
    }
}

@Suite("Discovery: what a folder holds, and whole stacks opened by name", .serialized)
struct DiscoveryTests {
    @Test(
        "a scan finds complete, degraded and damaged arrays, stale members and copies, pools on images and arrays, and damaged headers with their reasons"
    )
    func scanFindsEverything() async throws {
        let fixture = try await DiscoveryFixture.make()
        #expect(
            openDescriptors(matching: fixture.folder.path) == 0, "closing a pool closes the array and images under it")
        let found = try await Discovery.scan(folder: fixture.folder.path, engine: fixture.engine)
        #expect(openDescriptors(matching: fixture.folder.path) == 0, "a scan closes what it opened")
        #expect(found.folder == fixture.folder.path)
        #expect(found.devices.count == 14, "every image but tiny.txt: \(found.devices.map(\.name))")
        #expect(found.arrays.map(\.name) == ["deg", "dmg", "mir", "r5"])

        let r5 = try found.array(named: "r5")
        #expect(
            r5.uuid == fixture.r5.uuid && r5.level == .raid5 && r5.memberCount == 3
                && r5.capacityBytes == fixture.r5.capacity)
        #expect(r5.state == .clean && r5.isComplete && !r5.isDirty && r5.notes.isEmpty && r5.rebuild == nil)
        #expect(r5.slots.map(\.device) == (0..<3).map { Optional(fixture.path("r5-\($0).img")) })
        #expect(r5.slots.allSatisfy { $0.state == .active && $0.memberUUID != nil })

        let mir = try found.array(named: "mir")
        #expect(mir.state == .clean && mir.isComplete && mir.members.count == 3)
        #expect(
            mir.slots.map(\.device) == [Optional(fixture.path("mir-0.img")), Optional(fixture.path("mir-1.img"))],
            "the newest copy holds slot 0")
        try #require(mir.notes.count == 1)
        let copy = mir.notes[0]
        #expect(copy.device == fixture.path("mir-z.img") && copy.slot == 0 && copy.events < mir.events)
        #expect(copy.kind == .copy(holder: fixture.path("mir-0.img"), holderEvents: mir.events))
        #expect(
            copy.description.contains(
                "is a stale copy of the member in slot 0, which \(fixture.path("mir-0.img")) holds"))

        let deg = try found.array(named: "deg")
        #expect(deg.state == .degraded && !deg.isComplete)
        #expect(deg.slots.map(\.state) == [.active, .missing])
        #expect(deg.notes.map(\.kind) == [.stale] && deg.notes.first?.device == fixture.path("deg-1.img"))
        #expect(deg.notes.first.map { $0.events + 1 < $0.arrayEvents } == true)

        let dmg = try found.array(named: "dmg")
        #expect(dmg.state == .degraded && dmg.members.map(\.device) == [fixture.path("dmg-0.img")])
        #expect(dmg.slots[1].state == .missing && dmg.slots[1].device == nil && dmg.slots[1].lastKnownName != nil)

        #expect(found.pools.map(\.name) == ["plain", "tank"])
        let tank = try found.pool(named: "tank")
        #expect(
            tank.devices.map(\.location) == [.array(name: "r5", uuid: fixture.r5.uuid)]
                && tank.devices.map(\.index) == [0])
        let plain = try found.pool(named: "plain")
        #expect(plain.devices.map(\.location) == [.image(fixture.path("pp-0.img")), .image(fixture.path("pp-1.img"))])
        #expect(
            plain.devices.map(\.index) == [0, 1] && !plain.hasGaps && plain.chunkBytes == ThinPool.defaultChunkBytes)

        #expect(found.damaged.count == 2, "\(found.damaged)")
        let superblock = found.damaged.first { $0.location == .device(fixture.path("dmg-1.img")) }
        guard case .arraySuperblock(.checksumMismatch)? = superblock?.reason else {
            Issue.record("dmg-1.img: expected a superblock checksum mismatch, got \(String(describing: superblock))")
            return
        }
        let label = found.damaged.first { $0.location == .device(fixture.path("lone.img")) }
        #expect(label?.reason == .poolLabel(.checksumMismatch))
        #expect(
            label?.description
                == "\(fixture.path("lone.img")): the thin pool label at offset 0 is corrupt (checksum mismatch)")
        let lone = found.devices.first { $0.name == fixture.path("lone.img") }
        guard case .damaged(.poolLabel(.checksumMismatch))? = lone?.header else {
            Issue.record("lone.img's header: \(String(describing: lone?.header))")
            return
        }
        guard case .none? = found.devices.first(where: { $0.name == fixture.path("junk.bin") })?.header else {
            Issue.record("junk.bin has no Spindle header")
            return
        }

        expectError(
            await spindleError { _ = try found.pool(named: "lone") }, .notFound,
            ["no pool named 'lone'", "they hold plain, tank", "Damaged and not used", "lone.img", "checksum"])
        expectError(await spindleError { _ = try found.array(named: "nope") }, .notFound, ["no array named 'nope'"])
        expectError(
            await spindleError { _ = try await Discovery.scan(folder: fixture.path("missing")) }, .notFound,
            ["cannot list the folder"])
    }

    @Test(
        "volume vm1 of pool tank opens as one handle: reads and writes go through, close closes everything, reopening works, no descriptor leaks"
    )
    func openVolumeByName() async throws {
        let fixture = try await DiscoveryFixture.make()
        let found = try await Discovery.scan(folder: fixture.folder.path, engine: fixture.engine)
        let vm1 = try await found.openVolume("vm1", inPool: "tank", engine: fixture.engine)
        #expect(vm1.capacityBytes == 8 << 20 && vm1.name == "tank/vm1" && vm1.stack.arrays.map(\.arrayName) == ["r5"])
        #expect(openDescriptors(matching: fixture.folder.path) >= 3, "the three members are open")
        #expect(byteDifference(try await readAll(vm1), fixture.vm1) == nil)
        let change = AlignedBuffer(count: 192 << 10)
        fillRandom(change.bytes, seed: 14)
        try await vm1.write(from: change, at: 6 << 20)
        fixture.vm1.replaceSubrange((6 << 20)..<((6 << 20) + (192 << 10)), with: change.array)
        #expect(
            try await vm1.dataRanges(in: 0..<(8 << 20)) == [
                (1 << 20)..<(5 << 20), (6 << 20)..<((6 << 20) + (192 << 10)),
            ])
        try await vm1.close()
        try await vm1.close()
        #expect(
            openDescriptors(matching: fixture.folder.path) == 0,
            "closing the volume handle closes the pool, the array and its images")
        #expect(FileDevice.writeLockHolder(path: fixture.path("r5-0.img")) == nil)
        expectError(await spindleError { _ = try await vm1.read(into: change, at: 0) }, .closed, [])

        let again = try await Discovery.scan(folder: fixture.folder.path, engine: fixture.engine)
        let reopened = try await again.openVolume("vm1", inPool: "tank", engine: fixture.engine)
        #expect(byteDifference(try await readAll(reopened), fixture.vm1) == nil)
        try await reopened.close()
        #expect(openDescriptors(matching: fixture.folder.path) == 0)

        // A pool on images; a missing volume leaves nothing open.
        let plain = try await again.openPool(named: "plain", engine: fixture.engine)
        #expect(plain.arrays.isEmpty)
        let w = try await plain.pool.openVolume(name: "w")
        #expect(byteDifference(try await readAll(w), fixture.plainData) == nil)
        try await plain.close()
        #expect(openDescriptors(matching: fixture.folder.path) == 0)
        expectError(
            await spindleError { _ = try await again.openVolume("ghost", inPool: "plain", engine: fixture.engine) },
            .notFound, ["ghost"])
        #expect(openDescriptors(matching: fixture.folder.path) == 0)
    }

    @Test(
        "arrays open by name: members left out are closed, a refused assembly closes everything, faults go between member and array"
    )
    func openArraysByName() async throws {
        let fixture = try await DiscoveryFixture.make()
        let found = try await Discovery.scan(folder: fixture.folder.path, engine: fixture.engine)
        let notes = Locked<[String]>([])
        var options = Discovery.OpenOptions(notes: { note in notes.withLock { $0.append(note) } })
        let deg = try await found.openArray(named: "deg", engine: fixture.engine, options: options)
        #expect(deg.status.state == .degraded)
        #expect(openDescriptors(matching: "deg-1.img") == 0, "the stale member is left out, and closed")
        #expect(openDescriptors(matching: "deg-0.img") >= 1)
        #expect(
            notes.withLock { $0 }.contains { $0.hasPrefix("deg: ") && $0.contains("deg-1.img is stale") },
            "\(notes.withLock { $0 })")
        try await deg.close()
        #expect(openDescriptors(matching: fixture.folder.path) == 0)

        expectError(
            await spindleError { _ = try await found.openArray(named: "mir", engine: fixture.engine) },
            .invalidArgument,
            ["are the same member"])
        #expect(openDescriptors(matching: fixture.folder.path) == 0, "a refused assembly closes what it opened")
        expectError(
            await spindleError {
                _ = try await Discovery.assembleArray(paths: [
                    fixture.path("r5-0.img"), fixture.folder.path + "/./r5-0.img",
                ])
            },
            .invalidArgument, ["the image is given twice"])

        // Every write to r5-1 fails: assembly's superblock update fails the member, RAID5 serves the
        // data from parity, and the member (under its injector) is closed with the array.
        options.faults = [fixture.folder.path + "/./r5-1.img": try FaultSpec.parse("write-error")]
        let stack = try await found.openPool(named: "tank", engine: fixture.engine, options: options)
        let vm1 = try await stack.pool.openVolume(name: "vm1")
        #expect(byteDifference(try await readAll(vm1), fixture.vm1) == nil)
        #expect(stack.arrays[0].status.state == .degraded)
        try await stack.close()
        #expect(
            openDescriptors(matching: fixture.folder.path) == 0, "the fault injector's member is closed with the array")
    }

    @Test("devices the caller opened are scanned as they are, and the stack opened from them takes them")
    func scanGivenDevices() async throws {
        let members = try (0..<3).map {
            try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096, name: "m\($0)")
        }
        let array = try await RAIDArray.create(name: "mem", level: .raid5, members: members)
        let pool = try await ThinPool.create(name: "p", devices: [array])
        let volume = try await pool.createVolume(name: "v", sizeBytes: 1 << 20)
        let data = AlignedBuffer(count: 1 << 20)
        fillRandom(data.bytes, seed: 15)
        try await volume.write(from: data, at: 0)
        try await pool.commit()
        // As after a crash: the same devices, opened again from what they hold.
        let found = try await Discovery.scan(devices: members.reversed())
        #expect(found.arrays.map(\.name) == ["mem"] && found.pools.map(\.name) == ["p"] && found.folder == nil)
        #expect(found.pools[0].devices.map(\.location) == [.array(name: "mem", uuid: array.arrayUUID)])
        let opened = try await found.openVolume("v", inPool: "p")
        #expect(byteDifference(try await readAll(opened), data.array) == nil)
        try await opened.close()
        expectError(await spindleError { _ = try await members[0].read(into: data, at: 0) }, .closed, [])
    }

    @Test(
        "ownership: a pool closes its devices, once; a refused create leaves them open and names the parameter, not a flag"
    )
    func poolOwnsItsDevices() async throws {
        let device = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096)
        let extra = try MemoryDevice(capacityBytes: 8 << 20, logicalBlockBytes: 4096, name: "extra")
        let pool = try await ThinPool.create(name: "own", devices: [device])
        try await pool.extend(adding: [extra])
        try await pool.close()
        try await pool.close()
        let buffer = AlignedBuffer(count: 4096)
        expectError(await spindleError { try await device.read(into: buffer, at: 0) }, .closed, [])
        expectError(await spindleError { try await extra.read(into: buffer, at: 0) }, .closed, [])

        let used = try MemoryDevice(capacityBytes: 16 << 20, logicalBlockBytes: 4096, name: "used")
        buffer.fill(0x42)
        try await used.write(from: buffer, at: 0)
        let refusal = await spindleError { _ = try await ThinPool.create(name: "no", devices: [used]) }
        expectError(refusal, .alreadyExists, ["holds data", "pass `overwrite: true`"])
        #expect(refusal?.message.contains("--force") == false)
        try await used.read(into: buffer, at: 0)
        #expect(buffer.array.allSatisfy { $0 == 0x42 }, "the refused create left the device open and unchanged")
    }
}
