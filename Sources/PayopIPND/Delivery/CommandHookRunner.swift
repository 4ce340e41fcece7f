import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
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
        // Output goes to a pipe read on an event loop as it comes (bounded, the rest counted and dropped),
        // and the run ends when the hook exits, not when the pipe does: a child it left behind holding
        // its stdout neither keeps it running (waiting for EOF would time it out and run it again) nor
        // fills a disk.
        let capture: OutputPipe
        do {
            capture = try await OutputPipe.open()
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "cannot capture the hook's output: \(error)")
        }
        do {
            let outcome = try await withThrowingTaskGroup(of: RunOutcome.self) { group in
                group.addTask {
                    let result = try await Subprocess.run(
                        .path(FilePath(program)), arguments: Arguments(Array(argv.dropFirst())),
                        environment: .custom(environment), workingDirectory: FilePath("/"), platformOptions: platformOptions,
                        input: .inputWriter, output: .fileDescriptor(capture.writeEnd, closeAfterSpawningProcess: false),
                        // The same pipe, not `.combinedWithOutput`: that leaked a descriptor per run.
                        error: .fileDescriptor(capture.writeEnd, closeAfterSpawningProcess: false)
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
            let output = await capture.finish()
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
            _ = await capture.finish()
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not run \(program): \(error)")
        }
    }

    private enum RunOutcome: Sendable {
        case finished(TerminationStatus)
        case timedOut
    }
}

/// One run's output: a pipe whose write end the hook gets and whose read end an event loop drains into
/// a `BoundedCapture` as data comes.
final class OutputPipe: Sendable {
    let writeEnd: SystemPackage.FileDescriptor
    private let channel: any Channel
    private let captured: NIOLockedValueBox<BoundedCapture>
    private let ended: EventLoopPromise<Void>

    private init(writeEnd: SystemPackage.FileDescriptor, channel: any Channel, captured: NIOLockedValueBox<BoundedCapture>,
                 ended: EventLoopPromise<Void>) {
        self.writeEnd = writeEnd
        self.channel = channel
        self.captured = captured
        self.ended = ended
    }

    static func open() async throws -> OutputPipe {
        var fds: [Int32] = [0, 0]
        // Close-on-exec from the start (pipe2, atomically): a process another thread starts meanwhile
        // must not inherit the write end, or the pipe would not end when the hook does.
        guard systemPipe2(&fds, O_CLOEXEC) == 0 else { throw Errno(rawValue: errno) }
        let group = MultiThreadedEventLoopGroup.singleton
        let captured = NIOLockedValueBox(BoundedCapture())
        let ended = group.next().makePromise(of: Void.self)
        do {
            let channel = try await NIOPipeBootstrap(group: group)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(CaptureHandler(captured: captured, ended: ended))
                    }
                }
                .takingOwnershipOfDescriptor(input: fds[0]).get()
            return OutputPipe(
                writeEnd: SystemPackage.FileDescriptor(rawValue: fds[1]), channel: channel, captured: captured, ended: ended)
        } catch {
            close(fds[0])
            close(fds[1])
            throw error
        }
    }

    /// Once the hook has exited: what it wrote, read until the pipe ends or, when something it left
    /// behind still holds it, for a second longer; then the read end is closed.
    func finish() async -> String {
        try? writeEnd.close()
        let loop = channel.eventLoop
        let channel = channel
        let late = loop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
        try? await ended.futureResult.get()
        late.cancel()
        try? await channel.close().get()
        return captured.withLockedValue { $0.text }
    }

    private final class CaptureHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let captured: NIOLockedValueBox<BoundedCapture>
        let ended: EventLoopPromise<Void>

        init(captured: NIOLockedValueBox<BoundedCapture>, ended: EventLoopPromise<Void>) {
            self.captured = captured
            self.ended = ended
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            captured.withLockedValue { $0.append(buffer.readableBytesView) }
        }

        func channelInactive(context: ChannelHandlerContext) {
            ended.succeed(())
            context.fireChannelInactive()
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is ChannelEvent, case .inputClosed = event as! ChannelEvent {
                context.close(promise: nil)
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}

/// glibc's pipe2, which the Glibc module does not export.
@_silgen_name("pipe2")
private func systemPipe2(_ fds: UnsafeMutablePointer<Int32>, _ flags: Int32) -> Int32
