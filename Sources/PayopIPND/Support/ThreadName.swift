#if canImport(Glibc)
import Glibc
#endif

/// Names the calling OS thread as `top -H`, `perf` and `/proc/PID/task/*/comm` show it, by writing its
/// `comm` (glibc's `pthread_setname_np` does the same; Swift's Glibc module does not import it). Linux
/// keeps 15 bytes. Foundation's `Thread.name` reaches the OS only once the thread's start has been
/// recorded by the thread that started it, which a thread naming itself may precede.
func nameCurrentThread(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    defer { close(fd) }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}
