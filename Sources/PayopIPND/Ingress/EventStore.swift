/// An IPN that passed the listener's checks and is ready to be made durable.
public struct IncomingIPN: Sendable {
    public var receivedAt: Int64
    public var sourceIP: String
    public var path: String
    public var body: [UInt8]
    public var notification: Notification
    /// Legacy V1 IPNs are proven by their signature at the door; V2 IPNs wait for Payop's API.
    public var verifiedBySignature: Bool

    public init(
        receivedAt: Int64, sourceIP: String, path: String, body: [UInt8], notification: Notification,
        verifiedBySignature: Bool
    ) {
        self.receivedAt = receivedAt
        self.sourceIP = sourceIP
        self.path = path
        self.body = body
        self.notification = notification
        self.verifiedBySignature = verifiedBySignature
    }
}

/// A request from an allowed source that was answered 400 or 401: kept for the merchant to inspect.
public struct RefusedIPN: Sendable {
    public var receivedAt: Int64
    public var sourceIP: String
    public var path: String
    public var answer: Int
    public var reason: RefusalReason
    /// The first `RefusedIPN.keptBodyBytes` of the body; `size` is the whole length.
    public var bodyPrefix: [UInt8]
    public var size: Int
    public var notification: Notification?

    /// Refused bodies are evidence, not data: enough to see what was sent, bounded so garbage cannot
    /// fill the disk.
    public static let keptBodyBytes = 4096

    public init(
        receivedAt: Int64, sourceIP: String, path: String, reason: RefusalReason, body: some Collection<UInt8>,
        notification: Notification?
    ) {
        self.receivedAt = receivedAt
        self.sourceIP = sourceIP
        self.path = path
        self.answer = reason.httpStatus
        self.reason = reason
        self.bodyPrefix = Array(body.prefix(Self.keptBodyBytes))
        self.size = body.count
        self.notification = notification
    }
}

public struct IngestOutcome: Sendable, Equatable {
    public var receiptID: Int64
    public var eventID: String
    /// True when the IPN repeated a status the log already had.
    public var duplicate: Bool
}

/// What the listener needs of the event log: a fake in tests, SQLite in production. Completions, not
/// `async`: the listener decides on its event loop and is called back once the commit is durable.
public protocol EventStore: Sendable {
    /// Records the receipt and its event (or counts a duplicate); `completion` runs once durable.
    func ingest(_ ipn: IncomingIPN, completion: @escaping @Sendable (Result<IngestOutcome, EventLogError>) -> Void)
    /// Records a refused request; nothing else happens.
    func recordRefused(_ refused: RefusedIPN, completion: @escaping @Sendable (EventLogError?) -> Void)
}

extension EventStore {
    public func ingest(_ ipn: IncomingIPN) async throws(EventLogError) -> IngestOutcome {
        let result = await withCheckedContinuation { continuation in
            ingest(ipn) { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    public func recordRefused(_ refused: RefusedIPN) async throws(EventLogError) {
        let error = await withCheckedContinuation { continuation in
            recordRefused(refused) { continuation.resume(returning: $0) }
        }
        if let error { throw error }
    }
}
