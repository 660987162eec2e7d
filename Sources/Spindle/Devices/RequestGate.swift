import Synchronization

/// Counts a device's requests in flight so that closing waits for them and later requests fail.
///
/// A request enters (increments, then checks the closed flag); close sets the flag, then waits for
/// the count to reach zero. With sequentially consistent atomics either the request sees the flag or
/// close sees the request, so a descriptor is never released under a request that is using it.
package final class RequestGate: Sendable {
    private let inFlight = Atomic<Int>(0)
    private let closedFlag = Atomic<Bool>(false)

    package init() {}

    /// Whether ``close(pollNanoseconds:)`` has been called.
    package var isClosed: Bool { closedFlag.load(ordering: .sequentiallyConsistent) }

    /// Admits a request, or fails when the device is closed. `name` is evaluated only for the
    /// error, so a device whose name is built costs nothing per request.
    package func enter(operation: String, name: @autoclosure () -> String) throws(SpindleError) {
        if !tryEnter() {
            throw SpindleError(.closed, "the device is closed", operation: operation, path: name())
        }
    }

    func tryEnter() -> Bool {
        inFlight.add(1, ordering: .sequentiallyConsistent)
        if closedFlag.load(ordering: .sequentiallyConsistent) {
            inFlight.subtract(1, ordering: .sequentiallyConsistent)
            return false
        }
        return true
    }

    /// Ends a request admitted by ``enter(operation:name:)``.
    package func leave() {
        inFlight.subtract(1, ordering: .sequentiallyConsistent)
    }

    /// Refuses new requests and waits until those in flight have left.
    ///
    /// The wait is as long as the longest request in flight (each ends: the engine completes or
    /// cancels every operation it took); the poll starts at `pollNanoseconds` and backs off to 10 ms,
    /// so a long wait costs few wake-ups.
    /// - Returns: false if it was closed already.
    @discardableResult
    package func close(pollNanoseconds: UInt64 = 200_000) async -> Bool {
        let (exchanged, _) = closedFlag.compareExchange(
            expected: false, desired: true, ordering: .sequentiallyConsistent)
        var poll = pollNanoseconds
        while inFlight.load(ordering: .sequentiallyConsistent) > 0 {
            try? await Task.sleep(nanoseconds: poll)
            poll = min(poll * 2, 10_000_000)
        }
        return exchanged
    }
}
