import Foundation
import GRDB
import Logging
import PostgresNIO

/// `storage copy`: a stopped daemon's SQLite log moved into an empty PostgreSQL log, ids and times kept,
/// so every event, receipt and run reads the same on the shared log as it did on one machine (and what
/// hooks were told, event ids among it, stays true).
extension PostgresEventLog {
    /// One table's rows on both sides once copied.
    public struct CopyCount: Sendable, Equatable {
        public var table: String
        public var sqlite: Int
        public var postgresql: Int
    }

    /// Rows per INSERT: 500 events of 26 columns are 13,000 bound values, well under PostgreSQL's 65,535,
    /// and 100,000 receipts are 200 round trips (about 15 s in a debug build).
    public static let copyBatchSize = 500

    /// Copies every row of `source` into this log in one transaction: all of it, or nothing. Refuses a
    /// log that holds any event or receipt (ids would collide, and two histories would mix), and rolls
    /// back when the rows of a table differ on the two sides once copied. Returns those counts, read
    /// inside the transaction.
    public func copy(from source: SQLiteEventLog, batchSize: Int = copyBatchSize) async throws(EventLogError)
        -> [CopyCount]
    {
        let node = nodeID
        let now = clock.nowMilliseconds()
        let target = configuration.displayName
        let batch = max(batchSize, 1)
        return try await transaction("cannot copy the event log into \(target)") { connection, logger in
            // A daemon already pointed at this database waits for the copy (reads go on), so nothing of
            // its own lands between the copied rows or takes an id the copy is about to use.
            try await connection.query(
                "LOCK TABLE events, receipts, verification_attempts, deliveries, delivery_attempts IN EXCLUSIVE MODE",
                logger: logger)
            let held = try await connection.query(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM receipts)", logger: logger
            ).collect().first?.decode((Int64, Int64).self)
            if case let (events, receipts)? = held, events > 0 || receipts > 0 {
                throw EventLogError(
                    .inUse,
                    "the PostgreSQL event log at \(target) is not empty (\(events) events, \(receipts) receipts): "
                        + "storage copy writes only into an empty one (point storage.url at a new database); nothing "
                        + "was copied")
            }
            for table in CopiedTable.all {
                try await Self.copyRows(of: table, from: source, node: node, batchSize: batch, connection, logger)
            }
            try await Self.recoverRunningDeliveries(now: now, connection, logger)
            // Rows were written with their own ids: the next id each table hands out comes after them.
            for table in ["receipts", "verification_attempts", "deliveries", "delivery_attempts"] {
                try await connection.query(
                    """
                    SELECT setval(pg_get_serial_sequence('\(unescaped: table)', 'id'), COALESCE(max(id), 0) + 1, false)
                    FROM \(unescaped: table)
                    """, logger: logger)
            }
            var counts: [CopyCount] = []
            for table in CopiedTable.all {
                let name = table.name
                let sqlite = try await source.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM \(name)") ?? 0 }
                let postgresql = try await connection.query("SELECT count(*) FROM \(unescaped: name)", logger: logger)
                    .collect().first?.decode(Int64.self) ?? 0
                counts.append(CopyCount(table: name, sqlite: sqlite, postgresql: Int(postgresql)))
            }
            // Rows missing or extra: nothing is committed, and the message says where.
            let differing = counts.filter { $0.sqlite != $0.postgresql }
            guard differing.isEmpty else {
                throw EventLogError(
                    .unavailable,
                    "the copy would hold other counts than the SQLite log ("
                        + differing.map { "\($0.table): \($0.sqlite) in SQLite, \($0.postgresql) copied" }
                        .joined(separator: "; ") + "); nothing was copied")
            }
            return counts
        }
    }

    /// One table, page by page in rowid order: never more than one batch of the SQLite log in memory.
    private static func copyRows(
        of table: CopiedTable, from source: SQLiteEventLog, node: String, batchSize: Int,
        _ connection: PostgresConnection, _ logger: Logger
    ) async throws {
        try await source.read { db in try table.checkColumns(db) }
        var after = Int64.min
        while true {
            let from = after
            guard let page = try await source.read({ db in try table.page(db, after: from, limit: batchSize, node: node) })
            else { return }
            try await connection.query(page.insert, logger: logger)
            after = page.lastRowID
        }
    }

    /// What the SQLite daemon would have done at its next start (`recoverInterruptedDeliveries`): a run it
    /// did not see end runs again at once, and counts. Left `running`, with no lease and no claimer, it
    /// would be nobody's to take over on the shared log.
    private static func recoverRunningDeliveries(now: Int64, _ connection: PostgresConnection, _ logger: Logger)
        async throws
    {
        let running = try await connection.query(
            "SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries WHERE state = 'running'", logger: logger
        ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
        for delivery in running {
            var progress = delivery.progress
            progress.recoverAfterCrash(now: now)
            try await saveProgress(progress, id: delivery.id, connection, logger)
        }
    }
}

/// A table of the log as `storage copy` moves it: the columns both logs have, each bound in the type
/// PostgreSQL declares (SQLite keeps whatever a column was given, PostgreSQL takes only its own type).
///
/// Deliberately not copied: `events.reconcile_at` (SQLite only: migration 0004 moved it into
/// `next_check_at` and it has been NULL since). Deliberately left NULL on the PostgreSQL side:
/// `events.check_claimed_by`/`check_claimed_until` and `deliveries.lease_until`/`node_id`, the claims of
/// running daemons, of which a stopped one holds none (its running deliveries become pending).
/// `node_id` of receipts, verification attempts and hook runs (NOT NULL: who recorded the row) is the
/// copying configuration's `storage.node_id`.
struct CopiedTable: Sendable {
    enum ColumnType: Sendable { case integer, text, blob, boolean }

    struct Column: Sendable {
        let name: String
        let type: ColumnType
    }

    let name: String
    let columns: [Column]
    /// SQLite columns left behind on purpose.
    let dropped: Set<String>
    /// Whether PostgreSQL's `node_id` (NOT NULL) is set to the copying node.
    let stampsNode: Bool

    init(_ name: String, _ columns: KeyValuePairs<String, ColumnType>, dropped: Set<String> = [], stampsNode: Bool) {
        self.name = name
        self.columns = columns.map { Column(name: $0.key, type: $0.value) }
        self.dropped = dropped
        self.stampsNode = stampsNode
    }

    /// In an order the foreign keys accept: events before what refers to them.
    static let all: [CopiedTable] = [
        CopiedTable(
            "events",
            [
                "id": .text, "kind": .text, "entity_id": .text, "status": .text, "status_key": .text,
                "payop_state": .integer, "state": .text, "rejection_reason": .text, "source": .text,
                "verification": .text, "transaction_id": .text, "invoice_id": .text, "order_id": .text,
                "refund_id": .text, "withdrawal_id": .text, "amount": .text, "currency": .text, "error_message": .text,
                "legacy": .boolean, "received_at": .integer, "verified_at": .integer, "duplicates": .integer,
                "first_receipt": .integer, "next_check_at": .integer, "check_attempts": .integer,
                "watch_until": .integer,
            ], dropped: ["reconcile_at"], stampsNode: false),
        CopiedTable(
            "receipts",
            [
                "id": .integer, "received_at": .integer, "source_ip": .text, "path": .text, "answer": .integer,
                "reason": .text, "kind": .text, "entity_id": .text, "status": .text, "event_id": .text,
                "size": .integer, "body": .blob, "claim_order_id": .text, "claim_amount": .text,
                "claim_currency": .text, "claim_invoice_id": .text, "claim_transaction_id": .text,
            ], stampsNode: true),
        CopiedTable(
            "verification_attempts",
            [
                "id": .integer, "event_id": .text, "at": .integer, "outcome": .text, "payop_state": .integer,
                "detail": .text,
            ], stampsNode: true),
        CopiedTable(
            "deliveries",
            [
                "id": .integer, "event_id": .text, "hook": .text, "kind": .text, "entity_id": .text, "state": .text,
                "attempts": .integer, "next_attempt_at": .integer, "last_exit_code": .integer,
                "last_http_status": .integer, "last_error": .text, "output": .text, "created_at": .integer,
                "finished_at": .integer, "delivered_at": .integer,
            ], stampsNode: false),
        CopiedTable(
            "delivery_attempts",
            [
                "id": .integer, "delivery_id": .integer, "attempt": .integer, "finished_at": .integer,
                "outcome": .text, "exit_code": .integer, "http_status": .integer, "error": .text, "output": .text,
            ], stampsNode: true),
    ]

    /// Refuses a log with a column this version does not know (a newer payop-ipnd's migration): the
    /// copy would lose it without a word.
    func checkColumns(_ db: Database) throws {
        let unknown = try db.columns(in: name).map(\.name).filter { column in
            !dropped.contains(column) && !columns.contains { $0.name == column }
        }
        guard unknown.isEmpty else {
            throw EventLogError(
                .notEventLog,
                "the SQLite log's table \(name) has columns this payop-ipnd does not know (\(unknown.joined(separator: ", "))): "
                    + "copy it with the version that wrote it")
        }
    }

    /// One multi-row INSERT of the PostgreSQL log.
    struct Page: Sendable {
        var insert: PostgresQuery
        var lastRowID: Int64
    }

    /// The next `limit` rows after `rowID` as one INSERT, or nil when none is left. Multi-row VALUES
    /// rather than unnest of arrays: postgres-nio binds no arrays with NULL elements.
    func page(_ db: Database, after rowID: Int64, limit: Int, node: String) throws -> Page? {
        let rows = try Row.fetchAll(
            db,
            sql: "SELECT rowid, \(columns.map(\.name).joined(separator: ", ")) FROM \(name) WHERE rowid > ? ORDER BY rowid LIMIT ?",
            arguments: [rowID, limit])
        guard let last = rows.last else { return nil }
        var binds = PostgresBindings(capacity: rows.count * (columns.count + 1))
        var tuples: [String] = []
        tuples.reserveCapacity(rows.count)
        for row in rows {
            var placeholders: [String] = []
            for (index, column) in columns.enumerated() {
                try bind(row[index + 1], column, row: row[0], into: &binds)
                placeholders.append("$\(binds.count)")
            }
            if stampsNode {
                binds.append(node)
                placeholders.append("$\(binds.count)")
            }
            tuples.append("(\(placeholders.joined(separator: ", ")))")
        }
        let names = columns.map(\.name) + (stampsNode ? ["node_id"] : [])
        return Page(
            insert: PostgresQuery(
                unsafeSQL: "INSERT INTO \(name) (\(names.joined(separator: ", "))) VALUES \(tuples.joined(separator: ", "))",
                binds: binds),
            lastRowID: last[0])
    }

    private func bind(_ value: DatabaseValue, _ column: Column, row: Int64, into binds: inout PostgresBindings) throws {
        if value.isNull { return binds.appendNull() }
        func converted<T: DatabaseValueConvertible>(_: T.Type) throws -> T {
            guard let converted = T.fromDatabaseValue(value) else {
                throw EventLogError(
                    .notEventLog, "the SQLite log's \(name) row \(row) holds a \(column.name) that is not \(column.type)")
            }
            return converted
        }
        switch column.type {
        case .integer: binds.append(try converted(Int64.self))
        case .text: binds.append(try converted(String.self))
        case .blob: try binds.append(try converted(Data.self))
        case .boolean: binds.append(try converted(Bool.self))
        }
    }
}
