import ArgumentParser
import Foundation
import Spindle

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Run a fio-like load on an image and report IOPS, throughput and latency.",
        discussion: """
            The target is an image file, or an NBD export given by its URI (nbd://HOST[:PORT]/EXPORT or \
            nbd+unix:///EXPORT?socket=PATH). When an image does not exist and --size is given, it is \
            created and, for loads that read, written in full first (as fio lays out its files) so that \
            reads measure data rather than holes. --verify writes self-describing blocks, checks every block read and \
            reads back every block written at the end.

            Examples:
              spindle bench disk.img --rw randread --bs 4K --iodepth 32 --runtime 10
              spindle bench disk.img --rw write --bs 1M --iodepth 8 --size 1G --verify
              spindle bench nbd+unix:///disk?socket=/tmp/nbd.sock --rw randwrite --bs 4K --iodepth 32
            """)

    @Argument(help: "The image or NBD URI to load (or use --array or --volume).")
    var target: String?

    @Option(parsing: .upToNextOption, help: "Run on the RAID array made of these member images instead of one image.")
    var array: [String] = []

    @Option(help: "Run on the thin volume POOL/NAME instead (the pool is found in --dir).")
    var volume: String?

    /// The folder holding the pool of --volume, and its metadata cache.
    @OptionGroup var folder: PoolFolder

    @Option(help: "Access pattern: read, write, randread, randwrite or randrw.")
    var rw: Bench.Pattern = .randread

    @Option(help: "Bytes per request, such as 4K or 1M.", transform: parseSize)
    var bs: UInt64 = 4096

    @Option(help: "Requests kept in flight.")
    var iodepth: Int = 1

    @Option(
        help: "Bytes of the device to touch (from --offset); creates the image at this size if it is missing.",
        transform: parseSize)
    var size: UInt64?

    @Option(help: "Start of the region, in bytes.", transform: parseSize)
    var offset: UInt64 = 0

    @Option(help: "Seconds to run (default 10 unless --ops is given).")
    var runtime: Double?

    @Option(help: "Requests to complete, instead of a runtime.")
    var ops: UInt64?

    @Option(help: "Share of reads in randrw, in percent.")
    var rwmixread: Int = 50

    @Flag(inversion: .prefixedNo, help: "Bypass the page cache with O_DIRECT.")
    var direct = true

    @Option(help: "Seed for offsets, the read/write mix and verified contents.")
    var seed: UInt64 = 1

    @Flag(help: "Check every byte read against what was written.")
    var verify = false

    @Flag(help: "Write the whole region before measuring.")
    var fill = false

    @Flag(
        help:
            "Write nothing: read every block once and check it holds, whole, a block that an earlier '--fill --verify' run with the same --seed and --bs wrote (its layout pass or any later write of it; a lost write that left an older one of that run is not told apart)."
    )
    var verifyExisting = false

    @Option(
        help: ArgumentHelp(
            "How workers reach the engine: 'reactor' runs them on the engine's thread (the default, batched), 'global' on Swift's global executor (a cross-thread hand-off per request).",
            visibility: .hidden))
    var executor: String = "reactor"

    @Flag(
        inversion: .prefixedNo,
        help: ArgumentHelp("Set up the ring with IORING_SETUP_DEFER_TASKRUN.", visibility: .hidden))
    var deferTaskrun = true

    @Option(
        name: .customLong("submit-batch"),
        help: ArgumentHelp("Prepared requests that make the engine submit at once.", visibility: .hidden))
    var submitBatch: Int = IOEngine.Configuration().submitBatch

    @Option(
        help: ArgumentHelp(
            "Inject faults: SPEC for the image, or MEMBER:SPEC for a member of --array. SPEC is comma-separated: read-error, write-error, flush-error, range=START-END, probability=P, errno=N, fail-after=N, vanish-after=N, latency=2ms, jitter=1ms.",
            valueName: "spec"))
    var fault: [String] = []

    @Flag(
        help: ArgumentHelp(
            "Measure the integrity layer's block checksum, CRC32C alone and memcpy over 4 KiB blocks in memory (MiB/s), instead of a load.",
            visibility: .hidden))
    var checksumRate = false

    @Flag(help: "Print the report as JSON.")
    var json = false

    func validate() throws {
        if checksumRate { return }
        guard [target != nil, !array.isEmpty, volume != nil].filter({ $0 }).count == 1 else {
            throw ValidationError(
                "give one image to load, the member images of an array with --array, or a thin volume with --volume POOL/NAME"
            )
        }
        guard iodepth >= 1 && iodepth <= 4096 else { throw ValidationError("--iodepth must be from 1 to 4096") }
        guard (0...100).contains(rwmixread) else {
            throw ValidationError("--rwmixread must be a percentage from 0 to 100")
        }
        if let runtime, !(runtime > 0) { throw ValidationError("--runtime must be more than 0 seconds, such as 10") }
        if let ops, ops == 0 { throw ValidationError("--ops must be at least 1") }
        guard bs > 0 && bs <= 64 << 20 else { throw ValidationError("--bs must be from 512 bytes to 64M") }
        guard executor == "reactor" || executor == "global" else {
            throw ValidationError("--executor must be 'reactor' or 'global'")
        }
    }

    func run() async throws {
        if checksumRate {
            let rates = ChecksumRates.measure()
            if json {
                try Terminal.printJSON(rates)
            } else {
                print(
                    "4 KiB blocks in memory: integrity block checksum \(Int(rates.blockChecksumMiBPerSecond)) MiB/s, CRC32C \(Int(rates.crc32cMiBPerSecond)) MiB/s, memcpy \(Int(rates.memcpyMiBPerSecond)) MiB/s"
                )
            }
            return
        }
        var configuration = IOEngine.Configuration()
        configuration.deferTaskRun = deferTaskrun
        configuration.submitBatch = submitBatch
        let engine = try IOEngine(configuration: configuration)
        defer { engine.shutdown() }

        if !array.isEmpty {
            try await runOnArray(engine: engine)
            return
        }
        if let volume {
            try await runOnVolume(volume, engine: engine)
            return
        }
        let target = self.target!
        if NBDAddress.looksLikeURI(target) {
            try await runOnRemote(try NBDAddress(parsing: target), engine: engine)
            return
        }
        // A load that only reads opens the image read-only, as fio does: no write lock is taken.
        let readOnly = verifyExisting || (!rw.writesData && !fill && !verify)
        let directIO: FileDevice.DirectIO = direct ? .preferred : .disabled
        // Parsed before the image is created, so that a bad spec leaves nothing behind.
        let faultSpecs = try fault.map { text throws(SpindleError) in try FaultSpec.parse(text) }
        let (device, created) = try openTarget(target, engine: engine, readOnly: readOnly, directIO: directIO)
        if direct, let note = device.directIONote { Terminal.warning("\(target): \(note)") }
        var loaded: any BlockDevice = device
        if !faultSpecs.isEmpty {
            let faulty = FaultyDevice(wrapping: device, seed: seed, name: target)
            for spec in faultSpecs { spec.apply(to: faulty) }
            loaded = faulty
        }

        let options = options(fill: fill || (created && rw.readsData))

        if rw.readsData && !options.fill && !verify && !verifyExisting,
            let allocated = try? device.allocatedBytes(), allocated < device.capacityBytes / 2
        {
            Terminal.warning(
                "\(target) is mostly unwritten (\(ByteSize.format(allocated)) of \(ByteSize.format(device.capacityBytes)) allocated): reads of holes are faster than reads of data; add --fill for honest figures"
            )
        }

        let showProgress = Terminal.showsProgress && !json
        var progress: (@Sendable (Bench.Progress) -> Void)?
        if showProgress {
            progress = { @Sendable state in Terminal.progress(BenchCommand.describe(state)) }
        }
        let workerEngine: IOEngine? = executor == "reactor" ? engine : nil
        let report: Bench.Report
        do {
            report = try await Bench.run(on: loaded, options: options, engine: workerEngine, progress: progress)
        } catch {
            if showProgress { Terminal.endProgress() }
            try? await device.close()
            // A refused load (its options do not fit the image) leaves no image it created.
            if created && isRefusal(error) { try? FileDevice.remove(path: target) }
            throw error
        }
        if showProgress { Terminal.endProgress() }
        try await device.close()

        if json {
            try Terminal.printJSON(
                BenchOutput(report: report, directIO: device.usesDirectIO, engineRingFlags: engine.ringFlags))
        } else {
            printHuman(report, directIO: device.usesDirectIO)
        }
    }

    /// Runs the load on a remote export (its size is the server's; --size bounds the region).
    private func runOnRemote(_ address: NBDAddress, engine: IOEngine) async throws {
        guard fault.isEmpty else { throw ValidationError("--fault applies to images and arrays, not remote exports") }
        let readOnly = verifyExisting || (!rw.writesData && !fill && !verify)
        let device = try await NBDDevice.connect(
            address, engine: engine, options: NBDDevice.Options(readOnly: readOnly))
        let showProgress = Terminal.showsProgress && !json
        let progress: (@Sendable (Bench.Progress) -> Void)? =
            showProgress ? { @Sendable state in Terminal.progress(BenchCommand.describe(state)) } : nil
        let report: Bench.Report
        do {
            report = try await Bench.run(
                on: device, options: options(fill: fill), engine: executor == "reactor" ? engine : nil,
                progress: progress)
        } catch {
            if showProgress { Terminal.endProgress() }
            try? await device.close()
            throw error
        }
        if showProgress { Terminal.endProgress() }
        try await device.close()
        if json {
            try Terminal.printJSON(BenchOutput(report: report, directIO: false, engineRingFlags: engine.ringFlags))
        } else {
            printHuman(report, directIO: nil)
        }
    }

    /// Opens the target image, or creates it at --size (returning whether it did).
    private func openTarget(_ target: String, engine: IOEngine, readOnly: Bool, directIO: FileDevice.DirectIO) throws
        -> (FileDevice, Bool)
    {
        do {
            return (
                try FileDevice.open(
                    path: target, engine: engine, options: FileDevice.Options(readOnly: readOnly, directIO: directIO)),
                false
            )
        } catch {
            guard error.code == .notFound else { throw error }
            guard let size else {
                throw SpindleError(
                    .notFound, "no such image file; give --size to create it", operation: "open", path: target)
            }
            return (
                try FileDevice.create(
                    path: target, sizeBytes: offset + size, engine: engine,
                    options: FileDevice.Options(directIO: directIO)), true
            )
        }
    }

    /// Opens the pool and runs the load on one of its volumes.
    private func runOnVolume(_ path: String, engine: IOEngine) async throws {
        guard fault.isEmpty else {
            throw ValidationError("--fault applies to an image or --array members, not to --volume")
        }
        let (poolName, volumeName) = try PoolStore.split(path)
        let found = try await Discovery.scan(folder: folder.path)
        let opened = try await found.open(
            try PoolStore.find(poolName, in: found, folder: folder.path), engine: engine,
            options: PoolStore.openOptions(metadataCacheBytes: folder.metadataCacheBytes))
        var progress: (@Sendable (Bench.Progress) -> Void)?
        if Terminal.showsProgress && !json { progress = BenchCommand.printProgress }
        let workerEngine: IOEngine? = executor == "reactor" ? engine : nil
        let report: Bench.Report
        do {
            let target = try await opened.pool.openVolume(name: volumeName)
            report = try await Bench.run(
                on: target, options: options(fill: fill), engine: workerEngine, progress: progress)
            if Terminal.showsProgress && !json { Terminal.endProgress() }
        } catch {
            if Terminal.showsProgress && !json { Terminal.endProgress() }
            try? await opened.close()
            throw error
        }
        try await opened.close()
        if json {
            try Terminal.printJSON(BenchOutput(report: report, directIO: direct, engineRingFlags: engine.ringFlags))
        } else {
            printHuman(report, directIO: direct)
        }
    }

    /// Assembles the array from its member images and runs the load on it.
    private func runOnArray(engine: IOEngine) async throws {
        var faults: [String: FaultSpec] = [:]
        for text in fault {
            guard let colon = text.firstIndex(of: ":") else {
                throw ValidationError(
                    "with --array, write a fault as MEMBER:SPEC, such as \(array[0]):read-error,probability=0.01")
            }
            let member = String(text[..<colon])
            guard array.contains(member) else {
                throw ValidationError("'\(member)' in --fault is not one of the --array images")
            }
            faults[member] = try FaultSpec.parse(String(text[text.index(after: colon)...]))
        }
        var assembly = PoolStore.openOptions()
        assembly.faults = faults
        assembly.faultSeed = seed
        let raid = try await Discovery.assembleArray(paths: array, engine: engine, options: assembly)
        var progress: (@Sendable (Bench.Progress) -> Void)?
        if Terminal.showsProgress && !json { progress = BenchCommand.printProgress }
        let workerEngine: IOEngine? = executor == "reactor" ? engine : nil
        let benchOptions = options(fill: fill)
        let report: Bench.Report
        do {
            report = try await Bench.run(on: raid, options: benchOptions, engine: workerEngine, progress: progress)
            if Terminal.showsProgress && !json { Terminal.endProgress() }
        } catch {
            if Terminal.showsProgress && !json { Terminal.endProgress() }
            try? await raid.close()
            throw error
        }
        try await raid.close()
        if json {
            try Terminal.printJSON(BenchOutput(report: report, directIO: direct, engineRingFlags: engine.ringFlags))
        } else {
            printHuman(report, directIO: direct)
        }
    }

    private func options(fill: Bool) -> Bench.Options {
        var options = Bench.Options(pattern: rw)
        options.blockBytes = Int(bs)
        options.ioDepth = iodepth
        options.regionOffset = offset
        options.regionBytes = size
        options.runtimeSeconds = runtime
        options.operations = ops
        options.readPercent = rwmixread
        options.seed = seed
        options.verify = verify
        options.fill = fill
        options.verifyExisting = verifyExisting
        return options
    }

    @Sendable static func printProgress(_ progress: Bench.Progress) {
        Terminal.progress(describe(progress))
    }

    static func describe(_ progress: Bench.Progress) -> String {
        let seconds = formatDecimal(progress.elapsedSeconds, places: 1)
        var line =
            "  \(progress.phase): \(seconds) s, \(progress.operations) requests, \(ByteSize.format(progress.doneBytes))"
        if let total = progress.totalBytes, total > 0 {
            line += " of \(ByteSize.format(total)) (\(progress.doneBytes * 100 / total)%)"
            if progress.elapsedSeconds > 0 && progress.doneBytes > 0 {
                let rate = Double(progress.doneBytes) / progress.elapsedSeconds
                let remaining = Double(total - min(progress.doneBytes, total)) / rate
                line += ", \(ByteSize.format(UInt64(rate)))/s, \(formatDecimal(remaining, places: 0)) s left"
            }
        }
        return line
    }

    private func printHuman(_ report: Bench.Report, directIO: Bool?) {
        let options = report.options
        print(
            "\(options.pattern.rawValue) on \(report.device): \(ByteSize.format(UInt64(options.blockBytes))) requests, depth \(options.ioDepth), \(ByteSize.format(report.regionBytes)) region, \(directIO.map { $0 ? "direct I/O" : "page cache" } ?? "over NBD")"
        )
        if report.layoutBytes > 0 { print("  layout: wrote \(ByteSize.format(report.layoutBytes)) before measuring") }
        for (label, direction) in [("read", report.read), ("write", report.write)] {
            guard let direction else { continue }
            print(
                "  \(label): \(formatCount(direction.iops)) IOPS, \(formatDecimal(direction.mebibytesPerSecond, places: 1)) MiB/s, latency mean \(formatLatency(UInt64(direction.latencyNanosMean))), p50 \(formatLatency(direction.latencyNanosP50)), p99 \(formatLatency(direction.latencyNanosP99)), p99.9 \(formatLatency(direction.latencyNanosP999)), max \(formatLatency(direction.latencyNanosMax))"
            )
        }
        print(
            "  total: \(report.operations) requests, \(ByteSize.format(report.bytes)) in \(formatDecimal(report.elapsedSeconds, places: 2)) s"
        )
        if options.verify || options.verifyExisting {
            print("  verify: \(report.verifiedBlocks) blocks checked, all correct")
        }
    }
}

extension Bench.Pattern: ExpressibleByArgument {
    var readsData: Bool { self == .read || self == .randread || self == .randrw }
    var writesData: Bool { self == .write || self == .randwrite || self == .randrw }
}

/// The JSON report: the library's report plus how the device and engine were set up.
struct BenchOutput: Encodable {
    var report: Bench.Report
    var directIO: Bool
    var engineRingFlags: UInt32
}

func formatLatency(_ nanos: UInt64) -> String {
    if nanos < 1_000 { return "\(nanos) ns" }
    if nanos < 1_000_000 { return "\(formatDecimal(Double(nanos) / 1e3, places: 1)) µs" }
    if nanos < 1_000_000_000 { return "\(formatDecimal(Double(nanos) / 1e6, places: 2)) ms" }
    return "\(formatDecimal(Double(nanos) / 1e9, places: 2)) s"
}

func formatCount(_ value: Double) -> String {
    if value >= 1e6 { return "\(formatDecimal(value / 1e6, places: 2))M" }
    if value >= 1e4 { return "\(formatDecimal(value / 1e3, places: 1))k" }
    return formatDecimal(value, places: 0)
}

/// What `bench --checksum-rate` measures: the CPU cost of the integrity layer's checksums beside a copy.
struct ChecksumRates: Codable {
    var blockChecksumMiBPerSecond: Double
    var crc32cMiBPerSecond: Double
    var memcpyMiBPerSecond: Double

    /// Medians of 5 passes over 64 MiB of random 4 KiB blocks.
    static func measure() -> ChecksumRates {
        let bytes = 64 << 20
        let source = AlignedBuffer(count: bytes)
        let target = AlignedBuffer(count: bytes)
        var random = SeededRandom(seed: 1)
        for offset in stride(from: 0, to: bytes, by: 8) {
            source.bytes.storeBytes(of: random.next(), toByteOffset: offset, as: UInt64.self)
        }
        let checksum = BlockChecksum(uuid: .random())
        func rate(_ body: () -> UInt32) -> Double {
            var rates: [Double] = []
            var sink: UInt32 = 0
            for _ in 0..<5 {
                let started = monotonicNanos()
                sink ^= body()
                rates.append(Double(bytes) / 1_048_576 / (Double(monotonicNanos() - started) / 1e9))
            }
            if sink == 0x5EED { print("", terminator: "") }  // keeps the work from being optimized away
            return rates.sorted()[2]
        }
        let block = 4096
        let blockRate = rate {
            var folded: UInt32 = 0
            for offset in stride(from: 0, to: bytes, by: block) {
                folded ^= checksum.stored(
                    for: UnsafeRawBufferPointer(source.slice(offset: offset, length: block)),
                    index: UInt64(offset / block))
            }
            return folded
        }
        let crcRate = rate {
            var folded: UInt32 = 0
            for offset in stride(from: 0, to: bytes, by: block) {
                folded ^= CRC32C.checksum(UnsafeRawBufferPointer(source.slice(offset: offset, length: block)))
            }
            return folded
        }
        let copyRate = rate {
            for offset in stride(from: 0, to: bytes, by: block) {
                target.slice(offset: offset, length: block).copyMemory(
                    from: UnsafeRawBufferPointer(source.slice(offset: offset, length: block)))
            }
            return UInt32(target.bytes[bytes - 1])
        }
        withExtendedLifetime((source, target)) {}
        return ChecksumRates(
            blockChecksumMiBPerSecond: blockRate, crc32cMiBPerSecond: crcRate, memcpyMiBPerSecond: copyRate)
    }
}
