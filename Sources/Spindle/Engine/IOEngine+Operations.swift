internal import CSpindleRing
import Glibc

extension IOEngine {
    /// Resubmissions of an operation the kernel interrupted (`EINTR`) or could not take yet (`EAGAIN`)
    /// before ``perform(_:operation:path:offset:length:)`` gives up and reports the error.
    public static let retryLimit = 64

    /// Runs an operation and returns its byte count (0 for operations without one), resubmitting it
    /// when interrupted, at most ``retryLimit`` times. The one place where the engine's `-errno`
    /// results become ``SpindleError``s, named by `operation`, `path`, `offset` and `length`.
    public func perform(
        _ request: IOOperation, operation: String, path: String? = nil, offset: UInt64? = nil, length: UInt64? = nil
    ) async throws(SpindleError) -> Int {
        var retries = 0
        while true {
            let result = await execute(request)
            if (result == -EINTR || result == -EAGAIN) && retries < Self.retryLimit {
                retries += 1
                continue
            }
            return try SpindleError.check(result, operation: operation, path: path, offset: offset, length: length)
        }
    }

    /// Waits without holding a thread, on the ring's timer.
    /// - Throws: ``SpindleError/Code/closed`` when the engine shuts down first.
    public func sleep(nanoseconds: UInt64) async throws(SpindleError) {
        let result = await execute(.sleep(nanoseconds: nanoseconds))
        if result < 0 && result != -ETIME {
            throw SpindleError(.closed, "the I/O engine shut down", operation: "sleep")
        }
    }

    /// Fills a submission entry for an operation.
    static func prepare(
        _ operation: IOOperation, ring: OpaquePointer?, tag: UInt64, timespec: UnsafeMutablePointer<spindle_timespec>
    ) -> Int32 {
        switch operation {
        case .nop:
            return spindle_ring_nop(ring, tag)
        case let .read(fd, buffer, length, offset):
            return spindle_ring_read(ring, fd, buffer, length, offset, tag)
        case let .write(fd, buffer, length, offset, fua):
            return spindle_ring_write(ring, fd, buffer, length, offset, fua ? 1 : 0, tag)
        case let .readVector(fd, vectors, count, offset):
            return spindle_ring_readv(ring, fd, vectors, count, offset, tag)
        case let .writeVector(fd, vectors, count, offset, fua):
            return spindle_ring_writev(ring, fd, vectors, count, offset, fua ? 1 : 0, tag)
        case let .writeStream(fd, vectors, count, offload):
            return spindle_ring_writev_stream(ring, fd, vectors, count, offload ? 1 : 0, tag)
        case let .sync(fd, dataOnly):
            return spindle_ring_fsync(ring, fd, dataOnly ? 1 : 0, tag)
        case let .allocate(fd, mode, offset, length):
            return spindle_ring_fallocate(ring, fd, mode, offset, length, tag)
        case let .sleep(nanoseconds):
            return spindle_ring_timeout(ring, timespec, nanoseconds, tag)
        }
    }
}
