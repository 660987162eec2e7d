import Synchronization

/// Locks on stripes, so that the read-modify-write of a stripe, a rebuild step and a scrub step never
/// interleave on the same stripe. Ranges are taken in ascending order, so two requests never wait on
/// each other. Only stripes in use take memory.
final class StripeLocks: Sendable {
    private struct Entry {
        var waiters: [UnsafeContinuation<Void, Never>] = []
    }
    private let table = Locked<[UInt64: Entry]>([:])

    /// Takes every stripe in `range`, lowest first.
    func lock(_ range: ClosedRange<UInt64>) async {
        for stripe in range { await lock(stripe) }
    }

    func unlock(_ range: ClosedRange<UInt64>) {
        for stripe in range { unlock(stripe) }
    }

    private func lock(_ stripe: UInt64) async {
        let acquired = table.withLock { table -> Bool in
            if table[stripe] == nil {
                table[stripe] = Entry()
                return true
            }
            return false
        }
        if acquired { return }
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let acquiredNow = table.withLock { table -> Bool in
                if table[stripe] == nil {
                    table[stripe] = Entry()
                    return true
                }
                table[stripe]!.waiters.append(continuation)
                return false
            }
            if acquiredNow { continuation.resume() }
        }
    }

    private func unlock(_ stripe: UInt64) {
        let next = table.withLock { table -> UnsafeContinuation<Void, Never>? in
            guard var entry = table[stripe] else { preconditionFailure("stripe \(stripe) unlocked while not locked") }
            if entry.waiters.isEmpty {
                table[stripe] = nil
                return nil
            }
            let waiter = entry.waiters.removeFirst()
            table[stripe] = entry  // still held, now by the waiter
            return waiter
        }
        next?.resume()
    }
}
