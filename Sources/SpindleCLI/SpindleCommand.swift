import ArgumentParser
import Foundation
import Spindle

@main
struct SpindleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "spindle",
        abstract: "Software RAID and thin logical volumes over image files, on io_uring.",
        discussion: """
            Sizes take K, M, G and T suffixes, powers of two (4K = 4096 bytes). Commands that a script \
            reads take --json. Errors go to standard error, with a non-zero exit status.
            """,
        subcommands: [ImageCommand.self, ArrayCommand.self, PoolCommand.self, VolumeCommand.self, ServeCommand.self, BenchCommand.self, SimulateCommand.self]
    )

    /// Runs the command line, printing Spindle's errors as one line on standard error.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as SpindleError {
            Terminal.error("\(error)")
            Foundation.exit(error.code == .invalidArgument || error.code == .misaligned ? 2 : 1)
        } catch {
            exit(withError: error)
        }
    }
}

/// Output helpers shared by the commands.
enum Terminal {
    static func error(_ message: String) {
        FileHandle.standardError.write(Data("spindle: error: \(message)\n".utf8))
    }

    static func warning(_ message: String) {
        FileHandle.standardError.write(Data("spindle: warning: \(message)\n".utf8))
    }

    /// Whether progress lines should be drawn (standard error is a terminal).
    static var showsProgress: Bool { isatty(2) == 1 }

    static func progress(_ line: String) {
        FileHandle.standardError.write(Data("\r\u{1B}[K\(line)".utf8))
    }

    static func endProgress() {
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }

    static func printJSON<Value: Encodable>(_ value: Value) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(value)
        print(String(decoding: data, as: UTF8.self))
    }
}

/// Parses a size option, with Spindle's message when it is not one.
func parseSize(_ text: String) throws -> UInt64 {
    do {
        return try ByteSize.parse(text)
    } catch {
        throw ValidationError(error.message)
    }
}
