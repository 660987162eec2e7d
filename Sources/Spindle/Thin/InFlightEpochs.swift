/// Tracks data I/O that looked up a chunk mapping and has not finished, in two alternating epochs,
/// so the pool can wait for every request that might still use an old mapping before it reuses a
/// freed chunk or shares a chunk with a new snapshot (the grace period of read-copy-update).
///
/// A request enters under the pool lock in the same critical section as its lookup, and leaves
/// without it. ``drain()`` (called under the pool lock, after the mapping changed) starts a new epoch
/// and returns once every request of the old one left; requests entering meanwhile see the new
/// mappings and are not waited for, so a steady load cannot starve it.
final class InFlightEpochs: Sendable {
    private struct State {
        var current = 0
        var counts = [0, 0]
        var waiter: UnsafeContinuation<Void, Never>?
    }
    private let state = Locked(State())

    /// Registers a request in the current epoch; pass the result to ``leave(_:)``.
    func enter() -> Int {
        state.withLock { state in
            state.counts[state.current] += 1
            return state.current
        }
    }

    func leave(_ epoch: Int) {
        let waiter = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            state.counts[epoch] -= 1
            guard epoch != state.current, state.counts[epoch] == 0, let waiter = state.waiter else { return nil }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    /// Waits until every request that entered before this call has left. Callers serialize drains.
    func drain() async {
        let old = state.withLock { state -> Int in
            let old = state.current
            state.current = 1 - old
            return old
        }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let done = state.withLock { state -> Bool in
                if state.counts[old] == 0 { return true }
                state.waiter = continuation
                return false
            }
            if done { continuation.resume() }
        }
    }
}
