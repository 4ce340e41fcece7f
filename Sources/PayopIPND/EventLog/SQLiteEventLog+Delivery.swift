import Foundation
import GRDB

/// One hook's delivery of one event (DESIGN.md's delivery object).
public struct Delivery: Sendable, Equatable, Encodable {
    public var id: Int64
    public var eventID: String
    public var hook: String
    public var state: String
    public var attempts: Int
    public var nextAttemptAt: Int64?
    public var lastExitCode: Int?
    public var lastHTTPStatus: Int?
    public var lastError: String?
    public var output: String?
    public var deliveredAt: Int64?

    static let columns = """
        id, event_id, hook, state, attempts, next_attempt_at, last_exit_code, last_http_status, last_error, output,
        delivered_at
        """

    /// A delivery just created: pending, never tried.
    init(id: Int64, eventID: String, hook: String, nextAttemptAt: Int64) {
        self.id = id
        self.eventID = eventID
        self.hook = hook
        state = "pending"
        attempts = 0
        self.nextAttemptAt = nextAttemptAt
    }

    init(row: Row) {
        id = row["id"]
        eventID = row["event_id"]
        hook = row["hook"]
        state = row["state"]
        attempts = row["attempts"]
        let next: Int64 = row["next_attempt_at"]
        nextAttemptAt = (state == "pending") ? next : nil
        lastExitCode = row["last_exit_code"]
        lastHTTPStatus = row["last_http_status"]
        lastError = row["last_error"]
        output = row["output"]
        deliveredAt = row["delivered_at"]
    }

    enum CodingKeys: String, CodingKey {
        case id, eventID = "event_id", hook, state, attempts, nextAttemptAt = "next_attempt_at"
        case lastExitCode = "last_exit_code", lastHTTPStatus = "last_http_status", lastError = "last_error", output
        case deliveredAt = "delivered_at"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(eventID, forKey: .eventID)
        try c.encode(hook, forKey: .hook)
        try c.encode(state, forKey: .state)
        try c.encode(attempts, forKey: .attempts)
        try c.encode(nextAttemptAt.map { Timestamp.format(milliseconds: $0) }, forKey: .nextAttemptAt)
        try c.encode(lastExitCode, forKey: .lastExitCode)
        try c.encode(lastHTTPStatus, forKey: .lastHTTPStatus)
        try c.encode(lastError, forKey: .lastError)
        try c.encode(output, forKey: .output)
        try c.encode(deliveredAt.map { Timestamp.format(milliseconds: $0) }, forKey: .deliveredAt)
    }
}

extension SQLiteEventLog {
    /// The outbox: one pending delivery per matching hook for an event that just became verified, in the
    /// same transaction that verified it. A delivery that exists already is left as it is. Returns the
    /// new deliveries that may run at once (nothing earlier pending or running for their hook and
    /// entity), so the dispatcher can start them without looking them up again.
    @discardableResult
    static func enqueueDeliveries(_ db: Database, eventID: String, hooks: [HookConfig], now: Int64) throws -> [Delivery]
    {
        guard !hooks.isEmpty,
            let row = try Row.fetchOne(
                db.cachedStatement(
                    sql: "SELECT kind, entity_id, status FROM events WHERE id = ? AND state = 'verified'"),
                arguments: [eventID])
        else { return [] }
        let kind: String = row["kind"]
        let entity: String = row["entity_id"]
        let type = "\(kind).\(row["status"] as String)"
        var ready: [Delivery] = []
        for hook in hooks where hook.matches(type: type) {
            try db.cachedStatement(
                sql: """
                    INSERT OR IGNORE INTO deliveries (event_id, hook, kind, entity_id, state, next_attempt_at, created_at)
                    VALUES (?, ?, ?, ?, 'pending', ?, ?)
                    """
            ).execute(arguments: [eventID, hook.name, kind, entity, now, now])
            guard db.changesCount == 1 else { continue }
            let id = db.lastInsertedRowID
            let blocked =
                try Bool.fetchOne(
                    db.cachedStatement(
                        sql: """
                            SELECT EXISTS (SELECT 1 FROM deliveries WHERE hook = ? AND kind = ? AND entity_id = ? AND id < ?
                                           AND state IN ('pending', 'running'))
                            """), arguments: [hook.name, kind, entity, id]) ?? true
            if !blocked { ready.append(Delivery(id: id, eventID: eventID, hook: hook.name, nextAttemptAt: now)) }
        }
        return ready
    }

    /// At start: a delivery that was running when the daemon died runs again.
    @discardableResult
    public func recoverInterruptedDeliveries(now: Int64) async throws(EventLogError) -> Int {
        try await write { db in
            try db.cachedStatement(
                sql: "UPDATE deliveries SET state = 'pending', next_attempt_at = ? WHERE state = 'running'"
            ).execute(arguments: [now])
            return db.changesCount
        }
    }

    /// Pending deliveries due at `now` whose (hook, kind, entity) has nothing earlier still pending or
    /// running: a later status never overtakes an earlier one.
    public func dueDeliveries(now: Int64, limit: Int) async throws(EventLogError) -> [Delivery] {
        try await read { db in
            try Row.fetchAll(
                db.cachedStatement(
                    sql: """
                        SELECT \(Delivery.columns) FROM deliveries AS d
                        WHERE d.state = 'pending' AND d.next_attempt_at <= ?
                        AND NOT EXISTS (
                            SELECT 1 FROM deliveries AS e
                            WHERE e.hook = d.hook AND e.kind = d.kind AND e.entity_id = d.entity_id AND e.id < d.id
                            AND e.state IN ('pending', 'running'))
                        ORDER BY d.next_attempt_at, d.id LIMIT ?
                        """), arguments: [now, limit]
            ).map(Delivery.init(row:))
        }
    }

    public func nextDeliveryDue() async throws(EventLogError) -> Int64? {
        try await read { db in
            try Int64.fetchOne(
                db.cachedStatement(sql: "SELECT min(next_attempt_at) FROM deliveries WHERE state = 'pending'"))
        }
    }

    /// Marks a delivery running as attempt `attempt`; false when it was no longer pending (replayed or
    /// finished meanwhile).
    @discardableResult
    public func startDelivery(id: Int64, attempt: Int) async throws(EventLogError) -> Bool {
        try await write { db in
            try db.cachedStatement(
                sql: "UPDATE deliveries SET state = 'running', attempts = ? WHERE id = ? AND state = 'pending'"
            ).execute(arguments: [attempt, id])
            return db.changesCount == 1
        }
    }

    public enum DeliveryEnd: Sendable, Equatable {
        case delivered
        case retry(at: Int64)
        case dead
    }

    public func finishDelivery(id: Int64, attempt: Int, _ end: DeliveryEnd, result: HookResult, now: Int64)
        async throws(EventLogError)
    {
        try await write { db in
            let (state, next): (String, Int64) =
                switch end {
                case .delivered: ("delivered", now)
                case .retry(let at): ("pending", at)
                case .dead: ("dead", now)
                }
            try db.cachedStatement(
                sql: """
                    UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, last_exit_code = ?,
                        last_http_status = ?, last_error = ?, output = ?, finished_at = ?,
                        delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END
                    WHERE id = ?
                    """
            ).execute(arguments: [
                state, attempt, next, result.exitCode, result.httpStatus, result.error, result.output, now, state, now,
                id,
            ])
        }
    }

    /// `replay`: delivers an event again to every matching hook (or one), whatever its deliveries' state,
    /// creating deliveries for hooks added since. Returns how many deliveries are now pending.
    public func replay(eventID: String, hook: String?, hooks: [HookConfig], now: Int64) async throws(EventLogError)
        -> Int
    {
        try await write { db in
            guard
                let state = try String.fetchOne(
                    db.cachedStatement(sql: "SELECT state FROM events WHERE id = ?"), arguments: [eventID])
            else { throw EventLogError(.noSuchRecord, "no event \(eventID): list them with 'payop-ipnd events list'") }
            guard state == "verified" else {
                throw EventLogError(.noSuchRecord, "event \(eventID) is \(state), not verified: it is never delivered")
            }
            let chosen = hooks.filter { hook == nil || $0.name == hook }
            try Self.enqueueDeliveries(db, eventID: eventID, hooks: chosen, now: now)
            var arguments: StatementArguments = [now, eventID]
            var filter = ""
            if let hook {
                filter = " AND hook = ?"
                arguments += [hook]
            }
            try db.execute(
                sql: """
                    UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL
                    WHERE event_id = ? AND state <> 'running'\(filter)
                    """, arguments: arguments)
            return try Int.fetchOne(
                db, sql: "SELECT count(*) FROM deliveries WHERE event_id = ? AND state = 'pending'\(filter)",
                arguments: hook.map { [eventID, $0] } ?? [eventID]) ?? 0
        }
    }

    public func deliveries(state: String?, hook: String?, eventID: String? = nil, limit: Int)
        async throws(EventLogError)
        -> [Delivery]
    {
        try await read { db in
            var conditions = SQLFilter()
            conditions.add("state = ?", state)
            conditions.add("hook = ?", hook)
            conditions.add("event_id = ?", eventID)
            return try Row.fetchAll(
                db,
                sql: "SELECT \(Delivery.columns) FROM deliveries \(conditions.whereClause) ORDER BY id DESC LIMIT ?",
                arguments: conditions.arguments + [limit]
            ).map(Delivery.init(row:))
        }
    }
}

extension SQLiteEventLog {
    public struct DeliveryCounts: Sendable, Equatable {
        public var pending: Int
        public var running: Int
        public var dead: Int
    }

    public func deliveryCounts() async throws(EventLogError) -> DeliveryCounts {
        try await read { db in
            let rows = try Row.fetchAll(
                db.cachedStatement(
                    sql:
                        "SELECT state, count(*) AS n FROM deliveries WHERE state IN ('pending', 'running', 'dead') GROUP BY state"
                ))
            var counts = DeliveryCounts(pending: 0, running: 0, dead: 0)
            for row in rows {
                switch row["state"] as String {
                case "pending": counts.pending = row["n"]
                case "running": counts.running = row["n"]
                default: counts.dead = row["n"]
                }
            }
            return counts
        }
    }
}
