/// The random draws of a ``FaultyDevice``, each derived from the device's seed and the identity of
/// the request it is about, never from a shared stream: requests that arrive in another order (as
/// the concurrent member requests of an array do) get the same decisions.
///
/// A request's identity is its kind, offset and length, the epoch it arrived in and how many
/// requests of the same kind, offset and length arrived before it in that epoch (its occurrence),
/// so that repeating a request draws afresh.
struct FaultDecisions {
    /// The device's seed mixed with its name (so devices sharing a seed fail independently).
    let deviceSeed: UInt64
    /// Set by the caller between phases of its workload.
    private(set) var epoch: UInt64 = 0
    /// Restarts of the occurrence counts within the epoch, when they outgrow ``capacity``.
    private var generation: UInt64 = 0
    private var occurrences: [Identity: UInt32] = [:]

    /// Distinct request identities counted per epoch before the counts start afresh.
    static let capacity = 1 << 16

    struct Identity: Hashable {
        var kind: UInt8
        var offset: UInt64
        var length: UInt64
    }

    init(seed: UInt64, name: String) {
        // FNV-1a: a hash that is the same in every process (Swift's Hasher is seeded per process).
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
        deviceSeed = Self.mix(seed, hash)
    }

    /// Starts `epoch`: occurrence counts start afresh and every later key mixes it in.
    mutating func begin(epoch: UInt64) {
        self.epoch = epoch
        generation = 0
        occurrences.removeAll(keepingCapacity: true)
    }

    /// The key of a request that has just arrived: every draw about it derives from this.
    mutating func key(kind: UInt8, offset: UInt64, length: UInt64) -> UInt64 {
        let identity = Identity(kind: kind, offset: offset, length: length)
        if occurrences[identity] == nil && occurrences.count >= Self.capacity {
            generation += 1
            occurrences.removeAll(keepingCapacity: true)
        }
        let occurrence = occurrences[identity, default: 0]
        occurrences[identity] = occurrence &+ 1
        return Self.mix(deviceSeed, epoch, generation, UInt64(kind), offset, length, UInt64(occurrence))
    }

    /// True with `probability`, from `key` and a `salt` naming the decision.
    static func chance(_ probability: Double, key: UInt64, salt: UInt64) -> Bool {
        if probability >= 1 { return true }
        if probability <= 0 { return false }
        return Double(mix(key, salt) >> 11) * 0x1p-53 < probability
    }

    /// A value in `0..<bound` (bound > 0), from `key` and a `salt` naming the decision.
    static func below(_ bound: UInt64, key: UInt64, salt: UInt64) -> UInt64 {
        UInt64((UInt128(mix(key, salt)) * UInt128(bound)) >> 64)
    }

    /// Folds values into one well-mixed word (SplitMix64's finalizer after each).
    static func mix(_ first: UInt64, _ rest: UInt64...) -> UInt64 {
        var value = finalize(first)
        for word in rest { value = finalize(value ^ (word &+ 0x9E37_79B9_7F4A_7C15)) }
        return value
    }

    private static func finalize(_ input: UInt64) -> UInt64 {
        var value = input
        value = (value ^ (value >> 30)) &* 0xBF58_476D_1CE4_E5B9
        value = (value ^ (value >> 27)) &* 0x94D0_49BB_1331_11EB
        return value ^ (value >> 31)
    }
}
