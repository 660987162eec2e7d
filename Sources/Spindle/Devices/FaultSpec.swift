import Glibc

/// Faults written as text, for command lines: `read-error`, `write-error`, `flush-error`, the silent
/// faults `corrupt-read`, `corrupt-write`, `misdirect-write`, `lose-write` (``FaultyDevice/Silent``),
/// `range=START-END`, `probability=P`, `errno=N`, `fail-after=N`, `vanish-after=N`, `latency=D`,
/// `jitter=D`, separated by commas. `range=` and `probability=` apply to every fault named in the
/// spec. Sizes take K/M/G suffixes; durations take ns, us, ms or s.
///
/// Examples: `read-error,range=0-64M,probability=0.01` · `vanish-after=100000` · `latency=2ms,jitter=1ms` ·
/// `corrupt-write,misdirect-write,probability=0.001`
public struct FaultSpec: Sendable, Equatable {
    public var faults: [FaultyDevice.Fault] = []
    public var failAfterOperations: UInt64?
    public var vanishAfterOperations: UInt64?
    public var latencyNanos: UInt64 = 0
    public var jitterNanos: UInt64 = 0

    public init() {}

    /// Parses a spec.
    /// - Throws: ``SpindleError/Code/invalidArgument`` naming the part it could not read.
    public static func parse(_ text: String) throws(SpindleError) -> FaultSpec {
        var spec = FaultSpec()
        var kinds: FaultyDevice.Kinds = []
        var silent: [FaultyDevice.Silent] = []
        var range: Range<UInt64>?
        var probability = 1.0
        var errorNumber = EIO
        for part in text.split(separator: ",").map({ String($0).trimmingSpaces() }) where !part.isEmpty {
            let pieces = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let key = pieces[0]
            guard !key.isEmpty else { throw invalid(text, "'\(part)' has no name before '='") }
            let value = pieces.count == 2 ? pieces[1] : nil
            func need() throws(SpindleError) -> String {
                guard let value, !value.isEmpty else { throw invalid(text, "'\(key)' needs a value, as in \(key)=…") }
                return value
            }
            switch key {
            case "read-error": kinds.insert(.reads)
            case "write-error": kinds.insert(.writes)
            case "flush-error": kinds.insert(.flushes)
            case let name where FaultyDevice.Silent(rawValue: name) != nil:
                if !silent.contains(FaultyDevice.Silent(rawValue: name)!) {
                    silent.append(FaultyDevice.Silent(rawValue: name)!)
                }
            case "range":
                let bounds = try need().split(separator: "-").map(String.init)
                guard bounds.count == 2 else { throw invalid(text, "range is START-END, such as 0-64M") }
                let start = try ByteSize.parse(bounds[0])
                let end = try ByteSize.parse(bounds[1])
                guard start < end else { throw invalid(text, "the range \(bounds[0])-\(bounds[1]) is empty") }
                range = start..<end
            case "probability":
                guard let value = Double(try need()), value > 0, value <= 1 else {
                    throw invalid(text, "probability is a number above 0 and at most 1, such as 0.01")
                }
                probability = value
            case "errno":
                guard let value = Int32(try need()), value > 0 else {
                    throw invalid(text, "errno is a positive number, such as 5")
                }
                errorNumber = value
            case "fail-after":
                guard let value = UInt64(try need()) else {
                    throw invalid(text, "fail-after takes a number of operations")
                }
                spec.failAfterOperations = value
            case "vanish-after":
                guard let value = UInt64(try need()) else {
                    throw invalid(text, "vanish-after takes a number of operations")
                }
                spec.vanishAfterOperations = value
            case "latency": spec.latencyNanos = try duration(try need(), text)
            case "jitter": spec.jitterNanos = try duration(try need(), text)
            default:
                throw invalid(
                    text,
                    "unknown fault '\(key)'; use read-error, write-error, flush-error, corrupt-read, corrupt-write, misdirect-write, lose-write, range=, probability=, errno=, fail-after=, vanish-after=, latency= or jitter="
                )
            }
        }
        if !kinds.isEmpty {
            spec.faults.append(
                FaultyDevice.Fault(kinds: kinds, range: range, probability: probability, errno: errorNumber))
        }
        for kind in silent {
            spec.faults.append(FaultyDevice.Fault(kind, range: range, probability: probability))
        }
        if kinds.isEmpty && silent.isEmpty && (range != nil || probability != 1) {
            throw invalid(
                text,
                "range= and probability= go with read-error, write-error, flush-error or a silent fault (corrupt-read, corrupt-write, misdirect-write, lose-write)"
            )
        }
        if spec == FaultSpec() { throw invalid(text, "it names no fault") }
        return spec
    }

    /// Applies the spec to a fault-injecting device.
    public func apply(to device: FaultyDevice) {
        for fault in faults { device.inject(fault) }
        if let failAfterOperations { device.failAfter(operations: failAfterOperations) }
        if let vanishAfterOperations { device.vanish(afterOperations: vanishAfterOperations) }
        if latencyNanos > 0 || jitterNanos > 0 {
            device.addLatency(nanoseconds: latencyNanos, jitterNanoseconds: jitterNanos)
        }
    }

    private static func duration(_ value: String, _ text: String) throws(SpindleError) -> UInt64 {
        let units: [(String, Double)] = [("ns", 1), ("us", 1e3), ("µs", 1e3), ("ms", 1e6), ("s", 1e9)]
        for (suffix, scale) in units where value.hasSuffix(suffix) {
            if let number = Double(value.dropLast(suffix.count)), number >= 0 { return UInt64(number * scale) }
        }
        throw invalid(text, "'\(value)' is not a duration; write it as 200us, 2ms or 1s")
    }

    private static func invalid(_ text: String, _ reason: String) -> SpindleError {
        SpindleError(.invalidArgument, "bad fault spec '\(text)': \(reason)")
    }
}
