import Foundation
import Subprocess
import SystemPackage

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
        let environment = invocation.environment(path: path).map { Array("\($0.key)=\($0.value)".utf8) + [0] }
        var options = PlatformOptions()
        // A group of its own (pgid = its pid), so a timeout reaches whatever the hook started.
        options.processGroupID = 0
        options.teardownSequence = [
            .gracefulShutDown(
                toProcessGroup: true, allowedDurationToNextStep: .milliseconds(Int64(invocation.killGraceSeconds * 1000)))
        ]
        let platformOptions = options
        let timeout = Duration.milliseconds(Int64(invocation.hook.timeoutSeconds * 1000))
        let input = invocation.body
        // Output goes to an unlinked temporary file, not a pipe: a hook that exits 0 while a child it
        // left behind still holds its stdout is done when it exits, not when that child closes the pipe
        // (waiting for EOF would time it out and run it again).
        let capture: OutputFile
        do {
            capture = try OutputFile()
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "cannot capture the hook's output: \(error)")
        }
        defer { capture.close() }
        do {
            let outcome = try await withThrowingTaskGroup(of: RunOutcome.self) { group in
                group.addTask {
                    let result = try await Subprocess.run(
                        .path(FilePath(program)), arguments: Arguments(Array(argv.dropFirst())),
                        environment: .custom(environment), workingDirectory: FilePath("/"), platformOptions: platformOptions,
                        input: .inputWriter, output: .fileDescriptor(capture.descriptor, closeAfterSpawningProcess: false),
                        // The same file, not `.combinedWithOutput`: that leaked a descriptor per run.
                        error: .fileDescriptor(capture.descriptor, closeAfterSpawningProcess: false)
                    ) { execution in
                        // A hook that never reads its stdin is not an error here.
                        _ = try? await execution.standardInputWriter.write(input)
                        try? await execution.standardInputWriter.finish()
                    }
                    return .finished(result.terminationStatus)
                }
                group.addTask {
                    try await Task.sleep(for: timeout)
                    return .timedOut
                }
                let first = try await group.next() ?? .timedOut
                group.cancelAll()
                if case .timedOut = first {
                    // Cancelling the run tears the process group down; wait for that to finish.
                    while (try? await group.next()) != nil {}
                }
                return first
            }
            let output = capture.text()
            switch outcome {
            case .finished(.exited(let code)):
                return HookResult(
                    outcome: code == 0 ? .delivered : .failed(retryAfterMilliseconds: nil), exitCode: Int(code),
                    error: code == 0 ? nil : "exited with status \(code)", output: output)
            case .finished(.signaled(let signal)):
                return HookResult(
                    outcome: .failed(retryAfterMilliseconds: nil), error: "killed by signal \(signal)", output: output)
            case .timedOut:
                return HookResult(
                    outcome: .failed(retryAfterMilliseconds: nil),
                    error: "timed out after \(invocation.hook.timeoutSeconds) s; process group terminated", output: output)
            }
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not run \(program): \(error)")
        }
    }

    private enum RunOutcome: Sendable {
        case finished(TerminationStatus)
        case timedOut
    }
}

/// An unlinked temporary file for one run's output: written by the hook (and whatever it leaves
/// behind), read once the hook has exited, at most `HookResult.maxOutputBytes` of it.
final class OutputFile: Sendable {
    let descriptor: FileDescriptor

    init() throws {
        var template = Array((FileManager.default.temporaryDirectory.path + "/payop-ipnd-hook-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        // Not inherited by other hooks started meanwhile: each run's output is its own.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        descriptor = FileDescriptor(rawValue: fd)
    }

    func text() -> String {
        var capture = BoundedCapture()
        var buffer = [UInt8](repeating: 0, count: HookResult.maxOutputBytes)
        let count = buffer.withUnsafeMutableBytes { pread(descriptor.rawValue, $0.baseAddress, $0.count, 0) }
        capture.append(buffer.prefix(max(0, count)))
        var info = stat()
        if fstat(descriptor.rawValue, &info) == 0, Int(info.st_size) > capture.bytes.count {
            capture.append(repeatElement(UInt8(0), count: Int(info.st_size) - capture.bytes.count))
        }
        return capture.text
    }

    func close() {
        try? descriptor.close()
    }
}
