/* For bench/sqlite-writer.sh: the SQLite statements the log writer runs per IPN, on this machine's
 * libsqlite3, without the daemon around them. Per IPN: the ingest (a savepoint, the dedupe read, the
 * receipt and event inserts), the answer (a savepoint, the machine's read, the copies' claims, the
 * attempt insert, the event update, the delivery's insert) and the delivery's run (claimed, then
 * delivered), 32 IPNs per transaction, WAL, synchronous=OFF (the fsync is the same whatever is
 * measured here). Prints the CPU time per IPN in microseconds.
 *
 *   sqlite-writer MEMSTATUS(0|1) CLAIMS(grouped|walked) CHECKS(lists|chains) IPNS DIRECTORY */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static sqlite3 *db;
static void run(const char *sql) {
    char *error = 0;
    if (sqlite3_exec(db, sql, 0, 0, &error) != SQLITE_OK) { fprintf(stderr, "%s: %s\n", sql, error); exit(1); }
}
static sqlite3_stmt *prepare(const char *sql) {
    sqlite3_stmt *s;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s, 0) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", sql, sqlite3_errmsg(db)); exit(1);
    }
    return s;
}
static void step_all(sqlite3_stmt *s) {
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {}
    if (rc != SQLITE_DONE) { fprintf(stderr, "step: %s\n", sqlite3_errmsg(db)); exit(1); }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
}
#define TEXT(s, i, v) sqlite3_bind_text(s, i, v, -1, SQLITE_TRANSIENT)

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: sqlite-writer MEMSTATUS CLAIMS CHECKS IPNS DIRECTORY\n"); return 2; }
    int memstatus = atoi(argv[1]), walked = strcmp(argv[2], "walked") == 0, chains = strcmp(argv[3], "chains") == 0;
    int ipns = atoi(argv[4]);
    if (sqlite3_config(SQLITE_CONFIG_MEMSTATUS, memstatus) != SQLITE_OK) { fprintf(stderr, "config refused\n"); return 1; }
    char path[4096];
    snprintf(path, sizeof path, "%s/writer-%d.sqlite3", argv[5], (int)getpid());
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, 0)) return 1;
    char events[1024], deliveries[1024];
    snprintf(events, sizeof events,
        "CREATE TABLE events (id TEXT PRIMARY KEY NOT NULL, kind TEXT NOT NULL, entity_id TEXT NOT NULL,"
        " status TEXT NOT NULL, status_key TEXT NOT NULL, state TEXT NOT NULL CHECK (%s), amount TEXT, currency TEXT,"
        " order_id TEXT, received_at INTEGER NOT NULL, verified_at INTEGER, first_receipt INTEGER,"
        " next_check_at INTEGER, check_attempts INTEGER NOT NULL DEFAULT 0, UNIQUE (kind, entity_id, status_key));",
        chains ? "state = 'received' OR state = 'verified' OR state = 'rejected'"
               : "state IN ('received', 'verified', 'rejected')");
    snprintf(deliveries, sizeof deliveries,
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, hook TEXT NOT NULL,"
        " kind TEXT NOT NULL, entity_id TEXT NOT NULL, state TEXT NOT NULL CHECK (%s),"
        " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at INTEGER NOT NULL, last_exit_code INTEGER, output TEXT,"
        " created_at INTEGER NOT NULL, finished_at INTEGER, delivered_at INTEGER, UNIQUE (event_id, hook));",
        chains ? "state = 'pending' OR state = 'running' OR state = 'delivered' OR state = 'dead'"
               : "state IN ('pending', 'running', 'delivered', 'dead')");
    run("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;");
    run(events);
    run(deliveries);
    run("CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';"
        "CREATE INDEX deliveries_in_order ON deliveries (hook, kind, entity_id, id) WHERE state IN ('pending', 'running');"
        "CREATE INDEX deliveries_by_state ON deliveries (state, id) WHERE state <> 'delivered';");
    run("CREATE INDEX events_due_for_check ON events (next_check_at) WHERE next_check_at IS NOT NULL;"
        "CREATE TABLE receipts (id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, source_ip TEXT NOT NULL,"
        " path TEXT NOT NULL, answer INTEGER NOT NULL, kind TEXT, entity_id TEXT, status TEXT, event_id TEXT,"
        " size INTEGER NOT NULL, body BLOB NOT NULL, claim_order_id TEXT, claim_amount TEXT, claim_currency TEXT,"
        " claim_invoice_id TEXT, claim_transaction_id TEXT);"
        "CREATE INDEX receipts_by_event ON receipts (event_id);"
        "CREATE TABLE verification_attempts (id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, at INTEGER NOT NULL,"
        " outcome TEXT NOT NULL, payop_state INTEGER, detail TEXT);"
        "CREATE INDEX verification_attempts_by_event ON verification_attempts (event_id);");
    sqlite3_stmt *savepoint = prepare("SAVEPOINT job"), *release = prepare("RELEASE job");
    sqlite3_stmt *existing = prepare("SELECT id, state FROM events WHERE kind = ? AND entity_id = ? AND status_key = ?");
    sqlite3_stmt *receipt = prepare(
        "INSERT INTO receipts (received_at, source_ip, path, answer, kind, entity_id, status, event_id, size, body,"
        " claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id)"
        " VALUES (?, '127.0.0.1', '/payop/ipn', 200, 'checkout', ?, 'accepted', ?, 185, ?, ?, '10.00', 'EUR', ?, ?)");
    sqlite3_stmt *event = prepare(
        "INSERT INTO events (id, kind, entity_id, status, status_key, state, amount, currency, order_id, received_at,"
        " first_receipt, next_check_at) VALUES (?, 'checkout', ?, 'accepted', 'accepted', 'received', '10.00', 'EUR',"
        " ?, ?, ?, ?)");
    sqlite3_stmt *machine = prepare(
        "SELECT kind, status, state, received_at, check_attempts, next_check_at FROM events WHERE id = ?");
    sqlite3_stmt *claims = prepare(walked
        ? "SELECT id, claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id"
          " FROM receipts WHERE event_id = ? AND answer = 200 ORDER BY id"
        : "SELECT min(id) AS id, claim_order_id, claim_amount, claim_currency, claim_invoice_id, claim_transaction_id"
          " FROM receipts WHERE event_id = ? AND answer = 200 GROUP BY claim_order_id, claim_amount, claim_currency,"
          " claim_invoice_id, claim_transaction_id ORDER BY 1 DESC LIMIT 100");
    sqlite3_stmt *attempt = prepare(
        "INSERT INTO verification_attempts (event_id, at, outcome, payop_state, detail) VALUES (?, ?, 'verified', 2, NULL)");
    sqlite3_stmt *verified = prepare(
        "UPDATE events SET state = 'verified', verified_at = ?, next_check_at = NULL, check_attempts = 1 WHERE id = ?");
    sqlite3_stmt *delivery = prepare(
        "INSERT INTO deliveries (event_id, hook, kind, entity_id, state, next_attempt_at, created_at)"
        " VALUES (?, 'fulfil', 'checkout', ?, 'pending', ?, ?)");
    sqlite3_stmt *claimed = prepare("UPDATE deliveries SET state = 'running', attempts = attempts + 1 WHERE id = ?");
    sqlite3_stmt *delivered = prepare(
        "UPDATE deliveries SET state = 'delivered', last_exit_code = 0, output = '', finished_at = ?, delivered_at = ?"
        " WHERE id = ?");
    char body[185];
    memset(body, 'x', sizeof body);
    clock_t start = clock();
    for (int n = 0; n < ipns; n++) {
        char id[32], entity[32], order[32];
        snprintf(id, sizeof id, "evt_%010d", n);
        snprintf(entity, sizeof entity, "tx-%d", n);
        snprintf(order, sizeof order, "o-%d", n);
        if (n % 32 == 0) run("BEGIN IMMEDIATE");
        step_all(savepoint);
        TEXT(existing, 1, "checkout"); TEXT(existing, 2, entity); TEXT(existing, 3, "accepted");
        step_all(existing);
        sqlite3_bind_int64(receipt, 1, 1000 + n); TEXT(receipt, 2, entity); TEXT(receipt, 3, id);
        sqlite3_bind_blob(receipt, 4, body, sizeof body, SQLITE_TRANSIENT);
        TEXT(receipt, 5, order); TEXT(receipt, 6, "inv-1"); TEXT(receipt, 7, entity);
        step_all(receipt);
        sqlite3_int64 receipt_id = sqlite3_last_insert_rowid(db);
        TEXT(event, 1, id); TEXT(event, 2, entity); TEXT(event, 3, order);
        sqlite3_bind_int64(event, 4, 1000 + n); sqlite3_bind_int64(event, 5, receipt_id); sqlite3_bind_int64(event, 6, 1000 + n);
        step_all(event);
        step_all(release);
        step_all(savepoint);
        TEXT(machine, 1, id); step_all(machine);
        TEXT(claims, 1, id); step_all(claims);
        TEXT(attempt, 1, id); sqlite3_bind_int64(attempt, 2, 2000 + n); step_all(attempt);
        sqlite3_bind_int64(verified, 1, 2000 + n); TEXT(verified, 2, id); step_all(verified);
        TEXT(delivery, 1, id); TEXT(delivery, 2, entity); sqlite3_bind_int64(delivery, 3, 2000 + n);
        sqlite3_bind_int64(delivery, 4, 2000 + n); step_all(delivery);
        sqlite3_int64 delivery_id = sqlite3_last_insert_rowid(db);
        sqlite3_bind_int64(claimed, 1, delivery_id); step_all(claimed);
        step_all(release);
        step_all(savepoint);
        sqlite3_bind_int64(delivered, 1, 3000 + n); sqlite3_bind_int64(delivered, 2, 3000 + n);
        sqlite3_bind_int64(delivered, 3, delivery_id); step_all(delivered);
        step_all(release);
        if (n % 32 == 31 || n == ipns - 1) run("COMMIT");
    }
    printf("%.2f\n", (double)(clock() - start) / CLOCKS_PER_SEC * 1e6 / ipns);
    sqlite3_close(db);
    unlink(path);
    return 0;
}
