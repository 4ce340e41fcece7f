import Logging
import Synchronization

/// What the listener enforces; swapped whole on reload.
public struct IngressSettings: Sendable {
    public var paths: Set<String>
    public var maxBodyBytes: Int
    public var sources: SourcePolicy
    /// Payop's secret key, for legacy V1 signatures; nil when none is configured.
    public var legacySecretKey: String?

    public init(paths: Set<String>, maxBodyBytes: Int, sources: SourcePolicy, legacySecretKey: String?) {
        self.paths = paths
        self.maxBodyBytes = maxBodyBytes
        self.sources = sources
        self.legacySecretKey = legacySecretKey
    }
}

/// An HTTP answer, independent of the server that writes it.
public struct IngressAnswer: Sendable, Equatable {
    public var status: Int
    public var body: String
    public var allow: String?
    /// Close the connection after answering (the rest of the request is not worth reading).
    public var close: Bool

    init(_ status: Int, _ body: String, allow: String? = nil, close: Bool = false) {
        self.status = status
        self.body = body + "\n"
        self.allow = allow
        self.close = close
    }

    static let notFound = IngressAnswer(404, "not found")
    static let methodNotAllowed = IngressAnswer(405, "method not allowed: IPNs are POSTed", allow: "POST")
    static let forbidden = IngressAnswer(403, "forbidden: source address not allowed", close: true)
    static func tooLarge(_ limit: Int) -> IngressAnswer {
        IngressAnswer(413, "request body larger than \(limit) bytes", close: true)
    }
    static let accepted = IngressAnswer(200, "OK")
    static let unavailable = IngressAnswer(503, "event log unavailable, send again later")
}

/// What the listener reports; the daemon's Prometheus metrics in production.
public protocol IngressMetrics: Sendable {
    /// One IPN request answered; `kind` is nil when the body was not understood.
    func ipn(kind: String?, answer: Int)
    func eventCreated(type: String)
}

/// The IPN listener's decisions, with no HTTP server in them: the README's status table.
public final class IPNIngress: Sendable {
    /// A request that passed the checks that need no body; the body may now be read.
    public struct Admitted: Sendable {
        public var path: String
        public var sourceIP: String
        public var maxBodyBytes: Int
    }

    public enum Preflight: Sendable {
        case answer(IngressAnswer)
        case readBody(Admitted)
    }

    private let settings: Mutex<IngressSettings>
    private let store: any EventStore
    private let clock: any WallClock
    private let logger: Logger
    /// Told of every IPN made durable (the verifier takes it from there).
    private let onStored: @Sendable (IngestOutcome, IncomingIPN) -> Void
    /// Told of every IPN about to be logged, while its receipt commits (the verifier may ask Payop now).
    private let onAccepting: @Sendable (IncomingIPN) -> Void
    private let metrics: (any IngressMetrics)?

    public init(
        settings: IngressSettings, store: any EventStore, clock: any WallClock = SystemWallClock(), logger: Logger,
        metrics: (any IngressMetrics)? = nil, onAccepting: @escaping @Sendable (IncomingIPN) -> Void = { _ in },
        onStored: @escaping @Sendable (IngestOutcome, IncomingIPN) -> Void = { _, _ in }
    ) {
        self.onAccepting = onAccepting
        self.settings = Mutex(settings)
        self.store = store
        self.clock = clock
        self.logger = logger
        self.metrics = metrics
        self.onStored = onStored
    }

    /// Who may post, as the connection gate checks it at accept time.
    public var sources: SourcePolicy { settings.withLock { $0.sources } }

    public func reload(_ newSettings: IngressSettings) {
        settings.withLock { $0 = newSettings }
    }

    /// Everything decided before the body is read: path, method, source and declared length.
    public func preflight(
        method: String, path: String, peer: IPAddress?, forwardedFor: [String], contentLength: Int?
    ) -> Preflight {
        let decision = decide(method: method, path: path, peer: peer, forwardedFor: forwardedFor, contentLength: contentLength)
        if case .answer(let answer) = decision { metrics?.ipn(kind: nil, answer: answer.status) }
        return decision
    }

    private func decide(
        method: String, path: String, peer: IPAddress?, forwardedFor: [String], contentLength: Int?
    ) -> Preflight {
        let settings = settings.withLock { $0 }
        guard settings.paths.contains(path) else { return .answer(.notFound) }
        guard method == "POST" else { return .answer(.methodNotAllowed) }
        guard let peer, let client = settings.sources.clientAddress(peer: peer, forwardedFor: forwardedFor),
            settings.sources.allows(client)
        else {
            logger.notice(
                "ipn refused: source not allowed",
                metadata: ["peer": "\(peer.map(String.init(describing:)) ?? "unknown")", "forwarded_for": "\(forwardedFor)"])
            return .answer(.forbidden)
        }
        if let contentLength, contentLength > settings.maxBodyBytes {
            return .answer(.tooLarge(settings.maxBodyBytes))
        }
        return .readBody(Admitted(path: path, sourceIP: client.description, maxBodyBytes: settings.maxBodyBytes))
    }

    /// An answer given while reading the body (too large, too slow), counted like the others.
    public func answerWithoutBody(_ answer: IngressAnswer) -> IngressAnswer {
        metrics?.ipn(kind: nil, answer: answer.status)
        return answer
    }

    /// Parses, checks and records a body that was read whole; 200 only once it is durable.
    public func accept(body: [UInt8], from request: Admitted) async -> IngressAnswer {
        await withCheckedContinuation { continuation in
            accept(body: body, from: request) { continuation.resume(returning: $0) }
        }
    }

    /// The same, for the listener's event loop: parsing and the signature check run on the caller's
    /// thread, `answer` is called from the event log's writer once the receipt is durable (or not).
    public func accept(body: [UInt8], from request: Admitted, answer: @escaping @Sendable (IngressAnswer) -> Void) {
        let now = clock.nowMilliseconds()
        let notification: Notification
        switch NotificationParser.parse(body) {
        case .failure(let reason):
            return refuse(reason, body: body, notification: nil, request: request, at: now, answer: answer)
        case .success(let parsed):
            notification = parsed
        }
        if notification.legacy != nil,
            let failure = LegacySignature.verify(notification, secretKey: settings.withLock { $0.legacySecretKey })
        {
            return refuse(failure, body: body, notification: notification, request: request, at: now, answer: answer)
        }
        let ipn = IncomingIPN(
            receivedAt: now, sourceIP: request.sourceIP, path: request.path, body: body, notification: notification,
            verifiedBySignature: notification.legacy != nil)
        onAccepting(ipn)
        store.ingest(ipn) { [self] result in
            switch result {
            case .success(let outcome):
                onStored(outcome, ipn)
                metrics?.ipn(kind: notification.kind.rawValue, answer: 200)
                if outcome.duplicate {
                    logger.debug(
                        "ipn duplicate",
                        metadata: ["event.id": "\(outcome.eventID)", "event.type": "\(notification.type)"])
                } else {
                    metrics?.eventCreated(type: notification.type)
                    logger.info(
                        "ipn stored",
                        metadata: [
                            "event.id": "\(outcome.eventID)", "event.type": "\(notification.type)",
                            "entity.id": "\(notification.entityID)",
                        ])
                }
                answer(.accepted)
            case .failure(let error):
                logger.error("ipn not stored, answered 503", metadata: ["error": "\(error)"])
                metrics?.ipn(kind: notification.kind.rawValue, answer: 503)
                answer(.unavailable)
            }
        }
    }

    private func refuse(
        _ reason: RefusalReason, body: [UInt8], notification: Notification?, request: Admitted, at now: Int64,
        answer: @escaping @Sendable (IngressAnswer) -> Void
    ) {
        logger.notice("ipn refused", metadata: ["reason": "\(reason.rawValue)", "source": "\(request.sourceIP)"])
        let refused = RefusedIPN(
            receivedAt: now, sourceIP: request.sourceIP, path: request.path, reason: reason, body: body,
            notification: notification)
        store.recordRefused(refused) { [logger, metrics] error in
            // The answer does not depend on the record: the request was bad either way.
            if let error { logger.error("refused ipn not recorded", metadata: ["error": "\(error)"]) }
            metrics?.ipn(kind: notification?.kind.rawValue, answer: reason.httpStatus)
            answer(IngressAnswer(reason.httpStatus, reason.rawValue))
        }
    }
}
