import Glibc

/// One connection of an ``NBDDevice`` in its transmission phase: each request takes a slot of a fixed
/// table (the slot's index is the request's cookie) and joins the send queue; whichever request
/// finds no send under way becomes the sender and sends everything queued, its own and what arrives
/// meanwhile, in one `writev` per round (so 32 requests in flight cost a few sends, not 32). One
/// reader task on the engine takes the replies as they come, in any order, reading a read's data
/// straight into the waiting caller's buffer. Nothing is allocated per request: headers, vectors and
/// the queue live in preallocated memory, and the caller waits in its slot until its request is
/// both sent and answered (a write's buffer is in use until then).
///
/// When the connection breaks (the server goes away, a send fails, a reply makes no sense), the
/// reader stops, the socket is shut down, every request in flight fails with the reason and so does
/// every later one: the device is then reconnected with a new connection or closed.
final class NBDClientConnection: @unchecked Sendable {
    // @unchecked Sendable: the slot table is under `state`'s lock; a slot's header memory is written
    // only by the request holding the slot; the inbox is the reader task's alone.
    let socket: Int32
    let info: NBDExportInfo
    let address: NBDAddress
    let engine: IOEngine
    private let slotCount: Int

    private struct Slot {
        var busy = false
        var continuation: UnsafeContinuation<Int32, Never>?
        /// The reply's error (0 for success), or -1 when the connection broke first.
        var result: Int32?
        /// Whether the send that carried the request has finished (its buffers are free again).
        var sent = false
        var target: UnsafeMutableRawPointer?
        var length = 0
        /// The request's vectors: its header, and a write's payload.
        var vectorCount = 1
    }

    private struct State {
        var slots: [Slot]
        var free: [Int]
        var waiters: [UnsafeContinuation<Void, Never>] = []
        var broken: SpindleError?
        /// Slots waiting to be sent, in order (`queueCount` of them, in `queue`).
        var queueCount = 0
        /// Whether a request is sending (it drains the queue before it stops).
        var sending = false
    }

    private let state: Locked<State>
    private static let slotHeaderBytes = 32
    private let headers: UnsafeMutableRawPointer
    private let vectors: UnsafeMutablePointer<iovec>
    /// The send queue's slots (under `state`'s lock), and the sender's own copies: the batch it
    /// sends, its gathered vectors, and the continuations it resumes after.
    private let queue: UnsafeMutablePointer<Int>
    private let batch: UnsafeMutablePointer<Int>
    private let gathered: UnsafeMutablePointer<iovec>
    private let resumable: UnsafeMutablePointer<(UnsafeContinuation<Int32, Never>, Int32)>
    private let inbox = SocketInbox()
    private var reader: Task<Void, Never>?

    init(socket: Int32, info: NBDExportInfo, address: NBDAddress, engine: IOEngine, slots: Int) {
        self.socket = socket
        self.info = info
        self.address = address
        self.engine = engine
        slotCount = slots
        headers = .allocate(byteCount: slots * Self.slotHeaderBytes, alignment: 16)
        vectors = .allocate(capacity: slots * 2)
        queue = .allocate(capacity: slots)
        batch = .allocate(capacity: slots)
        gathered = .allocate(capacity: slots * 2)
        resumable = .allocate(capacity: slots)
        state = Locked(State(slots: Array(repeating: Slot(), count: slots), free: Array((0..<slots).reversed())))
    }

    deinit {
        Glibc.close(socket)
        headers.deallocate()
        vectors.deallocate()
        queue.deallocate()
        batch.deallocate()
        gathered.deallocate()
        resumable.deallocate()
    }

    /// Starts the reader task on the engine.
    func start() {
        reader = Task(executorPreference: engine) { [self] in await readReplies() }
    }

    /// Why the connection is unusable, once it is.
    var failure: SpindleError? { state.withLock { $0.broken } }

    // MARK: Requests

    /// Sends one request and waits for its reply: `payload` goes after the header (writes); a read's
    /// data lands in `target`. Returns the server's error number (0 for success).
    /// - Throws: the connection's failure when it broke before the reply.
    func request(
        _ command: NBDProtocol.Command, flags: UInt16 = 0, offset: UInt64, length: UInt32,
        payload: UnsafeRawPointer? = nil, target: UnsafeMutableRawPointer? = nil
    ) async throws(SpindleError) -> UInt32 {
        let slot = try await acquire()
        if let target {
            state.withLock {
                $0.slots[slot].target = target
                $0.slots[slot].length = Int(length)
            }
        }
        let header = UnsafeMutableRawBufferPointer(
            start: headers + slot * Self.slotHeaderBytes, count: NBDProtocol.Request.bytes)
        NBDProtocol.putBigEndian(NBDProtocol.requestMagic, header, 0)
        NBDProtocol.putBigEndian(flags, header, 4)
        NBDProtocol.putBigEndian(command.rawValue, header, 6)
        NBDProtocol.putBigEndian(UInt64(slot), header, 8)
        NBDProtocol.putBigEndian(offset, header, 16)
        NBDProtocol.putBigEndian(length, header, 24)
        let vector = vectors + slot * 2
        vector[0] = iovec(iov_base: header.baseAddress, iov_len: NBDProtocol.Request.bytes)
        vector[1] = iovec(
            iov_base: UnsafeMutableRawPointer(mutating: payload), iov_len: payload == nil ? 0 : Int(length))
        let sender = state.withLock { state -> Bool in
            state.slots[slot].vectorCount = payload == nil ? 1 : 2
            queue[state.queueCount] = slot
            state.queueCount += 1
            if state.sending { return false }
            state.sending = true
            return true
        }
        if sender { await sendQueued() }
        // The slot completes when it is sent and answered (or swept when the connection breaks):
        // only then may the caller's buffer go.
        let result = await withUnsafeContinuation { (continuation: UnsafeContinuation<Int32, Never>) in
            let ready = state.withLock { state -> Int32? in
                if let result = state.slots[slot].result, state.slots[slot].sent { return result }
                state.slots[slot].continuation = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
        release(slot)
        guard result >= 0 else { throw failure ?? closedError() }
        return UInt32(result)
    }

    private func acquire() async throws(SpindleError) -> Int {
        while true {
            enum Outcome {
                case slot(Int)
                case broken(SpindleError)
                case wait
            }
            let outcome = state.withLock { state -> Outcome in
                if let broken = state.broken { return .broken(broken) }
                if let slot = state.free.popLast() {
                    state.slots[slot] = Slot(busy: true)
                    return .slot(slot)
                }
                return .wait
            }
            switch outcome {
            case let .slot(slot): return slot
            case let .broken(error): throw error
            case .wait:
                await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                    let now = state.withLock { state -> Bool in
                        if state.broken != nil || !state.free.isEmpty { return true }
                        state.waiters.append(continuation)
                        return false
                    }
                    if now { continuation.resume() }
                }
            }
        }
    }

    private func release(_ slot: Int) {
        let waiter = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            state.slots[slot] = Slot()
            state.free.append(slot)
            return state.waiters.isEmpty ? nil : state.waiters.removeFirst()
        }
        waiter?.resume()
    }

    /// Marks the connection broken (the first reason wins) and shuts the socket down, which ends the
    /// reader; the reader's sweep then fails every request in flight.
    func breakConnection(_ error: SpindleError) {
        let first = state.withLock { state -> Bool in
            guard state.broken == nil else { return false }
            state.broken = error
            return true
        }
        if first { Glibc.shutdown(socket, Int32(SHUT_RDWR)) }
    }

    private func closedError() -> SpindleError {
        SpindleError(.closed, "the connection is closed", operation: "request", path: address.uri)
    }

    /// Sends what is queued, round after round, until the queue is empty: each round gathers the
    /// queued requests' vectors into one `writev`. Then marks them sent and resumes those answered
    /// already. A failed send breaks the connection (its requests fail in the reader's sweep).
    private func sendQueued() async {
        while true {
            let count = state.withLock { state -> Int in
                let count = state.queueCount
                if count == 0 { state.sending = false }
                batch.update(from: queue, count: count)
                state.queueCount = 0
                return count
            }
            guard count > 0 else { return }
            var vectorCount = 0
            state.withLock { state in
                for index in 0..<count {
                    let slot = batch[index]
                    for part in 0..<state.slots[slot].vectorCount {
                        gathered[vectorCount] = vectors[slot * 2 + part]
                        vectorCount += 1
                    }
                }
            }
            if let error = await send(gathered, count: vectorCount) { breakConnection(error) }
            let ready = state.withLock { state -> Int in
                var ready = 0
                for index in 0..<count {
                    let slot = batch[index]
                    state.slots[slot].sent = true
                    if let result = state.slots[slot].result, let continuation = state.slots[slot].continuation {
                        state.slots[slot].continuation = nil
                        (resumable + ready).initialize(to: (continuation, result))
                        ready += 1
                    }
                }
                return ready
            }
            for index in 0..<ready {
                let (continuation, result) = (resumable + index).move()
                continuation.resume(returning: result)
            }
        }
    }

    /// Sends `count` vectors in full, advancing them in place past what a partial send took; the
    /// error, or nil.
    private func send(_ vectors: UnsafeMutablePointer<iovec>, count: Int) async -> SpindleError? {
        var first = 0
        var left = 0
        for index in 0..<count { left += vectors[index].iov_len }
        while left > 0 {
            let result = await engine.execute(
                .writeStream(
                    fd: socket, vectors: vectors + first, count: UInt32(min(count - first, 1024)),
                    offload: left >= 128 * 1024))
            if result == -EINTR || result == -EAGAIN { continue }
            guard result > 0 else {
                return lost(result == 0 ? "the server stopped taking data" : String(cString: strerror(-result)))
            }
            left -= Int(result)
            var skip = Int(result)
            while skip > 0 && first < count {
                if skip >= vectors[first].iov_len {
                    skip -= vectors[first].iov_len
                    first += 1
                } else {
                    vectors[first].iov_base += skip
                    vectors[first].iov_len -= skip
                    skip = 0
                }
            }
            while first < count && vectors[first].iov_len == 0 { first += 1 }
        }
        return nil
    }

    func lost(_ why: String) -> SpindleError {
        SpindleError(
            .deviceGone,
            "the connection to \(address.uri) was lost (\(why)); requests fail until the device is reconnected (NBDDevice.reconnect(), or spindle array add of the same URI for an array member)",
            operation: "request", path: address.uri)
    }

    // MARK: Replies

    /// Takes replies until the connection ends, then fails what is still in flight.
    private func readReplies() async {
        let header = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
        defer { header.deallocate() }
        var reason: SpindleError
        while true {
            do throws(SpindleError) {
                try await receive(header, 16)
                let bytes = UnsafeRawBufferPointer(start: header, count: 16)
                guard NBDProtocol.bigEndian(UInt32.self, bytes, 0) == NBDProtocol.simpleReplyMagic else {
                    throw lost("the server sent a reply with a bad magic number")
                }
                let error = NBDProtocol.bigEndian(UInt32.self, bytes, 4)
                let cookie = NBDProtocol.bigEndian(UInt64.self, bytes, 8)
                let slot = Int(truncatingIfNeeded: cookie)
                let expected = state.withLock { state -> (UnsafeMutableRawPointer?, Int)? in
                    guard cookie < UInt64(slotCount), state.slots[slot].busy, state.slots[slot].result == nil else {
                        return nil
                    }
                    return (state.slots[slot].target, state.slots[slot].length)
                }
                guard let (target, length) = expected else {
                    throw lost("the server answered a request that is not in flight (cookie \(cookie))")
                }
                if error == 0, let target { try await receive(target, length) }
                complete(slot, Int32(bitPattern: min(error, UInt32(Int32.max))))
            } catch {
                reason = error
                break
            }
        }
        breakConnection(reason)
        let (waiting, waiters) = state.withLock {
            state -> ([UnsafeContinuation<Int32, Never>], [UnsafeContinuation<Void, Never>]) in
            var waiting: [UnsafeContinuation<Int32, Never>] = []
            for index in state.slots.indices where state.slots[index].busy && state.slots[index].result == nil {
                state.slots[index].result = -1
                // A request still being sent is resumed by its sender when the send ends.
                guard state.slots[index].sent, let continuation = state.slots[index].continuation else { continue }
                waiting.append(continuation)
                state.slots[index].continuation = nil
            }
            defer { state.waiters = [] }
            return (waiting, state.waiters)
        }
        for continuation in waiting { continuation.resume(returning: -1) }
        for waiter in waiters { waiter.resume() }
    }

    private func complete(_ slot: Int, _ result: Int32) {
        let continuation = state.withLock { state -> UnsafeContinuation<Int32, Never>? in
            state.slots[slot].result = result
            // Not sent yet (the reply outran the sender's completion): the sender resumes it.
            guard state.slots[slot].sent else { return nil }
            defer { state.slots[slot].continuation = nil }
            return state.slots[slot].continuation
        }
        continuation?.resume(returning: result)
    }

    /// Exactly `count` bytes, through the inbox (many replies per read).
    private func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int) async throws(SpindleError) {
        let complete = try await inbox.receive(buffer, count) { target, room throws(SpindleError) in
            while true {
                let result = await engine.execute(
                    .read(fd: socket, buffer: target, length: UInt32(room), offset: UInt64.max))
                if result == -EINTR || result == -EAGAIN { continue }
                if result < 0 { throw failure ?? lost(String(cString: strerror(-result))) }
                return Int(result)
            }
        }
        if !complete { throw failure ?? lost("the server closed the connection") }
    }

    /// Says goodbye (`NBD_CMD_DISCONNECT`, best effort), shuts the socket down and waits for the
    /// reader to end. For a connection with no request in flight.
    func close() async {
        if failure == nil {
            let header = UnsafeMutableRawBufferPointer(start: headers, count: NBDProtocol.Request.bytes)
            NBDProtocol.putBigEndian(NBDProtocol.requestMagic, header, 0)
            NBDProtocol.putBigEndian(UInt16(0), header, 4)
            NBDProtocol.putBigEndian(NBDProtocol.Command.disconnect.rawValue, header, 6)
            NBDProtocol.putBigEndian(UInt64.max, header, 8)
            NBDProtocol.putBigEndian(UInt64(0), header, 16)
            NBDProtocol.putBigEndian(UInt32(0), header, 24)
            vectors[0] = iovec(iov_base: headers, iov_len: NBDProtocol.Request.bytes)
            let free = state.withLock { state -> Bool in
                guard !state.sending else { return false }
                state.sending = true
                return true
            }
            if free {
                _ = await send(vectors, count: 1)
                state.withLock { $0.sending = false }
            }
        }
        breakConnection(SpindleError(.closed, "the device is closed", operation: "request", path: address.uri))
        await reader?.value
    }
}
