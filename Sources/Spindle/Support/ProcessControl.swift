import Foundation
import Glibc

/// What a program that serves or copies devices needs from its process, so that a tool built on
/// Spindle (the `spindle` command among them) makes no system calls of its own: waiting for the
/// signals that ask it to stop, and knowing whether a person is watching.
public enum ProcessControl {
    /// Waits until the process receives SIGINT or SIGTERM, and returns the signal's name ("SIGINT"
    /// or "SIGTERM"). From the first call on, these signals no longer end the process by themselves:
    /// the caller decides (for a server, finish the requests in flight, flush, close, then exit).
    /// A program that tells others it is ready (prints "serving") calls ``watchForTermination()``
    /// before it does, so a signal sent the moment it is ready is not lost.
    public static func waitForTermination() async -> String {
        await watchForTermination().wait()
    }

    /// Starts catching SIGINT and SIGTERM now; ``TerminationWatch/wait()`` returns the first one
    /// caught, whether it came before the wait or during it.
    public static func watchForTermination() -> TerminationWatch {
        let watch = TerminationWatch()
        let start = watchers.withLock { watchers -> Bool in
            watchers.append(watch)
            return watchers.count == 1
        }
        if start { catchStopSignals() }
        return watch
    }

    /// Installs a handler for SIGINT and SIGTERM that writes the signal's number into a pipe, and a
    /// thread that reads the pipe and tells the watchers. A handler works whichever thread the
    /// kernel delivers the signal to; a signal source (signalfd underneath) loses the signal when
    /// it lands on a thread that was started before the signal was blocked.
    private static func catchStopSignals() {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { return }
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        stopSignalPipe = ends[1]
        for number in [SIGINT, SIGTERM] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { number in
                var byte = UInt8(truncatingIfNeeded: number)
                _ = write(stopSignalPipe, &byte, 1)
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            sigaction(number, &action, nil)
        }
        let readEnd = ends[0]
        Thread.detachNewThread {
            var byte: UInt8 = 0
            while true {
                let count = read(readEnd, &byte, 1)
                if count < 0, errno == EINTR { continue }
                guard count == 1 else { return }
                let name = Int32(byte) == SIGINT ? "SIGINT" : "SIGTERM"
                for watch in watchers.withLock({ $0 }) { watch.fire(name) }
            }
        }
    }

    /// The stop signals caught since ``ProcessControl/watchForTermination()``.
    public final class TerminationWatch: Sendable {
        private struct State {
            var fired: String?
            var waiter: CheckedContinuation<String, Never>?
        }
        private let state = Locked(State())

        fileprivate init() {}

        fileprivate func fire(_ name: String) {
            let waiter = state.withLock { state -> CheckedContinuation<String, Never>? in
                guard state.fired == nil else { return nil }
                state.fired = name
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume(returning: name)
        }

        /// The name of the first stop signal caught, waiting for one if none has come yet.
        public func wait() async -> String {
            await withCheckedContinuation { continuation in
                let fired = state.withLock { state -> String? in
                    if let fired = state.fired { return fired }
                    state.waiter = continuation
                    return nil
                }
                if let fired { continuation.resume(returning: fired) }
            }
        }
    }

    /// Whether standard input is a terminal (a person who can answer a question).
    public static var inputIsTerminal: Bool { isatty(0) == 1 }

    /// Whether standard error is a terminal (a person who can watch progress redrawn in place).
    public static var errorIsTerminal: Bool { isatty(2) == 1 }

    /// Writes out what the process's output streams hold in their buffers (before a long wait, so
    /// that a reader of a pipe sees what was printed).
    public static func flushOutput() { fflush(nil) }

    private static let watchers = Locked<[TerminationWatch]>([])
}

/// The write end of the pipe the stop-signal handler writes to (set once, before the handler is
/// installed; read only by the handler).
nonisolated(unsafe) private var stopSignalPipe: Int32 = -1
