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
            reads take --json. Errors go to standard error, with exit status 2 for a bad argument (an \
            unknown command or option, a value that cannot be valid) and 1 for anything else.
            """,
        subcommands: [
            ImageCommand.self, ArrayCommand.self, PoolCommand.self, VolumeCommand.self, ServeCommand.self,
            BenchCommand.self, SimulateCommand.self,
        ]
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
        } catch var error as SpindleError {
            // The library names its parameter; the command line names its flag.
            error.message = error.message.replacingOccurrences(of: DeviceSignature.overwriteHint, with: "use --force")
            Terminal.error("\(error)")
            Foundation.exit(error.code == .invalidArgument || error.code == .misaligned ? 2 : 1)
        } catch {
            // swift-argument-parser exits 64 (EX_USAGE) for usage errors; Spindle's own invalid
            // arguments exit 2. One rule for scripts: every bad argument exits 2.
            if exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }
}

/// Image files a command created, so that a refused command can remove them again: a refusal
/// changes nothing. Files stay once the command took them into use, or when it failed with an I/O
/// error (what was written to them is then unknown, and they may hold an array's or pool's data).
final class CreatedImages {
    private(set) var paths: [String] = []

    /// Creates a sparse image file and opens it for writing, remembering its path.
    func create(path: String, sizeBytes: UInt64, engine: IOEngine) throws -> FileDevice {
        let device = try FileDevice.create(path: path, sizeBytes: sizeBytes, engine: engine)
        paths.append(path)
        return device
    }

    /// Removes the files created so far if `error` is a refusal (bad input, something in the way).
    func removeIfRefused(by error: any Error) {
        guard isRefusal(error) else { return }
        for path in paths { try? FileDevice.remove(path: path) }
        paths = []
    }
}

/// Whether an error refuses what was asked (bad input, a device in use, too little space) rather
/// than reporting a failure of the storage underneath.
func isRefusal(_ error: any Error) -> Bool {
    if error is ValidationError { return true }
    guard let error = error as? SpindleError else { return false }
    switch error.code {
    case .invalidArgument, .misaligned, .outOfRange, .alreadyExists, .notFound, .locked, .readOnly, .unsupported,
        .noSpace:
        return true
    default:  // the storage failed (I/O, corruption, a device gone) or the run was stopped
        return false
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
    static var showsProgress: Bool { ProcessControl.errorIsTerminal }

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

/// Opens an image for writing; when it is missing, creates it (in `created`) at `size`, or fails
/// saying what would (`hint`, such as "give --size to create it").
func openImage(
    _ path: String, engine: IOEngine, options: FileDevice.Options = FileDevice.Options(), size: UInt64?, hint: String,
    created: CreatedImages
) throws -> FileDevice {
    do {
        return try FileDevice.open(path: path, engine: engine, options: options)
    } catch {
        guard error.code == .notFound else { throw error }
        guard let size else {
            throw SpindleError(.notFound, "no such image file; \(hint)", operation: "open", path: path)
        }
        return try created.create(path: path, sizeBytes: size, engine: engine)
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
