import GRDB

/// What the merchant's console reads at a glance, and its one bulk action.
extension SQLiteEventLog {
    public func overview(now: Int64) async throws(EventLogError) -> EventLogOverview {
        let counts = try await deliveryCounts()
        return try await read { db in
            let hour = now - 3_600_000
            let day = now - 86_400_000
            var overview = EventLogOverview(deliveries: counts)
            let dayOfReceipts = try Self.firstReceiptID(stampedFrom: day, earlier: Self.receiptOrderSlack, db)
            if let row = try Row.fetchOne(
                db,
                sql: """
                    SELECT count(*) FILTER (WHERE received_at >= ? AND answer = 200) AS hour,
                           count(*) FILTER (WHERE answer = 200) AS day,
                           count(*) FILTER (WHERE answer <> 200) AS refused
                    FROM receipts WHERE id >= ? AND received_at >= ?
                    """, arguments: [hour, dayOfReceipts, day])
            {
                overview.ipnsLastHour = row["hour"]
                overview.ipnsLastDay = row["day"]
                overview.refusedLastDay = row["refused"]
            }
            if let row = try Row.fetchOne(
                db,
                sql: """
                    SELECT count(*) FILTER (WHERE received_at >= ?) AS hour, count(*) AS day
                    FROM events WHERE id >= ? AND received_at >= ?
                    """, arguments: [hour, SortableID.first(prefix: Event.idPrefix, millisecondsSince1970: day), day])
            {
                overview.eventsLastHour = row["hour"]
                overview.eventsLastDay = row["day"]
            }
            overview.awaitingVerification =
                try Int.fetchOne(db, sql: "SELECT count(*) FROM events WHERE state = 'received'") ?? 0
            overview.lastIPNAt = try Int64.fetchOne(
                db, sql: "SELECT received_at FROM receipts WHERE answer = 200 ORDER BY id DESC LIMIT 1")
            if let row = try Row.fetchOne(
                db, sql: "SELECT at, outcome FROM verification_attempts ORDER BY id DESC LIMIT 1")
            {
                overview.lastVerificationAt = row["at"]
                overview.lastVerificationOutcome = row["outcome"]
            }
            var perMinute = [Int](repeating: 0, count: 1440)
            let rows = try Row.fetchAll(
                db,
                sql: """
                    SELECT (received_at - ? - 1) / 60000 AS minute, count(*) AS n FROM receipts
                    WHERE id >= ? AND received_at > ? AND received_at <= ? AND answer = 200 GROUP BY minute
                    """, arguments: [day, dayOfReceipts, day, now])
            for row in rows {
                let minute: Int = row["minute"]
                if perMinute.indices.contains(minute) { perMinute[minute] = row["n"] }
            }
            overview.ipnsPerMinute = perMinute
            return overview
        }
    }

    static let deadByHookQuery =
        "SELECT hook, count(*) AS n FROM deliveries WHERE \(Delivery.byState) AND state = 'dead' GROUP BY hook"
    static let deadOfHookQuery =
        "SELECT \(Delivery.columns) FROM deliveries WHERE \(Delivery.byState) AND state = 'dead' AND hook = ? ORDER BY id"

    /// Dead deliveries per hook: what the console offers to replay in bulk.
    public func deadDeliveriesByHook() async throws(EventLogError) -> [String: Int] {
        try await read { db in
            let rows = try Row.fetchAll(
                db, sql: Self.deadByHookQuery)
            return Dictionary(rows.map { ($0["hook"] as String, $0["n"] as Int) }, uniquingKeysWith: +)
        }
    }

    /// Every dead delivery of `hook` runs again (after the merchant fixed the hook). Returns how many.
    public func replayDead(hook: String, now: Int64) async throws(EventLogError) -> Int {
        try await write { db in
            let dead = try Row.fetchAll(
                db, sql: Self.deadOfHookQuery,
                arguments: [hook]
            ).map(Delivery.init(row:))
            return try dead.filter { try Self.replay($0, now: now, in: db) }.count
        }
    }
}
