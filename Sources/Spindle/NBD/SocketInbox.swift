/// Bytes read from a socket and not consumed yet, so that one read takes in as many small messages
/// as have arrived (pipelined requests for the server, replies for the client) instead of one read
/// per header. Used by one task at a time: a connection's reader.
final class SocketInbox: @unchecked Sendable {
    // @unchecked Sendable: only the connection's reading task touches it.
    static let bytes = 256 * 1024
    private let storage = UnsafeMutableRawPointer.allocate(byteCount: SocketInbox.bytes, alignment: 64)
    private var start = 0
    private var end = 0

    deinit { storage.deallocate() }

    /// Exactly `count` bytes into `buffer`: what is buffered first, then what `read(target, room)`
    /// reads (it returns the bytes read, 0 at the end of the stream) — large remainders straight
    /// into `buffer`, small ones through the inbox. Returns false at the end of the stream.
    func receive<Failure: Error>(
        _ buffer: UnsafeMutableRawPointer, _ count: Int,
        read: (_ target: UnsafeMutableRawPointer, _ room: Int) async throws(Failure) -> Int
    ) async throws(Failure) -> Bool {
        var done = 0
        while done < count {
            if start < end {
                let take = min(count - done, end - start)
                (buffer + done).copyMemory(from: storage + start, byteCount: take)
                start += take
                done += take
                continue
            }
            let direct = count - done >= Self.bytes / 4
            let result = try await read(
                direct ? buffer + done : storage, min(direct ? count - done : Self.bytes, 1 << 30))
            if result == 0 { return false }
            if direct {
                done += result
            } else {
                start = 0
                end = result
            }
        }
        return true
    }

    /// The bytes buffered and not consumed, taken out (at `NBD_OPT_STARTTLS`, the start of the TLS
    /// stream).
    func takeBuffered() -> [UInt8] {
        defer { start = end }
        return Array(UnsafeRawBufferPointer(start: storage + start, count: end - start))
    }
}
