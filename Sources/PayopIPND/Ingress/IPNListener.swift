import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// The IPN port: SwiftNIO's HTTP/1 pipeline and one channel handler, no router and no Swift task per
/// request. The request is decided on its event loop (`IPNIngress`), the receipt goes to the event
/// log's writer thread, and the writer's completion writes the 200 back through the event loop: the
/// request path, not the disk, was the ingest ceiling. The admin port and the simulator keep
/// Hummingbird's router.
public enum IPNListener {
    public static func makeServer(
        host: String, port: Int, ingress: IPNIngress, readTimeoutSeconds: Double, logger: Logger,
        limits: ConnectionGate.Limits = .init(), onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> IPNServer {
        IPNServer(
            host: host, port: port, ingress: ingress, readTimeout: .milliseconds(Int64(readTimeoutSeconds * 1000)),
            gate: ConnectionGate(limits: limits) { ingress.sources }, logger: logger, onRunning: onRunning)
    }
}

/// The listener as a service: bound at start; on shutdown it stops accepting, lets the requests in
/// progress be answered, then closes every connection.
public struct IPNServer: Service {
    let host: String
    let port: Int
    let ingress: IPNIngress
    let readTimeout: TimeAmount
    let gate: ConnectionGate
    let logger: Logger
    let onRunning: @Sendable (Int) async -> Void

    public func run() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let quiesce = ServerQuiescingHelper(group: group)
        let (ingress, gate, readTimeout) = (ingress, gate, readTimeout)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 4096)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiesce.makeServerChannelHandler(channel: channel))
                }
            }
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let peer = channel.remoteAddress?.ipAddress.flatMap(IPAddress.init)
                    let ticket = gate.admit(peer)
                    channel.closeFuture.whenComplete { _ in gate.release(ticket) }
                    guard ticket.decision == .admit else {
                        try channel.pipeline.syncOperations.addHandler(RefusingHandler(answer: ticket.decision == .forbid))
                        return
                    }
                    // No pipelining assistance: it stops reading the socket after every request until
                    // the answer is written (two `epoll_ctl` calls per IPN); the handler queues what a
                    // pipelining client sends instead, and answers malformed HTTP itself, in order. No
                    // header validation: every header the handler writes is a constant or a number.
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                        withPipeliningAssistance: false, withErrorHandling: false, withOutboundHeaderValidation: false,
                        withEncoderConfiguration: .init())
                    try channel.pipeline.syncOperations.addHandler(
                        IPNRequestHandler(ingress: ingress, peer: peer, readTimeout: readTimeout))
                }
            }
        let server = try await bootstrap.bind(host: host, port: port).get()
        logger.info("IPN listener bound", metadata: ["address": "\(server.localAddress.map { "\($0)" } ?? "?")"])
        await onRunning(server.localAddress?.port ?? port)
        let stopped = group.next().makePromise(of: Void.self)
        let finished = NIOLockedValueBox(false)
        let finish: @Sendable () -> Void = {
            if finished.withLockedValue({ done in defer { done = true }; return !done }) { stopped.succeed(()) }
        }
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                try? await stopped.futureResult.get()
            } onGracefulShutdown: {
                let quiesced = group.next().makePromise(of: Void.self)
                quiesced.futureResult.whenComplete { _ in finish() }
                quiesce.initiateShutdown(promise: quiesced)
            }
        } onCancel: {
            // Cancelled (a stop past its grace): stop accepting and return without waiting. A
            // connection still waiting for the log keeps its socket until the process exits.
            quiesce.initiateShutdown(promise: nil)
            finish()
        }
    }
}

/// One connection's requests, one at a time, in order. Headers must arrive within the read timeout of
/// the connection's start or of the previous answer, and a started body within the read timeout of its
/// head: a trickling client is answered 408 or simply closed.
///
/// A client may send its next request before this one is answered (HTTP pipelining): what arrives while
/// a receipt is with the event log is queued, and the socket is not read further until the queue has
/// been handled, so it holds what one readable event brought (NIO reads up to four times per event),
/// and at most `maxPipelined` parts: a client that sends more is answered, then disconnected. Nothing is
/// held back from a client that waits for its answers, as Payop does.
///
/// Nor is the socket read while answers wait to be written (the channel is not writable: a client
/// that sends without reading), nor, once the connection is to close after the answer owed, while that
/// answer waits for the log: what such a client sends costs no memory. A request that ends HTTP on its
/// connection (an `Upgrade` header, `CONNECT`; the decoder parses nothing after it) is answered with
/// `Connection: close`. A closing answer shuts the connection's output first, then drops what still
/// arrives until the client closes or 200 ms pass (`closeAfterAnswer`), so that input still arriving
/// does not reset the connection under it.
final class IPNRequestHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        /// Waiting for a request head.
        case idle
        /// An answer decided before the body: the body is read and dropped, the answer sent at its end.
        case discarding(IngressAnswer)
        case reading(IPNIngress.Admitted, [UInt8])
        /// The body is with the event log; its answer comes back through the event loop.
        case waiting
        /// Answered with `Connection: close`; nothing more is read.
        case closing
    }

    /// What a pipelining client sent while a receipt was with the event log.
    private enum Pipelined {
        case part(HTTPServerRequestPart)
        /// The decoder found malformed HTTP: answered 400 in its turn.
        case malformed
    }

    private let ingress: IPNIngress
    private let peer: IPAddress?
    private let readTimeout: TimeAmount
    private var state = State.idle
    private var pipelined = CircularBuffer<Pipelined>()
    /// A read the channel asked for while reading was not due (`readIfDue`): issued once it is.
    private var readHeld = false
    /// The server is stopping: the request in progress is answered with `Connection: close`.
    private var quiescing = false
    private var keepAlive = true
    private var version = HTTPVersion.http1_1
    private var isHead = false
    /// When the current wait (for a head, for the rest of a body) ends, and what then happens.
    private var deadline: (at: NIODeadline, expire: (ChannelHandlerContext) -> Void)?
    /// The one timer that serves every wait, and when it fires. Waits only move later, so a timer that
    /// fires before the current deadline is set again for the rest: arming and cancelling one per
    /// request (two each) showed in ingest's profile.
    private var timer: (task: Scheduled<Void>, at: NIODeadline)?

    static let malformed = IngressAnswer(400, "malformed HTTP request", close: true)
    /// Request parts queued behind a receipt before the client is cut off (a head, a body and an end
    /// make one request).
    static let maxPipelined = 96

    init(ingress: IPNIngress, peer: IPAddress?, readTimeout: TimeAmount) {
        self.ingress = ingress
        self.peer = peer
        self.readTimeout = readTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        armDeadline(context) { context in context.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        stopTimer()
    }

    func channelInactive(context: ChannelHandlerContext) {
        stopTimer()
        context.fireChannelInactive()
    }

    func read(context: ChannelHandlerContext) {
        readHeld = true
        readIfDue(context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        readIfDue(context)
        context.fireChannelWritabilityChanged()
    }

    /// Issues the read the channel asked for, unless what was read is not handled yet (a queue behind a
    /// receipt), answers are not being written out (a client not reading them), or nothing more will be
    /// served on this connection.
    private func readIfDue(_ context: ChannelHandlerContext) {
        guard readHeld, pipelined.isEmpty, context.channel.isWritable else { return }
        switch state {
        case .closing: return
        case .waiting where !keepAlive: return
        case .idle, .discarding, .reading, .waiting: break
        }
        readHeld = false
        context.read()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        quiescing = true
        if case .idle = state {
            state = .closing
            disarmDeadline()
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        // The decoder reads nothing after this: the connection ends with a 400, after any answer owed first.
        switch state {
        case .waiting:
            queue(.malformed)
        case .closing:
            break
        case .idle, .discarding, .reading:
            respondMalformed(context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch state {
        case .waiting:
            queue(.part(part))
        case .closing:
            break
        case .idle, .discarding, .reading:
            handle(part, context)
        }
    }

    private func handle(_ part: HTTPServerRequestPart, _ context: ChannelHandlerContext) {
        switch (part, state) {
        case (.head(let head), .idle):
            disarmDeadline()
            // After an upgrade or CONNECT the decoder parses nothing more: answered, then closed.
            keepAlive = head.isKeepAlive && head.method != .CONNECT && !head.headers.contains(name: "Upgrade")
            version = head.version
            isHead = head.method == .HEAD
            let path = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first
            let preflight = ingress.preflight(
                method: head.method.rawValue, path: path.map(String.init) ?? head.uri, peer: peer,
                forwardedFor: head.headers["X-Forwarded-For"],
                contentLength: head.headers.first(name: "Content-Length").flatMap { Int($0) })
            switch preflight {
            case .answer(let answer) where answer.close:
                respond(context, answer)
            case .answer(let answer):
                state = .discarding(answer)
                // A body we do not want must still end within the read timeout, or the connection goes.
                armDeadline(context) { context in context.close(promise: nil) }
            case .readBody(let admitted):
                var body: [UInt8] = []
                body.reserveCapacity(min(admitted.maxBodyBytes, head.headers.first(name: "Content-Length").flatMap { Int($0) } ?? 1024))
                state = .reading(admitted, body)
                if head.headers.first(name: "Expect")?.lowercased() == "100-continue" {
                    // Clients that ask (curl does above 1 KiB) would otherwise wait a second for it.
                    context.writeAndFlush(
                        wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
                }
                // The whole body must arrive within the read timeout: a trickling client is answered 408.
                armDeadline(context) { [ingress] context in
                    self.respond(context, ingress.answerWithoutBody(IngressAnswer(408, "request body not received in time", close: true)))
                }
            }
        case (.body(let part), .reading(let admitted, var body)):
            state = .waiting  // the buffer is moved out of `state` while it grows (no copy)
            guard body.count + part.readableBytes <= admitted.maxBodyBytes else {
                respond(context, ingress.answerWithoutBody(.tooLarge(admitted.maxBodyBytes)))
                return
            }
            body.append(contentsOf: part.readableBytesView)
            state = .reading(admitted, body)
        case (.end, .reading(let admitted, let body)):
            disarmDeadline()
            state = .waiting
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            ingress.accept(body: body, from: admitted) { answer in
                loop.execute {
                    let (handler, context) = bound.value
                    handler.respond(context, answer)
                    handler.handlePipelined(context)
                }
            }
        case (.end, .discarding(let answer)):
            respond(context, answer)
        case (.body, .discarding), (_, .closing), (_, .waiting):
            break
        default:
            // A part out of order: the decoder's own errors come through `errorCaught`.
            context.close(promise: nil)
        }
    }

    /// Behind a receipt with the event log. Past `maxPipelined` parts the client is not served further:
    /// what it queued is dropped (none of it was answered, so none of it was accepted) and the answer
    /// owed closes the connection.
    private func queue(_ next: Pipelined) {
        guard keepAlive else { return }
        guard pipelined.count < Self.maxPipelined else {
            pipelined.removeAll()
            keepAlive = false
            return
        }
        pipelined.append(next)
    }

    /// Once a receipt's answer is written: what the client pipelined behind it, in order, until a
    /// request waits for the event log again; then the read held meanwhile.
    private func handlePipelined(_ context: ChannelHandlerContext) {
        while let next = pipelined.first {
            guard context.channel.isActive else {
                // Gone while answering: nothing queued is answered, so nothing of it is accepted.
                pipelined.removeAll()
                readHeld = false
                return
            }
            switch state {
            case .waiting:
                return
            case .closing:
                pipelined.removeAll()
                readHeld = false
                return
            case .idle, .discarding, .reading:
                pipelined.removeFirst()
                switch next {
                case .part(let part): handle(part, context)
                case .malformed: respondMalformed(context)
                }
            }
        }
        readIfDue(context)
    }


    /// The 400 that ends a connection whose bytes are not HTTP: in HTTP/1.1, whatever the request before.
    private func respondMalformed(_ context: ChannelHandlerContext) {
        version = .http1_1
        isHead = false
        respond(context, ingress.answerWithoutBody(Self.malformed))
    }

    private func respond(_ context: ChannelHandlerContext, _ answer: IngressAnswer) {
        guard context.channel.isActive else {
            state = .closing
            return
        }
        let close = answer.close || !keepAlive || quiescing
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        headers.add(name: "Content-Length", value: String(answer.body.utf8.count))
        if let allow = answer.allow { headers.add(name: "Allow", value: allow) }
        if close {
            headers.add(name: "Connection", value: "close")
        } else if version == .http1_0 {
            headers.add(name: "Connection", value: "keep-alive")
        }
        let head = HTTPResponseHead(
            version: version, status: HTTPResponseStatus(statusCode: answer.status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if !isHead {
            context.write(
                wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: answer.body)))), promise: nil)
        }
        if close {
            state = .closing
            // A client that stops reading cannot hold the connection (and shutdown) past the read timeout.
            armDeadline(context) { context in context.close(promise: nil) }
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.closeAfterAnswer() }
        } else {
            state = .idle
            armDeadline(context) { context in context.close(promise: nil) }
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    private func armDeadline(_ context: ChannelHandlerContext, _ expire: @escaping (ChannelHandlerContext) -> Void) {
        let at = NIODeadline.now() + readTimeout
        deadline = (at, expire)
        if let timer, timer.at <= at { return }
        startTimer(context, at: at)
    }

    private func startTimer(_ context: ChannelHandlerContext, at: NIODeadline) {
        timer?.task.cancel()
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let task = context.eventLoop.scheduleTask(deadline: at) {
            let (handler, context) = bound.value
            handler.timerFired(context)
        }
        timer = (task, at)
    }

    private func timerFired(_ context: ChannelHandlerContext) {
        timer = nil
        guard let deadline else { return }
        if deadline.at > .now() {
            startTimer(context, at: deadline.at)
            return
        }
        self.deadline = nil
        deadline.expire(context)
    }

    /// The connection is gone: no wait is left, and nothing keeps this handler alive.
    private func stopTimer() {
        deadline = nil
        timer?.task.cancel()
        timer = nil
    }

    private func disarmDeadline() {
        deadline = nil
    }
}

extension Channel {
    /// Ends a connection whose answer has been written, the way RFC 9112 (9.6) asks: its output is shut
    /// first (the client reads the answer, then an orderly end), what the client still sends is read
    /// and dropped before any parser sees it, and the socket is closed when the client closes its side,
    /// or 200 ms later (a graceful shutdown waits for it). Closing a socket with unread input at once
    /// makes the kernel reset the connection, and a reset can take with it an answer that has not
    /// reached the client yet. On the channel's event loop.
    func closeAfterAnswer() {
        close(mode: .output, promise: nil)
        try? pipeline.syncOperations.addHandler(InputDiscarder(), position: .first)
        eventLoop.scheduleTask(in: .milliseconds(200)) { self.close(promise: nil) }
    }
}

/// First in a closing connection's pipeline: reads on and drops everything (the handlers behind it
/// read no more), so the client's end of the connection is seen and nothing is buffered.
final class InputDiscarder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    func handlerAdded(context: ChannelHandlerContext) {
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelReadComplete(context: ChannelHandlerContext) {
        context.read()
    }
}
