/// Latencies in nanoseconds, counted in log-linear buckets: 64 buckets per power of two, so a
/// percentile is within 1.6% of the true value, in a fixed 18 KiB whatever the number of samples.
/// Recording is a few instructions and never allocates.
public struct LatencyHistogram: Sendable, Equatable {
    static let subBucketBits = 6
    static let subBucketCount = 1 << subBucketBits
    static let maximumExponent = 42  // about 73 minutes; larger values land in the last bucket
    static let bucketCount = subBucketCount + (maximumExponent - subBucketBits + 1) * subBucketCount

    private var counts: [UInt64]
    public private(set) var count: UInt64 = 0
    public private(set) var sumNanos: UInt64 = 0
    public private(set) var minimumNanos: UInt64 = .max
    public private(set) var maximumNanos: UInt64 = 0

    public init() {
        counts = [UInt64](repeating: 0, count: Self.bucketCount)
    }

    /// Bucket index for a value.
    static func bucket(of value: UInt64) -> Int {
        if value < UInt64(subBucketCount) { return Int(value) }
        let exponent = min(63 - value.leadingZeroBitCount, maximumExponent)
        let capped =
            exponent == maximumExponent && value >> (maximumExponent + 1) != 0
            ? (UInt64(1) << (maximumExponent + 1)) - 1 : value
        let sub = Int(capped >> UInt64(exponent - subBucketBits)) - subBucketCount
        return subBucketCount + (exponent - subBucketBits) * subBucketCount + sub
    }

    /// The largest value a bucket holds.
    static func upperBound(of bucket: Int) -> UInt64 {
        if bucket < subBucketCount { return UInt64(bucket) }
        let exponent = (bucket - subBucketCount) / subBucketCount + subBucketBits
        let sub = UInt64((bucket - subBucketCount) % subBucketCount + subBucketCount)
        let width = UInt64(1) << UInt64(exponent - subBucketBits)
        return sub * width + width - 1
    }

    @inlinable
    public mutating func record(_ nanos: UInt64) {
        recordValue(nanos)
    }

    @usableFromInline
    mutating func recordValue(_ nanos: UInt64) {
        counts[Self.bucket(of: nanos)] &+= 1
        count &+= 1
        sumNanos &+= nanos
        if nanos < minimumNanos { minimumNanos = nanos }
        if nanos > maximumNanos { maximumNanos = nanos }
    }

    /// Adds another histogram's samples.
    public mutating func merge(_ other: LatencyHistogram) {
        for index in counts.indices { counts[index] &+= other.counts[index] }
        count &+= other.count
        sumNanos &+= other.sumNanos
        minimumNanos = min(minimumNanos, other.minimumNanos)
        maximumNanos = max(maximumNanos, other.maximumNanos)
    }

    /// The value below which `fraction` (0...1) of the samples fall; 0 without samples.
    public func percentile(_ fraction: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let rank = max(1, UInt64((Double(count) * min(max(fraction, 0), 1)).rounded(.up)))
        var seen: UInt64 = 0
        for (index, bucketCount) in counts.enumerated() where bucketCount > 0 {
            seen += bucketCount
            if seen >= rank { return min(max(Self.upperBound(of: index), minimumNanos), maximumNanos) }
        }
        return maximumNanos
    }

    /// Mean in nanoseconds; 0 without samples.
    public var meanNanos: Double { count == 0 ? 0 : Double(sumNanos) / Double(count) }
}
