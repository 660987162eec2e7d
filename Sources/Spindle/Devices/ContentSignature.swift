import Glibc

/// What a device holds in formats other than Spindle's: file systems, partition tables, disk images,
/// LVM, swap, LUKS (by their magic numbers), or any non-zero data. Spindle's own headers are
/// recognized a layer up, by ``DeviceSignature``.
///
/// ``identify(_:at:)`` is pure (bytes in, description out); ``scan(_:)`` reads the places worth
/// looking at: the first MiB, the data extents of an image file (found with SEEK_DATA, so a sparse
/// new image costs nothing), and evenly spread samples of any other device.
public enum ContentSignature {
    /// Magic numbers at fixed offsets: (offset, bytes, what they mean).
    static let magics: [(offset: Int, bytes: [UInt8], meaning: String)] = [
        (1080, [0x53, 0xEF], "an ext2/ext3/ext4 file system"),
        (0, Array("XFSB".utf8), "an XFS file system"),
        (0x10040, Array("_BHRfS_M".utf8), "a btrfs file system"),
        (512, Array("EFI PART".utf8), "a GPT partition table"),
        (0, [0x51, 0x46, 0x49, 0xFB], "a qcow2 disk image"),
        (0, Array("KDMV".utf8), "a VMDK disk image"),
        (0, Array("LUKS".utf8) + [0xBA, 0xBE], "a LUKS encrypted volume"),
        (512, Array("LABELONE".utf8), "an LVM physical volume"),
        (4086, Array("SWAPSPACE2".utf8), "Linux swap space"),
        (3, Array("NTFS    ".utf8), "an NTFS file system"),
        (0x8001, Array("CD001".utf8), "an ISO 9660 image"),
        (510, [0x55, 0xAA], "a boot sector or MBR partition table"),
    ]

    /// A known format, or data in none.
    public enum Finding: Sendable, Equatable, CustomStringConvertible {
        /// A format other than Spindle's, in words ("an ext2/ext3/ext4 file system").
        case format(String)
        /// Non-zero bytes in no known format, the first at `offset`.
        case data(offset: UInt64)

        public var description: String {
            switch self {
            case let .format(meaning): return meaning
            case let .data(offset): return "data (a non-zero byte at offset \(offset))"
            }
        }
    }

    /// A known format or data in `bytes` (read from `offset` of a device), or nil when they are all zero.
    public static func identify(_ bytes: [UInt8], at offset: UInt64) -> Finding? {
        for magic in magics {
            let start = magic.offset - Int(offset)
            guard start >= 0, start + magic.bytes.count <= bytes.count else { continue }
            if bytes[start..<(start + magic.bytes.count)].elementsEqual(magic.bytes) { return .format(magic.meaning) }
        }
        guard let index = bytes.firstIndex(where: { $0 != 0 }) else { return nil }
        return .data(offset: offset + UInt64(index))
    }

    /// A known format or data on the device, or nil when every place in ``placesToLook(_:)`` is zero.
    public static func scan(_ device: any BlockDevice) async throws -> Finding? {
        for range in placesToLook(device) {
            let block = UInt64(device.logicalBlockBytes)
            let start = range.lowerBound / block * block
            let end = min(device.capacityBytes, (range.upperBound + block - 1) / block * block)
            guard end > start else { continue }
            let buffer = AlignedBuffer(count: Int(end - start), zeroed: false)
            try await device.read(into: buffer, at: start)
            if let found = identify(buffer.array, at: start) { return found }
        }
        return nil
    }

    /// The first MiB (enough for every magic above); then an image file's data extents (up to 16
    /// MiB of them), or 17 samples of 64 KiB spread over any other device.
    static func placesToLook(_ device: any BlockDevice) -> [Range<UInt64>] {
        let capacity = device.capacityBytes
        var places = [0..<min(capacity, 1 << 20)]
        if let file = device as? FileDevice, let extents = file.dataExtents(limitBytes: 16 << 20) {
            places += extents.compactMap { extent in
                let start = max(extent.lowerBound, 1 << 20)
                return start < min(extent.upperBound, capacity) ? start..<min(extent.upperBound, capacity) : nil
            }
        } else if capacity > 1 << 20 {
            for sample in 0...16 {
                let start = max(1 << 20, (capacity - 65536) / 16 * UInt64(sample))
                if start < capacity { places.append(start..<min(capacity, start + 65536)) }
            }
        }
        return places
    }
}

extension FileDevice {
    /// The byte ranges of the file that hold data (not holes), from SEEK_DATA/SEEK_HOLE, up to
    /// `limitBytes` in all, starting at `start`; nil when the file system cannot tell.
    public func dataExtents(from start: UInt64 = 0, limitBytes: UInt64) -> [Range<UInt64>]? {
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { Glibc.close(descriptor) }
        let seekData: Int32 = 3
        let seekHole: Int32 = 4
        var extents: [Range<UInt64>] = []
        var total: UInt64 = 0
        var offset = off_t(start)
        while UInt64(offset) < fileBytes && total < limitBytes {
            let data = lseek(descriptor, offset, seekData)
            if data < 0 { return errno == ENXIO ? extents : nil }
            let hole = lseek(descriptor, data, seekHole)
            guard hole > data else { return nil }
            let end = min(UInt64(hole), UInt64(data) + limitBytes - total)
            extents.append(UInt64(data)..<end)
            total += end - UInt64(data)
            offset = hole
        }
        return extents
    }
}
