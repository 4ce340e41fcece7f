import Foundation
import GRDB

extension Event {
    /// Select from `events` joined with its first receipt: `\(Event.select) WHERE events.id = ?`.
    static let select = """
        SELECT events.id, events.kind, events.status, events.state, events.rejection_reason, events.source,
               events.transaction_id, events.invoice_id, events.order_id, events.refund_id, events.withdrawal_id,
               events.amount, events.currency, events.payop_state, events.error_message, events.legacy,
               events.verification, events.received_at, events.verified_at, events.duplicates, receipts.body AS ipn
        FROM events LEFT JOIN receipts ON receipts.id = events.first_receipt
        """

    /// A row of `select`, read by position: GRDB finds a column by name by lowercasing each name it
    /// compares, which showed in the daemon's profile (every hook run reads an event). Debug builds
    /// (the tests) check that the row has `select`'s columns in this order.
    init(row: some PositionalRow) {
        assert(
            row.names == [
                "id", "kind", "status", "state", "rejection_reason", "source", "transaction_id", "invoice_id",
                "order_id", "refund_id", "withdrawal_id", "amount", "currency", "payop_state", "error_message", "legacy",
                "verification", "received_at", "verified_at", "duplicates", "ipn",
            ], "Event(row:) reads Event.select's columns by position")
        id = row.text(required: 0)
        kind = row.text(required: 1)
        status = row.text(required: 2)
        state = row.text(required: 3)
        rejectionReason = row.text(4)
        source = row.text(required: 5)
        transactionID = row.text(6)
        invoiceID = row.text(7)
        orderID = row.text(8)
        refundID = row.text(9)
        withdrawalID = row.text(10)
        amount = row.text(11)
        currency = row.text(12)
        payopState = row.int(13)
        errorMessage = row.text(14)
        legacy = row.bool(required: 15)
        verification = row.text(16)
        receivedAt = row.integer(required: 17)
        verifiedAt = row.integer(18)
        duplicates = row.int(required: 19)
        ipn = row.blob(20)
    }
}

/// One IPN request as recorded, accepted or refused.
public struct Receipt: Sendable, Equatable, Encodable {
    public var id: Int64
    public var receivedAt: Int64
    public var sourceIP: String
    public var path: String
    public var answer: Int
    public var reason: String?
    public var kind: String?
    public var entityID: String?
    public var eventID: String?
    public var size: Int
    /// The request body as received (refused ones cut to their prefix); read only for one event's page.
    public var body: [UInt8]?
    /// The daemon that answered it (`storage.node_id`); only a PostgreSQL log, shared by several, keeps it.
    public var nodeID: String?

    static let columns = "id, received_at, source_ip, path, answer, reason, kind, entity_id, event_id, size"

    init(row: Row) {
        id = row["id"]
        receivedAt = row["received_at"]
        sourceIP = row["source_ip"]
        path = row["path"]
        answer = row["answer"]
        reason = row["reason"]
        kind = row["kind"]
        entityID = row["entity_id"]
        eventID = row["event_id"]
        size = row["size"]
        body = row.hasColumn("body") ? (row["body"] as Data?).map { Array($0) } : nil
    }

    enum CodingKeys: String, CodingKey {
        case id, receivedAt = "received_at", sourceIP = "source_ip", path, answer, reason, kind
        case entityID = "entity_id", eventID = "event_id", size
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(Timestamp.format(milliseconds: receivedAt), forKey: .receivedAt)
        try c.encode(sourceIP, forKey: .sourceIP)
        try c.encode(path, forKey: .path)
        try c.encode(answer, forKey: .answer)
        try c.encode(reason, forKey: .reason)
        try c.encode(kind, forKey: .kind)
        try c.encode(entityID, forKey: .entityID)
        try c.encode(eventID, forKey: .eventID)
        try c.encode(size, forKey: .size)
    }
}

/// One finished run of a hook: the history behind a delivery's `last_*` fields.
public struct DeliveryAttempt: Sendable, Equatable, Encodable {
    public var deliveryID: Int64
    public var attempt: Int
    public var finishedAt: Int64
    /// delivered | failed | gone
    public var outcome: String
    public var exitCode: Int?
    public var httpStatus: Int?
    public var error: String?
    public var output: String?

    static let columns = "delivery_id, attempt, finished_at, outcome, exit_code, http_status, error, output"

    init(
        deliveryID: Int64, attempt: Int, finishedAt: Int64, outcome: String, exitCode: Int?, httpStatus: Int?,
        error: String?, output: String?
    ) {
        self.deliveryID = deliveryID
        self.attempt = attempt
        self.finishedAt = finishedAt
        self.outcome = outcome
        self.exitCode = exitCode
        self.httpStatus = httpStatus
        self.error = error
        self.output = output
    }

    /// Run `attempt` of delivery `id`, which ended now with `result`.
    init(deliveryID: Int64, attempt: Int, result: HookResult, now: Int64) {
        self.init(
            deliveryID: deliveryID, attempt: attempt, finishedAt: now, outcome: Self.outcomeName(result.outcome),
            exitCode: result.exitCode, httpStatus: result.httpStatus, error: result.error, output: result.output)
    }

    /// The last run of `delivery` when only its row records it (`DeliveryProgress.lastRunIsInRowOnly`).
    init?(inRowOf delivery: Delivery) {
        guard delivery.progress.lastRunIsInRowOnly, let finishedAt = delivery.deliveredAt else { return nil }
        self.init(
            deliveryID: delivery.id, attempt: delivery.attempts, finishedAt: finishedAt, outcome: "delivered",
            exitCode: delivery.lastExitCode, httpStatus: delivery.lastHTTPStatus, error: delivery.lastError,
            output: delivery.output)
    }

    /// Every finished run of `deliveries`: their history rows (`recorded`, in the order they finished),
    /// and each run only a delivery's row records, the newest of its delivery, put among the others by
    /// when it finished. One an earlier version's daemon also recorded (sharing the log while they were
    /// upgraded) is there once.
    static func history(recorded: [DeliveryAttempt], deliveries: [Delivery]) -> [DeliveryAttempt] {
        var runs = recorded
        for run in deliveries.compactMap(DeliveryAttempt.init(inRowOf:)) where !recorded.contains(run) {
            let afterItsOwn = runs.lastIndex { $0.deliveryID == run.deliveryID }.map { $0 + 1 } ?? runs.startIndex
            runs.insert(run, at: runs[afterItsOwn...].firstIndex { $0.finishedAt > run.finishedAt } ?? runs.endIndex)
        }
        return runs
    }

    init(row: Row) {
        deliveryID = row["delivery_id"]
        attempt = row["attempt"]
        finishedAt = row["finished_at"]
        outcome = row["outcome"]
        exitCode = row["exit_code"]
        httpStatus = row["http_status"]
        error = row["error"]
        output = row["output"]
    }

    static func outcomeName(_ outcome: HookResult.Outcome) -> String {
        switch outcome {
        case .delivered: "delivered"
        case .failed: "failed"
        case .gone: "gone"
        }
    }

    enum CodingKeys: String, CodingKey {
        case deliveryID = "delivery_id", attempt, finishedAt = "finished_at", outcome, exitCode = "exit_code"
        case httpStatus = "http_status", error, output
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(deliveryID, forKey: .deliveryID)
        try c.encode(attempt, forKey: .attempt)
        try c.encode(Timestamp.format(milliseconds: finishedAt), forKey: .finishedAt)
        try c.encode(outcome, forKey: .outcome)
        try c.encode(exitCode, forKey: .exitCode)
        try c.encode(httpStatus, forKey: .httpStatus)
        try c.encode(error, forKey: .error)
        try c.encode(output, forKey: .output)
    }
}

/// `events show`: the event with everything that happened to it.
public struct EventDetail: Sendable, Encodable {
    public var event: Event
    public var receipts: [Receipt]
    public var verificationAttempts: [VerificationAttempt] = []
    public var deliveries: [Delivery] = []
    /// Every finished run of the deliveries above, oldest first.
    public var deliveryAttempts: [DeliveryAttempt] = []

    enum CodingKeys: String, CodingKey {
        case receipts, verificationAttempts = "verification_attempts", deliveries
        case deliveryAttempts = "delivery_attempts"
    }

    private struct ReceiptLine: Encodable {
        var receipt: Receipt
        enum CodingKeys: String, CodingKey {
            case receivedAt = "received_at", sourceIP = "source_ip", answer, reason, nodeID = "node_id"
        }
        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(Timestamp.format(milliseconds: receipt.receivedAt), forKey: .receivedAt)
            try c.encode(receipt.sourceIP, forKey: .sourceIP)
            try c.encode(receipt.answer, forKey: .answer)
            try c.encode(receipt.reason, forKey: .reason)
            try c.encodeIfPresent(receipt.nodeID, forKey: .nodeID)
        }
    }

    public func encode(to encoder: any Encoder) throws {
        try event.encode(to: encoder)
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(receipts.map(ReceiptLine.init), forKey: .receipts)
        try c.encode(verificationAttempts, forKey: .verificationAttempts)
        try c.encode(deliveries, forKey: .deliveries)
        try c.encode(deliveryAttempts, forKey: .deliveryAttempts)
    }
}

