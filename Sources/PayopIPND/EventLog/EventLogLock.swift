import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One daemon per event log: an exclusive `flock` on `<log>.lock`, taken before the log is touched and
/// held for the daemon's life. The kernel drops it when the process dies (kill -9 included), so a
/// stale lock file never blocks a restart. The file holds the holder's pid, for the message a second
/// daemon prints.
public final class EventLogLock: Sendable {
    public let path: String
    private let descriptor: Int32

    private init(path: String, descriptor: Int32) {
        self.path = path
        self.descriptor = descriptor
    }

    public static func lockPath(forLog logPath: String) -> String { logPath + ".lock" }

    /// Takes the lock of the log at `logPath`, or fails naming the daemon that holds it.
    public static func acquire(logPath: String) throws(EventLogError) -> EventLogLock {
        let path = lockPath(forLog: logPath)
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw EventLogError(.unavailable, "cannot open the lock file \(path): \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let reason = errno
            let holder = readPID(fd)
            close(fd)
            guard reason == EWOULDBLOCK else {
                throw EventLogError(.unavailable, "cannot lock \(path): \(String(cString: strerror(reason)))")
            }
            throw EventLogError(
                .inUse,
                "another payop-ipnd\(holder.map { " (pid \($0))" } ?? "") is serving the event log \(logPath); "
                    + "stop it first, or give this one its own storage.path")
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return EventLogLock(path: path, descriptor: fd)
    }

    /// The pid of the daemon serving the log at `logPath`, if one is; touches nothing (no file or folder
    /// is created): for `doctor`.
    public static func holder(logPath: String) -> Int? {
        let fd = open(lockPath(forLog: logPath), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return nil
        }
        return readPID(fd) ?? 0
    }

    private static func readPID(_ fd: Int32) -> Int? {
        var buffer = [UInt8](repeating: 0, count: 32)
        let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard count > 0 else { return nil }
        return Int(String(decoding: buffer.prefix(count), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Lets the next daemon in (dying releases the lock too). Unlocked explicitly, not only closed: a
    /// process being spawned at that moment holds a copy of the descriptor until its exec closes it,
    /// and the lock belongs to the open file, not to one descriptor of it.
    public func release() {
        flock(descriptor, LOCK_UN)
        close(descriptor)
    }
}
