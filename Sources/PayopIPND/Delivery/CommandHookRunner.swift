import Foundation
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Runs `command` hooks: exec'd directly (never through a shell) in a process group of their own,
/// working directory `/`, stdin the event object, environment only `PATH` and `PAYOP_*`. Past its
/// timeout the whole group gets SIGTERM, then SIGKILL after the grace period, so children die too.
public struct CommandHookRunner: HookRunner {
    /// The `PATH` hooks get: the daemon's own, or the usual system one.
    public var path: String

    public init(path: String = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin") {
        self.path = path
        // A hook that exits without reading its stdin must not kill the daemon with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
    }

    public func run(_ invocation: HookInvocation) async -> HookResult {
        guard case .command(let argv) = invocation.hook.target, let program = argv.first else {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "not a command hook")
        }
        let environment = invocation.environment(path: path).map { "\($0.key)=\($0.value)" }
        // Output goes to a pipe the reaper reads as it comes (bounded, the rest counted and dropped),
        // and the run ends when the hook exits, not when the pipe does: a child it left behind holding
        // its stdout neither keeps it running (waiting for EOF would time it out and run it again) nor
        // fills a disk.
        let capture: OutputPipe
        do {
            capture = try OutputPipe.open()
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "cannot capture the hook's output: \(error)")
        }
        // Past the timeout (the reaper keeps it), or when the daemon stops, the whole process group is
        // terminated: SIGTERM, then SIGKILL after the grace.
        let grace = TimeAmount.milliseconds(Int64(invocation.killGraceSeconds * 1000))
        let timedOut = Atomic<Bool>(false)
        let process: HookProcess
        do {
            process = try await Self.spawn(
                argv: argv, environment: environment, input: invocation.body, output: capture,
                timeout: .milliseconds(Int64(invocation.hook.timeoutSeconds * 1000))
            ) { process in
                // Not when the hook was reaped just before (it ended on its own, as its timeout came).
                if process.terminate(grace: grace) { timedOut.store(true, ordering: .relaxed) }
            }
        } catch {
            capture.abandon()
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not run \(program): \(error)")
        }
        capture.closeWriteEnd()
        let status = await withTaskCancellationHandler {
            await process.exitStatus
        } onCancel: {
            process.terminate(grace: grace)
        }
        let output = await capture.finish()
        if timedOut.load(ordering: .relaxed) {
            return HookResult(
                outcome: .failed(retryAfterMilliseconds: nil),
                error: "timed out after \(invocation.hook.timeoutSeconds) s; process group terminated", output: output)
        }
        switch HookProcess.Termination(status: status) {
        case .exited(let code):
            return HookResult(
                outcome: code == 0 ? .delivered : .failed(retryAfterMilliseconds: nil), exitCode: Int(code),
                error: code == 0 ? nil : "exited with status \(code)", output: output)
        case .signaled(let signal):
            return HookResult(
                outcome: .failed(retryAfterMilliseconds: nil), error: "killed by signal \(signal)", output: output)
        }
    }

    /// Starts the hook, trying again on ETXTBSY: a script just written is still open for writing in a
    /// process another thread is starting (it holds the descriptor until its own exec), gone in moments.
    private static func spawn(
        argv: [String], environment: [String], input: [UInt8], output: OutputPipe, timeout: Duration,
        expired: @escaping @Sendable (HookProcess) -> Void
    ) async throws(SystemError) -> HookProcess {
        var attempt = 1
        while true {
            do {
                return try HookProcess.spawn(
                    argv: argv, environment: environment, input: input, output: output.writeEnd,
                    watch: { process in
                        ProcessReaper.watching.watch(process, output: output, timeout: timeout) { expired(process) }
                    })
            } catch where error.code == ETXTBSY && attempt < 5 {
                attempt += 1
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
    }
}

/// One run's output: a pipe whose write end the hook gets and whose read end the reaper thread reads
/// as data comes (`ProcessReaper`), into a `BoundedCapture`, alongside the hook's exit: no event-loop
/// channel per run. The pipe ends at EOF, or one second after the hook exited when something it left
/// behind still holds it open.
final class OutputPipe: Sendable {
    /// The descriptor the hook writes to; our copy is closed once the hook has its own.
    let writeEnd: Int32
    /// Nonblocking; read and closed only by the reaper thread, once it watches the run.
    let readEnd: Int32
    private struct State {
        var capture = BoundedCapture()
        var writeEndOpen = true
        var ended = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    private init(writeEnd: Int32, readEnd: Int32) {
        self.writeEnd = writeEnd
        self.readEnd = readEnd
    }

    static func open() throws(SystemError) -> OutputPipe {
        var fds: [Int32] = [0, 0]
        // Close-on-exec from the start (pipe2, atomically): a process another thread starts meanwhile
        // must not inherit the write end, or the pipe would not end when the hook does.
        guard systemPipe2(&fds, O_CLOEXEC) == 0 else { throw SystemError(errno) }
        guard systemSetNonblocking(fds[0]) else {
            let error = SystemError(errno)
            close(fds[0])
            close(fds[1])
            throw error
        }
        return OutputPipe(writeEnd: fds[1], readEnd: fds[0])
    }

    /// Closes our copy of the write end: once the hook has its own (or never will), the pipe ends
    /// when the hook and whatever it left behind have closed theirs.
    func closeWriteEnd() {
        state.withLock { state in
            guard state.writeEndOpen else { return }
            state.writeEndOpen = false
            close(writeEnd)
        }
    }

    /// Reads what the pipe holds now into the capture (the reaper thread); true once it has ended.
    /// At most `reads` reads a call: a writer that never stops (something the hook left behind) gets
    /// its share of the reaper, not all of it; `poll` reports the pipe again.
    func read(into buffer: inout [UInt8], reads: Int = 4) -> Bool {
        var left = reads
        while left > 0 {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(readEnd, $0.baseAddress, $0.count) }
            if count > 0 {
                state.withLock { $0.capture.append(buffer.prefix(count)) }
                left -= 1
            } else if count < 0, errno == EINTR {
                continue
            } else {
                return !(count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            }
        }
        return false
    }

    /// Stops reading (the reaper thread, once): closes the read end and hands what was read to `finish`.
    func end() {
        close(readEnd)
        let waiter = state.withLock { state in
            state.ended = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }

    /// A run that never started: nothing will read the pipe; both ends are closed here.
    func abandon() {
        closeWriteEnd()
        end()
    }

    /// What the hook wrote, once the pipe has ended.
    func finish() async -> String {
        closeWriteEnd()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ended = state.withLock { state in
                if !state.ended { state.waiter = continuation }
                return state.ended
            }
            if ended { continuation.resume() }
        }
        return state.withLock { $0.capture.text }
    }
}
