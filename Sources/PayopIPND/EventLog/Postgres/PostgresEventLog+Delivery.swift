import Foundation
import Logging
import PostgresNIO

extension PostgresEventLog: DeliveryStore {
    /// The per-entity lock that orders deliveries across daemons. Creating deliveries takes it
    /// exclusively and claiming one takes it shared, so ids are handed out in commit order per entity
    /// and a claim never misses an earlier delivery that another daemon is creating.
    static let orderLock = "hashtextextended('payop-ipnd/order/' || current_schema() || '/' || "

    /// The outbox: one pending delivery per matching hook for an event that just became verified, in the
    /// same transaction that verified it. A delivery that exists already is left as it is. Returns the
    /// deliveries created.
    @discardableResult
    static func enqueueDeliveries(
        _ connection: PostgresConnection, _ logger: Logger, eventID: String, hooks: [HookConfig], now: Int64
    ) async throws -> [Delivery] {
        guard !hooks.isEmpty,
            let row = try await connection.query(
                "SELECT kind, entity_id, status FROM events WHERE id = \(eventID) AND state = 'verified'", logger: logger
            ).collect().first
        else { return [] }
        let (kind, entity, status) = try row.decode((String, String, String).self)
        let names = hooks.filter { $0.matches(type: "\(kind).\(status)") }.map(\.name)
        guard !names.isEmpty else { return [] }
        // Read to the end: a row-returning statement's error shows only once its rows are read.
        _ = try await connection.query(
            "SELECT pg_advisory_xact_lock(\(unescaped: orderLock)\(kind) || '/' || \(entity), 0))", logger: logger
        ).collect()
        let progress = DeliveryProgress.created(now: now)
        // In the hooks' order, so ids (the delivery order) follow the configuration as in the SQLite log.
        let created = try await connection.query(
            """
            INSERT INTO deliveries (event_id, hook, kind, entity_id, state, attempts, next_attempt_at, created_at)
            SELECT \(eventID), hook, \(kind), \(entity), \(progress.state.rawValue), \(Int64(progress.attempts)),
                   \(progress.nextAttemptAt), \(now)
            FROM unnest(\(names)::text[]) WITH ORDINALITY AS h (hook, n) ORDER BY n
            ON CONFLICT (event_id, hook) DO NOTHING
            RETURNING id, hook
            """, logger: logger
        ).collect().map { row in
            let (id, hook) = try row.decode((Int64, String).self)
            return Delivery(
                id: id, eventID: eventID, hook: hook, state: progress.state, attempts: progress.attempts,
                nextAttemptAt: progress.nextAttemptAt)
        }.sorted { $0.id < $1.id }
        if !created.isEmpty { try await notify(.deliver, connection, logger) }
        return created
    }

    /// Deliveries of the given hooks that could run: pending ones, and running ones whose claimer's
    /// lease has ended (another daemon died running them), with nothing earlier of their
    /// (hook, kind, entity) pending or running anywhere.
    private static let headOfLine = """
        FROM deliveries AS d
        WHERE d.hook = ANY($1::text[])
        AND (d.state = 'pending' OR (d.state = 'running' AND d.lease_until IS NOT NULL))
        AND NOT EXISTS (
            SELECT 1 FROM deliveries AS e
            WHERE e.hook = d.hook AND e.kind = d.kind AND e.entity_id = d.entity_id AND e.id < d.id
            AND e.state IN ('pending', 'running'))
        """

    /// When a head-of-line delivery may run: a pending one when due, a running one when its lease ends.
    private static let runnableAt = "CASE WHEN d.state = 'pending' THEN d.next_attempt_at ELSE d.lease_until END"

    public func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery] {
        guard !hooks.isEmpty else { return [] }
        return try await read("cannot read the event log") { connection, logger in
            var query: PostgresQuery = """
                SELECT d.id, d.event_id, d.hook, d.state, d.attempts, d.next_attempt_at, d.last_exit_code,
                       d.last_http_status, d.last_error, d.output, d.delivered_at
                \(unescaped: Self.headOfLine) AND \(unescaped: Self.runnableAt) <= $2
                ORDER BY \(unescaped: Self.runnableAt), d.id LIMIT $3
                """
            query.binds.append(hooks)
            query.binds.append(now)
            query.binds.append(Int64(limit))
            return try await connection.query(query, logger: logger).collect().map {
                try Delivery(postgres: $0.makeRandomAccess())
            }
        }
    }

    public func nextRunnableDelivery(hooks: [String]) async throws(EventLogError) -> Int64? {
        guard !hooks.isEmpty else { return nil }
        let node = nodeID
        return try await read("cannot read the event log") { connection, logger in
            // This daemon's own runs are not waited for: it renews their leases itself.
            var query: PostgresQuery = """
                SELECT min(\(unescaped: Self.runnableAt)) \(unescaped: Self.headOfLine)
                AND NOT (d.state = 'running' AND d.node_id = $2)
                """
            query.binds.append(hooks)
            query.binds.append(node)
            return try await connection.query(query, logger: logger).collect().first?.decode(Int64?.self)
        }
    }

    static func delivery(_ connection: PostgresConnection, _ logger: Logger, _ id: Int64, lock: String) async throws
        -> (delivery: Delivery, kind: String, entity: String, leaseUntil: Int64?)?
    {
        guard
            let row = try await connection.query(
                """
                SELECT \(unescaped: Delivery.postgresColumns), kind, entity_id, lease_until FROM deliveries WHERE id = \(id)
                \(unescaped: lock)
                """, logger: logger
            ).collect().first?.makeRandomAccess()
        else { return nil }
        return (
            try Delivery(postgres: row), try row.value("kind"), try row.value("entity_id"), try row.value("lease_until")
        )
    }

    /// Records the next attempt as running under this daemon's lease, if the delivery may run now: a
    /// pending one when due and first in line, or a running one whose claimer's lease has ended (the
    /// claimer is taken for dead: its run counts, as after a crash, and the hook runs again).
    public func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
        try requireSession()
        let node = nodeID
        let leaseEnd = now + configuration.deliveryLeaseMilliseconds
        return try await timedClaim("delivery") { () async throws(EventLogError) in
        try await transaction("the event log could not record the delivery's start") { connection, logger in
            // SKIP LOCKED: another daemon claiming or finishing it right now has it.
            guard let found = try await Self.delivery(connection, logger, id, lock: "FOR UPDATE SKIP LOCKED") else {
                return nil
            }
            var delivery = found.delivery
            let (kind, entity, leaseUntil) = (found.kind, found.entity, found.leaseUntil)
            _ = try await connection.query(
                "SELECT pg_advisory_xact_lock_shared(\(unescaped: Self.orderLock)\(kind) || '/' || \(entity), 0))",
                logger: logger
            ).collect()
            let earlier = try await connection.query(
                """
                SELECT EXISTS (
                    SELECT 1 FROM deliveries WHERE hook = \(delivery.hook) AND kind = \(kind) AND entity_id = \(entity)
                    AND id < \(id) AND state IN ('pending', 'running'))
                """, logger: logger
            ).collect().first?.decode(Bool.self) ?? true
            guard !earlier else { return nil }
            var progress = delivery.progress
            if delivery.state == .running {
                guard let leaseUntil, leaseUntil <= now else { return nil }
                progress.recoverAfterCrash(now: now)
            }
            guard let attempt = progress.start(now: now),
                let row = try await connection.query(
                    "\(unescaped: Event.select) WHERE events.id = \(delivery.eventID)", logger: logger
                ).collect().first
            else { return nil }
            try await connection.query(
                """
                UPDATE deliveries SET state = \(progress.state.rawValue), attempts = \(Int64(progress.attempts)),
                    next_attempt_at = \(progress.nextAttemptAt), lease_until = \(leaseEnd), node_id = \(node)
                WHERE id = \(id)
                """, logger: logger)
            delivery.state = progress.state
            delivery.attempts = progress.attempts
            delivery.nextAttemptAt = nil
            return DeliveryClaim(delivery: delivery, attempt: attempt, event: try Event(postgres: row.makeRandomAccess()))
        }
        }
    }

    /// Keeps attempt `attempt` this daemon's while its hook runs; false when it is no longer (the lease
    /// ended and another daemon took the delivery over, or it was finished or replayed).
    /// A third of the lease: two renewals may fail before another daemon takes the delivery over.
    public var leaseRenewal: Duration? { .milliseconds(max(configuration.deliveryLeaseMilliseconds / 3, 1)) }

    public func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool {
        let node = nodeID
        let leaseEnd = now + configuration.deliveryLeaseMilliseconds
        return try await transaction("the event log could not renew the delivery's lease") { connection, logger in
            try await connection.query(
                """
                UPDATE deliveries SET lease_until = \(leaseEnd)
                WHERE id = \(id) AND state = 'running' AND attempts = \(Int64(attempt)) AND node_id = \(node)
                RETURNING id
                """, logger: logger
            ).collect().count == 1
        }
    }

    public func finishDelivery(
        id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
    ) async throws(EventLogError) -> DeliveryProgress.End? {
        let node = nodeID
        return try await transaction("the event log could not record how the hook ended") { connection, logger in
            // Only this daemon's run: after a takeover and a replay, another daemon's run may carry the
            // same attempt number, and this late outcome must not stand for it.
            guard let found = try await Self.delivery(connection, logger, id, lock: "FOR UPDATE"),
                found.delivery.nodeID == node
            else { return nil }
            var progress = found.delivery.progress
            guard
                let end = progress.finish(
                    attempt: attempt, outcome: result.outcome, maxAttempts: maxAttempts, backoff: backoff, now: now)
            else { return nil }
            let state = progress.state.rawValue
            try await connection.query(
                """
                UPDATE deliveries SET state = \(state), attempts = \(Int64(progress.attempts)),
                    next_attempt_at = \(progress.nextAttemptAt), last_exit_code = \(result.exitCode.map(Int64.init)),
                    last_http_status = \(result.httpStatus.map(Int64.init)), last_error = \(result.error),
                    output = \(result.output), finished_at = \(now),
                    delivered_at = CASE WHEN \(state) = 'delivered' THEN \(now) ELSE delivered_at END,
                    lease_until = NULL
                WHERE id = \(id)
                """, logger: logger)
            if !progress.lastRunIsInRowOnly {
                try await Self.record(
                    DeliveryAttempt(deliveryID: id, attempt: attempt, result: result, now: now), node: node, connection,
                    logger)
            }
            // The next delivery of this (hook, kind, entity) may now run, on whichever daemon.
            if progress.state == .delivered || progress.state == .dead { try await Self.notify(.deliver, connection, logger) }
            return end
        }
    }

    /// A finished run in the runs' history; `node` ran it.
    static func record(_ run: DeliveryAttempt, node: String, _ connection: PostgresConnection, _ logger: Logger)
        async throws
    {
        try await connection.query(
            """
            INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, http_status, error,
                                           output, node_id)
            VALUES (\(run.deliveryID), \(Int64(run.attempt)), \(run.finishedAt), \(run.outcome),
                    \(run.exitCode.map(Int64.init)), \(run.httpStatus.map(Int64.init)), \(run.error), \(run.output),
                    \(node))
            """, logger: logger)
    }

    /// Whether `run` is in the runs' history already, every field the same (as `DeliveryAttempt.history`
    /// compares them).
    static func isRecorded(_ run: DeliveryAttempt, _ connection: PostgresConnection, _ logger: Logger) async throws
        -> Bool
    {
        try await connection.query(
            """
            SELECT EXISTS (SELECT 1 FROM delivery_attempts
                           WHERE delivery_id = \(run.deliveryID) AND attempt = \(Int64(run.attempt))
                           AND finished_at = \(run.finishedAt) AND outcome = \(run.outcome)
                           AND exit_code IS NOT DISTINCT FROM \(run.exitCode.map(Int64.init))::bigint
                           AND http_status IS NOT DISTINCT FROM \(run.httpStatus.map(Int64.init))::bigint
                           AND error IS NOT DISTINCT FROM \(run.error)::text
                           AND output IS NOT DISTINCT FROM \(run.output)::text)
            """, logger: logger
        ).collect().first?.decode(Bool.self) ?? false
    }

    public func interruptDelivery(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) {
        let node = nodeID
        try await transaction("the event log could not record the interrupted run") { connection, logger in
            guard let found = try await Self.delivery(connection, logger, id, lock: "FOR UPDATE"),
                found.delivery.nodeID == node
            else { return }
            var progress = found.delivery.progress
            progress.interrupt(attempt: attempt, now: now)
            try await Self.saveProgress(progress, id: id, connection, logger)
        }
    }

    static func saveProgress(_ progress: DeliveryProgress, id: Int64, _ connection: PostgresConnection, _ logger: Logger)
        async throws
    {
        try await connection.query(
            """
            UPDATE deliveries SET state = \(progress.state.rawValue), attempts = \(Int64(progress.attempts)),
                next_attempt_at = \(progress.nextAttemptAt),
                lease_until = CASE WHEN \(progress.state.rawValue) = 'running' THEN lease_until ELSE NULL END
            WHERE id = \(id)
            """, logger: logger)
    }

    /// At start, with this node's session lock held (no other daemon has its node id): runs this node
    /// left `running` when it died run again at once, as after a crash of the SQLite daemon, and the
    /// questions to Payop it had claimed are due again now rather than when their claims end; other
    /// nodes' runs and questions are theirs until their leases end. Returns the runs recovered.
    @discardableResult
    public func recoverInterruptedDeliveries(now: Int64) async throws(EventLogError) -> Int {
        let node = nodeID
        return try await transaction("the event log could not recover interrupted deliveries") { connection, logger in
            try await connection.query(
                """
                UPDATE events SET check_claimed_by = NULL, check_claimed_until = NULL, next_check_at = \(now)
                WHERE check_claimed_by = \(node) AND check_claimed_until > \(now)
                """, logger: logger)
            let running = try await connection.query(
                "SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries WHERE state = 'running' AND node_id = \(node) FOR UPDATE",
                logger: logger
            ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
            for delivery in running {
                var progress = delivery.progress
                progress.recoverAfterCrash(now: now)
                try await Self.saveProgress(progress, id: delivery.id, connection, logger)
            }
            return running.count
        }
    }

    public func orphanedDeliveries(configured: [String]) async throws(EventLogError) -> [String: Int] {
        try await read("cannot read the event log") { connection, logger in
            var counts: [String: Int] = [:]
            for row in try await connection.query(
                """
                SELECT hook, count(*) FROM deliveries WHERE state = 'pending' AND hook <> ALL(\(configured)::text[])
                GROUP BY hook
                """, logger: logger
            ).collect() {
                let (hook, n) = try row.decode((String, Int64).self)
                counts[hook, default: 0] += Int(n)
            }
            return counts
        }
    }

    /// `replay`: delivers an event again to every matching hook (or one), whatever its deliveries' state,
    /// creating deliveries for hooks added since. Returns how many deliveries are now pending.
    public func replay(eventID: String, hook: String?, hooks: [HookConfig], now: Int64) async throws(EventLogError)
        -> Int
    {
        let node = nodeID
        return try await transaction("the event log could not record the replay") { connection, logger in
            guard
                let state = try await connection.query(
                    "SELECT state FROM events WHERE id = \(eventID) FOR UPDATE", logger: logger
                ).collect().first?.decode(String.self)
            else { throw EventLogError(.noSuchRecord, "no event \(eventID): list them with 'payop-ipnd events list'") }
            guard state == VerificationState.verified.name else {
                throw EventLogError(.noSuchRecord, "event \(eventID) is \(state), not verified: it is never delivered")
            }
            let chosen = hooks.filter { hook == nil || $0.name == hook }
            try await Self.enqueueDeliveries(connection, logger, eventID: eventID, hooks: chosen, now: now)
            var pending = 0
            let deliveries = try await connection.query(
                "SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries WHERE event_id = \(eventID) ORDER BY id FOR UPDATE",
                logger: logger
            ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
            // Only configured hooks: a removed hook's delivery would wait forever, and the person was told
            // it runs now.
            let configured = Set(hooks.map(\.name))
            for delivery in deliveries where (hook == nil || delivery.hook == hook) && configured.contains(delivery.hook) {
                if try await Self.replay(delivery, now: now, node: node, connection, logger) { pending += 1 }
            }
            if pending > 0 { try await Self.notify(.deliver, connection, logger) }
            return pending
        }
    }

    /// One delivery due again now (a running one keeps running); true when it is pending.
    static func replay(
        _ delivery: Delivery, now: Int64, node: String, _ connection: PostgresConnection, _ logger: Logger
    )
        async throws -> Bool
    {
        var progress = delivery.progress
        progress.replay(now: now)
        guard progress.state == .pending else { return false }
        // The row starts over: a run only it recorded goes to the history first, as run by its claimer
        // (unless an earlier version's daemon, sharing the log while they were upgraded, recorded it there too).
        if let run = DeliveryAttempt(inRowOf: delivery), try await !isRecorded(run, connection, logger) {
            try await record(run, node: delivery.nodeID ?? node, connection, logger)
        }
        try await saveProgress(progress, id: delivery.id, connection, logger)
        try await connection.query("UPDATE deliveries SET last_error = NULL WHERE id = \(delivery.id)", logger: logger)
        return true
    }

    /// Newest first; `deadFirst` puts the dead ones (what needs a person) before the rest.
    public func deliveries(state: String?, hook: String?, eventID: String? = nil, deadFirst: Bool = false, limit: Int)
        async throws(EventLogError) -> [Delivery]
    {
        try await read("cannot read the event log") { connection, logger in
            try await connection.query(
                """
                SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries
                WHERE (\(state)::text IS NULL OR state = \(state)) AND (\(hook)::text IS NULL OR hook = \(hook))
                AND (\(eventID)::text IS NULL OR event_id = \(eventID))
                ORDER BY \(unescaped: deadFirst ? "state = 'dead' DESC, " : "")id DESC LIMIT \(Int64(limit))
                """, logger: logger
            ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
        }
    }
}
