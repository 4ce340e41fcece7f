import Foundation
import GRDB
import GRDBSQLite
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The durable event log: one SQLite file in WAL mode with `synchronous=FULL`, written only through
/// the group-commit writer, read by any number of readers and other processes (the CLI) at once.
public final class SQLiteEventLog: EventLog {
    public enum Mode: Sendable {
        /// The daemon: checkpoints run off the commit path (see `checkpoint()`), from another connection.
        case daemon
        /// A command-line tool sharing the file with a running daemon.
        case tool
    }

    public let path: String
    public var location: String { path }
    let database: DatabasePool
    /// The stages' own read-only connection (`readInPlace`), outside the pool operations read from.
    private let stageReader: DatabaseQueue
    private let writer: GroupCommitWriter
    private let clock: any WallClock
    /// The configured hooks, for the outbox: verified events get one delivery per matching hook.
    private let hookRoutes = Mutex<[HookConfig]>([])

    /// How long a write waits for another process's lock before the log counts as unavailable.
    public static let lockDeadlineSeconds: TimeInterval = 5

    /// Group commits so far: the checkpointer skips its turn when nothing was written.
    public var commitCount: Int { writer.commitCount }

    private init(
        path: String, database: DatabasePool, stageReader: DatabaseQueue, clock: any WallClock,
        walRestartFrames: Int, onBatch: @escaping @Sendable (Int) -> Void
    ) {
        self.path = path
        self.walRestartFrames = walRestartFrames
        self.database = database
        self.stageReader = stageReader
        self.clock = clock
        self.writer = GroupCommitWriter(database: database, onBatch: onBatch)
    }

    /// Opens (creating when `create`) the log at `path`, migrates it and checks that commits are durable.
    public static func open(
        path: String, mode: Mode, create: Bool = true, clock: any WallClock = SystemWallClock(),
        lockDeadlineSeconds: TimeInterval = SQLiteEventLog.lockDeadlineSeconds, walRestartFrames: Int = 4096,
        onBatch: @escaping @Sendable (Int) -> Void = { _ in }
    ) throws(EventLogError) -> SQLiteEventLog {
        let fileManager = FileManager.default
        if !fileManager.fileExists(atPath: path) {
            guard create else {
                throw EventLogError(.notFound, "no event log at \(path): start the daemon once, or check storage.path")
            }
            let directory = (path as NSString).deletingLastPathComponent
            if !directory.isEmpty {
                do {
                    try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
                } catch {
                    throw EventLogError(.unavailable, "cannot create the directory \(directory)", cause: error)
                }
            }
        }
        var configuration = Configuration()
        configuration.busyMode = .timeout(lockDeadlineSeconds)
        configuration.label = "payop-ipnd.event-log"
        let database: DatabasePool
        let stageReader: DatabaseQueue
        do {
            database = try DatabasePool(path: path, configuration: configuration)
            try database.writeWithoutTransaction { db in
                // GRDB puts WAL databases on synchronous=NORMAL after setup; the log promises FULL.
                try db.execute(sql: "PRAGMA synchronous = FULL")
                if mode == .daemon {
                    try db.execute(sql: "PRAGMA wal_autocheckpoint = 0")
                }
                try db.execute(sql: "PRAGMA journal_size_limit = 67108864")
            }
            try Schema.migrator.migrate(database)
            var readOnly = configuration
            readOnly.readonly = true
            readOnly.label = "payop-ipnd.event-log.stages"
            stageReader = try DatabaseQueue(path: path, configuration: readOnly)
        } catch let error as DatabaseError where error.resultCode == .SQLITE_NOTADB {
            throw EventLogError(.notEventLog, "\(path) is not an SQLite database", cause: error)
        } catch {
            throw EventLogError(.unavailable, "cannot open the event log at \(path)", cause: error)
        }
        let log = SQLiteEventLog(
            path: path, database: database, stageReader: stageReader, clock: clock, walRestartFrames: walRestartFrames,
            onBatch: onBatch)
        let level = try log.synchronousLevel()
        guard level == 2 else {
            throw EventLogError(
                .unavailable, "the event log is not durable: PRAGMA synchronous reads \(level), not 2 (FULL)")
        }
        return log
    }

    /// `PRAGMA synchronous` of the write connection: 2 is FULL.
    public func synchronousLevel() throws(EventLogError) -> Int {
        do {
            return try database.writeWithoutTransaction { db in try Int.fetchOne(db, sql: "PRAGMA synchronous") ?? -1 }
        } catch {
            throw EventLogError(.unavailable, "cannot read PRAGMA synchronous", cause: error)
        }
    }

    /// How a repeated IPN's event is scheduled (at start and on reload).
    private let verificationPolicy = Mutex(VerificationPolicy.defaults)
    public func setVerificationPolicy(_ policy: VerificationPolicy) { verificationPolicy.withLock { $0 = policy } }

    /// The hooks deliveries are created for from now on (at start and on reload).
    public func setHooks(_ hooks: [HookConfig]) { hookRoutes.withLock { $0 = hooks } }
    public var hooks: [HookConfig] { hookRoutes.withLock { $0 } }

    /// Who admits runs claimed in the transaction that makes them due (the daemon's dispatcher); none
    /// until it is set, and none once the log is closed.
    private let earlyStarts = Mutex<(any EarlyStarts)?>(nil)
    public func startDeliveriesEarly(with starts: (any EarlyStarts)?) { earlyStarts.withLock { $0 = starts } }
    /// A write's early claims, when someone admits them.
    func earlyClaims() -> EarlyClaims? { earlyStarts.withLock { $0 }.map(EarlyClaims.init) }
    /// A run's outcome hands its slot to its hook's next due run through the one who admits early claims.
    public func handsOverRunSlots(to starts: any EarlyStarts) -> Bool { earlyStarts.withLock { $0 === starts } }

    /// An empty write through the group commit: proves the writer runs and the file takes a lock.
    public func checkWritable() async throws(EventLogError) {
        try await write { _ in }
    }

    /// Commits what is queued and stops the writer; later writes fail as unavailable.
    public func close() {
        earlyStarts.withLock { $0 = nil }
        writer.shutdown()
    }

    /// Runs `operation` in the next group commit; returns once it is on disk.
    public func write<T: Sendable>(_ operation: @escaping @Sendable (Database) throws -> T) async throws(EventLogError)
        -> T
    {
        try await writer.write(operation)
    }

    /// A write whose early claims are settled on the writer thread as soon as its commit is over.
    func write<T: Sendable>(claiming early: EarlyClaims?, _ operation: @escaping @Sendable (Database) throws -> T)
        async throws(EventLogError) -> T
    {
        try await writer.write(operation, settled: { early?.settle(committed: $0) })
    }

    /// A read on one of GRDB's reader queues: for operations' queries, which may scan.
    public func read<T: Sendable>(_ operation: @escaping @Sendable (Database) throws -> T) async throws(EventLogError)
        -> T
    {
        do {
            return try await database.read(operation)
        } catch {
            throw Self.readFailure(error)
        }
    }

    /// A read on the calling thread: for the stages' hot path, short lookups on an index with a limit.
    ///
    /// The hop to a reader queue and back (`read`) costs two thread wake-ups, more than such a read
    /// itself: on a busy log the verifier's and the dispatcher's passes spent more time switching
    /// threads than reading (README, "Tests, crash test and benchmarks"). A WAL reader never waits for
    /// the writer, and the stages' connection is their own: a blocking read from the pool could wait
    /// for a slot that an operations read gives back only once it gets a cooperative thread, which
    /// blocked reads hold.
    func readInPlace<T>(_ operation: (Database) throws -> T) throws(EventLogError) -> T {
        do {
            return try stageReader.read(operation)
        } catch {
            throw Self.readFailure(error)
        }
    }

    private static func readFailure(_ error: any Error) -> EventLogError {
        error as? EventLogError ?? EventLogError(.unavailable, "cannot read the event log", cause: error)
    }

    /// Moves committed WAL frames into the database file. Runs from its own connection so the writer
    /// never pays for it inside a commit (the source of occasional 10-30 ms commits otherwise).
    ///
    /// SQLite starts the WAL over at a commit only when a checkpoint has copied every frame before it,
    /// which one from another connection never does while IPNs keep coming (commits land while it
    /// copies): during a 20 s ingest bench the WAL grew to 1.2 GB, every commit growing the file. So
    /// past `walRestartFrames` the pass is repeated over what was committed meanwhile (at most
    /// `catchUpPasses` times), and when a few hundred frames are left at most, the writer copies those
    /// itself between two batches (`GroupCommitWriter.requestCheckpoint`, about a millisecond): it is
    /// then caught up, and its next commit starts the WAL over. Returns the frames the WAL held.
    @discardableResult
    public func checkpoint() throws(EventLogError) -> Int {
        if let failure = writer.takeCheckpointFailure() {
            throw EventLogError(.unavailable, "the writer's checkpoint failed", cause: failure)
        }
        let found: Int
        do {
            let connection = try DatabaseQueue(path: path, configuration: checkpointConfiguration)
            defer { try? connection.close() }
            found = try connection.writeWithoutTransaction { db in
                var pass = 0
                var found = 0
                while true {
                    let (frames, copied) = try Self.passiveCheckpoint(db)
                    if pass == 0 { found = frames }
                    pass += 1
                    guard found > walRestartFrames, copied < frames, pass < Self.catchUpPasses else { return found }
                }
            }
            guard found > walRestartFrames else { return found }
            // SQLite syncs the database file only at a checkpoint that reaches the WAL's end, which
            // under load is the writer's: the pages copied here are synced here first, off the commit
            // path (the writer's checkpoint took 7-8 ms with a second of them to sync, and commits
            // waited for it). A failed sync is reported, and then the writer is not asked: the WAL
            // must not start over on pages that may not be on disk.
            // Even when these passes copied everything, the writer was most likely inside a commit
            // whose frames came after them: once few are left (looked at again after the sync), the
            // writer copies them between two batches.
            let (frames, copied) = try connection.writeWithoutTransaction { db in
                try Self.syncFile(db)
                return try Self.passiveCheckpoint(db)
            }
            if frames >= 0, frames - copied <= Self.writerCheckpointFrames { writer.requestCheckpoint() }
        } catch let error as EventLogError {
            throw error
        } catch {
            throw EventLogError(.unavailable, "cannot checkpoint the event log", cause: error)
        }
        return found
    }

    /// One passive pass: the WAL's frames and how many of them are in the database file now (-1 and
    /// -1 when another checkpoint was running).
    private static func passiveCheckpoint(_ db: Database) throws -> (frames: Int, copied: Int) {
        let row = try Row.fetchOne(db, sql: "PRAGMA wal_checkpoint(PASSIVE)")
        return (row?[1] ?? -1, row?[2] ?? -1)
    }

    /// Syncs the database file through `db`'s own handle of it (SQLite's `xSync`). Opening and closing
    /// another descriptor of the file would drop every POSIX lock this process holds on it, SQLite's
    /// shared locks among them: a tool closing its connection could then take the file for itself,
    /// checkpoint and delete the WAL under the running daemon, whose next commits would go to a deleted
    /// file.
    private static func syncFile(_ db: Database) throws {
        var file: UnsafeMutablePointer<sqlite3_file>?
        let found = sqlite3_file_control(db.sqliteConnection, "main", SQLITE_FCNTL_FILE_POINTER, &file)
        guard found == SQLITE_OK, let file, let sync = file.pointee.pMethods?.pointee.xSync else {
            throw EventLogError(.unavailable, "cannot reach the event log's database file to sync it")
        }
        let synced = sync(file, SQLITE_SYNC_NORMAL)
        guard synced == SQLITE_OK else {
            throw EventLogError(
                .unavailable, "cannot sync the event log's database file",
                cause: DatabaseError(resultCode: ResultCode(rawValue: synced)))
        }
    }

    /// The writer checkpoints between two batches (see `checkpoint()`; tests).
    func checkpointFromWriter() { writer.requestCheckpoint() }
    /// Checkpoints the writer ran between batches (tests).
    var writerCheckpoints: Int { writer.checkpointCount }

    /// Passes of one checkpoint at most, catching up with the writer.
    static let catchUpPasses = 8
    /// Frames left at most for the writer to copy itself: the pause it costs commits stays short.
    static let writerCheckpointFrames = 512

    /// WAL frames (4 KiB pages) past which a checkpoint catches up with the writer: 16 MiB by default.
    let walRestartFrames: Int

    private var checkpointConfiguration: Configuration {
        var configuration = Configuration()
        configuration.busyMode = .timeout(1)
        return configuration
    }

    // MARK: - Ingest

    public func ingest(
        _ ipn: IncomingIPN, completion: @escaping @Sendable (Result<IngestOutcome, EventLogError>) -> Void
    ) {
        let hooks = ipn.verifiedBySignature ? self.hooks : []
        let policy = verificationPolicy.withLock { $0 }
        let early = ipn.verifiedBySignature ? earlyClaims() : nil
        writer.submit(
            { db in try Self.ingest(ipn, in: db, hooks: hooks, policy: policy, early: early) },
            settled: { early?.settle(committed: $0) }, completion: completion)
    }

    public func recordRefused(_ refused: RefusedIPN, completion: @escaping @Sendable (EventLogError?) -> Void) {
        writer.submit(
            { db in
                try db.cachedStatement(sql: Self.insertReceipt).execute(arguments: [
                    refused.receivedAt, refused.sourceIP, refused.path, refused.answer, refused.reason.rawValue,
                    refused.notification?.kind.rawValue, refused.notification?.entityID,
                    refused.notification?.status.name, nil, refused.size, Data(refused.bodyPrefix), nil, nil, nil, nil,
                    nil,
                ])
            },
            completion: { result in
                if case .failure(let error) = result { completion(error) } else { completion(nil) }
            })
    }

    private static let insertReceipt = """
        INSERT INTO receipts (received_at, source_ip, path, answer, reason, kind, entity_id, status, event_id,
                              size, body, claim_order_id, claim_amount, claim_currency, claim_invoice_id,
                              claim_transaction_id)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """

    private static let insertEvent = """
        INSERT INTO events (id, kind, entity_id, status, status_key, payop_state, state, source, verification,
                            transaction_id, invoice_id, order_id, refund_id, withdrawal_id, amount, currency,
                            error_message, legacy, received_at, verified_at, first_receipt, next_check_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, 'ipn', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """

    static func ingest(
        _ ipn: IncomingIPN, in db: Database, hooks: [HookConfig], policy: VerificationPolicy, early: EarlyClaims? = nil
    ) throws -> IngestOutcome {
        let n = ipn.notification
        let now = ipn.receivedAt
        // The statements every IPN runs are bound through SQLite's C API (`RawStatement`).
        let existing = try db.cachedStatement(
            sql: "SELECT id, state FROM events WHERE kind = ? AND entity_id = ? AND status_key = ?"
        ).firstRow {
            $0.add(n.kind.rawValue)
            $0.add(n.entityID)
            $0.add(n.status.dedupeKey)
        } read: { (id: $0.text(0) ?? "", state: $0.text(1)) }
        let eventID = existing?.id ?? SortableID.make(prefix: Event.idPrefix, millisecondsSince1970: now)
        // The receipt first, so a new event can point at it. Each copy keeps its own claims: a later copy
        // is judged on its own against Payop.
        try db.cachedStatement(sql: insertReceipt).run {
            $0.add(now)
            $0.add(ipn.sourceIP)
            $0.add(ipn.path)
            $0.add(200)
            $0.add(nil as String?)
            $0.add(n.kind.rawValue)
            $0.add(n.entityID)
            $0.add(n.status.name)
            $0.add(eventID)
            $0.add(ipn.body.count)
            $0.add(blob: ipn.body)
            $0.add(n.orderID)
            $0.add(n.amount)
            $0.add(n.currency)
            $0.add(n.invoiceID)
            $0.add(n.transactionID)
        }
        let receiptID = db.lastInsertedRowID
        if let existing {
            try db.cachedStatement(sql: "UPDATE events SET duplicates = duplicates + 1 WHERE id = ?").run {
                $0.add(eventID)
            }
            if existing.state == "rejected",
                var machine = try verification(db, eventID)
            {
                machine.ipnRepeated(now: now, policy: policy)
                try persist(machine, eventID: eventID, facts: nil, now: now, in: db)
            }
        } else {
            let machine =
                ipn.verifiedBySignature
                ? EventVerification.signed(kind: n.kind, status: n.status, receivedAt: now)
                : EventVerification.fresh(kind: n.kind, status: n.status, receivedAt: now)
            try db.cachedStatement(sql: insertEvent).run {
                $0.add(eventID)
                $0.add(n.kind.rawValue)
                $0.add(n.entityID)
                $0.add(n.status.name)
                $0.add(n.status.dedupeKey)
                $0.add(n.status.payopState)
                $0.add(machine.state.name)
                $0.add(ipn.verifiedBySignature ? "signature" : nil)
                $0.add(n.transactionID)
                $0.add(n.invoiceID)
                $0.add(n.orderID)
                $0.add(n.refundID)
                $0.add(n.withdrawalID)
                $0.add(n.amount)
                $0.add(n.currency)
                $0.add(n.errorMessage)
                $0.add(n.legacy != nil)
                $0.add(now)
                $0.add(ipn.verifiedBySignature ? now : nil)
                $0.add(receiptID)
                $0.add(machine.nextCheckAt)
            }
            if ipn.verifiedBySignature {
                let event = OutboxEvent(
                    eventID: eventID, kind: n.kind.rawValue, entityID: n.entityID, status: n.status.name)
                try enqueueDeliveries(db, of: event, hooks: hooks, now: now, early: early)
            }
        }
        return IngestOutcome(receiptID: receiptID, eventID: eventID, duplicate: existing != nil)
    }

    // MARK: - Queries

    /// Newest first.
    public func events(_ filter: EventFilter) async throws(EventLogError) -> [Event] {
        try await read { db in
            var conditions = SQLFilter()
            conditions.add("events.kind || '.' || events.status = ?", filter.type)
            conditions.add("events.status = ?", filter.status)
            conditions.add("events.state = ?", filter.state)
            if let since = filter.since {
                // The id range first (a seek of the primary key), then the exact time.
                conditions.add("events.id >= ?", SortableID.first(prefix: Event.idPrefix, millisecondsSince1970: since))
                conditions.add("events.received_at >= ?", since)
            }
            if let query = filter.query {
                // No index on these ids (each would cost every ingest a write): a search scans, which a
                // person at the console can afford and the hot path cannot.
                conditions.add(
                    """
                    (events.id = ? OR events.order_id = ? OR events.transaction_id = ? OR events.invoice_id = ?
                     OR events.refund_id = ? OR events.withdrawal_id = ? OR events.entity_id = ?)
                    """, arguments: StatementArguments(Array(repeating: query, count: 7)))
            }
            if let before = filter.before {
                conditions.add("events.id < ?", before.id)
            }
            return try Row.fetchAll(
                db,
                sql:
                    "\(Event.select) \(conditions.whereClause) ORDER BY events.id DESC LIMIT ?",
                arguments: conditions.arguments + [filter.limit]
            ).map(Event.init(row:))
        }
    }

    /// The event with its history. `receiptBodies`: each copy's body too, cut to that many bytes;
    /// `receiptLimit`: the first copies only (a flood of copies stays cheap to show).
    public func event(id: String, receiptBodies: Int? = nil, receiptLimit: Int? = nil) async throws(EventLogError)
        -> EventDetail?
    {
        try await read { db in
            guard let row = try Row.fetchOne(db, sql: "\(Event.select) WHERE events.id = ?", arguments: [id])
            else { return nil }
            let body = receiptBodies.map { ", substr(body, 1, \(max($0, 0))) AS body" } ?? ""
            let receipts = try Row.fetchAll(
                db,
                sql: "SELECT \(Receipt.columns)\(body) FROM receipts WHERE event_id = ? ORDER BY id LIMIT ?",
                arguments: [id, receiptLimit ?? -1]
            ).map(Receipt.init(row:))
            let attempts = try Row.fetchAll(
                db,
                sql:
                    "SELECT at, outcome, payop_state, detail FROM verification_attempts WHERE event_id = ? ORDER BY id",
                arguments: [id]
            ).map {
                VerificationAttempt(
                    at: $0["at"], outcome: $0["outcome"], payopState: $0["payop_state"], detail: $0["detail"])
            }
            let deliveries = try Row.fetchAll(
                db, sql: "SELECT \(Delivery.columns) FROM deliveries WHERE event_id = ? ORDER BY id", arguments: [id]
            ).map(Delivery.init(row:))
            let deliveryAttempts = try Row.fetchAll(
                db,
                sql: """
                    SELECT \(DeliveryAttempt.columns) FROM delivery_attempts
                    WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = ?) ORDER BY finished_at, id
                    """, arguments: [id]
            ).map(DeliveryAttempt.init(row:))
            return EventDetail(
                event: Event(row: row), receipts: receipts, verificationAttempts: attempts, deliveries: deliveries,
                deliveryAttempts: DeliveryAttempt.history(recorded: deliveryAttempts, deliveries: deliveries))
        }
    }

    /// Newest first; `refusedOnly` keeps the 400 and 401 answers.
    public func receipts(refusedOnly: Bool, since: Int64?, limit: Int) async throws(EventLogError) -> [Receipt] {
        try await read { db in
            var conditions = SQLFilter()
            conditions.add("answer <> 200", when: refusedOnly)
            if let since {
                conditions.add("id >= ?", try Self.firstReceiptID(stampedFrom: since, earlier: Self.receiptOrderSlack, db))
                conditions.add("received_at >= ?", since)
            }
            return try Row.fetchAll(
                db,
                sql: "SELECT \(Receipt.columns) FROM receipts \(conditions.whereClause) ORDER BY id DESC LIMIT ?",
                arguments: conditions.arguments + [limit]
            ).map(Receipt.init(row:))
        }
    }

    /// Deletes receipts received before `cutoff` and deliveries delivered before it. Events are kept,
    /// and with them the receipt of each one's first IPN (its `ipn` body); dead deliveries are kept
    /// for `replay`.
    public func prune(before cutoff: Int64) async throws(EventLogError) -> PruneResult {
        try await write { db in
            // Every receipt from the bound on was received at the cutoff or later: the scan stops there.
            let bound = try Self.firstReceiptID(stampedFrom: cutoff, earlier: -Self.receiptOrderSlack, db)
            try db.execute(
                sql: """
                    DELETE FROM receipts WHERE id < ? AND received_at < ?
                    AND id NOT IN (SELECT first_receipt FROM events WHERE first_receipt IS NOT NULL)
                    """, arguments: [bound, cutoff])
            let receipts = db.changesCount
            try db.execute(
                sql: """
                    DELETE FROM delivery_attempts WHERE delivery_id IN
                        (SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < ?)
                    """, arguments: [cutoff])
            try db.execute(
                sql: "DELETE FROM deliveries WHERE state = 'delivered' AND finished_at < ?", arguments: [cutoff])
            return PruneResult(receipts: receipts, deliveries: db.changesCount)
        }
    }

    /// How far apart in time two receipts written one after the other can be stamped: two event loops
    /// stamp their own, and the clock may be stepped back. Time ranges over receipts count on it.
    static let receiptOrderSlack: Int64 = 60_000

    /// The receipts have no index on their time (it cost every commit pages, for the console and the
    /// pruning only): they are numbered as they are written, in the order they arrived give or take
    /// `receiptOrderSlack`. This bisects the ids, a few dozen seeks of the primary key, for the point
    /// where the stamps reach `time`. With stamps at most the slack out of order, every receipt below
    /// it was received before `time + slack`, and every one from it on at `time - slack` or later.
    /// `earlier` moves the time back (forward when negative), saturating: a time from the command line
    /// may be anything.
    static func firstReceiptID(stampedFrom time: Int64, earlier: Int64, _ db: Database) throws -> Int64 {
        let (moved, overflow) = time.subtractingReportingOverflow(earlier)
        let time = overflow ? (earlier > 0 ? Int64.min : Int64.max) : moved
        guard let last = try Int64.fetchOne(db, sql: "SELECT max(id) FROM receipts") else { return 0 }
        let seek = try db.cachedStatement(sql: "SELECT id, received_at FROM receipts WHERE id >= ? ORDER BY id LIMIT 1")
        var low = try Int64.fetchOne(db, sql: "SELECT min(id) FROM receipts") ?? 0
        var high = last == .max ? last : last + 1
        while low < high {
            let middle = low + (high - low) / 2
            guard let row = try Row.fetchOne(seek, arguments: [middle]) else { break }
            let id: Int64 = row[0]
            if row[1] as Int64 >= time {
                high = middle
            } else if id == .max {
                // Every receipt is older, and none can come after this id.
                return id
            } else {
                low = id + 1
            }
        }
        return low
    }

    public func counts() async throws(EventLogError) -> (events: Int, receipts: Int) {
        try await read { db in
            (
                try Int.fetchOne(db, sql: "SELECT count(*) FROM events") ?? 0,
                try Int.fetchOne(db, sql: "SELECT count(*) FROM receipts") ?? 0
            )
        }
    }
}
