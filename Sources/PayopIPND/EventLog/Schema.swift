import GRDB

/// The event log's tables. Migrations are numbered and append-only: never edit one that has shipped,
/// add the next.
enum Schema {
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("0001-events-and-receipts") { db in
            try db.execute(
                sql: """
                    CREATE TABLE events (
                        id TEXT PRIMARY KEY NOT NULL,
                        kind TEXT NOT NULL,
                        entity_id TEXT NOT NULL,
                        status TEXT NOT NULL,
                        -- the status, or unknown:N, so two unknown states stay two events
                        status_key TEXT NOT NULL,
                        payop_state INTEGER,
                        state TEXT NOT NULL CHECK (state IN ('received', 'verified', 'rejected')),
                        rejection_reason TEXT,
                        source TEXT NOT NULL CHECK (source IN ('ipn', 'reconcile')),
                        verification TEXT,
                        transaction_id TEXT,
                        invoice_id TEXT,
                        order_id TEXT,
                        refund_id TEXT,
                        withdrawal_id TEXT,
                        amount TEXT,
                        currency TEXT,
                        error_message TEXT,
                        legacy INTEGER NOT NULL DEFAULT 0,
                        received_at INTEGER NOT NULL,
                        verified_at INTEGER,
                        duplicates INTEGER NOT NULL DEFAULT 0,
                        -- the receipt of the first IPN that brought this status: its body is the event's `ipn`
                        first_receipt INTEGER,
                        -- when the verifier should next ask Payop; NULL when there is nothing to ask
                        next_check_at INTEGER,
                        check_attempts INTEGER NOT NULL DEFAULT 0,
                        UNIQUE (kind, entity_id, status_key)
                    );
                    CREATE INDEX events_by_received_at ON events (received_at);
                    CREATE INDEX events_due_for_check ON events (next_check_at) WHERE next_check_at IS NOT NULL;

                    CREATE TABLE receipts (
                        id INTEGER PRIMARY KEY,
                        received_at INTEGER NOT NULL,
                        source_ip TEXT NOT NULL,
                        path TEXT NOT NULL,
                        answer INTEGER NOT NULL,
                        reason TEXT,
                        kind TEXT,
                        entity_id TEXT,
                        status TEXT,
                        event_id TEXT REFERENCES events (id) DEFERRABLE INITIALLY DEFERRED,
                        size INTEGER NOT NULL,
                        body BLOB NOT NULL
                    );
                    CREATE INDEX receipts_by_event ON receipts (event_id);
                    CREATE INDEX receipts_by_received_at ON receipts (received_at);
                    """)
        }
        migrator.registerMigration("0002-verification") { db in
            try db.execute(
                sql: """
                    CREATE TABLE verification_attempts (
                        id INTEGER PRIMARY KEY,
                        event_id TEXT NOT NULL REFERENCES events (id),
                        at INTEGER NOT NULL,
                        -- verified | rejected | not_found | unavailable | unauthorized | bad_response
                        outcome TEXT NOT NULL,
                        payop_state INTEGER,
                        detail TEXT
                    );
                    CREATE INDEX verification_attempts_by_event ON verification_attempts (event_id);
                    -- when the reconciler should next ask Payop about a verified, not yet final status
                    ALTER TABLE events ADD COLUMN reconcile_at INTEGER;
                    CREATE INDEX events_due_for_reconcile ON events (reconcile_at) WHERE reconcile_at IS NOT NULL;
                    """)
        }
        migrator.registerMigration("0003-deliveries") { db in
            try db.execute(
                sql: """
                    CREATE TABLE deliveries (
                        id INTEGER PRIMARY KEY,
                        event_id TEXT NOT NULL REFERENCES events (id),
                        hook TEXT NOT NULL,
                        -- the ordering key: one (hook, kind, entity) delivers strictly in id order
                        kind TEXT NOT NULL,
                        entity_id TEXT NOT NULL,
                        state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'delivered', 'dead')),
                        attempts INTEGER NOT NULL DEFAULT 0,
                        next_attempt_at INTEGER NOT NULL,
                        last_exit_code INTEGER,
                        last_http_status INTEGER,
                        last_error TEXT,
                        output TEXT,
                        created_at INTEGER NOT NULL,
                        finished_at INTEGER,
                        delivered_at INTEGER,
                        UNIQUE (event_id, hook)
                    );
                    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
                    CREATE INDEX deliveries_in_order ON deliveries (hook, kind, entity_id, id)
                        WHERE state IN ('pending', 'running');
                    CREATE INDEX deliveries_by_state ON deliveries (state, id);
                    """)
        }
        migrator.registerMigration("0004-verification-machine") { db in
            try db.execute(
                sql: """
                    -- a contradicted claim, or a verified failed checkout, is asked about until then
                    ALTER TABLE events ADD COLUMN watch_until INTEGER;
                    -- one schedule for every question to Payop: re-checks of verified statuses join it
                    UPDATE events SET next_check_at = reconcile_at WHERE state = 'verified' AND reconcile_at IS NOT NULL;
                    UPDATE events SET reconcile_at = NULL;
                    DROP INDEX events_due_for_reconcile;
                    -- what each copy of an IPN claimed: every copy is judged on its own against Payop
                    ALTER TABLE receipts ADD COLUMN claim_order_id TEXT;
                    ALTER TABLE receipts ADD COLUMN claim_amount TEXT;
                    ALTER TABLE receipts ADD COLUMN claim_currency TEXT;
                    ALTER TABLE receipts ADD COLUMN claim_invoice_id TEXT;
                    ALTER TABLE receipts ADD COLUMN claim_transaction_id TEXT;
                    -- claims the previous version contradicted, and failed checkouts it verified, within
                    -- Payop's 24 h retry window: asked about again from now on
                    UPDATE events SET watch_until = received_at + 86400000, next_check_at = received_at
                    WHERE legacy = 0 AND received_at + 86400000 > CAST(strftime('%s', 'now') AS INTEGER) * 1000
                    AND ((state = 'rejected' AND rejection_reason = 'status_mismatch')
                         OR (state = 'verified' AND kind = 'checkout' AND status = 'failed'));
                    -- copies received before this version: the event's first copy speaks for them all
                    UPDATE receipts SET
                        claim_order_id = (SELECT order_id FROM events WHERE events.id = receipts.event_id),
                        claim_amount = (SELECT amount FROM events WHERE events.id = receipts.event_id),
                        claim_currency = (SELECT currency FROM events WHERE events.id = receipts.event_id),
                        claim_invoice_id = (SELECT invoice_id FROM events WHERE events.id = receipts.event_id),
                        claim_transaction_id = (SELECT transaction_id FROM events WHERE events.id = receipts.event_id)
                    WHERE answer = 200 AND event_id IS NOT NULL;
                    """)
        }
        migrator.registerMigration("0005-delivery-attempts") { db in
            try db.execute(
                sql: """
                    -- every finished run of a hook, for the console's history (deliveries keep the last)
                    CREATE TABLE delivery_attempts (
                        id INTEGER PRIMARY KEY,
                        delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
                        attempt INTEGER NOT NULL,
                        finished_at INTEGER NOT NULL,
                        -- delivered | failed | gone
                        outcome TEXT NOT NULL,
                        exit_code INTEGER,
                        http_status INTEGER,
                        error TEXT,
                        output TEXT
                    );
                    CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id);
                    """)
        }
        migrator.registerMigration("0006-time-ordered-ids") { db in
            // Time ranges read the ids' order instead (`SQLiteEventLog.firstReceiptID`, `SortableID.first`):
            // these two indexes were about a sixth of the pages every commit wrote, for `--since`, the
            // console's overview and `prune` only.
            try db.execute(
                sql: """
                    DROP INDEX events_by_received_at;
                    DROP INDEX receipts_by_received_at;
                    """)
        }
        migrator.registerMigration("0007-lean-deliveries") { db in
            // Two writes fewer in most deliveries' commits: a first run that delivered is recorded by its
            // delivery's row alone (`DeliveryProgress.lastRunIsInRowOnly`), and a delivered delivery leaves
            // `deliveries_by_state`, which only the others' reads use (they name its condition).
            try db.execute(
                sql: """
                    DELETE FROM delivery_attempts WHERE outcome = 'delivered' AND attempt = 1 AND id IN (
                        SELECT max(a.id) FROM delivery_attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id
                        WHERE d.state = 'delivered' AND d.attempts = 1 GROUP BY a.delivery_id);
                    DROP INDEX deliveries_by_state;
                    CREATE INDEX deliveries_by_state ON deliveries (state, id) WHERE state <> 'delivered';
                    """)
        }
        // Foreign keys stay on (`.immediate`): no row changes, so GRDB's check of the whole log after a
        // migration would only cost time (seconds on a log of millions of rows).
        migrator.registerMigration("0008-checks-without-lists", foreignKeyChecks: .immediate) { db in
            // A CHECK of `x IN (a, b, c)` (three values or more) builds a temporary b-tree of its list each
            // time a statement runs it: every event and delivery written and every change of their state
            // opened and freed one. The same checks as chains of `=` build nothing. Only the text of the
            // constraints changes (same meaning: `state` is NOT NULL, and rows already satisfy it), so the
            // schema is edited in place, as SQLite documents for CHECK constraints (lang_altertable.html,
            // "Making Other Kinds Of Table Schema Changes"), rather than copying both tables.
            let version = try Int.fetchOne(db, sql: "PRAGMA schema_version") ?? 0
            try db.execute(sql: "PRAGMA writable_schema = ON")
            defer { try? db.execute(sql: "PRAGMA writable_schema = OFF") }
            for (index, (table, list, chain)) in Schema.checksWithoutLists.enumerated() {
                do {
                    try db.execute(
                        sql: "UPDATE sqlite_schema SET sql = replace(sql, ?, ?) WHERE type = 'table' AND name = ?",
                        arguments: [list, chain, table])
                } catch let error as DatabaseError where error.resultCode == .SQLITE_ERROR && index == 0 {
                    // A library in defensive mode (macOS's, for one) refuses any edit of the schema, and
                    // nothing has changed yet: the lists stay (slower, not wrong). A refusal after the
                    // first edit fails the migration, which rolls back.
                    return
                }
            }
            try db.execute(sql: "PRAGMA schema_version = \(version + 1)")
        }
        return migrator
    }

    /// Migration 0008's edits: each table's CHECK as 0001 and 0003 wrote it, and the same as a chain.
    static let checksWithoutLists = [
        (
            "events", "CHECK (state IN ('received', 'verified', 'rejected'))",
            "CHECK (state = 'received' OR state = 'verified' OR state = 'rejected')"
        ),
        (
            "deliveries", "CHECK (state IN ('pending', 'running', 'delivered', 'dead'))",
            "CHECK (state = 'pending' OR state = 'running' OR state = 'delivered' OR state = 'dead')"
        ),
    ]
}
