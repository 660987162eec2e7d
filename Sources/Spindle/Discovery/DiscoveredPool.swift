/// A thin pool as its devices' labels name it, without opening it.
public struct DiscoveredPool: Sendable {
    /// A device of the pool.
    public struct Device: Sendable {
        /// What the device is.
        public enum Location: Sendable, Equatable {
            /// An image file (or a device the caller opened), by path or name.
            case image(String)
            /// An array, found from its members (``Discovery/arrays``).
            case array(name: String, uuid: SpindleUUID)
        }
        /// Its place in the pool (device 0 holds the metadata).
        public var index: Int
        public var location: Location
        public var label: ThinPoolLabel
        /// How to open an image device; nil for an array.
        let source: DeviceSource?
    }

    public var name: String
    public var uuid: SpindleUUID
    public var chunkBytes: UInt64
    /// Its devices found, by index.
    public var devices: [Device]

    /// Whether devices 0 to the highest index found are all there (the metadata, read on open, says
    /// whether later devices are missing too).
    public var hasGaps: Bool { devices.enumerated().contains { $0.offset != $0.element.index } }
}

/// A pool opened with the stack under it. The pool owns its devices (the ownership rule in
/// ``BlockDevice``): ``close()`` commits and closes the pool, the arrays and the image files.
public struct OpenedPool: Sendable {
    public let pool: ThinPool
    /// The arrays under the pool, in the order of the pool's devices: for their status (the pool
    /// owns them; do not close them yourself).
    public let arrays: [RAIDArray]

    /// Commits the pool and closes it with everything under it. Closing twice is harmless.
    public func close() async throws {
        try await pool.close()
    }
}

/// A thin volume opened with its pool and the stack under it, as one block device: reads and writes
/// go to the volume; ``close()`` closes the volume, then the pool with everything under it.
public final class OpenedVolume: SparseBlockDevice {
    public let volume: ThinVolume
    /// The pool and the arrays under it (owned by this handle through the pool).
    public let stack: OpenedPool
    public var pool: ThinPool { stack.pool }

    init(volume: ThinVolume, stack: OpenedPool) {
        self.volume = volume
        self.stack = stack
    }

    public var logicalBlockBytes: Int { volume.logicalBlockBytes }
    public var capacityBytes: UInt64 { volume.capacityBytes }
    public var isReadOnly: Bool { volume.isReadOnly }
    public var discardReadsZeroes: Bool { volume.discardReadsZeroes }
    public var name: String { volume.name }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try await volume.read(into: buffer, at: offset)
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try await volume.write(from: buffer, at: offset, fua: fua)
    }

    public func flush() async throws { try await volume.flush() }

    public func discard(offset: UInt64, length: UInt64) async throws {
        try await volume.discard(offset: offset, length: length)
    }

    public func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await volume.writeZeroes(offset: offset, length: length)
    }

    public func discardBytes(offset: UInt64, length: UInt64) async throws {
        try await volume.discardBytes(offset: offset, length: length)
    }

    public func zeroBytes(offset: UInt64, length: UInt64) async throws {
        try await volume.zeroBytes(offset: offset, length: length)
    }

    public func dataRanges(in range: Range<UInt64>) async throws -> [Range<UInt64>] {
        try await volume.dataRanges(in: range)
    }

    /// Closes the volume, then commits and closes the pool and everything under it.
    public func close() async throws {
        try? await volume.close()
        try await stack.close()
    }
}

/// A fault injector over a member a stack opened: the stack owns the member, and the injector
/// (which leaves what it wraps open, as a crash leaves a disk) is closed with it.
final class InjectedMember: BlockDevice {
    let faulty: FaultyDevice

    init(_ device: any BlockDevice, spec: FaultSpec, seed: UInt64) {
        faulty = FaultyDevice(wrapping: device, seed: seed, name: device.name)
        spec.apply(to: faulty)
    }

    var logicalBlockBytes: Int { faulty.logicalBlockBytes }
    var capacityBytes: UInt64 { faulty.capacityBytes }
    var isReadOnly: Bool { faulty.isReadOnly }
    var discardReadsZeroes: Bool { faulty.discardReadsZeroes }
    var name: String { faulty.name }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        try await faulty.read(into: buffer, at: offset)
    }

    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        try await faulty.write(from: buffer, at: offset, fua: fua)
    }

    func flush() async throws { try await faulty.flush() }

    func discard(offset: UInt64, length: UInt64) async throws {
        try await faulty.discard(offset: offset, length: length)
    }

    func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await faulty.writeZeroes(offset: offset, length: length)
    }

    func close() async throws {
        try? await faulty.close()
        try await faulty.inner.close()
    }
}
