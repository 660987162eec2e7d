import Dispatch
import Glibc

/// What a program that serves or copies devices needs from its process, so that a tool built on
/// Spindle (the `spindle` command among them) makes no system calls of its own: waiting for the
/// signals that ask it to stop, and knowing whether a person is watching.
public enum ProcessControl {
    /// Waits until the process receives SIGINT or SIGTERM, and returns the signal's name ("SIGINT"
    /// or "SIGTERM"). From the first call on, these signals no longer end the process by themselves:
    /// the caller decides (for a server, finish the requests in flight, flush, close, then exit).
    public static func waitForTermination() async -> String {
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
        return await withCheckedContinuation { continuation in
            let fired = Locked(false)
            var sources: [DispatchSourceSignal] = []
            for (number, name) in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")] {
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler {
                    let first = fired.withLock { fired in
                        defer { fired = true }
                        return !fired
                    }
                    if first { continuation.resume(returning: name) }
                }
                source.resume()
                sources.append(source)
            }
            // The sources stay alive for the life of the process.
            kept.withLock { $0 += sources }
        }
    }

    /// Whether standard input is a terminal (a person who can answer a question).
    public static var inputIsTerminal: Bool { isatty(0) == 1 }

    /// Whether standard error is a terminal (a person who can watch progress redrawn in place).
    public static var errorIsTerminal: Bool { isatty(2) == 1 }

    /// Writes out what the process's output streams hold in their buffers (before a long wait, so
    /// that a reader of a pipe sees what was printed).
    public static func flushOutput() { fflush(nil) }

    private static let queue = DispatchQueue(label: "spindle.signals")
    private static let kept = Locked<[DispatchSourceSignal]>([])
}
