import HTTPTypes
import HummingbirdCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The IPN port: HummingbirdCore's HTTP/1 server with one lean responder and no router, middleware or
/// per-request context, because the request path, not the disk, is the ingest ceiling (DESIGN.md).
public enum IPNListener {
    public static func makeServer(
        host: String, port: Int, ingress: IPNIngress, readTimeoutSeconds: Double, logger: Logger,
        limits: ConnectionGate.Limits = .init(), onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> Server<GatedHTTP1Channel> {
        let readTimeout = TimeAmount.milliseconds(Int64(readTimeoutSeconds * 1000))
        let channel = HTTP1Channel(
            responder: { request, responseWriter, channel in
                let answer = await respond(to: request, on: channel, ingress: ingress, readTimeout: readTimeout)
                try await write(answer, to: responseWriter)
                if answer.close {
                    try? await channel.close()
                }
            },
            // Headers must arrive within the read timeout (HeaderDeadlineHandler, which also ends kept-alive
            // connections that send nothing more), and a started body too (below, answered 408). The idle
            // timeout is only a backstop.
            configuration: .init(
                additionalChannelHandlers: [HeaderDeadlineHandler(timeout: readTimeout)],
                idleTimeout: readTimeout * 4))
        // Connections are admitted or refused as they are accepted (ConnectionGate), never left waiting
        // in the backlog behind someone else's: memory stays bounded whatever is sent.
        let gate = ConnectionGate(limits: limits) { ingress.sources }
        return Server(
            childChannelSetup: GatedHTTP1Channel(inner: channel, gate: gate),
            configuration: .init(address: .hostname(host, port: port), serverName: nil, backlog: 4096),
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) },
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
            logger: logger)
    }

    private static func respond(
        to request: Request, on channel: any Channel, ingress: IPNIngress, readTimeout: TimeAmount
    ) async -> IngressAnswer {
        let peer = channel.remoteAddress?.ipAddress.flatMap(IPAddress.init)
        let preflight = ingress.preflight(
            method: request.method.rawValue, path: request.uri.path, peer: peer,
            forwardedFor: request.headers[values: .xForwardedFor],
            contentLength: request.headers[.contentLength].flatMap { Int($0) })
        switch preflight {
        case .answer(let answer):
            return answer
        case .readBody(let admitted):
            // The whole body must arrive within the read timeout: a client that trickles has its input
            // closed, is answered 408 and disconnected.
            let timedOut = NIOLockedValueBox(false)
            let deadline = channel.eventLoop.scheduleTask(in: readTimeout) {
                timedOut.withLockedValue { $0 = true }
                channel.close(mode: .input, promise: nil)
            }
            defer { deadline.cancel() }
            var body: [UInt8] = []
            var failed = false
            do {
                for try await part in request.body {
                    guard body.count + part.readableBytes <= admitted.maxBodyBytes else {
                        return ingress.answerWithoutBody(.tooLarge(admitted.maxBodyBytes))
                    }
                    body.append(contentsOf: part.readableBytesView)
                }
            } catch {
                failed = true
            }
            deadline.cancel()
            if timedOut.withLockedValue({ $0 }) || failed {
                return ingress.answerWithoutBody(IngressAnswer(408, "request body not received in time", close: true))
            }
            return await ingress.accept(body: body, from: admitted)
        }
    }

    private static func write(_ answer: IngressAnswer, to writer: consuming ResponseWriter) async throws {
        var fields: HTTPFields = [
            .contentType: "text/plain; charset=utf-8",
            .contentLength: String(answer.body.utf8.count),
        ]
        if let allow = answer.allow { fields[.allow] = allow }
        if answer.close { fields[.connection] = "close" }
        try await writer.write(
            response: HTTPResponse(status: .init(code: answer.status), headerFields: fields),
            body: ResponseBody(byteBuffer: ByteBuffer(string: answer.body)))
    }
}

extension HTTPField.Name {
    static let xForwardedFor = HTTPField.Name("X-Forwarded-For")!
}
