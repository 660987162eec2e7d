import Synchronization

/// Tracks data I/O that looked up a chunk mapping and has not finished, in two alternating epochs,
/// so the pool can wait for every request that might still use an old mapping before it reuses a
/// freed chunk or shares a chunk with a new snapshot (the grace period of read-copy-update).
///
/// A request enters before it looks a mapping up (in the pool's metadata under the pool's lock, or
/// in a volume's mapping table without it) and leaves when its I/O is done. ``drain()``, called
/// after a mapping changed, starts a new epoch and returns once every request of the old one left:
/// a request that saw the old mapping entered before the change, so before the new epoch began,
/// and is waited for; one entering meanwhile sees the new mapping and is not, so a steady load
/// cannot starve a drain. Entering and leaving are a few atomic operations, without a lock.
final class InFlightEpochs: Sendable {
    private let current = Atomic<Int>(0)
    private let count0 = Atomic<Int>(0)
    private let count1 = Atomic<Int>(0)
    /// The drain waiting for an epoch to empty, if any (only drains and the last request of the
    /// epoch it waits for take this lock).
    private let waiter = Locked<(epoch: Int, continuation: UnsafeContinuation<Void, Never>)?>(nil)
    /// Drains run one at a time (each flips the epoch and waits for the old one).
    private let drains = AsyncMutex()

    private func count(_ epoch: Int) -> Int {
        epoch == 0 ? count0.load(ordering: .sequentiallyConsistent) : count1.load(ordering: .sequentiallyConsistent)
    }

    /// Registers a request in the current epoch; pass the result to ``leave(_:)``.
    func enter() -> Int {
        while true {
            let epoch = current.load(ordering: .sequentiallyConsistent)
            if epoch == 0 {
                count0.add(1, ordering: .sequentiallyConsistent)
            } else {
                count1.add(1, ordering: .sequentiallyConsistent)
            }
            // Counted in the epoch that is still current: any later drain waits for this request.
            // Otherwise a drain began in between and may have found the old epoch empty already.
            if current.load(ordering: .sequentiallyConsistent) == epoch { return epoch }
            leave(epoch)
        }
    }

    func leave(_ epoch: Int) {
        let left =
            epoch == 0
            ? count0.subtract(1, ordering: .sequentiallyConsistent).newValue
            : count1.subtract(1, ordering: .sequentiallyConsistent).newValue
        guard left == 0, current.load(ordering: .sequentiallyConsistent) != epoch else { return }
        let continuation = waiter.withLock { waiter -> UnsafeContinuation<Void, Never>? in
            guard let waiting = waiter, waiting.epoch == epoch, count(epoch) == 0 else { return nil }
            waiter = nil
            return waiting.continuation
        }
        continuation?.resume()
    }

    /// Whether a drain is waiting for requests to leave.
    var isDraining: Bool { waiter.withLock { $0 != nil } }

    /// Waits until every request that entered before this call has left. Drains run one at a time;
    /// the pool calls it with or without its lock (a drain never needs the lock).
    func drain() async {
        await drains.lock()
        defer { drains.unlock() }
        let old = current.load(ordering: .sequentiallyConsistent)
        current.store(1 - old, ordering: .sequentiallyConsistent)
        if count(old) == 0 { return }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let done = waiter.withLock { waiter -> Bool in
                if count(old) == 0 { return true }
                waiter = (old, continuation)
                return false
            }
            if done { continuation.resume() }
        }
    }
}
