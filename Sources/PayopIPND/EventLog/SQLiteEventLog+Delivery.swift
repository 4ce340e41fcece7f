import Foundation
import GRDB
import Synchronization

extension Delivery {
    static let columnNames = [
        "id", "event_id", "hook", "state", "attempts", "next_attempt_at", "last_exit_code", "last_http_status",
        "last_error", "output", "delivered_at",
    ]
    static let columns = columnNames.joined(separator: ", ")
    /// `columns` of the table named `alias` in a query.
    static func columns(of alias: String) -> String { columnNames.map { "\(alias).\($0)" }.joined(separator: ", ") }

    /// The condition of `deliveries_by_state`, which holds every delivery not delivered: a query by
    /// state names it to be read along that index (SQLite does not infer it from `state = 'dead'`).
    static let byState = "state <> 'delivered'"

    /// A row of `columns`, read by position (as `Event(row:)`, and checked the same way in debug builds).
    init(row: some PositionalRow) {
        assert(
            row.names == Self.columnNames,
            "Delivery(row:) reads Delivery.columns by position")
        self.init(
            id: row.integer(required: 0), eventID: row.text(required: 1), hook: row.text(required: 2),
            state: DeliveryState(rawValue: row.text(required: 3)) ?? .pending,
            attempts: row.int(required: 4), nextAttemptAt: row.integer(5), lastExitCode: row.int(6),
            lastHTTPStatus: row.int(7), lastError: row.text(8), output: row.text(9), deliveredAt: row.integer(10))
    }

    var progress: DeliveryProgress {
        DeliveryProgress(state: state, attempts: attempts, nextAttemptAt: nextAttemptAt ?? 0)
    }
}

extension SQLiteEventLog {
    /// What the outbox needs of an event (`outboxEvent` reads it).
    struct OutboxEvent {
        var eventID: String
        var kind: String
        var entityID: String
        var status: String
        var type: String { "\(kind).\(status)" }
    }

    /// The event as the outbox needs it, with its verification state and when it was received: one read
    /// for the verification that just verified it and for `replay`.
    static func outboxEvent(_ db: Database, _ eventID: String) throws
        -> (event: OutboxEvent, state: String, receivedAt: Int64)?
    {
        try db.cachedStatement(sql: "SELECT kind, entity_id, status, state, received_at FROM events WHERE id = ?")
            .firstRow { $0.add(eventID) } read: { row in
                (
                    OutboxEvent(
                        eventID: eventID, kind: row.text(required: 0), entityID: row.text(required: 1),
                        status: row.text(required: 2)),
                    row.text(required: 3), row.integer(required: 4)
                )
            }
    }

    /// The outbox: one pending delivery per matching hook for an event the caller knows to be verified,
    /// in the caller's transaction (the one that verified it, or a replay's). A delivery that exists
    /// already is left as it is. Returns the deliveries created.
    @discardableResult
    static func enqueueDeliveries(_ db: Database, of event: OutboxEvent, hooks: [HookConfig], now: Int64) throws
        -> [Delivery]
    {
        let type = event.type
        let progress = DeliveryProgress.created(now: now)
        var created: [Delivery] = []
        for hook in hooks where hook.matches(type: type) {
            try db.cachedStatement(
                sql: """
                    INSERT OR IGNORE INTO deliveries (event_id, hook, kind, entity_id, state, attempts, next_attempt_at,
                                                      created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """
            ).run {
                $0.add(event.eventID)
                $0.add(hook.name)
                $0.add(event.kind)
                $0.add(event.entityID)
                $0.add(progress.state.rawValue)
                $0.add(progress.attempts)
                $0.add(progress.nextAttemptAt)
                $0.add(now)
            }
            guard db.changesCount == 1 else { continue }
            created.append(
                Delivery(
                    id: db.lastInsertedRowID, eventID: event.eventID, hook: hook.name, state: progress.state,
                    attempts: progress.attempts, nextAttemptAt: progress.nextAttemptAt))
        }
        return created
    }

    /// The outbox, and the runs of it `early` admits claimed in the same transaction.
    @discardableResult
    static func enqueueDeliveries(
        _ db: Database, of event: OutboxEvent, hooks: [HookConfig], now: Int64, early: EarlyClaims?
    ) throws -> [Delivery] {
        let created = try enqueueDeliveries(db, of: event, hooks: hooks, now: now)
        try early?.claim(created, now: now, in: db)
        return created
    }

    /// Head-of-line pending deliveries of the given hooks: nothing earlier of their (hook, kind, entity)
    /// is pending or running. Walked along `deliveries_due`, so that a query in due order stops at the
    /// first rows it needs: left to itself SQLite scanned every pending delivery (2 ms per dispatcher
    /// pass with 3,400 waiting, 0.05 ms this way), and a backlog slowed its own draining.
    private static let headOfLine = """
        FROM deliveries AS d INDEXED BY deliveries_due
        WHERE d.state = 'pending' AND d.hook IN (SELECT value FROM json_each(?)) AND \(nothingEarlier)
        """

    /// Nothing earlier of `d`'s (hook, kind, entity) is pending or running.
    private static let nothingEarlier = """
        NOT EXISTS (
            SELECT 1 FROM deliveries AS e
            WHERE e.hook = d.hook AND e.kind = d.kind AND e.entity_id = d.entity_id AND e.id < d.id
            AND e.state IN ('pending', 'running'))
        """

    /// Whether the delivery `?` is pending and first in line: `headOfLine`'s rule for one delivery.
    private static let firstInLine = """
        SELECT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.id = ? AND d.state = 'pending' AND \(nothingEarlier))
        """

    /// The hooks as a JSON array for `json_each`: every pass of the dispatcher binds the same set until
    /// a reload changes it, so the last one is kept (encoding it was 3 % of the Swift tasks' samples
    /// while IPNs came one at a time). Sorted: the dispatcher's list comes from a dictionary's keys,
    /// whose order differs between two dictionaries of the same keys.
    private static func hookList(_ unsorted: [String]) -> String {
        let hooks = unsorted.sorted()
        if let json = lastHookList.withLock({ $0.hooks == hooks ? $0.json : nil }) { return json }
        let json = String(decoding: (try? JSONEncoder().encode(hooks)) ?? Data("[]".utf8), as: UTF8.self)
        lastHookList.withLock { $0 = (hooks, json) }
        return json
    }

    private static let lastHookList = Mutex<(hooks: [String], json: String)>(([], "[]"))

    public func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery] {
        guard !hooks.isEmpty else { return [] }
        return try readInPlace { db in
            try db.cachedStatement(
                sql: """
                    SELECT \(Delivery.columns(of: "d")) \(Self.headOfLine) AND d.next_attempt_at <= ?
                    ORDER BY d.next_attempt_at, d.id LIMIT ?
                    """
            ).allRows {
                $0.add(Self.hookList(hooks))
                $0.add(now)
                $0.add(limit)
            } read: { Delivery(row: $0) }
        }
    }

    public func nextRunnableDelivery(hooks: [String]) async throws(EventLogError) -> Int64? {
        guard !hooks.isEmpty else { return nil }
        return try readInPlace { db in
            try db.cachedStatement(
                sql: "SELECT d.next_attempt_at \(Self.headOfLine) ORDER BY d.next_attempt_at LIMIT 1"
            ).firstRow { $0.add(Self.hookList(hooks)) } read: { $0.integer(0) } ?? nil
        }
    }

    /// The first run of `hook` that may start now, in the dispatcher's order (`runnableDeliveries`),
    /// if it is among the first `firstRunnableWindow` due deliveries of all hooks. It runs inside the
    /// writer's transaction, which every commit waits for: the walk is bounded, so that deliveries of
    /// other hooks ahead of it (a removed hook's, another hook's backlog) never make it long. Past the
    /// window nothing is handed over, and the dispatcher's pass finds the run on a reader. The walk
    /// stops at the first run that qualifies (usually the first row).
    static func firstRunnable(_ db: Database, hook: String, now: Int64) throws -> Delivery? {
        var found: Delivery?
        try db.cachedStatement(
            sql: """
                SELECT \(Delivery.columns) FROM deliveries INDEXED BY deliveries_due
                WHERE state = 'pending' AND next_attempt_at <= ?
                ORDER BY next_attempt_at, id LIMIT \(firstRunnableWindow)
                """
        ).forEachRow { $0.add(now) } _: { row in
            guard row.text(2) == hook else { return true }  // Delivery.columns: id, event_id, hook, ...
            let delivery = Delivery(row: row)
            guard try isFirstInLine(db, delivery.id) else { return true }
            found = delivery
            return false
        }
        return found
    }

    /// Due deliveries `firstRunnable` looks at, at most.
    static let firstRunnableWindow = 32

    static func delivery(_ db: Database, _ id: Int64) throws -> Delivery? {
        try db.cachedStatement(sql: "SELECT \(Delivery.columns) FROM deliveries WHERE id = ?").firstRow {
            $0.add(id)
        } read: { Delivery(row: $0) }
    }

    /// `firstInLine` for the delivery `id`.
    private static func isFirstInLine(_ db: Database, _ id: Int64) throws -> Bool {
        try db.cachedStatement(sql: firstInLine).firstRow { $0.add(id) } read: { $0.bool(0) ?? false } ?? false
    }

    static func saveProgress(_ progress: DeliveryProgress, id: Int64, in db: Database) throws {
        try db.cachedStatement(
            sql: "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ? WHERE id = ?"
        ).run {
            $0.add(progress.state.rawValue)
            $0.add(progress.attempts)
            $0.add(progress.nextAttemptAt)
            $0.add(id)
        }
    }

    public func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
        try await write { db in try Self.claim(db, id: id, now: now) }
    }

    /// Records the delivery's next attempt as running, if it may run now: pending, due, and first in
    /// line (the same rule the runnable list uses, checked where it is claimed).
    static func claim(_ db: Database, id: Int64, now: Int64) throws -> DeliveryClaim? {
        guard let delivery = try delivery(db, id) else { return nil }
        return try claim(db, current: delivery, now: now)
    }

    /// `claim(_:id:now:)` for a delivery the caller holds as it is in this transaction (read, or just
    /// made): not read again.
    static func claim(_ db: Database, current delivery: Delivery, now: Int64) throws -> DeliveryClaim? {
        guard try isFirstInLine(db, delivery.id) else { return nil }
        return try claim(db, firstInLine: delivery, now: now)
    }

    /// Records `delivery`'s next attempt as running, if it is due; the caller has read it, first in
    /// line, in this transaction.
    static func claim(_ db: Database, firstInLine delivery: Delivery, now: Int64) throws -> DeliveryClaim? {
        var delivery = delivery
        var progress = delivery.progress
        guard let attempt = progress.start(now: now),
            let event = try db.cachedStatement(sql: "\(Event.select) WHERE events.id = ?").firstRow({
                $0.add(delivery.eventID)
            }, read: { Event(row: $0) })
        else { return nil }
        try saveProgress(progress, id: delivery.id, in: db)
        delivery.state = progress.state
        delivery.attempts = progress.attempts
        return DeliveryClaim(delivery: delivery, attempt: attempt, event: event)
    }

    public func finishDelivery(
        id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
    ) async throws(EventLogError) -> DeliveryProgress.End? {
        let early = earlyClaims()
        return try await write(claiming: early) { db in
            guard let delivery = try Self.delivery(db, id) else { return nil }
            // Whatever became of the run (replayed meanwhile: nil), its slot may go to its hook's next
            // due run, claimed in this commit.
            var progress = delivery.progress
            guard
                let end = progress.finish(
                    attempt: attempt, outcome: result.outcome, maxAttempts: maxAttempts, backoff: backoff, now: now)
            else {
                try early?.claimNext(after: id, hook: delivery.hook, now: now, in: db)
                return nil
            }
            try db.cachedStatement(
                sql: """
                    UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, last_exit_code = ?,
                        last_http_status = ?, last_error = ?, output = ?, finished_at = ?,
                        delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END
                    WHERE id = ?
                    """
            ).run {
                $0.add(progress.state.rawValue)
                $0.add(progress.attempts)
                $0.add(progress.nextAttemptAt)
                $0.add(result.exitCode)
                $0.add(result.httpStatus)
                $0.add(result.error)
                $0.add(result.output)
                $0.add(now)
                $0.add(progress.state.rawValue)
                $0.add(now)
                $0.add(id)
            }
            if !progress.lastRunIsInRowOnly {
                try Self.record(DeliveryAttempt(deliveryID: id, attempt: attempt, result: result, now: now), in: db)
            }
            try early?.claimNext(after: id, hook: delivery.hook, now: now, in: db)
            return end
        }
    }

    /// A finished run in the runs' history.
    static func record(_ run: DeliveryAttempt, in db: Database) throws {
        try db.cachedStatement(
            sql: """
                INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, http_status,
                                               error, output)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """
        ).run { $0.add(run) }
    }

    /// Whether `run` is in the runs' history already, every field the same (as `DeliveryAttempt.history`
    /// compares them).
    static func isRecorded(_ run: DeliveryAttempt, in db: Database) throws -> Bool {
        try db.cachedStatement(
            sql: """
                SELECT EXISTS (SELECT 1 FROM delivery_attempts
                               WHERE delivery_id = ? AND attempt = ? AND finished_at = ? AND outcome = ?
                               AND exit_code IS ? AND http_status IS ? AND error IS ? AND output IS ?)
                """
        ).firstRow { $0.add(run) } read: { $0.bool(0) ?? false } ?? false
    }

    public func interruptDelivery(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) {
        try await write { db in
            guard var progress = try Self.delivery(db, id)?.progress else { return }
            progress.interrupt(attempt: attempt, now: now)
            try Self.saveProgress(progress, id: id, in: db)
        }
    }

    /// At start, under the log's lock: a delivery that was running when the last daemon died runs again.
    @discardableResult
    public func recoverInterruptedDeliveries(now: Int64) async throws(EventLogError) -> Int {
        try await write { db in
            let running = try Row.fetchAll(
                db, sql: Self.runningDeliveries
            ).map(Delivery.init(row:))
            for delivery in running {
                var progress = delivery.progress
                progress.recoverAfterCrash(now: now)
                try Self.saveProgress(progress, id: delivery.id, in: db)
            }
            return running.count
        }
    }

    public func orphanedDeliveries(configured: [String]) async throws(EventLogError) -> [String: Int] {
        try await read { db in
            let rows = try Row.fetchAll(
                db.cachedStatement(
                    sql: """
                        SELECT hook, count(*) AS n FROM deliveries
                        WHERE state = 'pending' AND hook NOT IN (SELECT value FROM json_each(?))
                        GROUP BY hook
                        """), arguments: [Self.hookList(configured)])
            return Dictionary(rows.map { ($0["hook"] as String, $0["n"] as Int) }, uniquingKeysWith: +)
        }
    }

    /// `replay`: delivers an event again to every matching hook (or one), whatever its deliveries' state,
    /// creating deliveries for hooks added since. Returns how many deliveries are now pending.
    public func replay(eventID: String, hook: String?, hooks: [HookConfig], now: Int64) async throws(EventLogError)
        -> Int
    {
        try await write { db in
            guard let (event, state, _) = try Self.outboxEvent(db, eventID) else {
                throw EventLogError(.noSuchRecord, "no event \(eventID): list them with 'payop-ipnd events list'")
            }
            guard state == VerificationState.verified.name else {
                throw EventLogError(.noSuchRecord, "event \(eventID) is \(state), not verified: it is never delivered")
            }
            let chosen = hooks.filter { hook == nil || $0.name == hook }
            try Self.enqueueDeliveries(db, of: event, hooks: chosen, now: now)
            var pending = 0
            let deliveries = try Row.fetchAll(
                db, sql: "SELECT \(Delivery.columns) FROM deliveries WHERE event_id = ? ORDER BY id", arguments: [eventID]
            ).map(Delivery.init(row:))
            // Only configured hooks: a removed hook's delivery would wait forever, and the person was told
            // it runs now.
            let configured = Set(hooks.map(\.name))
            for delivery in deliveries where (hook == nil || delivery.hook == hook) && configured.contains(delivery.hook) {
                if try Self.replay(delivery, now: now, in: db) { pending += 1 }
            }
            return pending
        }
    }

    /// One delivery due again now (a running one keeps running); true when it is pending.
    static func replay(_ delivery: Delivery, now: Int64, in db: Database) throws -> Bool {
        var progress = delivery.progress
        progress.replay(now: now)
        guard progress.state == .pending else { return false }
        // The row starts over: a run only it recorded goes to the history first (unless an earlier
        // version's daemon, sharing the log while it was upgraded, recorded it there too).
        if let run = DeliveryAttempt(inRowOf: delivery), try !isRecorded(run, in: db) { try record(run, in: db) }
        try saveProgress(progress, id: delivery.id, in: db)
        try db.execute(sql: "UPDATE deliveries SET last_error = NULL WHERE id = ?", arguments: [delivery.id])
        return true
    }

    /// Newest first; `deadFirst` puts the dead ones (what needs a person) before the rest.
    public func deliveries(state: String?, hook: String?, eventID: String? = nil, deadFirst: Bool = false, limit: Int)
        async throws(EventLogError)
        -> [Delivery]
    {
        let (sql, arguments) = Self.deliveriesQuery(state: state, hook: hook, eventID: eventID, deadFirst: deadFirst)
        return try await read { db in
            try Row.fetchAll(db, sql: sql, arguments: arguments + [limit]).map(Delivery.init(row:))
        }
    }

    /// `deliveries`' query, without its limit.
    static func deliveriesQuery(state: String?, hook: String?, eventID: String?, deadFirst: Bool)
        -> (sql: String, arguments: StatementArguments)
    {
        var conditions = SQLFilter()
        conditions.add(Delivery.byState, when: state != nil && state != DeliveryState.delivered.rawValue)
        conditions.add("state = ?", state)
        conditions.add("hook = ?", hook)
        conditions.add("event_id = ?", eventID)
        let order = deadFirst ? "state = 'dead' DESC, id DESC" : "id DESC"
        return (
            "SELECT \(Delivery.columns) FROM deliveries \(conditions.whereClause) ORDER BY \(order) LIMIT ?",
            conditions.arguments
        )
    }

    /// The deliveries running when the last daemon stopped (`recoverInterruptedDeliveries`).
    static let runningDeliveries = "SELECT \(Delivery.columns) FROM deliveries WHERE \(Delivery.byState) AND state = 'running'"

    /// `deliveryCounts`' query.
    static let deliveryCountsQuery =
        "SELECT state, count(*) AS n FROM deliveries WHERE \(Delivery.byState) GROUP BY state"
}

extension RawParameters {
    /// Every field of `run`, in the order of `DeliveryAttempt.columns` (`record` and `isRecorded`).
    mutating func add(_ run: DeliveryAttempt) {
        add(run.deliveryID)
        add(run.attempt)
        add(run.finishedAt)
        add(run.outcome)
        add(run.exitCode)
        add(run.httpStatus)
        add(run.error)
        add(run.output)
    }
}

/// The runs one write claims early (`EarlyStarts`): handed to the dispatcher once the write's commit
/// is on disk, their slots given back when it is not. A run is never started before its claim is
/// durable, and a slot is never kept for a claim that was not committed.
final class EarlyClaims: Sendable {
    private let starts: any EarlyStarts
    private let claimed = Mutex<[DeliveryClaim]>([])

    init(_ starts: any EarlyStarts) { self.starts = starts }

    /// Claims each delivery the dispatcher admits, in the write's transaction, which has just made them
    /// (`enqueueDeliveries`). One it admitted but that may not run now (something earlier of its entity
    /// is pending or running) gets its slot back and stays pending for the dispatcher.
    func claim(_ deliveries: [Delivery], now: Int64, in db: Database) throws {
        for delivery in deliveries where starts.admit(id: delivery.id, hook: delivery.hook) {
            let claim: DeliveryClaim?
            do {
                claim = try SQLiteEventLog.claim(db, current: delivery, now: now)
            } catch {
                starts.withdraw([delivery.id])
                throw error
            }
            if let claim {
                claimed.withLock { $0.append(claim) }
            } else {
                starts.withdraw([delivery.id])
            }
        }
    }

    /// Run `finished` of `hook` has ended, in the transaction that records how: its slot goes to the
    /// hook's first run that may start now, claimed here, when the dispatcher hands it over
    /// (`EarlyStarts.handOver`). A backlog then drains one commit per run, without a pass of the
    /// dispatcher's own between two runs.
    ///
    /// The outcome does not depend on it. The read and the claim run in a savepoint of their own: one
    /// that fails on its own (not the database) is undone whole and left to the dispatcher, which meets
    /// the same error on its own path, and the outcome is written without it. A claim whose failure
    /// shows only at `COMMIT` fails the outcome's try too; the next try writes the outcome alone (the
    /// slot is no longer held, so nothing is handed over).
    func claimNext(after finished: Int64, hook: String, now: Int64, in db: Database) throws {
        // No read when nothing can be handed over (a later try of this outcome, the dispatcher stopping).
        guard starts.holdsSlot(of: finished) else {
            _ = starts.handOver(from: finished, to: nil, hook: hook)
            return
        }
        try db.cachedStatement(sql: "SAVEPOINT next_run").execute()
        var taken: Int64?
        do {
            let next = try SQLiteEventLog.firstRunnable(db, hook: hook, now: now)
            guard starts.handOver(from: finished, to: next?.id, hook: hook), let next else {
                try db.cachedStatement(sql: "RELEASE next_run").execute()
                return
            }
            taken = next.id
            let claim = try SQLiteEventLog.claim(db, firstInLine: next, now: now)
            try db.cachedStatement(sql: "RELEASE next_run").execute()
            // Kept only once its savepoint is: a claim rolled back is never started.
            if let claim { claimed.withLock { $0.append(claim) } } else { starts.withdraw([next.id]) }
        } catch let error as DatabaseError where GroupCommitWriter.failsTheBatch(error) {
            if let taken { starts.withdraw([taken]) }
            throw error
        } catch {
            if let taken { starts.withdraw([taken]) }
            _ = starts.handOver(from: finished, to: nil, hook: hook)
            try db.cachedStatement(sql: "ROLLBACK TO next_run").execute()
            try db.cachedStatement(sql: "RELEASE next_run").execute()
        }
    }

    /// The write is over: `committed` hands its claims to the dispatcher; otherwise (the write failed,
    /// or its group commit did) their slots are given back and the log holds none of them.
    func settle(committed: Bool) {
        let claims = claimed.withLock { claimed in
            defer { claimed.removeAll() }
            return claimed
        }
        guard !claims.isEmpty else { return }
        if committed {
            starts.start(claims)
        } else {
            starts.withdraw(claims.map(\.delivery.id))
        }
    }
}

extension SQLiteEventLog {
    public func deliveryCounts() async throws(EventLogError) -> DeliveryCounts {
        try await read { db in
            let rows = try Row.fetchAll(db.cachedStatement(sql: Self.deliveryCountsQuery))
            var counts = DeliveryCounts(pending: 0, running: 0, dead: 0)
            for row in rows {
                switch DeliveryState(rawValue: row["state"]) {
                case .pending: counts.pending = row["n"]
                case .running: counts.running = row["n"]
                default: counts.dead = row["n"]
                }
            }
            return counts
        }
    }
}
