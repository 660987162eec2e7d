import ArgumentParser
import Foundation
import Spindle

/// Member management: fail, remove, add and replace.
extension ArrayCommand {
    struct Fail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Mark a member failed, as if its disk had died.")

        @OptionGroup var selection: Selection

        @Option(help: "The member image to fail.")
        var member: String

        func run() async throws {
            let status = try await ArrayCommand.withArray(selection) { array, _ in
                try await array.fail(memberNamed: resolveMember(member, in: array))
                return array.status
            }
            print("failed \(member); array \(status.name) is \(status.state)")
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a failed member or a spare from an array.")

        @OptionGroup var selection: Selection

        @Option(help: "The failed member or spare image to remove.")
        var member: String

        func run() async throws {
            let name = try await ArrayCommand.withArray(selection) { array, _ in
                try await array.remove(memberNamed: resolveMember(member, in: array))
                return array.arrayName
            }
            print("removed \(member) from array \(name)")
        }
    }

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Add an image: it replaces a failed or missing member (rebuild it with 'array rebuild'), or becomes a spare."
        )

        @OptionGroup var selection: Selection

        @Option(help: "The image to add; created when missing, as large as the members need.")
        var device: String

        @Flag(
            help:
                "Use the image even if it holds something (another array, a pool, a file system, data), destroying it.")
        var force = false

        func run() async throws {
            let created = CreatedImages()
            let status: RAIDArray.Status
            do {
                status = try await ArrayCommand.withArray(selection) { array, engine in
                    let image = try openOrCreate(device, for: array, engine: engine, created: created)
                    do {
                        try await array.add(image, overwrite: force)
                    } catch {
                        // Not added: the image is still this command's to close.
                        try? await image.close()
                        throw error
                    }
                    return array.status
                }
            } catch {
                created.removeIfRefused(by: error)
                throw error
            }
            let role = status.spares.contains(device) ? "a spare" : "the member to rebuild"
            print("added \(device) to array \(status.name) as \(role); array is \(status.state)")
        }
    }

    struct Replace: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Replace a member with a new image and rebuild onto it.")

        @OptionGroup var selection: Selection

        @Option(help: "The member image to replace.")
        var old: String

        @Option(help: "The new image; created when missing, as large as the members need.")
        var new: String

        @Option(help: "Limit the rebuild rate, such as 100M (bytes per second).", transform: parseSize)
        var rate: UInt64?

        @Flag(help: "Only swap the member; rebuild later with 'array rebuild'.")
        var noRebuild = false

        @Flag(
            help:
                "Use the new image even if it holds something (another array, a pool, a file system, data), destroying it."
        )
        var force = false

        func run() async throws {
            let created = CreatedImages()
            let status = try await ArrayCommand.withArray(selection) { array, engine in
                let device = try openOrCreate(new, for: array, engine: engine, created: created)
                do {
                    try await array.replace(memberNamed: resolveMember(old, in: array), with: device, overwrite: force)
                } catch {
                    try? await device.close()
                    created.removeIfRefused(by: error)
                    throw error
                }
                print("replaced \(old) with \(new) in array \(array.arrayName)")
                if !noRebuild {
                    let rebuilt = try await array.rebuild(
                        rateBytesPerSecond: rate, progress: ArrayCommand.progressPrinter("rebuilding \(new)"))
                    if Terminal.showsProgress { Terminal.endProgress() }
                    print("rebuilt \(ByteSize.format(rebuilt)) onto \(new)")
                }
                return array.status
            }
            print("array \(status.name) is \(status.state)")
        }
    }
}
