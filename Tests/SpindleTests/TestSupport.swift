import Foundation
import Glibc
import Testing

@testable import Spindle

/// A fresh folder under /var/tmp (a disk file system, so O_DIRECT works), removed by `remove()`.
struct TemporaryFolder {
    let path: String

    init(_ label: String = "test") {
        var template = Array("/var/tmp/spindle-\(label)-XXXXXX".utf8CString)
        let created = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(created != nil, "mkdtemp failed")
        path = String(decoding: template.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func file(_ name: String) -> String { "\(path)/\(name)" }

    func remove() {
        _ = system("rm -rf '\(path)'")
    }
}

/// The error a throwing body raised, as a SpindleError; records a failure when it did not throw one.
func spindleError(
    _ body: () async throws -> Void, sourceLocation: SourceLocation = #_sourceLocation
) async -> SpindleError? {
    do {
        try await body()
        Issue.record("expected a SpindleError, but the call succeeded", sourceLocation: sourceLocation)
        return nil
    } catch let error as SpindleError {
        return error
    } catch {
        Issue.record("expected a SpindleError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Checks an error's code and that its description contains each fragment.
func expectError(
    _ error: SpindleError?, _ code: SpindleError.Code, _ fragments: [String],
    sourceLocation: SourceLocation = #_sourceLocation
) {
    guard let error else { return }
    #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
    for fragment in fragments {
        #expect(
            error.description.contains(fragment), "'\(error)' should mention '\(fragment)'",
            sourceLocation: sourceLocation)
    }
}

/// Deterministic bytes for a test buffer.
func fillRandom(_ buffer: UnsafeMutableRawBufferPointer, seed: UInt64) {
    var random = SeededRandom(seed: seed)
    var index = 0
    while index < buffer.count {
        var word = random.next()
        for _ in 0..<8 where index < buffer.count {
            buffer[index] = UInt8(truncatingIfNeeded: word)
            word >>= 8
            index += 1
        }
    }
}

/// Reads a whole device into an array.
func readAll(_ device: any BlockDevice) async throws -> [UInt8] {
    let buffer = AlignedBuffer(count: Int(device.capacityBytes))
    let piece = 1 << 20
    var offset = 0
    while offset < buffer.count {
        let length = min(piece, buffer.count - offset)
        try await device.read(into: buffer.slice(offset: offset, length: length), at: UInt64(offset))
        offset += length
    }
    return buffer.array
}

/// Many tasks issue random reads, writes, FUA writes, write-zeroes, discards and flushes at once,
/// each in its own region of the device, checking every read against its own model; the final
/// contents are returned for comparison with what the device holds.
func exerciseConcurrently(
    _ device: any BlockDevice, engine: IOEngine?, tasks: Int = 16, operationsPerTask: Int = 150, seed: UInt64
) async throws -> [UInt8] {
    let regionBytes = Int(device.capacityBytes) / tasks / device.logicalBlockBytes * device.logicalBlockBytes
    precondition(regionBytes >= device.logicalBlockBytes * 4)
    let initial = try await readAll(device)
    let regions = try await withThrowingTaskGroup(of: (Int, [UInt8]).self) { group in
        for task in 0..<tasks {
            let start = task * regionBytes
            let initialRegion = Array(initial[start..<(start + regionBytes)])
            group.addTask(executorPreference: engine) {
                var model = initialRegion
                var random = SeededRandom(seed: seed &+ UInt64(task))
                let block = device.logicalBlockBytes
                let maximumBlocks = min(regionBytes / block, 32)
                for step in 0..<operationsPerTask {
                    let blocks = 1 + Int(random.below(UInt64(maximumBlocks)))
                    let first = Int(random.below(UInt64(regionBytes / block - blocks + 1)))
                    let offset = start + first * block
                    let length = blocks * block
                    let local = offset - start
                    switch random.below(20) {
                    case 0..<8:
                        let buffer = AlignedBuffer(count: length)
                        fillRandom(buffer.bytes, seed: seed &* 31 &+ UInt64(task * 100_000 + step))
                        try await device.write(from: buffer, at: UInt64(offset), fua: random.chance(0.1))
                        model.replaceSubrange(local..<(local + length), with: buffer.array)
                    case 8..<16:
                        let buffer = AlignedBuffer(count: length)
                        try await device.read(into: buffer, at: UInt64(offset))
                        if buffer.array != Array(model[local..<(local + length)]) {
                            throw SpindleError(
                                .verificationFailed, "task \(task) step \(step): read differs from the model",
                                operation: "read", path: device.name, offset: UInt64(offset), length: UInt64(length))
                        }
                    case 16:
                        try await device.writeZeroes(offset: UInt64(offset), length: UInt64(length))
                        model.replaceSubrange(local..<(local + length), with: repeatElement(0, count: length))
                    case 17 where device.discardReadsZeroes:
                        try await device.discard(offset: UInt64(offset), length: UInt64(length))
                        model.replaceSubrange(local..<(local + length), with: repeatElement(0, count: length))
                    default:
                        try await device.flush()
                    }
                }
                return (task, model)
            }
        }
        var collected = [(Int, [UInt8])]()
        for try await region in group { collected.append(region) }
        return collected.sorted { $0.0 < $1.0 }
    }
    var expected = initial
    for (task, model) in regions {
        expected.replaceSubrange((task * regionBytes)..<((task + 1) * regionBytes), with: model)
    }
    return expected
}

/// Open descriptors of this process whose target contains `fragment` (e.g. "io_uring").
func openDescriptors(matching fragment: String) -> Int {
    guard let directory = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(directory) }
    var count = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) {
            String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name == "." || name == ".." { continue }
        var target = [CChar](repeating: 0, count: 512)
        let length = readlink("/proc/self/fd/\(name)", &target, 511)
        if length > 0 {
            let text = String(decoding: target[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.contains(fragment) { count += 1 }
        }
    }
    return count
}

/// nil when the bytes are equal; else where they first differ, in a few words (a failed
/// expectation then prints this, not two arrays of megabytes).
func byteDifference(_ got: [UInt8], _ expected: [UInt8]) -> String? {
    if got == expected { return nil }
    guard let index = (0..<min(got.count, expected.count)).first(where: { got[$0] != expected[$0] }) else {
        return "lengths differ: \(got.count) bytes, expected \(expected.count)"
    }
    let differing = (index..<min(got.count, expected.count)).filter { got[$0] != expected[$0] }.count
    return
        "first difference at byte \(index) (block \(index / 4096)): \(got[index]) instead of \(expected[index]); \(differing) bytes differ"
}

/// Writes `bytes` into the file at `path` at `offset`, creating the file when it is missing (as a
/// person editing an image by hand would, behind Spindle's back).
func patchFile(_ path: String, at offset: UInt64, with bytes: [UInt8]) throws {
    if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
    let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: bytes)
}

/// A memory device that can hold reads and writes touching a byte range until ``release()``.
final class HoldingDevice: BlockDevice {
    let inner: MemoryDevice
    private struct State {
        var range: Range<UInt64>?
        var parked: [UnsafeContinuation<Void, Never>] = []
        var watchers: [UnsafeContinuation<Void, Never>] = []
    }
    private let state = Locked(State())

    init(wrapping inner: MemoryDevice) { self.inner = inner }

    var logicalBlockBytes: Int { inner.logicalBlockBytes }
    var capacityBytes: UInt64 { inner.capacityBytes }
    var isReadOnly: Bool { false }
    var discardReadsZeroes: Bool { inner.discardReadsZeroes }
    var name: String { "held" }

    /// Holds requests touching `range` from now on.
    func hold(_ range: Range<UInt64>) { state.withLock { $0.range = range } }

    /// Lets held requests go, and holds no more.
    func release() {
        let parked = state.withLock { state in
            state.range = nil
            defer { state.parked = [] }
            return state.parked
        }
        for continuation in parked { continuation.resume() }
    }

    /// Returns once a request is held.
    func waitUntilParked() async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                if !state.parked.isEmpty { return true }
                state.watchers.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    private func admit(_ offset: UInt64, _ length: Int) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let watchers = state.withLock { state -> [UnsafeContinuation<Void, Never>]? in
                guard let range = state.range, range.overlaps(offset..<(offset + UInt64(length))) else { return nil }
                state.parked.append(continuation)
                defer { state.watchers = [] }
                return state.watchers
            }
            guard let watchers else { return continuation.resume() }
            for watcher in watchers { watcher.resume() }
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) async throws {
        await admit(offset, buffer.count)
        try await inner.read(into: buffer, at: offset)
    }

    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) async throws {
        await admit(offset, buffer.count)
        try await inner.write(from: buffer, at: offset, fua: fua)
    }

    func flush() async throws { try await inner.flush() }
    func discard(offset: UInt64, length: UInt64) async throws {
        try await inner.discard(offset: offset, length: length)
    }
    func writeZeroes(offset: UInt64, length: UInt64) async throws {
        try await inner.writeZeroes(offset: offset, length: length)
    }
    func close() async throws {}
}
