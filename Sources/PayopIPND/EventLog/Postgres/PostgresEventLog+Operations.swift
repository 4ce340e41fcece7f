import Foundation
import Logging
import PostgresNIO

/// What the console and the command-line tools ask of the shared log: the SQLite log's queries, in
/// PostgreSQL's words (optional filters as `$n IS NULL OR ...`, so every value stays a bound parameter).
extension PostgresEventLog: EventLog {
    public var location: String { configuration.displayName }

    static let readinessTimeout = Duration.seconds(3)

    /// A writable primary: a standby (`pg_is_in_recovery`) or a lost server cannot take IPNs.
    /// Answers within `readinessTimeout`, so `/readyz` and the watchdog never hang on a lost server.
    public func checkWritable() async throws(EventLogError) {
        let standby = try await read("cannot check the event log", timeout: Self.readinessTimeout) { connection, logger in
            try await connection.query("SELECT pg_is_in_recovery()", logger: logger).collect().first?.decode(Bool.self)
        }
        if let problem = sessionProblem { throw EventLogError(.unavailable, problem) }
        if standby == true {
            throw EventLogError(
                .unavailable, "\(location) is a standby in recovery: point storage.url at the primary")
        }
    }

    public func events(_ filter: EventFilter) async throws(EventLogError) -> [Event] {
        try await read("cannot read the event log") { connection, logger in
            // No index on the searched ids (each would cost every ingest a write): a search scans.
            try await connection.query(
                """
                \(unescaped: Event.select)
                WHERE (\(filter.type)::text IS NULL OR events.kind || '.' || events.status = \(filter.type))
                AND (\(filter.status)::text IS NULL OR events.status = \(filter.status))
                AND (\(filter.state)::text IS NULL OR events.state = \(filter.state))
                AND (\(filter.since)::bigint IS NULL OR events.received_at >= \(filter.since))
                AND (\(filter.query)::text IS NULL OR \(filter.query) IN (events.id, events.order_id,
                     events.transaction_id, events.invoice_id, events.refund_id, events.withdrawal_id, events.entity_id))
                AND (\(filter.before?.receivedAt)::bigint IS NULL
                     OR (events.received_at, events.id) < (\(filter.before?.receivedAt), \(filter.before?.id)::text))
                ORDER BY events.received_at DESC, events.id DESC LIMIT \(Int64(filter.limit))
                """, logger: logger
            ).collect().map { try Event(postgres: $0.makeRandomAccess()) }
        }
    }

    public func deliveryCounts() async throws(EventLogError) -> DeliveryCounts {
        try await read("cannot read the event log") { connection, logger in
            var counts = DeliveryCounts(pending: 0, running: 0, dead: 0)
            for row in try await connection.query(
                "SELECT state, count(*) FROM deliveries WHERE state IN ('pending', 'running', 'dead') GROUP BY state",
                logger: logger
            ).collect() {
                let (state, n) = try row.decode((String, Int64).self)
                switch DeliveryState(rawValue: state) {
                case .pending: counts.pending = Int(n)
                case .running: counts.running = Int(n)
                default: counts.dead = Int(n)
                }
            }
            return counts
        }
    }

    public func deadDeliveriesByHook() async throws(EventLogError) -> [String: Int] {
        try await read("cannot read the event log") { connection, logger in
            var counts: [String: Int] = [:]
            for row in try await connection.query(
                "SELECT hook, count(*) FROM deliveries WHERE state = 'dead' GROUP BY hook", logger: logger
            ).collect() {
                let (hook, n) = try row.decode((String, Int64).self)
                counts[hook, default: 0] += Int(n)
            }
            return counts
        }
    }

    public func overview(now: Int64) async throws(EventLogError) -> EventLogOverview {
        let counts = try await deliveryCounts()
        return try await read("cannot read the event log") { connection, logger in
            let hour = now - 3_600_000
            let day = now - 86_400_000
            var overview = EventLogOverview(deliveries: counts)
            if let row = try await connection.query(
                """
                SELECT count(*) FILTER (WHERE received_at >= \(hour) AND answer = 200),
                       count(*) FILTER (WHERE answer = 200), count(*) FILTER (WHERE answer <> 200)
                FROM receipts WHERE received_at >= \(day)
                """, logger: logger
            ).collect().first {
                let (inHour, inDay, refused) = try row.decode((Int64, Int64, Int64).self)
                (overview.ipnsLastHour, overview.ipnsLastDay, overview.refusedLastDay) =
                    (Int(inHour), Int(inDay), Int(refused))
            }
            if let row = try await connection.query(
                """
                SELECT count(*) FILTER (WHERE received_at >= \(hour)), count(*), 
                       (SELECT count(*) FROM events WHERE state = 'received'),
                       (SELECT max(received_at) FROM receipts WHERE answer = 200)
                FROM events WHERE received_at >= \(day)
                """, logger: logger
            ).collect().first {
                let (inHour, inDay, waiting, last) = try row.decode((Int64, Int64, Int64, Int64?).self)
                (overview.eventsLastHour, overview.eventsLastDay) = (Int(inHour), Int(inDay))
                overview.awaitingVerification = Int(waiting)
                overview.lastIPNAt = last
            }
            if let row = try await connection.query(
                "SELECT at, outcome FROM verification_attempts ORDER BY id DESC LIMIT 1", logger: logger
            ).collect().first {
                (overview.lastVerificationAt, overview.lastVerificationOutcome) = try row.decode((Int64, String).self)
            }
            var perMinute = [Int](repeating: 0, count: 1440)
            for row in try await connection.query(
                """
                SELECT (received_at - \(day) - 1) / 60000 AS minute, count(*) FROM receipts
                WHERE received_at > \(day) AND received_at <= \(now) AND answer = 200 GROUP BY minute
                """, logger: logger
            ).collect() {
                let (minute, n) = try row.decode((Int64, Int64).self)
                if perMinute.indices.contains(Int(minute)) { perMinute[Int(minute)] = Int(n) }
            }
            overview.ipnsPerMinute = perMinute
            return overview
        }
    }

    public func replayDead(hook: String, now: Int64) async throws(EventLogError) -> Int {
        let node = nodeID
        return try await transaction("the event log could not record the replay") { connection, logger in
            let dead = try await connection.query(
                """
                SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries WHERE state = 'dead' AND hook = \(hook)
                ORDER BY id FOR UPDATE
                """, logger: logger
            ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
            var pending = 0
            for delivery in dead where try await Self.replay(delivery, now: now, node: node, connection, logger) { pending += 1 }
            if pending > 0 { try await Self.notify(.deliver, connection, logger) }
            return pending
        }
    }

    public func prune(before cutoff: Int64) async throws(EventLogError) -> PruneResult {
        try await transaction("the event log could not prune") { connection, logger in
            let receipts = try await connection.query(
                """
                WITH gone AS (
                    DELETE FROM receipts WHERE received_at < \(cutoff)
                    AND NOT EXISTS (SELECT 1 FROM events WHERE events.first_receipt = receipts.id)
                    RETURNING 1)
                SELECT count(*) FROM gone
                """, logger: logger
            ).collect().first?.decode(Int64.self) ?? 0
            try await connection.query(
                """
                DELETE FROM delivery_attempts WHERE delivery_id IN
                    (SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < \(cutoff))
                """, logger: logger)
            let deliveries = try await connection.query(
                """
                WITH gone AS (
                    DELETE FROM deliveries WHERE state = 'delivered' AND finished_at < \(cutoff) RETURNING 1)
                SELECT count(*) FROM gone
                """, logger: logger
            ).collect().first?.decode(Int64.self) ?? 0
            return PruneResult(receipts: Int(receipts), deliveries: Int(deliveries))
        }
    }
}
