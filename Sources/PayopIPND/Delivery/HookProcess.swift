import Foundation
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A hook's process: started with `posix_spawn` (no shell, a process group of its own, working
/// directory `/`, only the given environment, every signal at its default, no descriptor of the
/// daemon's but stdin, stdout and stderr), its exit learnt by the one `ProcessReaper` thread.
/// No thread per process: swift-subprocess started one for each run, and on a backlog its thread
/// creation, wake-ups and stack unmapping cost more than the hook's own exec.
final class HookProcess: Sendable {
    let pid: pid_t
    private struct State {
        var status: Int32?
        var waiters: [CheckedContinuation<Int32, Never>] = []
    }
    private let state = Mutex(State())

    private init(pid: pid_t) { self.pid = pid }

    /// How the process ended (wait(2)'s status), once it has.
    var exitStatus: Int32 {
        get async {
            await withCheckedContinuation { continuation in
                let status = state.withLock { state -> Int32? in
                    if state.status == nil { state.waiters.append(continuation) }
                    return state.status
                }
                if let status { continuation.resume(returning: status) }
            }
        }
    }

    /// Sends `signal` to the process group while its leader is not yet reaped (after that its id may
    /// belong to someone else).
    func signalGroup(_ signal: Int32) {
        state.withLock { state in
            if state.status == nil { _ = kill(-pid, signal) }
        }
    }

    /// SIGTERM to the group now, SIGKILL after `grace` if the hook has not exited by then.
    func terminate(grace: TimeAmount) {
        signalGroup(SIGTERM)
        MultiThreadedEventLoopGroup.singleton.next().scheduleTask(in: grace) { self.signalGroup(SIGKILL) }
    }

    /// Reaps the process if it has exited; true when it was (the reaper then forgets it).
    fileprivate func reap(blocking: Bool = false) -> Bool {
        var raw: Int32 = 0
        let waiters = state.withLock { state -> [CheckedContinuation<Int32, Never>]? in
            while true {
                let reaped = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
                if reaped == pid { break }
                if reaped < 0, errno == EINTR { continue }
                if reaped == 0 { return nil }
                raw = 127 << 8  // ECHILD: someone else reaped it; report a failure, never hang.
                break
            }
            state.status = raw
            defer { state.waiters = [] }
            return state.waiters
        }
        guard let waiters else { return false }
        for waiter in waiters { waiter.resume(returning: raw) }
        return true
    }

    /// Starts `argv` (argv[0] an absolute path) with `environment` as its whole environment, `input`
    /// as its stdin and `output` as its stdout and stderr.
    static func spawn(argv: [String], environment: [String], input: [UInt8], output: Int32) throws(SystemError) -> HookProcess {
        var fds: [Int32] = [0, 0]
        guard systemPipe2(&fds, O_CLOEXEC) == 0 else { throw SystemError(errno) }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        defer { close(readEnd) }  // the child has its own copy
        // The body goes into the pipe before the hook exists, so a hook that exits without reading it
        // is no error and needs no writer; a body larger than the pipe is the rare exception.
        if input.count > 65536 { _ = systemFcntl(writeEnd, 1031 /* F_SETPIPE_SZ */, min(input.count, 1 << 20)) }
        _ = systemFcntl(writeEnd, F_SETFL, Int(systemFcntl(writeEnd, F_GETFL, 0) | O_NONBLOCK))
        var written = 0
        while written < input.count {
            let n = input.withUnsafeBytes { write(writeEnd, $0.baseAddress! + written, input.count - written) }
            if n > 0 {
                written += n
            } else if n < 0, errno == EINTR {
                continue
            } else {
                break
            }
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, readEnd, 0)
        posix_spawn_file_actions_adddup2(&actions, output, 1)
        posix_spawn_file_actions_adddup2(&actions, output, 2)
        systemAddChdir(&actions, "/")
        systemAddClosefrom(&actions, 3)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setpgroup(&attributes, 0)
        // The daemon ignores SIGPIPE and its lifecycle ignores SIGTERM/SIGINT/SIGHUP (handled through
        // dispatch sources); ignored signals survive exec, so every signal is reset for the hook.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in 1...64 where signal != SIGKILL && signal != SIGSTOP { sigaddset(&defaults, Int32(signal)) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var unblocked = sigset_t()
        sigemptyset(&unblocked)
        posix_spawnattr_setsigmask(&attributes, &unblocked)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var pid = pid_t()
        let spawned = withCStrings(argv) { argvPointers in
            withCStrings(environment) { environmentPointers in
                posix_spawn(&pid, argv[0], &actions, &attributes, argvPointers, environmentPointers)
            }
        }
        guard spawned == 0 else {
            close(writeEnd)
            throw SystemError(spawned)
        }
        if written < input.count {
            writeRest(Array(input[written...]), to: writeEnd)
        } else {
            close(writeEnd)
        }
        let process = HookProcess(pid: pid)
        ProcessReaper.shared.watch(process)
        return process
    }

    /// The part of a large body the pipe could not hold, written from an event loop as the hook reads.
    private static func writeRest(_ rest: [UInt8], to descriptor: Int32) {
        NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .takingOwnershipOfDescriptor(output: descriptor)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    // A hook that stops reading ends the write (EPIPE); that is not the run's failure.
                    channel.writeAndFlush(ByteBuffer(bytes: rest)).whenComplete { _ in channel.close(promise: nil) }
                case .failure:
                    close(descriptor)
                }
            }
    }

    private static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        let pointers = strings.map { strdup($0) } + [nil]
        defer { for pointer in pointers { free(pointer) } }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }

    /// The status as the result of a run: exit code, or the signal that ended it.
    enum Termination: Equatable {
        case exited(Int32)
        case signaled(Int32)

        init(status: Int32) {
            let signal = status & 0x7f
            self = signal == 0 ? .exited((status >> 8) & 0xff) : .signaled(signal)
        }
    }

    /// The reaper's fallback where pidfds do not exist: one thread blocked in waitpid for this process.
    fileprivate func reapOnItsOwnThread() {
        let thread = Thread { _ = self.reap(blocking: true) }
        thread.name = "payop-ipnd.hook-wait"
        thread.start()
    }
}

/// One thread that learns of every hook's exit: it polls a pidfd per running hook (readable once the
/// process has exited) and reaps the process then. It sleeps in `poll` while hooks run or none does.
final class ProcessReaper: @unchecked Sendable {
    static let shared = ProcessReaper()

    /// pidfd -> process; `lock` guards it, the reaper thread alone polls.
    private var watched: [Int32: HookProcess] = [:]
    private let lock = NSLock()
    /// A pipe whose byte wakes `poll` to look at a newly watched process.
    private let wakeRead: Int32
    private let wakeWrite: Int32

    private init() {
        var fds: [Int32] = [-1, -1]
        _ = systemPipe2(&fds, O_CLOEXEC | O_NONBLOCK)
        (wakeRead, wakeWrite) = (fds[0], fds[1])
        let thread = Thread { [self] in run() }
        thread.name = "payop-ipnd.hook-reaper"
        thread.start()
    }

    func watch(_ process: HookProcess) {
        let pidfd = systemPidfdOpen(process.pid, 0)
        guard pidfd >= 0, wakeRead >= 0 else {
            process.reapOnItsOwnThread()
            return
        }
        lock.withLock { watched[pidfd] = process }
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
    }

    private func run() {
        var drain = [UInt8](repeating: 0, count: 64)
        while true {
            let entries = lock.withLock { Array(watched) }
            var fds = [pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            fds += entries.map { pollfd(fd: $0.key, events: Int16(POLLIN), revents: 0) }
            guard poll(&fds, nfds_t(fds.count), -1) > 0 else { continue }  // EINTR
            if fds[0].revents != 0 {
                while read(wakeRead, &drain, drain.count) > 0 {}
            }
            for (index, entry) in entries.enumerated() where fds[index + 1].revents != 0 {
                if entry.value.reap() {
                    lock.withLock { _ = watched.removeValue(forKey: entry.key) }
                    close(entry.key)
                }
            }
        }
    }
}

/// A failed system call, described as the C library describes its errno.
struct SystemError: Error, CustomStringConvertible {
    let code: Int32
    init(_ code: Int32) { self.code = code }
    var description: String { String(cString: strerror(code)) }
}

/// glibc's pipe2, which the Glibc module does not export.
@_silgen_name("pipe2")
func systemPipe2(_ fds: UnsafeMutablePointer<Int32>, _ flags: Int32) -> Int32

/// fcntl with one integer argument (the Glibc module does not import variadic functions).
@_silgen_name("fcntl")
private func systemFcntl(_ descriptor: Int32, _ command: Int32, _ argument: Int) -> Int32

/// glibc 2.36's pidfd_open (Linux 5.3).
@_silgen_name("pidfd_open")
private func systemPidfdOpen(_ pid: pid_t, _ flags: UInt32) -> Int32

/// glibc's posix_spawn_file_actions_addchdir_np (2.29).
@_silgen_name("posix_spawn_file_actions_addchdir_np")
@discardableResult
private func systemAddChdir(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ path: UnsafePointer<CChar>) -> Int32

/// glibc's posix_spawn_file_actions_addclosefrom_np (2.34).
@_silgen_name("posix_spawn_file_actions_addclosefrom_np")
@discardableResult
private func systemAddClosefrom(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ from: Int32) -> Int32
