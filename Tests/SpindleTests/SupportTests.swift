import Foundation
import Testing

@testable import Spindle

@Suite("Sizes, statistics and patterns")
struct SupportTests {
    @Test(
        "sizes parse with binary suffixes",
        arguments: [
            ("4096", UInt64(4096)), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("64KB", 65536), ("1M", 1 << 20),
            ("1.5G", 3 << 29), ("2T", 2 << 40), (" 10G ", 10 << 30), ("0.5K", 512), ("1P", 1 << 50),
        ])
    func parseSizes(text: String, bytes: UInt64) throws {
        #expect(try ByteSize.parse(text) == bytes)
    }

    @Test(
        "bad sizes say what to type",
        arguments: ["", "abc", "4X", "1.3K", "-1", "K", "1..5M", "99999999999T", "4 KiB B"])
    func rejectSizes(text: String) async {
        let error = await spindleError { _ = try ByteSize.parse(text) }
        #expect(error?.code == .invalidArgument)
    }

    @Test("errors keep their cause; codes encode as their names and compare by name")
    func errorsKeepTheirCause() throws {
        let problem = RAIDSuperblock.Problem.checksumMismatch(stored: 1, computed: 2)
        let error = SpindleError(.corrupted, "\(problem)", operation: "assemble", path: "a.img", cause: problem)
        #expect(error.cause as? RAIDSuperblock.Problem == problem)
        #expect(error.rootCause as? RAIDSuperblock.Problem == problem)
        let outer = SpindleError(.ioFailed, "the array could not start", cause: error)
        #expect((outer.rootCause as? RAIDSuperblock.Problem) == problem)
        #expect(outer != SpindleError(.ioFailed, "the array could not start"))
        let encoded = try JSONEncoder().encode([SpindleError.Code.corrupted, .noSpace])
        #expect(String(decoding: encoded, as: UTF8.self) == #"["corrupted","noSpace"]"#)
        #expect(try JSONDecoder().decode([SpindleError.Code].self, from: encoded) == [.corrupted, .noSpace])
        // A switch over codes keeps compiling as codes are added: it has a default branch.
        switch error.code {
        case .corrupted: break
        default: Issue.record("expected corrupted, got \(error.code)")
        }
    }

    @Test("sizes format with binary units")
    func formatSizes() {
        #expect(ByteSize.format(512) == "512 B")
        #expect(ByteSize.format(4096) == "4 KiB")
        #expect(ByteSize.format(3 << 29) == "1.5 GiB")
        #expect(ByteSize.format(1_000_000) == "976.56 KiB")
        #expect(formatDecimal(2.5, places: 1) == "2.5")
        #expect(formatDecimal(-0.004, places: 2) == "0")
    }

    @Test("histogram percentiles stay within 1.6% of the exact values")
    func histogramAgainstSorting() {
        var random = SeededRandom(seed: 5)
        var histogram = LatencyHistogram()
        var samples: [UInt64] = []
        for _ in 0..<20_000 {
            let value = random.below(5_000_000) + random.below(100)
            samples.append(value)
            histogram.record(value)
        }
        samples.sort()
        for fraction in [0.5, 0.9, 0.99, 0.999] {
            let exact = samples[Int((Double(samples.count) * fraction).rounded(.up)) - 1]
            let estimate = histogram.percentile(fraction)
            #expect(estimate >= exact, "p\(fraction): \(estimate) < \(exact)")
            #expect(Double(estimate - exact) <= Double(exact) * 0.016 + 1, "p\(fraction): \(estimate) vs \(exact)")
        }
        #expect(histogram.count == 20_000)
        #expect(histogram.maximumNanos == samples.last && histogram.minimumNanos == samples.first)
        var merged = LatencyHistogram()
        merged.merge(histogram)
        merged.merge(histogram)
        #expect(merged.count == 40_000 && merged.percentile(0.5) == histogram.percentile(0.5))
        #expect(LatencyHistogram().percentile(0.5) == 0)
    }

    @Test("histogram buckets cover every value in order")
    func histogramBuckets() {
        var previous = -1
        for exponent in 0..<63 {
            for value in Set([UInt64(1) << exponent, (UInt64(1) << exponent) + 1, (UInt64(1) << (exponent + 1)) - 1])
                .sorted()
            {
                let bucket = LatencyHistogram.bucket(of: value)
                #expect(bucket >= previous && bucket < LatencyHistogram.bucketCount)
                if exponent <= LatencyHistogram.maximumExponent {
                    #expect(LatencyHistogram.upperBound(of: bucket) >= value)
                }
                previous = bucket
            }
        }
    }

    @Test("seeded random numbers repeat and stay in bounds")
    func seededRandom() {
        var first = SeededRandom(seed: 1)
        var second = SeededRandom(seed: 1)
        var third = SeededRandom(seed: 2)
        let a = (0..<100).map { _ in first.next() }
        #expect(a == (0..<100).map { _ in second.next() })
        #expect(a != (0..<100).map { _ in third.next() })
        for bound in [1, 2, 7, 1000] as [UInt64] {
            for _ in 0..<1000 { #expect(first.below(bound) < bound) }
        }
    }

    @Test("verification blocks describe what they hold")
    func blockPattern() {
        let block = AlignedBuffer(count: 4096)
        let scratch = AlignedBuffer(count: 4096)
        BlockPattern.fill(block.bytes, seed: 7, offset: 8192, serial: 3)
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 7, offset: 8192, serial: 3, scratch: scratch.bytes) == nil)
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 7, offset: 8192, serial: 4, scratch: scratch.bytes)?
                .contains("expected write #4 but the block holds write #3 (lost or stale write)") == true)
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 7, offset: 4096, serial: 3, scratch: scratch.bytes)?
                .contains("offset 8192 (misdirected write)") == true)
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 8, offset: 8192, serial: 3, scratch: scratch.bytes)?
                .contains("data of seed 7") == true)
        block.bytes[100] ^= 1
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 7, offset: 8192, serial: 3, scratch: scratch.bytes)?
                .contains("corrupted data") == true)
        block.fill(0)
        #expect(
            BlockPattern.mismatch(block.readOnlyBytes, seed: 7, offset: 8192, serial: 0, scratch: scratch.bytes)?
                .contains("expected the layout pass but the block holds zeros") == true)
    }

    @Test("lock holders are read from /proc/locks")
    func lockHolderParsing() {
        let text = """
            1: POSIX  ADVISORY  WRITE 99 00:15:1234 0 EOF
            2: FLOCK  ADVISORY  WRITE 4242 fe:01:5678 0 EOF
            2: -> FLOCK  ADVISORY  WRITE 4343 fe:01:5678 0 EOF
            3: FLOCK  ADVISORY  WRITE 777 08:02:5678 0 EOF
            """
        let device = UInt64(0xfe) << 8 | 0x01
        #expect(FileLockHolder.holderPID(device: device, inode: 5678, locksText: text) == 4242)
        #expect(FileLockHolder.holderPID(device: UInt64(8) << 8 | 2, inode: 5678, locksText: text) == 777)
        #expect(FileLockHolder.holderPID(device: device, inode: 1234, locksText: text) == nil)
    }
}

@Suite("Fault specs")
struct FaultSpecTests {
    @Test("specs parse into faults")
    func parse() throws {
        let spec = try FaultSpec.parse("read-error,range=0-64M,probability=0.01,errno=61")
        #expect(spec.faults == [FaultyDevice.Fault(kinds: .reads, range: 0..<(64 << 20), probability: 0.01, errno: 61)])
        let timing = try FaultSpec.parse("latency=2ms, jitter=500us, vanish-after=100, fail-after=7")
        #expect(timing.latencyNanos == 2_000_000 && timing.jitterNanos == 500_000)
        #expect(timing.vanishAfterOperations == 100 && timing.failAfterOperations == 7)
        #expect(try FaultSpec.parse("write-error,flush-error").faults.first?.kinds == [.writes, .flushes])
        let silent = try FaultSpec.parse("corrupt-write,misdirect-write,range=1M-2M,probability=0.25")
        #expect(
            silent.faults == [
                FaultyDevice.Fault(.corruptAtRest, range: (1 << 20)..<(2 << 20), probability: 0.25),
                FaultyDevice.Fault(.misdirect, range: (1 << 20)..<(2 << 20), probability: 0.25),
            ])
        #expect(try FaultSpec.parse("corrupt-read").faults == [FaultyDevice.Fault(.corruptOnRead)])
        #expect(try FaultSpec.parse("lose-write").faults.first?.kinds == .writes)
    }

    @Test(
        "bad specs say what is wrong",
        arguments: [
            ("nonsense", "unknown fault 'nonsense'"), ("read-error,range=5", "range is START-END"),
            ("read-error,probability=2", "probability is a number"), ("latency=fast", "not a duration"),
            ("range=0-1M", "go with read-error"), ("probability=0.5", "or a silent fault"), ("", "names no fault"),
            ("vanish-after", "needs a value"),
        ])
    func rejects(text: String, fragment: String) async {
        let error = await spindleError { _ = try FaultSpec.parse(text) }
        expectError(error, .invalidArgument, [fragment])
    }

    @Test("a spec applied to a device injects its faults")
    func applies() async throws {
        let device = FaultyDevice(wrapping: try MemoryDevice(capacityBytes: 1 << 20))
        try FaultSpec.parse("write-error,range=0-4K").apply(to: device)
        let buffer = AlignedBuffer(count: 4096)
        expectError(await spindleError { try await device.write(from: buffer, at: 0) }, .injectedFault, ["write"])
        try await device.write(from: buffer, at: 4096)
    }
}
