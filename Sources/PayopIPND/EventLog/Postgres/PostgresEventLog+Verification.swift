import Foundation
import Logging
import PostgresNIO

extension PostgresEventLog: VerificationStore {
    /// Claims the questions due at `now`: at most one per entity, and none for an entity another daemon
    /// is asking about. Each claimed event's `next_check_at` moves to the end of the claim, so the
    /// question comes back by itself if this daemon dies before answering; the answer (`applyAnswer`)
    /// replaces it with the machine's schedule.
    ///
    /// First questions (events still `received`) are asked by any daemon; re-asking about decided
    /// events (the reconciler: statuses that can still change, failed checkouts and contradicted
    /// claims being watched) only by the reconcile leader (`isReconcileLeader`), so N daemons do not
    /// poll Payop N times as often.
    public func dueChecks(now: Int64, limit: Int) async throws(EventLogError) -> [DueCheck] {
        try requireSession()
        let node = nodeID
        let leader = isReconcileLeader
        let leaseEnd = now + configuration.checkLeaseMilliseconds
        return try await timedClaim("check") { () async throws(EventLogError) in
        try await transaction("cannot claim the questions due to Payop") { connection, logger in
            // SKIP LOCKED: rows another daemon is claiming or answering right now are simply not ours.
            var candidates: [DueCheck] = []
            for row in try await connection.query(
                """
                SELECT id, kind, entity_id, status, payop_state FROM events
                WHERE next_check_at IS NOT NULL AND next_check_at <= \(now) AND (state = 'received' OR \(leader))
                ORDER BY next_check_at, id LIMIT \(Int64(limit))
                FOR UPDATE SKIP LOCKED
                """, logger: logger
            ).collect() {
                let (id, kind, entity, status, state) = try row.decode((String, String, String, String, Int64?).self)
                candidates.append(
                    DueCheck(
                        eventID: id, kind: IPNKind(rawValue: kind) ?? .checkout, entityID: entity,
                        status: PaymentStatus(name: status, payopState: state.map(Int.init))))
            }
            var entities = Set<String>()
            let firsts = candidates.filter { entities.insert($0.entityKey).inserted }
            guard !firsts.isEmpty else { return [] }
            // Two daemons may hold different events of one entity: an advisory lock per entity, taken in
            // its own statement, decides which of them claims it; the claim check below then runs on a
            // fresh snapshot that sees every claim committed before the lock was had.
            let keys = firsts.map(\.entityKey)
            var lockedKeys = Set<String>()
            for try await key in try await connection.query(
                """
                SELECT k FROM unnest(\(keys)::text[]) AS k
                WHERE pg_try_advisory_xact_lock(hashtextextended('payop-ipnd/check/' || current_schema() || '/' || k, 0))
                """, logger: logger
            ).decode(String.self) {
                lockedKeys.insert(key)
            }
            let ids = firsts.filter { lockedKeys.contains($0.entityKey) }.map(\.eventID)
            guard !ids.isEmpty else { return [] }
            var claimed = Set<String>()
            for try await id in try await connection.query(
                """
                UPDATE events AS e SET check_claimed_by = \(node), check_claimed_until = \(leaseEnd),
                    next_check_at = \(leaseEnd)
                WHERE e.id = ANY(\(ids)::text[])
                AND NOT EXISTS (
                    SELECT 1 FROM events AS o
                    WHERE o.kind = e.kind AND o.entity_id = e.entity_id AND o.check_claimed_until > \(now))
                RETURNING e.id
                """, logger: logger
            ).decode(String.self) {
                claimed.insert(id)
            }
            return firsts.filter { claimed.contains($0.eventID) }
        }
        }
    }

    public func nextCheckDue() async throws(EventLogError) -> Int64? {
        let leader = isReconcileLeader
        return try await read("cannot read the event log") { connection, logger in
            try await connection.query(
                """
                SELECT min(next_check_at) FROM events
                WHERE next_check_at IS NOT NULL AND (state = 'received' OR \(leader))
                """, logger: logger
            ).collect().first?.decode(Int64?.self)
        }
    }

    public func applyAnswer(_ answer: PayopAnswer, to check: DueCheck, now: Int64, policy: VerificationPolicy)
        async throws(EventLogError) -> AppliedAnswer
    {
        let hooks = self.hooks
        let node = nodeID
        return try await transaction("the event log could not record Payop's answer") { connection, logger in
            // Every event of the entity, in id order: answers about one entity apply one at a time, and
            // a status Payop reports below is already held (two daemons never wait on each other).
            _ = try await connection.query(
                """
                SELECT id FROM events WHERE kind = \(check.kind.rawValue) AND entity_id = \(check.entityID)
                ORDER BY id FOR UPDATE
                """, logger: logger
            ).collect()
            // An answer that took longer than the claim: another daemon may have asked since and recorded a
            // newer truth; this one is stale, and the question is the claimant's now.
            let claimant = try await connection.query(
                "SELECT check_claimed_by FROM events WHERE id = \(check.eventID)", logger: logger
            ).collect().first?.decode(String?.self)
            guard claimant == node else {
                return AppliedAnswer(
                    state: nil, outcome: "claim_lost", detail: "answered after this daemon's claim ended", verified: [])
            }
            guard var machine = try await Self.verification(connection, logger, check.eventID) else {
                return AppliedAnswer(state: nil, outcome: "gone", detail: nil, verified: [])
            }
            let claims = try await Self.claims(connection, logger, check.eventID)
            let outcome = machine.payopAnswered(answer, claims: claims, now: now, policy: policy)
            var payopState: Int?
            if case .record(let record) = answer { payopState = record.status.payopState }
            try await Self.attempt(
                connection, logger, check.eventID, now, outcome.attemptOutcome, payopState, outcome.attemptDetail,
                node: node)
            try await Self.persist(
                machine, eventID: check.eventID, facts: outcome.verified, now: now, releaseClaimOf: node, connection,
                logger)
            var verified: [VerifiedEvent] = []
            if outcome.verified != nil {
                verified += try await Self.verifiedEvent(connection, logger, check.eventID, hooks: hooks, now: now)
            }
            if let reported = outcome.reportedStatus {
                verified += try await Self.recordReported(
                    reported, by: check.eventID, now: now, policy: policy, hooks: hooks, node: node, connection, logger)
            }
            return AppliedAnswer(
                state: machine.state, outcome: outcome.attemptOutcome, detail: outcome.attemptDetail, verified: verified)
        }
    }

    // MARK: - The machine's state in rows

    static func verification(_ connection: PostgresConnection, _ logger: Logger, _ eventID: String) async throws
        -> EventVerification?
    {
        guard
            let row = try await connection.query(
                """
                SELECT kind, status, payop_state, state, rejection_reason, legacy, received_at, check_attempts,
                       next_check_at, watch_until
                FROM events WHERE id = \(eventID)
                """, logger: logger
            ).collect().first?.makeRandomAccess(),
            let kind = IPNKind(rawValue: try row.value("kind")),
            let state = VerificationState(name: try row.value("state"), reason: try row.value("rejection_reason"))
        else { return nil }
        return EventVerification(
            kind: kind, status: PaymentStatus(name: try row.value("status"), payopState: try row.optionalInt("payop_state")),
            receivedAt: try row.value("received_at"), legacy: try row.value("legacy"), state: state,
            attempts: try row.int("check_attempts"), nextCheckAt: try row.value("next_check_at"),
            watchUntil: try row.value("watch_until"))
    }

    /// The distinct claims of the event's accepted copies, each with its first receipt, newest first:
    /// Payop repeats the genuine copy, so forged copies sent before it cannot push it out of the list.
    static func claims(_ connection: PostgresConnection, _ logger: Logger, _ eventID: String) async throws -> [IPNClaim] {
        try await connection.query(
            """
            SELECT min(id) AS id, claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id
            FROM receipts WHERE event_id = \(eventID) AND answer = 200
            GROUP BY claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id
            ORDER BY 1 DESC LIMIT 100
            """, logger: logger
        ).collect().map { row in
            let (id, order, amount, currency, invoice, transaction) = try row.decode(
                (Int64, String?, String?, String?, String?, String?).self)
            return IPNClaim(
                receiptID: id, orderID: order, amount: amount, currency: currency, invoiceID: invoice,
                transactionID: transaction)
        }
    }

    /// Writes what a transition returned: the state, the schedule and, on verification, Payop's facts.
    /// `releaseClaimOf`: the node whose question this answers; its claim on the event ends (another
    /// node's claim, taken after this one's lapsed, stands).
    static func persist(
        _ machine: EventVerification, eventID: String, facts: VerifiedFacts?, now: Int64, releaseClaimOf node: String?,
        _ connection: PostgresConnection, _ logger: Logger
    ) async throws {
        let state = machine.state.name
        try await connection.query(
            """
            UPDATE events SET state = \(state), rejection_reason = \(machine.state.reason?.rawValue),
                check_attempts = \(Int64(machine.attempts)), next_check_at = \(machine.nextCheckAt),
                watch_until = \(machine.watchUntil),
                verification = CASE WHEN \(state) = 'verified' THEN COALESCE(verification, 'payop_api') ELSE NULL END,
                verified_at = CASE WHEN \(state) = 'verified' THEN COALESCE(verified_at, \(now)) ELSE NULL END,
                check_claimed_until = CASE WHEN check_claimed_by = \(node) THEN NULL ELSE check_claimed_until END,
                check_claimed_by = CASE WHEN check_claimed_by = \(node) THEN NULL ELSE check_claimed_by END
            WHERE id = \(eventID)
            """, logger: logger)
        guard let facts else { return }
        try await connection.query(
            """
            UPDATE events SET transaction_id = \(facts.transactionID), invoice_id = \(facts.invoiceID),
                order_id = \(facts.orderID), amount = \(facts.amount), currency = \(facts.currency),
                error_message = \(facts.errorMessage), payop_state = COALESCE(\(facts.payopState), payop_state),
                first_receipt = \(facts.receiptID), source = COALESCE(\(facts.source), source)
            WHERE id = \(eventID)
            """, logger: logger)
    }

    /// Payop reported another status of the entity than `asker`'s: that status is verified as its own
    /// event, as if its IPN had arrived (created when the log lacks it). The caller holds the entity's
    /// rows; an IPN of that status arriving meanwhile on another daemon is found by ON CONFLICT.
    static func recordReported(
        _ record: PayopRecord, by asker: String, now: Int64, policy: VerificationPolicy, hooks: [HookConfig],
        node: String, _ connection: PostgresConnection, _ logger: Logger
    ) async throws -> [VerifiedEvent] {
        let detail = "Payop reported it when asked about \(asker)"
        let (machine, facts) = EventVerification.reported(record, now: now, policy: policy)
        let candidate = SortableID.make(prefix: Event.idPrefix, millisecondsSince1970: now)
        let inserted = try await connection.query(
            """
            INSERT INTO events (id, kind, entity_id, status, status_key, payop_state, state, source, verification,
                                transaction_id, invoice_id, order_id, refund_id, withdrawal_id, amount, currency,
                                error_message, legacy, received_at, verified_at, first_receipt, next_check_at,
                                check_attempts, watch_until)
            VALUES (\(candidate), \(record.kind.rawValue), \(record.id), \(record.status.name),
                    \(record.status.dedupeKey), \(record.status.payopState.map(Int64.init)), \(machine.state.name),
                    'reconcile', 'payop_api', \(facts.transactionID), \(facts.invoiceID), \(facts.orderID),
                    \(record.kind == .refund ? record.id : nil), \(record.kind == .withdrawal ? record.id : nil),
                    \(facts.amount), \(facts.currency), \(facts.errorMessage), false, \(now), \(now), NULL,
                    \(machine.nextCheckAt), \(Int64(machine.attempts)), \(machine.watchUntil))
            ON CONFLICT (kind, entity_id, status_key) DO NOTHING
            RETURNING id
            """, logger: logger
        ).collect().first?.decode(String.self)
        if let inserted {
            try await attempt(connection, logger, inserted, now, "verified", record.status.payopState, detail, node: node)
            return try await verifiedEvent(connection, logger, inserted, hooks: hooks, now: now)
        }
        guard
            let existing = try await connection.query(
                """
                SELECT id FROM events WHERE kind = \(record.kind.rawValue) AND entity_id = \(record.id)
                AND status_key = \(record.status.dedupeKey) FOR UPDATE
                """, logger: logger
            ).collect().first?.decode(String.self),
            var machine = try await verification(connection, logger, existing),
            let facts = machine.reportedByPayop(
                record, claims: try await claims(connection, logger, existing), now: now, policy: policy)
        else { return [] }
        try await attempt(connection, logger, existing, now, "verified", record.status.payopState, detail, node: node)
        try await persist(machine, eventID: existing, facts: facts, now: now, releaseClaimOf: nil, connection, logger)
        return try await verifiedEvent(connection, logger, existing, hooks: hooks, now: now)
    }

    /// The outbox entries of an event that just became verified, and the event as its hooks will see it.
    static func verifiedEvent(
        _ connection: PostgresConnection, _ logger: Logger, _ eventID: String, hooks: [HookConfig], now: Int64
    ) async throws -> [VerifiedEvent] {
        let created = try await enqueueDeliveries(connection, logger, eventID: eventID, hooks: hooks, now: now)
        guard
            let row = try await connection.query(
                "SELECT kind, status, received_at FROM events WHERE id = \(eventID)", logger: logger
            ).collect().first
        else { return [] }
        let (kind, status, receivedAt) = try row.decode((String, String, Int64).self)
        return [VerifiedEvent(eventID: eventID, type: "\(kind).\(status)", receivedAt: receivedAt, deliveries: created.count)]
    }

    static func attempt(
        _ connection: PostgresConnection, _ logger: Logger, _ eventID: String, _ at: Int64, _ outcome: String,
        _ state: Int?, _ detail: String?, node: String
    ) async throws {
        try await connection.query(
            """
            INSERT INTO verification_attempts (event_id, at, outcome, payop_state, detail, node_id)
            VALUES (\(eventID), \(at), \(outcome), \(state.map(Int64.init)), \(detail), \(node))
            """, logger: logger)
    }
}
