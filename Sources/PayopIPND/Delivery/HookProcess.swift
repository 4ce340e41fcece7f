import CHookSpawn
import Foundation
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A hook's process: started by `payop_spawn_hook` (`CHookSpawn`: no shell, a process group of its
/// own, working directory `/`, only the given environment, every signal at its default and none
/// blocked, no descriptor of the daemon's but stdin, stdout and stderr), its exit learnt by the one
/// `ProcessReaper` thread. No thread per process: swift-subprocess started one for each run, and on a
/// backlog its thread creation, wake-ups and stack unmapping cost more than the hook's own exec; and no
/// stack mapped and unmapped per process, as glibc's `posix_spawn` does.
final class HookProcess: Sendable {
    let pid: pid_t
    private struct State {
        var status: Int32?
        var waiters: [CheckedContinuation<Int32, Never>] = []
        /// Timed out or stopped by shutdown: what the hook leaves behind dies with it.
        var terminating = false
        /// Writes the part of a large body the pipe could not hold; closed once the hook has exited.
        var stdinWriter: EventLoopFuture<any Channel>?
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

    /// SIGTERM to the group now, SIGKILL after `grace` if the hook has not exited by then; whatever of
    /// the group outlives the hook is killed when the hook is reaped. False when it was reaped already
    /// (nothing sent: it ended on its own).
    @discardableResult
    func terminate(grace: TimeAmount) -> Bool {
        let running = state.withLock { state in
            state.terminating = true
            return state.status == nil
        }
        guard running else { return false }
        signalGroup(SIGTERM)
        MultiThreadedEventLoopGroup.singleton.next().scheduleTask(in: grace) { self.signalGroup(SIGKILL) }
        return true
    }

    /// Reaps the process if it has exited, without waiting; true when it was (the reaper then forgets it).
    fileprivate func reap() -> Bool {
        var raw: Int32 = 0
        let reaped = state.withLock { state -> (waiters: [CheckedContinuation<Int32, Never>], writer: EventLoopFuture<any Channel>?)? in
            guard state.status == nil else { return ([], nil) }  // reaped before
            let exit = Self.exitState(pid)
            guard exit != .running else { return nil }
            // The leader is a zombie until reaped, so its group id is still the hook's own (not when
            // something else reaped it: then the id may be anyone's).
            if state.terminating, exit == .exited { _ = kill(-pid, SIGKILL) }
            while true {
                let result = waitpid(pid, &raw, WNOHANG)
                if result == pid { break }
                if result < 0, errno == EINTR { continue }
                if result == 0 { return nil }
                raw = 127 << 8  // ECHILD: someone else reaped it; report a failure, never hang.
                break
            }
            state.status = raw
            defer {
                state.waiters = []
                state.stdinWriter = nil
            }
            return (state.waiters, state.stdinWriter)
        }
        guard let reaped else { return false }
        reaped.writer?.whenSuccess { $0.close(promise: nil) }
        for waiter in reaped.waiters { waiter.resume(returning: raw) }
        return true
    }

    private enum ExitState { case running, exited, gone }

    /// Whether the child has exited (it is then a zombie, not reaped: WNOWAIT), or is gone (ECHILD:
    /// reaped by someone else).
    private static func exitState(_ pid: pid_t, wait: Bool = false) -> ExitState {
        var info = siginfo_t()
        while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT | (wait ? 0 : WNOHANG)) != 0 {
            if errno != EINTR { return .gone }
        }
        return info._sifields._sigchld.si_pid == pid ? .exited : .running
    }

    /// The reaper's fallback where pidfds do not exist: one thread blocked until this process exits
    /// (holding no lock meanwhile), then reaping it; `exited` runs once it is reaped.
    func reapOnItsOwnThread(exited: @escaping @Sendable () -> Void = {}) {
        let thread = Thread {
            nameCurrentThread("ipnd-hook-wait")
            while !(Self.exitState(self.pid, wait: true) != .running && self.reap()) {}
            exited()
        }
        thread.start()
    }

    /// Starts `argv` (argv[0] an absolute path) with `environment` as its whole environment, `input`
    /// as its stdin and `output` as its stdout and stderr.
    static func spawn(
        argv: [String], environment: [String], input: [UInt8], output: Int32,
        watch: (HookProcess) -> Void = { ProcessReaper.watching.watch($0, output: nil) }
    ) throws(SystemError) -> HookProcess {
        var fds: [Int32] = [0, 0]
        guard systemPipe2(&fds, O_CLOEXEC) == 0 else { throw SystemError(errno) }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        defer { close(readEnd) }  // the child has its own copy
        // The body goes into the pipe before the hook exists, so a hook that exits without reading it
        // is no error and needs no writer; a body larger than the pipe is the rare exception.
        if input.count > 65536 { _ = systemFcntl(writeEnd, 1031 /* F_SETPIPE_SZ */, min(input.count, 1 << 20)) }
        _ = systemSetNonblocking(writeEnd)
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

        var pid = pid_t()
        let spawned = withCStrings(argv) { argvPointers in
            withCStrings(environment) { environmentPointers in
                payop_spawn_hook(&pid, argv[0], argvPointers, environmentPointers, readEnd, output)
            }
        }
        guard spawned == 0 else {
            close(writeEnd)
            throw SystemError(spawned)
        }
        let process = HookProcess(pid: pid)
        if written < input.count {
            let writer = writeRest(Array(input[written...]), to: writeEnd)
            process.state.withLock { $0.stdinWriter = writer }
        } else {
            close(writeEnd)
        }
        watch(process)
        return process
    }

    /// The part of a large body the pipe could not hold, written from an event loop as the hook reads.
    private static func writeRest(_ rest: [UInt8], to descriptor: Int32) -> EventLoopFuture<any Channel> {
        let owned = OwnershipFlag()
        let writer = NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                owned.set()
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .takingOwnershipOfDescriptor(output: descriptor)
        writer.whenComplete { result in
            switch result {
            case .success(let channel):
                // A hook that stops reading ends the write (EPIPE); that is not the run's failure.
                channel.writeAndFlush(ByteBuffer(bytes: rest)).whenComplete { _ in channel.close(promise: nil) }
            case .failure:
                owned.closeUnlessOwned(descriptor)
            }
        }
        return writer
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
}

/// One thread that learns of every hook's exit and reads its output: it polls a pidfd per running
/// hook (readable once the process has exited) and the read end of each run's output pipe, reaps a
/// process once it has exited, and ends its output at EOF, or a second after the exit when something
/// the hook left behind still holds the pipe. It sleeps in `poll` while hooks run or none does. One
/// owner for a run's process and output means no event-loop channel, registration and close per run.
///
/// It is also the runs' task executor (`Dispatcher` starts each run's task on it): the task waiting
/// for a hook's exit runs on this thread as soon as the exit is learnt, and starts the next run of its
/// slot from here, so a delivery wakes no thread of the Swift pool. Tasks run between two polls; what
/// they do is short (build the event's body, start a process, hand the outcome to the writer).
final class ProcessReaper: TaskExecutor, @unchecked Sendable {
    /// Two reaper threads: a hook's start blocks the thread starting it until the child has exec'd
    /// (`CLONE_VFORK`), and meanwhile the other goes on with its own runs, exits and outputs.
    static let all = [ProcessReaper(name: "ipnd-hook-reap0"), ProcessReaper(name: "ipnd-hook-reap1")]
    static var shared: ProcessReaper { all[0] }
    /// Where the next run's task goes: to the reaper with fewer runs' tasks, counted until each ends
    /// (`runEnded`). The task stays there, and so do the runs it starts after it (`Dispatcher.run`),
    /// so a chain of runs never moves: new tasks even the load out.
    static func forNextRun(among reapers: [ProcessReaper] = all) -> ProcessReaper {
        let reaper = reapers.min { $0.runs.load(ordering: .relaxed) < $1.runs.load(ordering: .relaxed) }!
        reaper.runs.add(1, ordering: .relaxed)
        return reaper
    }
    /// A run's task given by `forNextRun` has ended (or `count` of them, or claims given this reaper that
    /// will not start on it).
    func runEnded(_ count: Int = 1) { runs.subtract(count, ordering: .relaxed) }
    /// Runs' tasks given to this reaper that have not ended.
    private let runs = Atomic<Int>(0)
    /// The reaper whose thread this is, if any: a hook a run's task starts is watched by the thread the
    /// task runs on, so that its exit wakes no other thread.
    static var current: ProcessReaper? {
        let me = pthread_self()
        return all.first { $0.thread.load(ordering: .relaxed) == me }
    }
    /// The reaper that watches a hook started now: the calling thread's, else the first.
    static var watching: ProcessReaper { current ?? shared }
    /// What a reaper thread does not block: SIGCHLD, and what a fault in the thread itself raises.
    static let unblocked = [SIGCHLD, SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE, SIGSYS, SIGABRT]
    /// The reaper thread's pthread id, once it runs.
    private let thread = Atomic<UInt>(0)
    /// How long a pipe is read after its hook exited, when something else still holds it open.
    static let lingerNanoseconds: UInt64 = 1_000_000_000

    /// What `lock` guards; the reaper thread alone polls and reads.
    private struct Watch {
        let process: HookProcess
        let output: OutputPipe?
    }
    private struct Reading {
        let output: OutputPipe
        /// Monotonic nanoseconds past which the pipe is ended, read or not: set when its hook exits.
        var deadline: UInt64?
    }
    /// A running hook's timeout: `expired` runs once, on this thread, if it has not exited by `deadline`.
    private struct Timeout {
        let deadline: UInt64
        let expired: @Sendable () -> Void
    }
    /// pidfd -> process (and its output).
    private var watched: [Int32: Watch] = [:]
    /// Output read end -> pipe still being read.
    private var reading: [Int32: Reading] = [:]
    /// Hooks with a timeout not yet reached, until they are reaped (by process: a pid may be reused).
    private var timeouts: [ObjectIdentifier: Timeout] = [:]
    /// Jobs of the runs' tasks, to run on the reaper thread before it polls again.
    private var jobs: [UnownedJob] = []
    /// The reaper thread is in `poll`, or about to be, with no job left: what it must look at now wakes it.
    private var polling = false
    private let lock = NSLock()
    /// A pipe whose byte wakes `poll` to look at a newly watched process, or a job.
    private let wakeRead: Int32
    private let wakeWrite: Int32

    private init(name: String) {
        var fds: [Int32] = [-1, -1]
        _ = systemPipe2(&fds, O_CLOEXEC | O_NONBLOCK)
        (wakeRead, wakeWrite) = (fds[0], fds[1])
        let thread = Thread { [self] in
            nameCurrentThread(name)
            self.thread.store(pthread_self(), ordering: .relaxed)
            // Hooks are started from this thread (their runs' tasks run here), so a hook's exit signals
            // it: SIGCHLD, left at its default (ignored), is then dropped by the kernel at once, when the
            // thread that started the child does not block it. Blocked (as the threads it inherits its
            // mask from do), it was queued for the one thread that does not block it, the main thread,
            // and woke it and libdispatch's manager (its signalfd) at every hook's exit, for nothing.
            // Every other signal blocked, whatever the mask of the thread that created this one: process
            // signals are the main thread's (libdispatch's sources). But not those a fault raises in this
            // thread: blocked, the kernel would kill the process without running a handler (Swift's
            // backtracer). Should anything install a SIGCHLD handler one day (a DispatchSource for it),
            // SIGCHLD would be delivered here, and `poll` retries after EINTR.
            var mask = sigset_t()
            sigfillset(&mask)
            for signal in Self.unblocked { sigdelset(&mask, signal) }
            pthread_sigmask(SIG_SETMASK, &mask, nil)
            run()
        }
        thread.start()
    }

    /// Watches `process` until it is reaped, and reads `output` meanwhile. Past `timeout` (if it has
    /// not exited by then), `expired` runs once, on the reaper thread: the hook's timer, without a timer
    /// of its own.
    /// `pidfds: false` takes the fallback for kernels without them (tests).
    func watch(
        _ process: HookProcess, output: OutputPipe?, timeout: Duration? = nil, pidfds: Bool = true,
        expired: @escaping @Sendable () -> Void = {}
    ) {
        let pidfd = pidfds ? systemPidfdOpen(process.pid, 0) : -1
        // Capped at a year (the config refuses longer timeouts).
        let deadline = timeout.map { Self.now() &+ WorkSignal.nanoseconds(min($0, .seconds(31_536_000))) }
        // What the reaper thread must see is in place before it is asked whether it polls: one that does
        // not takes its next snapshot after this, one that does is woken.
        let polling = lock.withLock {
            if let output { reading[output.readEnd] = Reading(output: output) }
            if pidfd >= 0 { watched[pidfd] = Watch(process: process, output: output) }
            if let deadline { timeouts[ObjectIdentifier(process)] = Timeout(deadline: deadline, expired: expired) }
            return wasPolling()
        }
        if pidfd < 0 {
            process.reapOnItsOwnThread { [self] in
                exited(output)
                let polling = lock.withLock {
                    _ = timeouts.removeValue(forKey: ObjectIdentifier(process))
                    return wasPolling()
                }
                if polling { wake() }
            }
        }
        if polling { wake() }
    }

    /// Runs `job` on the reaper thread, before it polls again.
    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let polling = lock.withLock {
            jobs.append(job)
            return wasPolling()
        }
        if polling { wake() }
    }

    /// Whether the reaper thread polls and must be woken to see what changed (once: the first caller
    /// wakes it). Under `lock`; a thread that is not polling looks at everything before it polls again.
    private func wasPolling() -> Bool {
        defer { polling = false }
        return polling
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
    }

    /// The hook of `output` has exited: what it wrote is in the pipe; read on until EOF, at most a
    /// second more. (A pipe that ended already may have its descriptor number reused by another run's:
    /// only this pipe's entry counts.)
    private func exited(_ output: OutputPipe?) {
        guard let output else { return }
        lock.withLock {
            guard reading[output.readEnd]?.output === output else { return }
            reading[output.readEnd]?.deadline = Self.now() + Self.lingerNanoseconds
        }
    }

    /// Monotonic nanoseconds, the clock `WorkSignal` keeps its deadlines on.
    private static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    private func run() {
        var drain = [UInt8](repeating: 0, count: 64)
        var buffer = [UInt8](repeating: 0, count: 16_384)
        while true {
            // The runs' tasks first: a task woken by the last poll (a hook exited) or by another thread
            // (its outcome committed) goes on now, and what it starts is watched by the poll below.
            for job in lock.withLock({ () -> [UnownedJob] in
                defer { jobs.removeAll(keepingCapacity: true) }
                return jobs
            }) {
                job.runSynchronously(on: asUnownedTaskExecutor())
            }
            let (processes, outputs, nearestTimeout, jobsWaiting) = lock.withLock {
                polling = jobs.isEmpty
                return (Array(watched), Array(reading), timeouts.values.map(\.deadline).min(), !jobs.isEmpty)
            }
            var fds = [pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            fds += processes.map { pollfd(fd: $0.key, events: Int16(POLLIN), revents: 0) }
            fds += outputs.map { pollfd(fd: $0.key, events: Int16(POLLIN), revents: 0) }
            // Until the nearest deadline (rounded up to a millisecond, at most a second), else until
            // something happens.
            var timeout: Int32 = -1
            if let nearest = (outputs.compactMap(\.value.deadline) + (nearestTimeout.map { [$0] } ?? [])).min() {
                let now = Self.now()
                timeout = nearest <= now ? 0 : Int32(min((nearest - now + 999_999) / 1_000_000, 1_000))
            }
            // Without a wake pipe a new run cannot interrupt `poll`: look every 10 ms instead.
            if wakeRead < 0, timeout < 0 || timeout > 10 { timeout = 10 }
            if jobsWaiting { timeout = 0 }
            let ready = poll(&fds, nfds_t(fds.count), timeout)
            lock.withLock { polling = false }
            if ready < 0 {
                if errno != EINTR { usleep(10_000) }  // never a hot loop, whatever poll says
                continue
            }
            if fds[0].revents != 0 {
                while read(wakeRead, &drain, drain.count) > 0 {}
            }
            // Output first: what a hook wrote before it exited is read before its exit is reported.
            var ended: [Int32] = []
            for (index, entry) in outputs.enumerated() where fds[1 + processes.count + index].revents != 0 {
                if entry.value.output.read(into: &buffer) { ended.append(entry.key) }
            }
            var unreaped = false
            for (index, entry) in processes.enumerated() where fds[index + 1].revents != 0 {
                if entry.value.process.reap() {
                    lock.withLock {
                        _ = watched.removeValue(forKey: entry.key)
                        _ = timeouts.removeValue(forKey: ObjectIdentifier(entry.value.process))
                    }
                    close(entry.key)
                    exited(entry.value.output)
                } else {
                    unreaped = true
                }
            }
            let now = Self.now()
            let expired = lock.withLock { () -> [@Sendable () -> Void] in
                let due = timeouts.filter { $0.value.deadline <= now }
                for key in due.keys { timeouts.removeValue(forKey: key) }
                return due.values.map(\.expired)
            }
            for action in expired { action() }
            for entry in outputs where !ended.contains(entry.key) {
                if let deadline = entry.value.deadline, deadline <= now {
                    _ = entry.value.output.read(into: &buffer, reads: 1)
                    ended.append(entry.key)
                }
            }
            if !ended.isEmpty {
                let finished = lock.withLock { ended.compactMap { reading.removeValue(forKey: $0)?.output } }
                for output in finished { output.end() }
            }
            // Readable but not reapable (a debugger holds the exited hook): look again shortly, not at once.
            if unreaped { usleep(10_000) }
        }
    }
}

/// Whether NIO took a descriptor handed to a bootstrap: once its channel exists (the initializer ran),
/// NIO closes it on any later failure, and closing it again could close another file's new descriptor.
final class OwnershipFlag: Sendable {
    private let owned = Atomic<Bool>(false)
    func set() { owned.store(true, ordering: .releasing) }
    func closeUnlessOwned(_ descriptor: Int32) {
        if !owned.load(ordering: .acquiring) { close(descriptor) }
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

/// Sets O_NONBLOCK on `descriptor`; false (errno set) when it cannot.
func systemSetNonblocking(_ descriptor: Int32) -> Bool {
    let flags = systemFcntl(descriptor, F_GETFL, 0)
    return flags >= 0 && systemFcntl(descriptor, F_SETFL, Int(flags | O_NONBLOCK)) == 0
}

/// glibc 2.36's pidfd_open (Linux 5.3).
@_silgen_name("pidfd_open")
private func systemPidfdOpen(_ pid: pid_t, _ flags: UInt32) -> Int32
