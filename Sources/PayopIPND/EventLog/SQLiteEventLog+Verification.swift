import Foundation
import GRDB

/// An event waiting for Payop's word, with what the verifier compares.
public struct PendingVerification: Sendable, Equatable {
    public var eventID: String
    public var kind: IPNKind
    public var entityID: String
    public var status: PaymentStatus
    public var orderID: String?
    public var amount: String?
    public var currency: String?
    public var invoiceID: String?
    public var transactionID: String?
    public var receivedAt: Int64
    /// Failed attempts so far (network, 5xx, not found while Payop catches up).
    public var attempts: Int
}

extension PendingVerification {
    /// A V2 IPN that just made a new event: due at once, never asked about.
    public init(fresh outcome: IngestOutcome, ipn: IncomingIPN) {
        let n = ipn.notification
        self.init(
            eventID: outcome.eventID, kind: n.kind, entityID: n.entityID, status: n.status, orderID: n.orderID,
            amount: n.amount, currency: n.currency, invoiceID: n.invoiceID, transactionID: n.transactionID,
            receivedAt: ipn.receivedAt, attempts: 0)
    }
}

/// What the verifier concluded from one question to Payop.
public enum VerificationOutcome: Sendable, Equatable {
    /// Payop confirms the status; fields Payop knows and the IPN lacked are filled in.
    case verified(PayopRecord)
    /// Payop disagrees on something other than the status.
    case rejected(reason: String, record: PayopRecord?)
    /// Payop reports another status: the IPN's event is rejected and Payop's status becomes its own event.
    case statusMismatch(PayopRecord)
    /// No answer worth acting on yet: ask again at `retryAt`.
    case retry(outcome: String, detail: String, retryAt: Int64)
}

extension SQLiteEventLog {
    private static let pendingColumns = """
        id, kind, entity_id, status, payop_state, order_id, amount, currency, invoice_id, transaction_id,
        received_at, check_attempts
        """

    private static func pending(_ row: Row) -> PendingVerification? {
        guard let kind = IPNKind(rawValue: row["kind"]) else { return nil }
        return PendingVerification(
            eventID: row["id"], kind: kind, entityID: row["entity_id"],
            status: PaymentStatus(name: row["status"], payopState: row["payop_state"]), orderID: row["order_id"],
            amount: row["amount"], currency: row["currency"], invoiceID: row["invoice_id"],
            transactionID: row["transaction_id"], receivedAt: row["received_at"], attempts: row["check_attempts"])
    }

    /// Events whose verification is due at `now`, oldest due first.
    public func dueForVerification(now: Int64, limit: Int) async throws(EventLogError) -> [PendingVerification] {
        try await read { db in
            try Row.fetchAll(
                db.cachedStatement(
                    sql: """
                        SELECT \(Self.pendingColumns) FROM events
                        WHERE next_check_at IS NOT NULL AND next_check_at <= ? AND state IN ('received', 'rejected')
                        ORDER BY next_check_at, id LIMIT ?
                        """), arguments: [now, limit]
            ).compactMap(Self.pending)
        }
    }

    /// When the verifier next has something to do, if ever.
    public func nextVerificationDue() async throws(EventLogError) -> Int64? {
        try await read { db in
            try Int64.fetchOne(
                db.cachedStatement(
                    sql:
                        "SELECT min(next_check_at) FROM events WHERE next_check_at IS NOT NULL AND state IN ('received', 'rejected')"
                ))
        }
    }

    /// Records the attempt and its consequence in one transaction. Returns the events that became
    /// verified (the IPN's, or Payop's own status on a mismatch) with their deliveries ready to run.
    @discardableResult
    public func applyVerification(
        _ outcome: VerificationOutcome, to pending: PendingVerification, now: Int64, reconcileInterval: Int64
    )
        async throws(EventLogError) -> [VerifiedEvent]
    {
        let hooks = self.hooks
        return try await write { db in
            // Another attempt may have settled it meanwhile (a duplicate IPN, a second verifier pass).
            guard
                try Bool.fetchOne(
                    db.cachedStatement(
                        sql:
                            "SELECT state IN ('received', 'rejected') AND next_check_at IS NOT NULL FROM events WHERE id = ?"
                    ),
                    arguments: [pending.eventID]) == true
            else { return [] }
            switch outcome {
            case .verified(let record):
                try Self.attempt(db, pending.eventID, now, "verified", record.status.payopState, nil)
                try Self.markVerified(
                    db, eventID: pending.eventID, record: record, now: now, reconcileInterval: reconcileInterval)
                return try Self.verifiedEvent(db, pending.eventID, hooks: hooks, now: now)
            case .rejected(let reason, let record):
                try Self.attempt(db, pending.eventID, now, "rejected", record?.status.payopState, reason)
                try Self.markRejected(db, eventID: pending.eventID, reason: reason)
                return []
            case .statusMismatch(let record):
                try Self.attempt(
                    db, pending.eventID, now, "rejected", record.status.payopState,
                    "status_mismatch: Payop reports \(record.status.name)")
                try Self.markRejected(db, eventID: pending.eventID, reason: "status_mismatch")
                guard
                    let created = try Self.insertReported(
                        db, record: record, like: pending, now: now, reconcileInterval: reconcileInterval)
                else { return [] }
                return try Self.verifiedEvent(db, created, hooks: hooks, now: now)
            case .retry(let outcome, let detail, let retryAt):
                try Self.attempt(db, pending.eventID, now, outcome, nil, detail)
                try db.cachedStatement(
                    sql: "UPDATE events SET check_attempts = check_attempts + 1, next_check_at = ? WHERE id = ?"
                ).execute(arguments: [retryAt, pending.eventID])
                return []
            }
        }
    }

    /// The outbox entries of an event that just became verified, and the event as its hooks will see it.
    static func verifiedEvent(_ db: Database, _ eventID: String, hooks: [HookConfig], now: Int64) throws
        -> [VerifiedEvent]
    {
        let ready = try enqueueDeliveries(db, eventID: eventID, hooks: hooks, now: now)
        guard
            let row = try Row.fetchOne(
                db.cachedStatement(sql: "\(Event.select) WHERE events.id = ?"), arguments: [eventID])
        else {
            return []
        }
        return [VerifiedEvent(event: Event(row: row), readyDeliveries: ready)]
    }

    static func attempt(
        _ db: Database, _ eventID: String, _ at: Int64, _ outcome: String, _ state: Int?, _ detail: String?
    )
        throws
    {
        try db.cachedStatement(
            sql: "INSERT INTO verification_attempts (event_id, at, outcome, payop_state, detail) VALUES (?, ?, ?, ?, ?)"
        ).execute(arguments: [eventID, at, outcome, state, detail])
    }

    static func markVerified(_ db: Database, eventID: String, record: PayopRecord, now: Int64, reconcileInterval: Int64)
        throws
    {
        try db.cachedStatement(
            sql: """
                UPDATE events SET state = 'verified', rejection_reason = NULL, verification = 'payop_api',
                    verified_at = ?, next_check_at = NULL,
                    amount = COALESCE(amount, ?), currency = COALESCE(currency, ?),
                    order_id = COALESCE(order_id, ?), transaction_id = COALESCE(transaction_id, ?),
                    error_message = COALESCE(error_message, ?),
                    reconcile_at = ?
                WHERE id = ?
                """
        ).execute(arguments: [
            now, record.amount, record.currency, record.orderID, record.transactionID, record.errorMessage,
            record.status.isFinal ? nil : now + reconcileInterval, eventID,
        ])
    }

    static func markRejected(_ db: Database, eventID: String, reason: String) throws {
        try db.cachedStatement(
            sql: """
                UPDATE events SET state = 'rejected', rejection_reason = ?, verification = NULL, verified_at = NULL,
                    next_check_at = NULL, reconcile_at = NULL
                WHERE id = ?
                """
        ).execute(arguments: [reason, eventID])
    }

    /// Payop's own status as a verified event "as if its IPN had arrived"; nil when the log has it already.
    static func insertReported(
        _ db: Database, record: PayopRecord, like pending: PendingVerification, now: Int64, reconcileInterval: Int64
    ) throws -> String? {
        let exists = try String.fetchOne(
            db.cachedStatement(sql: "SELECT id FROM events WHERE kind = ? AND entity_id = ? AND status_key = ?"),
            arguments: [record.kind.rawValue, record.id, record.status.dedupeKey])
        if exists != nil { return nil }
        let id = SortableID.make(prefix: "evt_", millisecondsSince1970: now)
        try db.cachedStatement(
            sql: """
                INSERT INTO events (id, kind, entity_id, status, status_key, payop_state, state, source, verification,
                                    transaction_id, invoice_id, order_id, refund_id, withdrawal_id, amount, currency,
                                    error_message, legacy, received_at, verified_at, first_receipt, next_check_at, reconcile_at)
                VALUES (?, ?, ?, ?, ?, ?, 'verified', 'reconcile', 'payop_api', ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, NULL, NULL, ?)
                """
        ).execute(arguments: [
            id, record.kind.rawValue, record.id, record.status.name, record.status.dedupeKey, record.status.payopState,
            record.kind == .checkout ? record.id : (record.transactionID ?? pending.transactionID),
            pending.invoiceID, record.orderID ?? pending.orderID,
            record.kind == .refund ? record.id : nil, record.kind == .withdrawal ? record.id : nil,
            record.amount ?? pending.amount, record.currency ?? pending.currency, record.errorMessage, now, now,
            record.status.isFinal ? nil : now + reconcileInterval,
        ])
        return id
    }

    // MARK: - Reconciliation

    /// Verified events whose status can still change and whose re-check is due.
    public func dueForReconcile(now: Int64, limit: Int) async throws(EventLogError) -> [PendingVerification] {
        try await read { db in
            try Row.fetchAll(
                db.cachedStatement(
                    sql: """
                        SELECT \(Self.pendingColumns) FROM events
                        WHERE reconcile_at IS NOT NULL AND reconcile_at <= ? AND state = 'verified'
                        ORDER BY reconcile_at, id LIMIT ?
                        """), arguments: [now, limit]
            ).compactMap(Self.pending)
        }
    }

    public func nextReconcileDue() async throws(EventLogError) -> Int64? {
        try await read { db in
            try Int64.fetchOne(
                db.cachedStatement(
                    sql: "SELECT min(reconcile_at) FROM events WHERE reconcile_at IS NOT NULL AND state = 'verified'"))
        }
    }

    /// Applies what Payop now says of a non-final event: the same status waits for the next round; another
    /// status becomes a new verified event (unless the log has it already) and ends this one's re-checks.
    @discardableResult
    public func applyReconciliation(
        _ record: PayopRecord?, to pending: PendingVerification, now: Int64, reconcileInterval: Int64
    ) async throws(EventLogError) -> VerifiedEvent? {
        let hooks = self.hooks
        return try await write { db in
            guard let record, record.status.dedupeKey != pending.status.dedupeKey else {
                try db.cachedStatement(
                    sql: "UPDATE events SET reconcile_at = ? WHERE id = ? AND reconcile_at IS NOT NULL"
                ).execute(arguments: [now + reconcileInterval, pending.eventID])
                return nil
            }
            try db.cachedStatement(sql: "UPDATE events SET reconcile_at = NULL WHERE id = ?").execute(arguments: [
                pending.eventID
            ])
            guard
                let created = try Self.insertReported(
                    db, record: record, like: pending, now: now, reconcileInterval: reconcileInterval)
            else { return nil }
            return try Self.verifiedEvent(db, created, hooks: hooks, now: now).first
        }
    }
}

/// An event that just became verified, with the deliveries that may start at once.
public struct VerifiedEvent: Sendable {
    public var event: Event
    public var readyDeliveries: [Delivery]
}

public struct VerificationAttempt: Sendable, Equatable, Encodable {
    public var at: Int64
    public var outcome: String
    public var payopState: Int?
    public var detail: String?

    enum CodingKeys: String, CodingKey { case at, outcome, payopState = "payop_state", detail }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(Timestamp.format(milliseconds: at), forKey: .at)
        try c.encode(outcome, forKey: .outcome)
        try c.encode(payopState, forKey: .payopState)
        try c.encode(detail, forKey: .detail)
    }
}
