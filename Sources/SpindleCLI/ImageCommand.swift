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
            discussion: "The file takes no space until written. It must not exist yet.")

        @Argument(help: "Path of the image to create.")
        var path: String

        @Option(help: "Size of the image, such as 10G.", transform: parseSize)
        var size: UInt64

        @Option(name: .customLong("block-size"), help: "Logical block size in bytes, a power of two from 512 to 65536.",
                transform: parseSize)
        var blockSize: UInt64 = 512

        @Flag(help: "Print the result as JSON.")
        var json = false

        func validate() throws {
            guard blockSize >= 512, blockSize <= 65536, blockSize & (blockSize - 1) == 0 else {
                throw ValidationError("--block-size must be a power of two from 512 to 65536, such as 512 or 4K")
            }
            guard size > 0, size % blockSize == 0 else {
                throw ValidationError("--size must be a positive multiple of the block size (\(blockSize) bytes), such as 1G")
            }
        }

        func run() async throws {
            let device = try FileDevice.create(
                path: path, sizeBytes: size, options: FileDevice.Options(logicalBlockBytes: Int(blockSize)))
            let info = ImageInfo(device: device)
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
            abstract: "Show an image's size, space used, block size, direct I/O support and lock holder.")

        @Argument(help: "Path of the image.")
        var path: String

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let device = try FileDevice.open(path: path, options: FileDevice.Options(readOnly: true))
            var info = ImageInfo(device: device)
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
    var contents: String

    var allocatedPercent: Int { sizeBytes == 0 ? 0 : Int(allocatedBytes * 100 / sizeBytes) }

    init(device: FileDevice) {
        path = device.path
        sizeBytes = device.fileBytes
        capacityBytes = device.capacityBytes
        allocatedBytes = (try? device.allocatedBytes()) ?? 0
        logicalBlockBytes = device.logicalBlockBytes
        directIO = device.usesDirectIO
        directIONote = device.directIONote
        lockHolder = nil
        contents = "raw data (no Spindle metadata)"
    }
}
