import Glibc

/// Finds who holds a `flock` on a file, from `/proc/locks`, for error messages.
enum FileLockHolder {
    /// "process 1234 (spindle)", "this process (the image is open already)", or "another process"
    /// when the holder cannot be found.
    static func describe(device: UInt64, inode: UInt64) -> String {
        guard let pid = holderPID(device: device, inode: inode) else { return "another process" }
        if pid == getpid() { return "this process (the image is open for writing already)" }
        if !isAlive(pid) {
            return
                "process \(pid), which has exited (the kernel is still finishing its I/O and has not released the lock),"
        }
        if let command = readSmallFile("/proc/\(pid)/comm")?.split(separator: "\n").first {
            return "process \(pid) (\(command))"
        }
        return "process \(pid)"
    }

    /// Takes an exclusive `flock` without blocking. When a process holds it that has already
    /// exited — a killed process whose io_uring requests the kernel is still tearing down keeps its
    /// files, and so its lock, for a moment — waits up to `patienceSeconds` for the lock to go; when
    /// no holder is listed (a lock being released just after a close), waits up to a second.
    /// Returns false with `errno` set when the lock is not taken.
    static func lock(_ descriptor: Int32, device: UInt64, inode: UInt64, patienceSeconds: Double = 10) -> Bool {
        if flock(descriptor, LOCK_EX | LOCK_NB) == 0 { return true }
        var failure = errno
        var waited = 0.0
        var unknownHolderWait = 0.0
        while failure == EWOULDBLOCK, waited < patienceSeconds {
            if let pid = holderPID(device: device, inode: inode) {
                if pid == getpid() || isAlive(pid) { break }
            } else {
                // No holder listed: the lock is being released (the kernel drops a closed file's
                // lock when its last in-flight reference goes, a moment after close). Wait briefly.
                guard unknownHolderWait < 1 else { break }
                unknownHolderWait += 0.01
            }
            usleep(10_000)
            waited += 0.01
            if flock(descriptor, LOCK_EX | LOCK_NB) == 0 { return true }
            failure = errno
        }
        errno = failure
        return false
    }

    /// Whether a process with this id exists (a zombie counts: it still holds nothing, but its
    /// parent has not collected it yet, which is the parent's business).
    static func isAlive(_ pid: Int32) -> Bool {
        kill(pid, 0) == 0 || errno != ESRCH
    }

    /// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 4242 fe:01:1234 0 EOF`.
    static func holderPID(device: UInt64, inode: UInt64, locksText: String? = nil) -> Int32? {
        guard let text = locksText ?? readSmallFile("/proc/locks") else { return nil }
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
        let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // Blocked waiters are listed with "->" before the kind; skip them.
            guard fields.count >= 6, fields[1] == "FLOCK" else { continue }
            let identity = fields[5].split(separator: ":")
            guard identity.count == 3, UInt64(identity[2]) == inode,
                UInt64(identity[0], radix: 16) == major, UInt64(identity[1], radix: 16) == minor,
                let pid = Int32(fields[4])
            else { continue }
            return pid
        }
        return nil
    }

    static func readSmallFile(_ path: String) -> String? {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension FileDevice {
    /// Who holds the write lock of an image, or nil when nobody does (or the file cannot be opened).
    /// Does not take the lock.
    public static func writeLockHolder(path: String) -> String? {
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { Glibc.close(descriptor) }
        if flock(descriptor, LOCK_SH | LOCK_NB) == 0 {
            flock(descriptor, LOCK_UN)
            return nil
        }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { return "another process" }
        return FileLockHolder.describe(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }
}
