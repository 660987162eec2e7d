extension StackSimulation {
    /// One run: the stack under test (members, array, pool), the model of every volume, the random
    /// stream every choice is drawn from, and the operations that act on them. The steps of the
    /// workload are in StackSimulation+Steps.swift; power cuts and the final checks in
    /// StackSimulation+Checks.swift.
    final class Run {
        // Named here for the extensions of this class in other files.
        typealias Mismatch = StackSimulation.Mismatch
        typealias VolumeModel = StackSimulation.VolumeModel

        let options: Options
        let record: Record
        /// Write errors, paused rebuilds, idle moments and the rest of ``Options/extendedFaults``.
        let extended: Bool
        /// A pool too small for its volumes (one seed in four, with the extended faults).
        let tight: Bool
        let widened: Bool
        let config: Configuration
        var random: SeededRandom
        var memberCounter: Int
        var members: [FaultyDevice]
        var array: RAIDArray
        var pool: ThinPool?
        var models: [String: VolumeModel]
        /// The number of the current operation.
        var counter = 0
        /// 1 while read errors (or silent faults) injected on a member are active.
        var readErrorsActive = 0
        /// The kind of the silent fault episode under way, if one is.
        var silentEpisode: String?

        var memberBytes: UInt64 { config.memberBytes }
        /// The smallest request: the members' logical block.
        var unit: Int { config.blockBytes }

        /// Builds the stack the seed calls for.
        init(_ options: Options, record: Record) async throws {
            self.options = options
            self.record = record
            random = SeededRandom(seed: options.seed)
            let extended = options.extendedFaults
            self.extended = extended
            // One seed in four (with the extended faults) gets a pool too small for its volumes.
            let tight = extended && options.seed % 4 == 3
            self.tight = tight
            let widened = extended && options.widened
            self.widened = widened
            var config =
                widened
                ? Configuration.drawn(seed: options.seed, level: options.level, tight: tight)
                : Configuration(
                    level: options.level, members: options.members, chunkBytes: 16384, withPool: true,
                    memberBytes: tight ? (options.level == .raid5 ? 4 << 20 : 5 << 20) : options.memberBytes,
                    blockBytes: 4096)
            if options.integrity {
                // The layer takes about 0.1% and its own MiB: members grow by that, and take 4 KiB requests.
                config.memberBytes = IntegritySuperblock.underlyingBytes(forDataBytes: config.memberBytes)
                config.blockBytes = 4096
                config.integrity = true
            }
            self.config = config
            record.report.configuration = config
            let members = try (1...config.members).map { try Self.member($0, options: options, config: config) }
            memberCounter = config.members
            self.members = members
            record.devices = members
            array = try await RAIDArray.create(
                name: "sim", level: config.level, chunkBytes: config.chunkBytes, members: members,
                integrity: options.integrity)
            Self.quietIntegrity(of: array)
            // Wall-clock behaviour (marking an idle array clean) would make runs differ by timing; the
            // simulation makes its own idle moments.
            array.setIdleCleanDelay(nanoseconds: .max)
            if config.withPool {
                let created = try await ThinPool.create(name: "sim", devices: [array])
                _ = try await created.createVolume(name: "v0", sizeBytes: options.volumeBytes)
                try await created.commit()
                pool = created
                models = ["v0": VolumeModel([UInt8](repeating: 0, count: Int(options.volumeBytes)))]
            } else {
                // The workload goes to the array itself (which zeroed its data areas when it was created).
                models = [
                    "array": VolumeModel(
                        [UInt8](repeating: 0, count: Int(array.capacityBytes)), blockBytes: config.blockBytes)
                ]
            }
        }

        /// Member number `number`: an in-memory disk behind a fault-injecting device with a volatile cache.
        private static func member(_ number: Int, options: Options, config: Configuration) throws -> FaultyDevice {
            let memory = try MemoryDevice(
                capacityBytes: config.memberBytes, logicalBlockBytes: config.blockBytes, name: "member\(number)")
            return FaultyDevice(
                wrapping: memory, seed: options.seed &+ UInt64(number), volatileCache: true, name: "member\(number)")
        }

        func newMember() throws -> FaultyDevice {
            memberCounter += 1
            let member = try Self.member(memberCounter, options: options, config: config)
            record.devices.append(member)
            return member
        }

        /// Turns off the members' integrity layers' idle cleaning (wall-clock behaviour would make
        /// runs differ by timing), for members added or reassembled too.
        func quietIntegrity() { Self.quietIntegrity(of: array) }

        static func quietIntegrity(of array: RAIDArray) {
            for member in array.readableMembers() + array.writableMembers() {
                (member?.device as? IntegrityDevice)?.setIdleCleanDelay(nanoseconds: 0)
            }
        }

        /// Where the array's data lies on a member's disk: under the integrity layer, past its
        /// checksums and the array's metadata (silent faults hit there, so that each of them is one
        /// a checksum must catch, and none lands on a header that carries its own).
        var memberDataRange: Range<UInt64> {
            let layout = IntegritySuperblock.layout(
                underlyingBytes: config.memberBytes, uuid: .zero, policy: .redundant,
                selfCheckedBytes: RAIDArray.dataOffset, createdSeconds: 0)!
            let start = layout.dataOffset + RAIDArray.dataOffset
            return start..<(start + array.geometry.memberDataBytes)
        }

        /// Starts epoch `epoch` on every member: from here on, which requests meet faults depends only
        /// on the requests of this epoch, not on the order they reach a member.
        func beginEpoch(_ epoch: Int) {
            for member in members { member.beginEpoch(UInt64(epoch)) }
        }

        /// The device a model stands for: a thin volume, or the array.
        func device(_ name: String) async throws -> any BlockDevice {
            guard let pool else { return array }
            return try await pool.openVolume(name: name)
        }
        /// A request of `size`-unit volume: as before with a pool (1 to `most` blocks); on the array
        /// itself, shapes that select each write path (a few sectors in one chunk, a chunk or more
        /// across boundaries, whole stripes, several stripes) at any 512-byte offset.
        func extent(size: Int, most: Int) -> (first: Int, blocks: Int) {
            if config.withPool {
                let blocks = min(1 + Int(random.below(UInt64(most))), size)
                return (Int(random.below(UInt64(size - blocks + 1))), blocks)
            }
            let chunkUnits = Int(config.chunkBytes) / unit
            let stripeUnits = Int(array.geometry.stripeDataBytes) / unit
            var blocks: Int
            var first: Int
            switch random.below(5) {
            case 0: blocks = 1 + Int(random.below(16))
            case 1: blocks = 1 + Int(random.below(UInt64(chunkUnits * 2)))
            case 2: blocks = stripeUnits
            case 3: blocks = stripeUnits * (1 + Int(random.below(3))) + Int(random.below(UInt64(chunkUnits)))
            default: blocks = 1 + Int(random.below(UInt64(min(size, 4 * stripeUnits))))
            }
            blocks = min(blocks, size)
            first =
                random.chance(0.25)
                ? Int(random.below(UInt64(size / stripeUnits))) * stripeUnits
                : Int(random.below(UInt64(size - blocks + 1)))
            first = min(first, size - blocks)
            return (first, blocks)
        }
        func log(_ line: String, volume: String? = nil, blocks: Range<Int>? = nil, origin: String? = nil) {
            record.steps.append(Step(index: counter, text: line, volume: volume, blocks: blocks, origin: origin))
        }
        func commitAll() { for name in models.keys { models[name]!.committed() } }
        func pickVolume(writable: Bool) -> String? {
            let names = models.keys.sorted().filter { !writable || !models[$0]!.readOnly }
            return names.isEmpty ? nil : names[Int(random.below(UInt64(names.count)))]
        }
        /// Every slot active and no rebuild pending.
        func isWhole() -> Bool {
            let status = array.status
            return status.rebuildSlot == nil && status.slots.allSatisfy { $0.state == .active }
        }
        /// Whether a fault that needs every member may start now (without the extended faults, as
        /// the earlier generator decided it).
        func mayInject() -> Bool { extended ? isWhole() : array.status.state != .degraded }
        /// Whether member faults may start now: never on RAID0, which has no redundancy for them.
        func mayFault() -> Bool { config.level != .raid0 && mayInject() }
        /// After a write the pool refused for want of space: each block must hold its old or its new
        /// contents; what it holds becomes the model's.
        func settleRefusedWrite(_ name: String, first: Int, data: [UInt8]) async throws {
            let old = models[name]!.current
            let buffer = AlignedBuffer(count: data.count, zeroed: false)
            try await device(name).read(into: buffer, at: UInt64(first * unit))
            let got = buffer.array
            for block in 0..<(data.count / unit) {
                let range = (block * unit)..<((block + 1) * unit)
                let bytes = Array(got[range])
                if bytes == Array(data[range]) {
                    models[name]!.apply(bytes, at: (first + block) * unit)
                } else if bytes != Array(old[((first + block) * unit)..<((first + block + 1) * unit)]) {
                    throw Mismatch(
                        message:
                            "seed \(options.seed): after a write refused for want of space, \(name) block \(first + block) holds neither its old nor its new contents",
                        volume: name, block: first + block)
                }
            }
        }
        func write(fua: Bool) async throws {
            guard let name = pickVolume(writable: true) else { return }
            let size = models[name]!.current.count
            // A tight pool gets larger writes, to fill it.
            let (first, blocks) = extent(size: size / unit, most: tight ? 64 : 16)
            let data = AlignedBuffer(count: blocks * unit, zeroed: false)
            fillRandom(data.bytes, seed: options.seed << 24 ^ UInt64(counter))
            log(
                "write \(name) blocks \(first)+\(blocks)\(fua ? " fua" : "")", volume: name,
                blocks: first..<(first + blocks))
            do {
                try await device(name).write(from: data, at: UInt64(first * unit), fua: fua)
            } catch let error as SpindleError where error.code == .noSpace && tight {
                log("  refused: the pool is full", volume: name, blocks: first..<(first + blocks))
                record.report.poolFullErrors += 1
                try await settleRefusedWrite(name, first: first, data: data.array)
                return
            }
            models[name]!.apply(data.array, at: first * unit)
            if fua {
                if config.withPool {
                    commitAll()  // a thin volume's FUA write commits the pool, and with it every write before
                } else {
                    // On the array a FUA write makes itself durable, not the unflushed writes before it.
                    models[name]!.durable.replaceSubrange((first * unit)..<((first + blocks) * unit), with: data.bytes)
                }
            }
            record.report.writes += 1
        }
        /// Reads `count` units at `first` of `name` and compares them with the model; with
        /// `mayFail`, an I/O error is allowed (a read error where no redundancy is left).
        func check(_ name: String, first: Int, count: Int, mayFail: Bool = false) async throws {
            let buffer = AlignedBuffer(count: count * unit, zeroed: false)
            do {
                try await device(name).read(into: buffer, at: UInt64(first * unit))
            } catch let error as SpindleError where mayFail && error.code == .ioFailed {
                log("  failed: \(error.message)", volume: name, blocks: first..<(first + count))
                record.report.unrecoverableReads += 1
                return
            }
            let expected = Array(models[name]!.current[(first * unit)..<((first + count) * unit)])
            if buffer.array != expected {
                let got = buffer.array
                let index = (0..<got.count).first { got[$0] != expected[$0] }!
                throw Mismatch(
                    message:
                        "seed \(options.seed): \(name) byte \(first * unit + index) (block \(first + index / unit)) reads \(got[index]), the model says \(expected[index])",
                    volume: name, block: first + index / unit)
            }
        }
        /// Replaces the member that is not active (failed by write errors, or left out) and
        /// rebuilds onto the new one; with the extended faults the rebuild may pause part way.
        func replaceAndRebuild(_ victim: FaultyDevice, reason: String) async throws {
            log("\(reason): replace \(victim.name) and rebuild")
            if array.status.slots.contains(where: { $0.device == victim.name && $0.state == .active }) {
                try await array.fail(memberNamed: victim.name)
            }
            let replacement = try newMember()
            try await array.replace(memberNamed: victim.name, with: replacement)
            quietIntegrity()
            members[members.firstIndex { $0 === victim }!] = replacement
            record.report.memberFailures += 1
            if extended && random.chance(0.4) {
                let stop =
                    widened
                    ? max(1, random.below(array.geometry.memberDataBytes >> 20)) << 20
                    : (1 + random.below((memberBytes >> 20) - 2)) << 20
                _ = try await array.rebuild(checkpointBytes: 1 << 20, stopAtBytes: stop)
                log("  rebuild paused at \(stop >> 20) MiB")
                record.report.pausedRebuilds += 1
            } else {
                _ = try await array.rebuild()
                record.report.rebuilds += 1
            }
        }
        /// The member whose slot is not active, when there is one.
        func brokenMember() -> FaultyDevice? {
            let active = Set(array.status.slots.filter { $0.state == .active }.compactMap(\.device))
            return members.first { !active.contains($0.name) }
        }
    }
}
