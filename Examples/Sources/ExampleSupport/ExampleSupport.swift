import Foundation
import Spindle

/// A check an example makes on what it reads back; a false one ends the run with status 1.
public struct ExampleFailure: Error, CustomStringConvertible {
    public let description: String
}

/// Fails the example with `message` unless `condition` holds.
public func expect(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw ExampleFailure(description: message()) }
}

/// Runs an example in a new temporary folder (its path is passed to `body`), removes the folder
/// afterwards, and ends the process: status 0 when `body` returned, 1 when it threw.
public func runExample(_ name: String, _ body: (String) async throws -> Void) async -> Never {
    let base = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
    var template = Array("\(base)/spindle-\(name)-XXXXXX".utf8CString)
    guard let created = mkdtemp(&template) else {
        print("\(name): FAILED: cannot create a temporary folder in \(base)")
        exit(1)
    }
    let folder = String(cString: created)
    var status: Int32 = 0
    do {
        try await body(folder)
        print("\(name): ok")
    } catch {
        print("\(name): FAILED: \(error)")
        status = 1
    }
    do {
        try FileManager.default.removeItem(atPath: folder)
    } catch {
        print("\(name): could not remove \(folder): \(error)")
        status = 1
    }
    exit(status)
}

extension AlignedBuffer {
    /// Fills the buffer with bytes that depend on `seed` and on their position, so that data read
    /// from the wrong place, or an older write, does not pass for the right one.
    public func fillPattern(seed: UInt64) {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        withExtendedLifetime(self) {
            for index in 0..<count {
                state ^= state << 13
                state ^= state >> 7
                state ^= state << 17
                bytes[index] = UInt8(truncatingIfNeeded: state)
            }
        }
    }
}
