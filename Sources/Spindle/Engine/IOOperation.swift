public import Glibc

/// One operation for the ``IOEngine``: what the kernel is asked to do, with the memory it reads or fills.
///
/// Pointers inside an operation must stay valid, and the memory they point to must not be touched by
/// anyone else, until ``IOEngine/execute(_:)`` returns. Callers hold that memory across the `await`,
/// which is what makes handing the operation to the engine's thread safe; the engine never keeps an
/// operation after it completes.
public enum IOOperation: @unchecked Sendable {
    /// Does nothing; measures the engine's own cost per operation.
    case nop
    /// Reads `length` bytes at `offset` into `buffer`.
    case read(fd: Int32, buffer: UnsafeMutableRawPointer, length: UInt32, offset: UInt64)
    /// Writes `length` bytes from `buffer` at `offset`; with `fua` the write is durable when it completes.
    case write(fd: Int32, buffer: UnsafeRawPointer, length: UInt32, offset: UInt64, fua: Bool)
    /// Reads into several buffers, filled in order, from `offset`.
    case readVector(fd: Int32, vectors: UnsafePointer<iovec>, count: UInt32, offset: UInt64)
    /// Writes several buffers, in order, at `offset`.
    case writeVector(fd: Int32, vectors: UnsafePointer<iovec>, count: UInt32, offset: UInt64, fua: Bool)
    /// Writes several buffers to a stream (a socket) at its current position; with `offload` the
    /// kernel copies the data in a worker thread, not on the reactor (for large payloads).
    case writeStream(fd: Int32, vectors: UnsafePointer<iovec>, count: UInt32, offload: Bool)
    /// Makes completed writes durable; `dataOnly` is fdatasync.
    case sync(fd: Int32, dataOnly: Bool)
    /// fallocate(2) with the given mode (punch hole, zero range).
    case allocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64)
    /// Completes after the given time; result 0.
    case sleep(nanoseconds: UInt64)

    /// Name used in errors and traces.
    public var name: String {
        switch self {
        case .nop: return "nop"
        case .read, .readVector: return "read"
        case .write, .writeVector, .writeStream: return "write"
        case .sync: return "flush"
        case .allocate: return "fallocate"
        case .sleep: return "sleep"
        }
    }
}
