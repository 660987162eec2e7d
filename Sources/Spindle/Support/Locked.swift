import Glibc

/// A value behind a pthread mutex.
///
/// Spindle uses this rather than `Synchronization.Mutex`: on Linux that one is built on raw futexes,
/// which ThreadSanitizer cannot see, so every access under it was reported as a race and real races
/// would drown in the noise. pthread mutexes are understood by the sanitizer and cost the same when
/// uncontended.
package final class Locked<Value>: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched inside `withLock`, which holds `mutex`.
    private var value: Value
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    package init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with exclusive access to the value.
    @inline(__always)
    package func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
