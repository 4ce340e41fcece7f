import CSQLiteConfig

#if canImport(Glibc)
import Glibc
#endif

/// The allocators under the daemon, set as `serve` starts: glibc's keeps freed memory for reuse rather
/// than handing it back to the kernel after every commit, and SQLite's stops counting every allocation.
///
/// By default glibc gives the free top of a thread's heap back to the kernel (`madvise`) as soon as it
/// passes a threshold of about 128 KB. The log writer frees and takes again about that much with every
/// commit (SQLite's savepoint bookkeeping, among others), so it did so about once per commit: 1,350 to
/// 1,650 times a second while a backlog drained, each a TLB flush on both cores, then page faults to take
/// the memory back. With a threshold of `trimThreshold` a heap's free top is given back only past that
/// size. Fixing it turns off glibc's own adjustment of its `mmap` threshold, which is set here as that
/// adjustment would have raised it: blocks up to `mmapThreshold` come from the heaps, not one `mmap`
/// and `munmap` each.
enum MemoryTuning {
    static let trimThreshold: Int32 = 4 << 20
    static let mmapThreshold: Int32 = 4 << 20

    /// `mallopt`'s parameters, from glibc's `malloc.h`.
    private static let mTrimThreshold: Int32 = -1
    private static let mMmapThreshold: Int32 = -3

    /// Once, as `serve` starts, before the log and the listeners are opened (`mallopt` may be called
    /// from any thread). Returns false when the C library has no `mallopt` (not glibc) or refused a
    /// setting: its defaults then stand (slower, not wrong).
    @discardableResult
    static func keepFreedMemory() -> Bool {
        // Swift's Glibc module does not import `malloc.h`: the function is looked up by name.
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return false }
        let mallopt = unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)
        return mallopt(mMmapThreshold, mmapThreshold) == 1 && mallopt(mTrimThreshold, trimThreshold) == 1
    }

    /// SQLite's allocation statistics, off. Debian's libsqlite3 counts the bytes of every allocation
    /// (`SQLITE_DEFAULT_MEMSTATUS` is 1 there) under one global mutex, and, built without lookaside
    /// memory (`SQLITE_OMIT_LOOKASIDE`), it takes every one of a statement's allocations from `malloc`: the
    /// writer thread locked and unlocked that mutex around each, for statistics (`sqlite3_status`)
    /// nothing here reads. SQLite's documentation recommends building with it off.
    ///
    /// Once, before the first connection opens: SQLite takes the setting only before it is initialized.
    /// Returns false when it was refused (a connection had opened): SQLite then keeps counting (slower,
    /// not wrong).
    @discardableResult
    static func skipSQLiteAllocationStatistics() -> Bool {
        payop_sqlite3_config_memstatus(0) == 0
    }
}
