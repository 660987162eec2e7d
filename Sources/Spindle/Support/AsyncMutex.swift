import Synchronization

/// Mutual exclusion across `await`s: holders are admitted one at a time in arrival order, and waiters
/// suspend instead of blocking a thread. Used where a sequence of device requests must not interleave.
package final class AsyncMutex: Sendable {
    private struct State {
        var locked = false
        var waiters: [UnsafeContinuation<Void, Never>] = []
        var head = 0
    }
    private let state = Locked(State())

    package init() {}

    /// Waits for the lock.
    package func lock() async {
        let acquired = state.withLock { state -> Bool in
            if state.locked { return false }
            state.locked = true
            return true
        }
        if acquired { return }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let acquiredNow = state.withLock { state -> Bool in
                if !state.locked {
                    state.locked = true
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if acquiredNow { continuation.resume() }
        }
        // The lock was handed over by unlock(), under `state`'s mutex, and the runtime orders the
        // resume in code ThreadSanitizer does not see: taking that mutex once more makes the
        // hand-over (everything the previous holder did) visible to it. One uncontended lock.
        state.withLock { _ in }
    }

    /// Takes the lock if it is free, without waiting.
    package func tryLock() -> Bool {
        state.withLock { state in
            if state.locked { return false }
            state.locked = true
            return true
        }
    }

    /// Hands the lock to the next waiter, or frees it.
    package func unlock() {
        let next = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            precondition(state.locked, "AsyncMutex unlocked while not locked")
            guard state.head < state.waiters.count else {
                state.locked = false
                state.waiters.removeAll(keepingCapacity: true)
                state.head = 0
                return nil
            }
            let waiter = state.waiters[state.head]
            state.head += 1
            return waiter  // the lock passes to the waiter still held
        }
        next?.resume()
    }

    /// Runs `body` holding the lock.
    package func withLock<Result>(_ body: () async throws -> Result) async rethrows -> Result {
        await lock()
        defer { unlock() }
        return try await body()
    }
}
