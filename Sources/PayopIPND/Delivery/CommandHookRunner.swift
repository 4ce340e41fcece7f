import Foundation
import NIOConcurrencyHelpers
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
        // Output goes to a pipe read on an event loop as it comes (bounded, the rest counted and dropped),
        // and the run ends when the hook exits, not when the pipe does: a child it left behind holding
        // its stdout neither keeps it running (waiting for EOF would time it out and run it again) nor
        // fills a disk.
        let capture: OutputPipe
        do {
            capture = try OutputPipe.open()
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "cannot capture the hook's output: \(error)")
        }
        let process: HookProcess
        do {
            process = try await Self.spawn(argv: argv, environment: environment, input: invocation.body, output: capture)
        } catch {
            _ = await capture.finish()
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not run \(program): \(error)")
        }
        // Past the timeout, or when the daemon stops, the whole process group is terminated: SIGTERM,
        // then SIGKILL after the grace.
        let grace = TimeAmount.milliseconds(Int64(invocation.killGraceSeconds * 1000))
        let timedOut = Atomic<Bool>(false)
        let timer = MultiThreadedEventLoopGroup.singleton.next().scheduleTask(
            in: .milliseconds(Int64(invocation.hook.timeoutSeconds * 1000))
        ) {
            timedOut.store(true, ordering: .relaxed)
            process.terminate(grace: grace)
        }
        let status = await withTaskCancellationHandler {
            await process.exitStatus
        } onCancel: {
            process.terminate(grace: grace)
        }
        timer.cancel()
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
    private static func spawn(argv: [String], environment: [String], input: [UInt8], output: OutputPipe)
        async throws(SystemError) -> HookProcess
    {
        var attempt = 1
        while true {
            do {
                return try HookProcess.spawn(argv: argv, environment: environment, input: input, output: output.writeEnd)
            } catch where error.code == ETXTBSY && attempt < 5 {
                attempt += 1
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
    }
}

/// One run's output: a pipe whose write end the hook gets and whose read end an event loop drains into
/// a `BoundedCapture` as data comes. The pipe exists at once; its read end joins the event loop while
/// the hook starts (what the hook writes meanwhile waits in the pipe), not before it.
final class OutputPipe: Sendable {
    /// The descriptor the hook writes to; closed by `finish`.
    let writeEnd: Int32
    /// Ours until the event loop has taken it (`owned`).
    private let readEnd: Int32
    private let owned: OwnershipFlag
    private let channel: EventLoopFuture<any Channel>
    private let captured: NIOLockedValueBox<BoundedCapture>
    private let ended: EventLoopPromise<Void>

    private init(writeEnd: Int32, readEnd: Int32, owned: OwnershipFlag, channel: EventLoopFuture<any Channel>,
                 captured: NIOLockedValueBox<BoundedCapture>, ended: EventLoopPromise<Void>) {
        self.writeEnd = writeEnd
        self.readEnd = readEnd
        self.owned = owned
        self.channel = channel
        self.captured = captured
        self.ended = ended
    }

    static func open() throws(SystemError) -> OutputPipe {
        var fds: [Int32] = [0, 0]
        // Close-on-exec from the start (pipe2, atomically): a process another thread starts meanwhile
        // must not inherit the write end, or the pipe would not end when the hook does.
        guard systemPipe2(&fds, O_CLOEXEC) == 0 else { throw SystemError(errno) }
        let group = MultiThreadedEventLoopGroup.singleton
        let captured = NIOLockedValueBox(BoundedCapture())
        let ended = group.next().makePromise(of: Void.self)
        let owned = OwnershipFlag()
        let channel = NIOPipeBootstrap(group: group)
            .channelInitializer { channel in
                owned.set()
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(CaptureHandler(captured: captured, ended: ended))
                }
            }
            .takingOwnershipOfDescriptor(input: fds[0])
        return OutputPipe(
            writeEnd: fds[1], readEnd: fds[0], owned: owned, channel: channel, captured: captured, ended: ended)
    }

    /// Once the hook has exited: what it wrote, read until the pipe ends or, when something it left
    /// behind still holds it, for a second longer; then the read end is closed.
    func finish() async -> String {
        close(writeEnd)
        guard let channel = try? await channel.get() else {
            // Never registered: the read end is still ours unless NIO took it, and there is nothing to wait for.
            owned.closeUnlessOwned(readEnd)
            ended.fail(ChannelError.ioOnClosedChannel)
            return captured.withLockedValue { $0.text }
        }
        let loop = channel.eventLoop
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
