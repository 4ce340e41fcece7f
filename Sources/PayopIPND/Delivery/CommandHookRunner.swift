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
        do {
            let outcome = try await withThrowingTaskGroup(of: RunOutcome.self) { group in
                group.addTask {
                    let result = try await Subprocess.run(
                        .path(FilePath(program)), arguments: Arguments(Array(argv.dropFirst())),
                        environment: .custom(environment), workingDirectory: FilePath("/"), platformOptions: platformOptions,
                        input: .inputWriter, output: .sequence, error: .combinedWithOutput
                    ) { execution in
                        // Written while the output is read, so a large event cannot deadlock on a full
                        // pipe; a hook that never reads its stdin is not an error here.
                        async let written: Void = {
                            _ = try? await execution.standardInputWriter.write(input)
                            try? await execution.standardInputWriter.finish()
                        }()
                        var capture = BoundedCapture()
                        for try await chunk in execution.standardOutput {
                            chunk.withUnsafeBytes { capture.append($0) }
                        }
                        await written
                        return capture.text
                    }
                    return .finished(result.terminationStatus, result.closureResult)
                }
                group.addTask {
                    try await Task.sleep(for: timeout)
                    return .timedOut
                }
                let first = try await group.next() ?? .timedOut
                group.cancelAll()
                if case .timedOut = first {
                    // Cancelling the run tears the process group down; wait for that to finish.
                    while let next = try? await group.next() {
                        if case .finished(_, let output) = next { return RunOutcome.timedOutWith(output) }
                    }
                }
                return first
            }
            switch outcome {
            case .finished(.exited(let code), let output):
                return HookResult(
                    outcome: code == 0 ? .delivered : .failed(retryAfterMilliseconds: nil), exitCode: Int(code),
                    error: code == 0 ? nil : "exited with status \(code)", output: output)
            case .finished(.signaled(let signal), let output):
                return HookResult(
                    outcome: .failed(retryAfterMilliseconds: nil), error: "killed by signal \(signal)", output: output)
            case .timedOut, .timedOutWith:
                var output = ""
                if case .timedOutWith(let captured) = outcome { output = captured }
                return HookResult(
                    outcome: .failed(retryAfterMilliseconds: nil),
                    error: "timed out after \(invocation.hook.timeoutSeconds) s; process group terminated", output: output)
            }
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not run \(program): \(error)")
        }
    }

    private enum RunOutcome: Sendable {
        case finished(TerminationStatus, String)
        case timedOut
        case timedOutWith(String)
    }
}
