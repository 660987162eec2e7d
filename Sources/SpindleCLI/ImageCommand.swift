import ArgumentParser
import Foundation
import Spindle

struct ImageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Create and inspect image files.",
        subcommands: [Create.self, Info.self]
    )

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a sparse image file.",
            discussion: """
                The file takes no space until written. It must not exist yet. An image file records no block \
                size: it is read and written in the file system's direct-I/O block (at least 512 bytes), which \
                'image info' shows.
                """)

        @Argument(help: "Path of the image to create.")
        var path: String

        @Option(help: "Size of the image, a multiple of 512 bytes, such as 10G.", transform: parseSize)
        var size: UInt64

        @Flag(help: "Print the result as JSON.")
        var json = false

        func validate() throws {
            guard size > 0, size % 512 == 0 else {
                throw ValidationError("--size must be a positive multiple of 512 bytes, such as 1G")
            }
        }

        func run() async throws {
            let device = try FileDevice.create(path: path, sizeBytes: size)
            let info = await ImageInfo(device: device)
            try await device.close()
            if json {
                try Terminal.printJSON(info)
            } else {
                print("created \(path): \(ByteSize.format(size)) (sparse), \(device.logicalBlockBytes)-byte blocks")
            }
        }
    }

    struct Info: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Show an image's size, space used, block size, direct I/O support, lock holder and what it holds.",
            discussion: """
                What it holds: a member or spare of an array (its name and slot), a device of a thin pool, a \
                damaged Spindle header, a format Spindle knows of (file systems, partition tables, disk images, \
                LVM, swap, LUKS), other data, or nothing (zeros). Reads only.
                """)

        @Argument(help: "Path of the image.")
        var path: String

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let device = try FileDevice.open(path: path, options: FileDevice.Options(readOnly: true))
            var info = await ImageInfo(device: device)
            info.lockHolder = FileDevice.writeLockHolder(path: path)
            try await device.close()
            if json {
                try Terminal.printJSON(info)
                return
            }
            print("image:        \(info.path)")
            print("size:         \(ByteSize.format(info.sizeBytes)) (\(info.sizeBytes) bytes)")
            print("allocated:    \(ByteSize.format(info.allocatedBytes)) (\(info.allocatedPercent)% of the size)")
            print("block size:   \(info.logicalBlockBytes) bytes")
            print("direct I/O:   \(info.directIO ? "yes" : "no, \(info.directIONote ?? "not in use")")")
            print("write lock:   \(info.lockHolder.map { "held by \($0)" } ?? "free")")
            print("contents:     \(info.contents)")
            if let integrity = info.integrity { print("integrity:    checksummed 4 KiB blocks (layer \(integrity))") }
        }
    }
}

/// What `image create` and `image info` report.
struct ImageInfo: Codable {
    var path: String
    var sizeBytes: UInt64
    var capacityBytes: UInt64
    var allocatedBytes: UInt64
    var logicalBlockBytes: Int
    var directIO: Bool
    var directIONote: String?
    var lockHolder: String?
    /// What the image holds, in words.
    var contents: String
    /// arrayMember, arraySpare, poolDevice, damagedArraySuperblock, damagedPoolLabel, format, data, empty
    /// or unreadable (a read failed).
    var contentsKind: String
    var arrayName: String?
    var arrayUUID: String?
    /// The slot an array member fills (none for a spare).
    var arraySlot: Int?
    var poolName: String?
    var poolUUID: String?
    var poolDeviceIndex: Int?
    /// A format other than Spindle's, such as "an ext2/ext3/ext4 file system".
    var format: String?
    /// The UUID of the integrity layer the contents lie under, when the image has one.
    var integrity: String?

    var allocatedPercent: Int { sizeBytes == 0 ? 0 : Int(allocatedBytes * 100 / sizeBytes) }

    init(device: FileDevice) async {
        path = device.path
        sizeBytes = device.fileBytes
        capacityBytes = device.capacityBytes
        allocatedBytes = (try? device.allocatedBytes()) ?? 0
        logicalBlockBytes = device.logicalBlockBytes
        directIO = device.usesDirectIO
        directIONote = device.directIONote
        lockHolder = nil
        do {
            var finding = try await DeviceSignature.find(device)
            if case let .integrityDevice(superblock, inside)? = finding {
                integrity = superblock.uuid.description
                finding = inside
            }
            switch finding {
            case let .integrityDevice(_, inside)?:
                contentsKind = "integrity"
                contents = "a Spindle integrity layer" + (inside.map { " holding \($0)" } ?? "")
            case let .damagedIntegritySuperblock(problem)?:
                contentsKind = "damagedIntegritySuperblock"
                contents = "a damaged Spindle integrity superblock: \(problem)"
            case let .arrayMember(superblock)?:
                arrayName = superblock.name
                arrayUUID = superblock.arrayUUID.description
                let array =
                    "array '\(superblock.name)' (raid\(superblock.level.rawValue), \(superblock.memberCount) members, \(superblock.arrayUUID))"
                if superblock.role >= 0 {
                    contentsKind = "arrayMember"
                    arraySlot = superblock.role
                    contents = "member of \(array) in slot \(superblock.role)"
                } else {
                    contentsKind = "arraySpare"
                    contents = "spare of \(array)"
                }
            case let .poolDevice(label)?:
                contentsKind = "poolDevice"
                poolName = label.poolName
                poolUUID = label.poolUUID.description
                poolDeviceIndex = label.deviceIndex
                contents = "device \(label.deviceIndex) of thin pool '\(label.poolName)' (\(label.poolUUID))"
            case let .damagedArraySuperblock(problem)?:
                contentsKind = "damagedArraySuperblock"
                contents = "a damaged Spindle array superblock: \(problem)"
            case let .damagedPoolLabel(problem)?:
                contentsKind = "damagedPoolLabel"
                contents = "a damaged Spindle pool label: \(problem)"
            case let .format(meaning)?:
                contentsKind = "format"
                format = meaning
                contents = "\(meaning) (not a Spindle format)"
            case let .data(offset)?:
                contentsKind = "data"
                contents =
                    "raw data (no Spindle metadata or known format; the first non-zero byte is at offset \(offset))"
            case nil:
                contentsKind = "empty"
                contents = "nothing: zeros (no Spindle metadata, no known format, no data)"
            }
        } catch {
            contentsKind = "unreadable"
            contents = "unknown: \(error)"
        }
    }
}
