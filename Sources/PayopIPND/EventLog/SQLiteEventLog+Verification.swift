import Foundation
import GRDB

extension SQLiteEventLog {
    public func dueChecks(now: Int64, limit: Int) async throws(EventLogError) -> [DueCheck] {
        try readInPlace { db in
            try db.cachedStatement(
                sql: """
                    SELECT id, kind, entity_id, status, payop_state FROM events
                    WHERE next_check_at IS NOT NULL AND next_check_at <= ?
                    ORDER BY next_check_at, id LIMIT ?
                    """
            ).allRows {
                $0.add(now)
                $0.add(limit)
            } read: { row in
                DueCheck(
                    eventID: row.text(required: 0), kind: IPNKind(rawValue: row.text(required: 1)) ?? .checkout,
                    entityID: row.text(required: 2),
                    status: PaymentStatus(name: row.text(required: 3), payopState: row.int(4)))
            }
        }
    }

    public func nextCheckDue() async throws(EventLogError) -> Int64? {
        try readInPlace { db in
            try db.cachedStatement(sql: "SELECT min(next_check_at) FROM events WHERE next_check_at IS NOT NULL")
                .firstRow { _ in } read: { $0.integer(0) } ?? nil
        }
    }

    public func applyAnswer(_ answer: PayopAnswer, to check: DueCheck, now: Int64, policy: VerificationPolicy)
        async throws(EventLogError) -> AppliedAnswer
    {
        let hooks = self.hooks
        let early = earlyClaims()
        return try await write(claiming: early) { db in
            try Self.apply(answer, to: check, now: now, policy: policy, hooks: hooks, early: early, in: db)
        }
    }

    /// Payop's answer about `check`'s event in the log: the machine's transition, the attempt, and the
    /// deliveries of whatever became verified (claimed at once when `early` admits them).
    static func apply(
        _ answer: PayopAnswer, to check: DueCheck, now: Int64, policy: VerificationPolicy, hooks: [HookConfig],
        early: EarlyClaims?, in db: Database
    ) throws -> AppliedAnswer {
        guard var machine = try verification(db, check.eventID) else {
            return AppliedAnswer(state: nil, outcome: "gone", detail: nil, verified: [])
        }
        let outcome = machine.payopAnswered(answer, claims: try Self.claims(db, check.eventID), now: now, policy: policy)
        var payopState: Int?
        if case .record(let record) = answer { payopState = record.status.payopState }
        try attempt(db, check.eventID, now, outcome.attemptOutcome, payopState, outcome.attemptDetail)
        try persist(machine, eventID: check.eventID, facts: outcome.verified, now: now, in: db)
        var verified: [VerifiedEvent] = []
        if outcome.verified != nil {
            verified += try verifiedEvent(db, check.eventID, hooks: hooks, now: now, early: early)
        }
        if let reported = outcome.reportedStatus {
            verified += try recordReported(
                reported, by: check.eventID, now: now, policy: policy, hooks: hooks, early: early, in: db)
        }
        return AppliedAnswer(
            state: machine.state, outcome: outcome.attemptOutcome, detail: outcome.attemptDetail, verified: verified)
    }

    // MARK: - The machine's state in rows

    static func verification(_ db: Database, _ eventID: String) throws -> EventVerification? {
        // Read by position (the SELECT above, in its order): the writer runs this for every answer.
        let read = try db.cachedStatement(
            sql: """
                SELECT kind, status, payop_state, state, rejection_reason, legacy, received_at, check_attempts,
                       next_check_at, watch_until
                FROM events WHERE id = ?
                """
        ).firstRow { $0.add(eventID) } read: { row -> EventVerification? in
            guard let kind = IPNKind(rawValue: row.text(required: 0)),
                let state = VerificationState(name: row.text(required: 3), reason: row.text(4))
            else { return nil }
            return EventVerification(
                kind: kind, status: PaymentStatus(name: row.text(required: 1), payopState: row.int(2)),
                receivedAt: row.integer(required: 6), legacy: row.bool(required: 5), state: state,
                attempts: row.int(required: 7), nextCheckAt: row.integer(8), watchUntil: row.integer(9))
        }
        return read ?? nil
    }

    /// The distinct claims of the event's accepted copies, each with its first receipt, newest first:
    /// Payop repeats the genuine copy, so forged copies sent before it cannot push it out of the list.
    ///
    /// The writer reads them for every answer. An event has one copy or a few: they are walked in id
    /// order along `receipts_by_event` and each claim is kept with its first copy, which needs no sort
    /// (the grouped query below took two of SQLite's sorters per answer). An event with more than
    /// `claimsWalked` copies is answered by that query, whose sorter spills to disk: a flood of forged
    /// copies does not grow the writer's memory. So is one with a claim this daemon never writes (a
    /// blob, text that is not UTF-8), which the walk could not compare as SQLite does.
    static func claims(_ db: Database, _ eventID: String) throws -> [IPNClaim] {
        var claims: [IPNClaim] = []
        var walked = 0
        var exact = true
        try db.cachedStatement(sql: claimsQuery).forEachRow { $0.add(eventID) } _: { row in
            walked += 1
            guard walked <= claimsWalked else { return false }
            // Compared as read, a claim must read as stored: another program's blob or broken text could
            // otherwise read the same as a copy the grouped query keeps apart.
            guard let claim = exactClaim(row) else {
                exact = false
                return false
            }
            if !claims.contains(where: { $0.isSameClaim(as: claim) }) { claims.append(claim) }
            return true
        }
        return walked <= claimsWalked && exact ? claims.reversed() : try groupedClaims(db, eventID)
    }

    private static func exactClaim(_ row: RawColumns) -> IPNClaim? {
        guard let orderID = row.exactText(1), let amount = row.exactText(2), let currency = row.exactText(3),
            let invoiceID = row.exactText(4), let transactionID = row.exactText(5)
        else { return nil }
        return IPNClaim(
            receiptID: row.integer(0), orderID: orderID, amount: amount, currency: currency, invoiceID: invoiceID,
            transactionID: transactionID)
    }

    /// `claims`' walk: `receipts_by_event` holds an event's copies in id order.
    static let claimsQuery = """
        SELECT id, claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id
        FROM receipts WHERE event_id = ? AND answer = 200 ORDER BY id
        """

    /// Copies of one event walked for its claims at most; past them, the grouped query. At most the
    /// grouped query's `LIMIT`, so both give the same list.
    static let claimsWalked = 64

    /// `claims`, grouped and sorted by SQLite (the same columns, positions and order).
    static func groupedClaims(_ db: Database, _ eventID: String) throws -> [IPNClaim] {
        try db.cachedStatement(
            sql: """
                SELECT min(id) AS id, claim_order_id, claim_amount, claim_currency, claim_invoice_id,
                       claim_transaction_id
                FROM receipts WHERE event_id = ? AND answer = 200
                GROUP BY claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id
                ORDER BY 1 DESC LIMIT 100
                """
        ).allRows { $0.add(eventID) } read: { claimRead($0) }
    }

    private static func claimRead(_ row: RawColumns) -> IPNClaim {
        IPNClaim(
            receiptID: row.integer(0), orderID: row.text(1), amount: row.text(2), currency: row.text(3),
            invoiceID: row.text(4), transactionID: row.text(5))
    }

    /// Writes what a transition returned: the state, the schedule and, on verification, Payop's facts
    /// (in the same statement: one row update per answer).
    static func persist(_ machine: EventVerification, eventID: String, facts: VerifiedFacts?, now: Int64, in db: Database)
        throws
    {
        let state = machine.state.name
        let statement =
            facts == nil
            ? try db.cachedStatement(sql: "UPDATE events SET \(Self.machineColumns) WHERE id = ?")
            : try db.cachedStatement(
                sql: """
                    UPDATE events SET \(Self.machineColumns), transaction_id = ?, invoice_id = ?, order_id = ?,
                        amount = ?, currency = ?, error_message = ?, payop_state = COALESCE(?, payop_state),
                        first_receipt = ?, source = COALESCE(?, source)
                    WHERE id = ?
                    """)
        try statement.run {
            $0.add(state)
            $0.add(machine.state.reason?.rawValue)
            $0.add(machine.attempts)
            $0.add(machine.nextCheckAt)
            $0.add(machine.watchUntil)
            $0.add(state)
            $0.add(state)
            $0.add(now)
            if let facts {
                $0.add(facts.transactionID)
                $0.add(facts.invoiceID)
                $0.add(facts.orderID)
                $0.add(facts.amount)
                $0.add(facts.currency)
                $0.add(facts.errorMessage)
                $0.add(facts.payopState)
                $0.add(facts.receiptID)
                $0.add(facts.source)
            }
            $0.add(eventID)
        }
    }

    /// The verification machine's columns, as `persist` sets them.
    private static let machineColumns = """
        state = ?, rejection_reason = ?, check_attempts = ?, next_check_at = ?, watch_until = ?,
        verification = CASE WHEN ? = 'verified' THEN COALESCE(verification, 'payop_api') ELSE NULL END,
        verified_at = CASE WHEN ? = 'verified' THEN COALESCE(verified_at, ?) ELSE NULL END
        """

    /// Payop reported another status of the entity than `asker`'s: that status is verified as its own
    /// event, as if its IPN had arrived (created when the log lacks it).
    static func recordReported(
        _ record: PayopRecord, by asker: String, now: Int64, policy: VerificationPolicy, hooks: [HookConfig],
        early: EarlyClaims?, in db: Database
    ) throws -> [VerifiedEvent] {
        let existing = try String.fetchOne(
            db.cachedStatement(sql: "SELECT id FROM events WHERE kind = ? AND entity_id = ? AND status_key = ?"),
            arguments: [record.kind.rawValue, record.id, record.status.dedupeKey])
        if let existing {
            guard var machine = try verification(db, existing),
                let facts = machine.reportedByPayop(record, claims: try claims(db, existing), now: now, policy: policy)
            else { return [] }
            try attempt(db, existing, now, "verified", record.status.payopState, "Payop reported it when asked about \(asker)")
            try persist(machine, eventID: existing, facts: facts, now: now, in: db)
            return try verifiedEvent(db, existing, hooks: hooks, now: now, early: early)
        }
        let (machine, facts) = EventVerification.reported(record, now: now, policy: policy)
        let id = SortableID.make(prefix: Event.idPrefix, millisecondsSince1970: now)
        try db.cachedStatement(
            sql: """
                INSERT INTO events (id, kind, entity_id, status, status_key, payop_state, state, source, verification,
                                    transaction_id, invoice_id, order_id, refund_id, withdrawal_id, amount, currency,
                                    error_message, legacy, received_at, verified_at, first_receipt, next_check_at,
                                    check_attempts, watch_until)
                VALUES (?, ?, ?, ?, ?, ?, ?, 'reconcile', 'payop_api', ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, NULL, ?, ?, ?)
                """
        ).execute(arguments: [
            id, record.kind.rawValue, record.id, record.status.name, record.status.dedupeKey, record.status.payopState,
            machine.state.name, facts.transactionID, facts.invoiceID, facts.orderID,
            record.kind == .refund ? record.id : nil, record.kind == .withdrawal ? record.id : nil,
            facts.amount, facts.currency, facts.errorMessage, now, now, machine.nextCheckAt, machine.attempts,
            machine.watchUntil,
        ])
        try attempt(db, id, now, "verified", record.status.payopState, "Payop reported it when asked about \(asker)")
        return try verifiedEvent(db, id, hooks: hooks, now: now, early: early)
    }

    /// The outbox entries of an event that just became verified, and the event as its hooks will see it.
    static func verifiedEvent(
        _ db: Database, _ eventID: String, hooks: [HookConfig], now: Int64, early: EarlyClaims?
    ) throws -> [VerifiedEvent] {
        guard let (event, state, receivedAt) = try outboxEvent(db, eventID) else { return [] }
        let created =
            state == VerificationState.verified.name
            ? try enqueueDeliveries(db, of: event, hooks: hooks, now: now, early: early) : []
        return [VerifiedEvent(eventID: eventID, type: event.type, receivedAt: receivedAt, deliveries: created.count)]
    }

    static func attempt(
        _ db: Database, _ eventID: String, _ at: Int64, _ outcome: String, _ state: Int?, _ detail: String?
    ) throws {
        try db.cachedStatement(
            sql: "INSERT INTO verification_attempts (event_id, at, outcome, payop_state, detail) VALUES (?, ?, ?, ?, ?)"
        ).run {
            $0.add(eventID)
            $0.add(at)
            $0.add(outcome)
            $0.add(state)
            $0.add(detail)
        }
    }
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

extension IPNClaim {
    /// Whether `other` claims the same as this copy, whichever receipts carried them: byte for byte, as
    /// SQLite's `GROUP BY` compares text (Swift's `==` on strings would merge two spellings of one
    /// character, so a copy could hide another's claim).
    fileprivate func isSameClaim(as other: IPNClaim) -> Bool {
        func same(_ a: String?, _ b: String?) -> Bool {
            switch (a, b) {
            case (nil, nil): true
            case (let a?, let b?): a.utf8.elementsEqual(b.utf8)
            default: false
            }
        }
        return same(orderID, other.orderID) && same(amount, other.amount) && same(currency, other.currency)
            && same(invoiceID, other.invoiceID) && same(transactionID, other.transactionID)
    }
}
