import Foundation
import Logging
import NIOPosix
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// The event log shared by several daemons: one PostgreSQL database, reached through postgres-nio's
/// connection pool. Every state change runs the same state machines as the SQLite log (load the row,
/// run the machine's `mutating func`, write what it returns, in one transaction); what SQLite gets from
/// its single writer, this log gets from the database:
///
/// - dedupe through unique constraints and `INSERT ... ON CONFLICT`, so two daemons receiving the same
///   IPN at once make one event;
/// - questions to Payop claimed with `FOR UPDATE SKIP LOCKED` and a lease per entity, so one daemon at a
///   time asks about an entity;
/// - deliveries claimed with a lease (`running`, `lease_until`, the claimer's `node_id`), so a delivery
///   whose claimer died is taken over once the lease ends, and the per-(hook, kind, entity) order is
///   checked in the claim's own transaction, serialised with the creation of deliveries;
/// - durability checked at open: `synchronous_commit` at least `on`, `fsync` on.
///
/// Lifecycle: `run()` (a swift-service-lifecycle `Service`) runs the pool; `open()` checks and migrates
/// once it runs. `withLog` does both for tools and tests.
public final class PostgresEventLog: EventStore, Service {
    public let configuration: PostgresEventLogConfiguration
    let client: PostgresClient
    let clock: any WallClock
    let logger: Logger
    /// The configured hooks, for the outbox: verified events get one delivery per matching hook.
    private let hookRoutes = Mutex<[HookConfig]>([])
    /// How a repeated IPN's event is scheduled (at start and on reload).
    private let verificationPolicy = Mutex(VerificationPolicy.defaults)
    private let closed = Atomic<Bool>(false)
    /// Whether this daemon re-asks Payop about decided events: true without a session (one daemon,
    /// tools, tests); a daemon's `PostgresSession` sets it while it holds the leadership.
    private let reconcileLeader = Atomic<Bool>(true)
    /// Why this daemon's session is not whole (its connection lost, its node id taken), for `/readyz`.
    private let sessionTrouble = Mutex<String?>(nil)

    let metrics: (any StorageMetrics)?
    /// Pool connections leased now (for the metrics).
    private let leasedConnections = Atomic<Int>(0)

    public var isReconcileLeader: Bool { reconcileLeader.load(ordering: .relaxed) }
    func setReconcileLeader(_ leader: Bool) {
        reconcileLeader.store(leader, ordering: .relaxed)
        metrics?.reconcileLeader(leader)
    }
    var sessionProblem: String? { sessionTrouble.withLock { $0 } }
    func setSessionProblem(_ problem: String?) { sessionTrouble.withLock { $0 = problem } }

    /// Claims are made only while this node's session (and so its node id) is held.
    func requireSession() throws(EventLogError) {
        if let problem = sessionProblem { throw EventLogError(.unavailable, problem) }
    }

    public var nodeID: String { configuration.nodeID }

    public init(
        configuration: PostgresEventLogConfiguration, clock: any WallClock = SystemWallClock(),
        logger: Logger = Logger(label: "payop-ipnd.event-log", factory: { _ in SwiftLogNoOpLogHandler() }),
        metrics: (any StorageMetrics)? = nil
    ) {
        self.configuration = configuration
        self.clock = clock
        self.logger = logger
        self.metrics = metrics
        self.client = PostgresClient(configuration: configuration.clientConfiguration, backgroundLogger: logger)
    }

    /// Runs the connection pool until cancelled or a graceful shutdown; nothing reaches the database
    /// without it.
    public func run() async {
        await client.run()
    }

    /// Checks that the server makes commits durable and brings the schema up to date. Call it while
    /// `run()` runs; it fails within `configuration.openTimeout` when the server cannot be reached.
    public func open() async throws(EventLogError) {
        let now = clock.nowMilliseconds()
        let logger = self.logger
        let where_ = configuration.displayName
        do {
            try await withDeadline(configuration.openTimeout) { [client] in
                try await client.withConnection { connection in
                    try await Self.checkDurability(connection, logger: logger)
                    let applied = try await PostgresSchema.migrate(connection, now: now, logger: logger)
                    if applied > 0 {
                        logger.notice("event log migrated", metadata: ["migrations": "\(applied)", "database": "\(where_)"])
                    }
                }
            }
        } catch let error as EventLogError {
            throw error
        } catch is DeadlineExceeded {
            // The pool retries a refused login or TLS handshake quietly: one direct connection names the cause.
            _ = try await Self.probe(configuration, logger: logger)
            throw EventLogError(
                .unavailable,
                "cannot reach PostgreSQL at \(where_) within \(configuration.openTimeout): check storage.url, "
                    + "that the server runs and accepts connections from this host")
        } catch {
            throw Self.mapError(error, "cannot open the event log at \(where_)")
        }
    }

    /// Stops this log's writes; the pool itself stops with `run()` (or here, when `start` ran it).
    public func close() {
        closed.store(true, ordering: .relaxed)
        ownPool.withLock { $0?.cancel() }
    }

    /// The pool's task when the log runs it itself (`start`).
    private let ownPool = Mutex<Task<Void, Never>?>(nil)

    /// Opens a log that runs its own pool until `close()`: for command-line tools.
    public static func start(
        configuration: PostgresEventLogConfiguration, clock: any WallClock = SystemWallClock(),
        logger: Logger = Logger(label: "payop-ipnd.event-log", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(EventLogError) -> PostgresEventLog {
        let log = PostgresEventLog(configuration: configuration, clock: clock, logger: logger)
        log.ownPool.withLock { $0 = Task { await log.run() } }
        do {
            try await log.open()
        } catch {
            log.close()
            throw error
        }
        return log
    }

    /// Runs `run()` for the duration of `body`, after `open()`: for command-line tools and tests.
    public static func withLog<T: Sendable>(
        configuration: PostgresEventLogConfiguration, clock: any WallClock = SystemWallClock(),
        logger: Logger = Logger(label: "payop-ipnd.event-log", factory: { _ in SwiftLogNoOpLogHandler() }),
        _ body: @Sendable (PostgresEventLog) async throws -> T
    ) async throws -> T {
        let log = PostgresEventLog(configuration: configuration, clock: clock, logger: logger)
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                await log.run()
                return nil
            }
            defer { group.cancelAll() }
            try await log.open()
            let value = try await body(log)
            log.close()
            return value
        }
    }

    public func setVerificationPolicy(_ policy: VerificationPolicy) { verificationPolicy.withLock { $0 = policy } }

    /// The hooks deliveries are created for from now on (at start and on reload).
    public func setHooks(_ hooks: [HookConfig]) { hookRoutes.withLock { $0 = hooks } }
    public var hooks: [HookConfig] { hookRoutes.withLock { $0 } }

    // MARK: - Durability

    /// A commit is acknowledged (and Payop answered 200) only once it is on disk: anything weaker than
    /// `synchronous_commit = on` can lose acknowledged IPNs in a crash, and `fsync = off` loses them
    /// whatever the setting. `remote_apply` (a synchronous standby) is stronger still and accepted.
    static let durableCommitSettings: Set<String> = ["on", "remote_apply"]

    static func checkDurability(_ connection: PostgresConnection, logger: Logger) async throws {
        let setting = try await connection.query("SHOW synchronous_commit", logger: logger).collect().first?
            .decode(String.self)
        guard let setting, durableCommitSettings.contains(setting) else {
            throw EventLogError(
                .misconfigured,
                "PostgreSQL's synchronous_commit is \(setting ?? "unknown") for this role and database: a crash could "
                    + "lose IPNs already answered 200. Set it to on (or remote_apply with a synchronous standby), e.g. "
                    + "ALTER ROLE <user> SET synchronous_commit = on")
        }
        let fsync = try await connection.query("SHOW fsync", logger: logger).collect().first?.decode(String.self)
        guard fsync == "on" else {
            throw EventLogError(
                .misconfigured,
                "PostgreSQL runs with fsync = \(fsync ?? "unknown"): commits are not durable. Turn fsync on in "
                    + "postgresql.conf and reload the server")
        }
    }

    /// The `synchronous_commit` a connection of the pool sees now.
    public func synchronousCommit() async throws(EventLogError) -> String {
        try await read("cannot read synchronous_commit") { connection, logger in
            try await connection.query("SHOW synchronous_commit", logger: logger).collect().first?
                .decode(String.self) ?? ""
        }
    }

    // MARK: - Transactions

    /// Runs `body` in one transaction on a pooled connection. A deadlock or serialization failure
    /// (two daemons touching the same rows in another order) rolls back and runs `body` again; any
    /// other failure rolls back and is reported.
    func transaction<T: Sendable>(
        _ what: String, timeout: Duration = operationTimeout,
        _ body: @escaping @Sendable (PostgresConnection, Logger) async throws -> T
    ) async throws(EventLogError) -> T {
        guard !closed.load(ordering: .relaxed) else {
            throw EventLogError(.closed, "the event log is shutting down")
        }
        return try await bounded(what, timeout) { () async throws(EventLogError) in
            try await self.tries(what, body)
        }
    }

    /// The transaction, once more after each deadlock or serialization failure, five times at most.
    private func tries<T: Sendable>(_ what: String, _ body: @Sendable (PostgresConnection, Logger) async throws -> T)
        async throws(EventLogError) -> T
    {
        let logger = self.logger
        var tries = 0
        while true {
            tries += 1
            do {
                return try await leased { connection in
                    try await connection.query("BEGIN", logger: logger)
                    let value: T
                    do {
                        value = try await body(connection, logger)
                    } catch {
                        _ = try? await connection.query("ROLLBACK", logger: logger)
                        throw error
                    }
                    // A COMMIT that fails (the connection lost) leaves the outcome unknown: reported as
                    // unavailable, so the IPN is answered 503 and Payop's retry is deduplicated.
                    try await connection.query("COMMIT", logger: logger)
                    return value
                }
            } catch let error as EventLogError {
                throw error
            } catch {
                if tries < 5, Self.isTransient(error) { continue }
                throw Self.mapError(error, what)
            }
        }
    }

    /// How long one transaction or read may take, waiting for a connection included, before the caller
    /// is told the log is unavailable (and carries on: backs off, answers 503, shows the error). With the
    /// server gone, a connection is waited for without end; nothing the daemon does may wait with it.
    static let operationTimeout = Duration.seconds(30)

    /// `body`, or unavailable once `timeout` has passed (`withDeadline`: a query stuck where cancellation
    /// does not reach is left behind, not waited for).
    private func bounded<T: Sendable>(
        _ what: String, _ timeout: Duration, _ body: @escaping @Sendable () async throws(EventLogError) -> T
    ) async throws(EventLogError) -> T {
        do {
            return try await withDeadline(timeout) { try await body() }
        } catch let error as EventLogError {
            throw error
        } catch {
            throw EventLogError(.unavailable, "\(what): PostgreSQL at \(location) did not answer within \(timeout)")
        }
    }

    /// A pooled connection for `body`, with how long it took to get and how many are out, measured.
    private func leased<T: Sendable>(_ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let asked = ContinuousClock.now
        return try await client.withConnection { connection in
            if let metrics {
                metrics.storageConnectionWait(milliseconds: Self.milliseconds(since: asked))
                let out = leasedConnections.wrappingAdd(1, ordering: .relaxed).newValue
                metrics.storageConnections(inUse: out, poolSize: configuration.poolSize)
            }
            defer {
                let out = leasedConnections.wrappingSubtract(1, ordering: .relaxed).newValue
                metrics?.storageConnections(inUse: out, poolSize: configuration.poolSize)
            }
            return try await body(connection)
        }
    }

    static func milliseconds(since start: ContinuousClock.Instant) -> Int64 {
        let elapsed = (ContinuousClock.now - start).components
        return elapsed.seconds * 1000 + elapsed.attoseconds / 1_000_000_000_000_000
    }

    /// Runs a claim, timing it for the metrics.
    func timedClaim<T>(_ what: String, _ body: () async throws(EventLogError) -> T) async throws(EventLogError) -> T {
        let start = ContinuousClock.now
        defer { metrics?.storageClaim(what, milliseconds: Self.milliseconds(since: start)) }
        return try await body()
    }

    /// One read outside an explicit transaction.
    func read<T: Sendable>(
        _ what: String, timeout: Duration = operationTimeout,
        _ body: @escaping @Sendable (PostgresConnection, Logger) async throws -> T
    ) async throws(EventLogError) -> T {
        let logger = self.logger
        return try await bounded(what, timeout) { () async throws(EventLogError) in
            do {
                return try await self.leased { connection in try await body(connection, logger) }
            } catch let error as EventLogError {
                throw error
            } catch {
                throw Self.mapError(error, what)
            }
        }
    }

    static func isTLSFailure(_ error: PSQLError) -> Bool {
        let underlying = error.underlying.map { String(reflecting: $0) } ?? ""
        return ["SSL", "TLS", "certificate", "handshake"].contains { underlying.localizedCaseInsensitiveContains($0) }
    }

    /// SQLSTATE 40001 (serialization_failure) and 40P01 (deadlock_detected): the same work again succeeds.
    static func isTransient(_ error: any Error) -> Bool {
        guard let error = error as? PSQLError, let state = error.serverInfo?[.sqlState] else { return false }
        return state == "40001" || state == "40P01"
    }

    /// The server's own words (SQLSTATE and message) or the client's error code, for the message: never
    /// the query's bound values.
    static func describe(_ error: any Error) -> String {
        if let error = error as? PSQLError {
            if let info = error.serverInfo {
                let state = info[.sqlState] ?? "?"
                return "PostgreSQL \(state): \(info[.message] ?? "no message")"
            }
            return "PostgreSQL client: \(error.code)" + (error.underlying.map { ": \($0)" } ?? "")
        }
        return String(describing: error)
    }

    static func mapError(_ error: any Error, _ what: String) -> EventLogError {
        if let error = error as? EventLogError { return error }
        var message = what
        if let error = error as? PSQLError {
            switch (error.code, error.serverInfo?[.sqlState]) {
            case (_, "28P01"), (_, "28000"):
                message += ": PostgreSQL refused the user or password (check storage.url and storage.password_file)"
            case (_, "3D000"):
                message += ": the database in storage.url does not exist"
            case (_, "42501"):
                message += ": the user lacks a privilege on the database (it needs to create tables and write them)"
            case (.sslUnsupported, _):
                message += ": the server does not offer TLS (use sslmode=disable only on a trusted network)"
            case (.connectionError, _) where Self.isTLSFailure(error):
                message += ": the TLS handshake failed (\(Self.describe(error))). With sslmode=verify-full the "
                    + "server's certificate must name the host in storage.url and be signed by a CA this machine trusts"
            case (.connectionError, _), (.serverClosedConnection, _), (.poolClosed, _):
                message += ": PostgreSQL is not reachable"
            default:
                break
            }
        }
        return EventLogError(.unavailable, message, cause: DescribedError(describe(error)))
    }

    // MARK: - Ingest

    /// The listener's completion API bridged to the pool: one task per IPN, whose only work is this
    /// one transaction (bounded by the pool's connection and query timeouts) and the completion.
    public func ingest(
        _ ipn: IncomingIPN, completion: @escaping @Sendable (Result<IngestOutcome, EventLogError>) -> Void
    ) {
        Task {
            do throws(EventLogError) {
                completion(.success(try await ingest(ipn)))
            } catch {
                completion(.failure(error))
            }
        }
    }

    public func recordRefused(_ refused: RefusedIPN, completion: @escaping @Sendable (EventLogError?) -> Void) {
        Task {
            do throws(EventLogError) {
                try await recordRefused(refused)
                completion(nil)
            } catch {
                completion(error)
            }
        }
    }

    /// How long an IPN may wait for PostgreSQL (a connection, the transaction) before it is answered
    /// 503: a lost server must not hold Payop's requests open. A commit that lands after it is only
    /// a duplicate when Payop sends the IPN again.
    static let ingestTimeout = Duration.seconds(10)

    /// Records the receipt and its event (or counts a duplicate) in one transaction; returns once committed.
    public func ingest(_ ipn: IncomingIPN) async throws(EventLogError) -> IngestOutcome {
        let hooks = ipn.verifiedBySignature ? self.hooks : []
        let policy = verificationPolicy.withLock { $0 }
        let node = nodeID
        return try await transaction("the event log could not commit the IPN", timeout: Self.ingestTimeout) {
            connection, logger in
            try await Self.ingest(ipn, on: connection, logger: logger, hooks: hooks, policy: policy, node: node)
        }
    }

    public func recordRefused(_ refused: RefusedIPN) async throws(EventLogError) {
        let node = nodeID
        try await transaction("the event log could not commit the refused request", timeout: Self.ingestTimeout) {
            connection, logger in
            let n = refused.notification
            try await connection.query(
                """
                INSERT INTO receipts (received_at, source_ip, path, answer, reason, kind, entity_id, status, size, body,
                                      node_id)
                VALUES (\(refused.receivedAt), \(refused.sourceIP), \(refused.path), \(refused.answer),
                        \(refused.reason.rawValue), \(n?.kind.rawValue), \(n?.entityID), \(n?.status.name),
                        \(refused.size), \(Data(refused.bodyPrefix)), \(node))
                """, logger: logger)
        }
    }

    static func ingest(
        _ ipn: IncomingIPN, on connection: PostgresConnection, logger: Logger, hooks: [HookConfig],
        policy: VerificationPolicy, node: String
    ) async throws -> IngestOutcome {
        let n = ipn.notification
        let now = ipn.receivedAt
        let machine =
            ipn.verifiedBySignature
            ? EventVerification.signed(kind: n.kind, status: n.status, receivedAt: now)
            : EventVerification.fresh(kind: n.kind, status: n.status, receivedAt: now)
        let candidate = SortableID.make(prefix: Event.idPrefix, millisecondsSince1970: now)
        // The event first, naming the receipt id it takes from the sequence: when another transaction
        // has the same (kind, entity, status) in flight, ON CONFLICT waits for it and then does nothing,
        // and this IPN becomes that event's duplicate. One event however many daemons receive it.
        let created = try await connection.query(
            """
            INSERT INTO events (id, kind, entity_id, status, status_key, payop_state, state, source, verification,
                                transaction_id, invoice_id, order_id, refund_id, withdrawal_id, amount, currency,
                                error_message, legacy, received_at, verified_at, first_receipt, next_check_at,
                                check_attempts, watch_until)
            VALUES (\(candidate), \(n.kind.rawValue), \(n.entityID), \(n.status.name), \(n.status.dedupeKey),
                    \(n.status.payopState.map(Int64.init)), \(machine.state.name), 'ipn',
                    \(ipn.verifiedBySignature ? "signature" : nil), \(n.transactionID), \(n.invoiceID), \(n.orderID),
                    \(n.refundID), \(n.withdrawalID), \(n.amount), \(n.currency), \(n.errorMessage), \(n.legacy != nil),
                    \(now), \(ipn.verifiedBySignature ? now : nil), nextval('receipts_id_seq'), \(machine.nextCheckAt),
                    \(Int64(machine.attempts)), \(machine.watchUntil))
            ON CONFLICT (kind, entity_id, status_key) DO NOTHING
            RETURNING first_receipt
            """, logger: logger
        ).collect().first?.decode(Int64.self)

        if let receiptID = created {
            try await insertReceipt(ipn, id: receiptID, eventID: candidate, node: node, on: connection, logger: logger)
            // No notification for the question to Payop: the daemon that took the IPN asks at once
            // itself, and a NOTIFY on every ingest would serialise the commits of every daemon.
            if ipn.verifiedBySignature {
                try await enqueueDeliveries(connection, logger, eventID: candidate, hooks: hooks, now: now)
            }
            return IngestOutcome(receiptID: receiptID, eventID: candidate, duplicate: false)
        }

        // A duplicate: the event's row is locked for the count and for the machine's transition.
        guard
            let existing = try await connection.query(
                """
                SELECT id FROM events WHERE kind = \(n.kind.rawValue) AND entity_id = \(n.entityID)
                AND status_key = \(n.status.dedupeKey) FOR UPDATE
                """, logger: logger
            ).collect().first?.decode(String.self)
        else {
            // ON CONFLICT found a row that is gone now: nothing deletes events, so this is a fault.
            throw EventLogError(.unavailable, "the event for this IPN vanished while it was being recorded")
        }
        let receiptID = try await insertReceipt(
            ipn, id: nil, eventID: existing, node: node, on: connection, logger: logger)
        try await connection.query(
            "UPDATE events SET duplicates = duplicates + 1 WHERE id = \(existing)", logger: logger)
        if var machine = try await verification(connection, logger, existing), case .rejected = machine.state {
            machine.ipnRepeated(now: now, policy: policy)
            try await persist(machine, eventID: existing, facts: nil, now: now, releaseClaimOf: nil, connection, logger)
        }
        return IngestOutcome(receiptID: receiptID, eventID: existing, duplicate: true)
    }

    @discardableResult
    static func insertReceipt(
        _ ipn: IncomingIPN, id: Int64?, eventID: String, node: String, on connection: PostgresConnection,
        logger: Logger
    ) async throws -> Int64 {
        let n = ipn.notification
        // Each copy keeps its own claims: a later copy is judged on its own against Payop.
        let row = try await connection.query(
            """
            INSERT INTO receipts (id, received_at, source_ip, path, answer, reason, kind, entity_id, status, event_id,
                                  size, body, claim_order_id, claim_amount, claim_currency, claim_invoice_id,
                                  claim_transaction_id, node_id)
            VALUES (COALESCE(\(id), nextval('receipts_id_seq')), \(ipn.receivedAt), \(ipn.sourceIP), \(ipn.path), 200,
                    NULL, \(n.kind.rawValue), \(n.entityID), \(n.status.name), \(eventID), \(Int64(ipn.body.count)),
                    \(Data(ipn.body)), \(n.orderID), \(n.amount), \(n.currency), \(n.invoiceID), \(n.transactionID),
                    \(node))
            RETURNING id
            """, logger: logger
        ).collect().first
        guard let row else { throw EventLogError(.unavailable, "the receipt was not recorded") }
        return try row.decode(Int64.self)
    }

    // MARK: - Queries

    /// As `EventLog.event(id:receiptBodies:receiptLimit:)`.
    public func event(id: String, receiptBodies: Int? = nil, receiptLimit: Int? = nil) async throws(EventLogError)
        -> EventDetail?
    {
        try await transaction("cannot read the event log") { connection, logger in
            // One snapshot for the whole history: a replay committed between two of the reads below would
            // show a run both in its delivery's row and in the runs' history.
            try await connection.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", logger: logger)
            guard
                let row = try await connection.query("\(unescaped: Event.select) WHERE events.id = \(id)", logger: logger)
                    .collect().first
            else { return nil }
            let body = receiptBodies.map { ", substr(body, 1, \(max($0, 0))) AS body" } ?? ""
            let limit = receiptLimit.map { " LIMIT \(max($0, 0))" } ?? ""
            let receipts = try await connection.query(
                """
                SELECT \(unescaped: Receipt.postgresColumns)\(unescaped: body) FROM receipts WHERE event_id = \(id)
                ORDER BY received_at, id\(unescaped: limit)
                """, logger: logger
            ).collect().map { try Receipt(postgres: $0.makeRandomAccess()) }
            let attempts = try await connection.query(
                "SELECT at, outcome, payop_state, detail FROM verification_attempts WHERE event_id = \(id) ORDER BY id",
                logger: logger
            ).collect().map { row in
                let (at, outcome, state, detail) = try row.decode((Int64, String, Int64?, String?).self)
                return VerificationAttempt(at: at, outcome: outcome, payopState: state.map(Int.init), detail: detail)
            }
            let deliveries = try await connection.query(
                "SELECT \(unescaped: Delivery.postgresColumns) FROM deliveries WHERE event_id = \(id) ORDER BY id", logger: logger
            ).collect().map { try Delivery(postgres: $0.makeRandomAccess()) }
            let deliveryAttempts = try await connection.query(
                """
                SELECT \(unescaped: DeliveryAttempt.columns) FROM delivery_attempts
                WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = \(id)) ORDER BY finished_at, id
                """, logger: logger
            ).collect().map { try DeliveryAttempt(postgres: $0.makeRandomAccess()) }
            return EventDetail(
                event: try Event(postgres: row.makeRandomAccess()), receipts: receipts, verificationAttempts: attempts,
                deliveries: deliveries,
                deliveryAttempts: DeliveryAttempt.history(recorded: deliveryAttempts, deliveries: deliveries))
        }
    }

    /// Newest first; `refusedOnly` keeps the 400 and 401 answers.
    public func receipts(refusedOnly: Bool, since: Int64?, limit: Int) async throws(EventLogError) -> [Receipt] {
        try await read("cannot read the event log") { connection, logger in
            try await connection.query(
                """
                SELECT \(unescaped: Receipt.postgresColumns) FROM receipts
                WHERE (NOT \(refusedOnly) OR answer <> 200) AND (\(since)::bigint IS NULL OR received_at >= \(since))
                ORDER BY received_at DESC, id DESC LIMIT \(Int64(limit))
                """, logger: logger
            ).collect().map { try Receipt(postgres: $0.makeRandomAccess()) }
        }
    }

    public func counts() async throws(EventLogError) -> (events: Int, receipts: Int) {
        try await read("cannot read the event log") { connection, logger in
            let row = try await connection.query(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM receipts)", logger: logger
            ).collect().first
            guard let (events, receipts) = try row?.decode((Int64, Int64).self) else { return (0, 0) }
            return (Int(events), Int(receipts))
        }
    }
}

/// A failure's description kept as text: the cause of an `EventLogError`.
struct DescribedError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

struct DeadlineExceeded: Error {}

/// Runs `body`, or throws `DeadlineExceeded` once `limit` has passed. The body is cancelled then but
/// not waited for: a call stuck where cancellation does not reach (a query on a connection the server
/// dropped without a word) must not hold the caller, and the IPN waiting on it, past its deadline.
func withDeadline<T: Sendable>(_ limit: Duration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let race = DeadlineRace<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { continuation in
            race.start(continuation, limit: limit, body)
        }
    } onCancel: {
        race.finish(.failure(CancellationError()))
    }
}

/// The first of the body and the timer to end answers; the other is cancelled.
///
/// The timer is an event loop's scheduled task, not a `Task.sleep`: a cancelled sleep keeps its task
/// and its dispatch timer, and through them this race and its body's task, until the original deadline
/// (swiftlang/swift#60441): one per IPN held 10 s of IPNs, about 35 MB at 2,000 IPNs a second. A
/// cancelled scheduled task is dropped from its loop at once.
private final class DeadlineRace<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T, any Error>?
        var work: Task<Void, Never>?
        var timer: Scheduled<Void>?
        var done = false
    }
    private let state = Mutex(State())

    func start(
        _ continuation: CheckedContinuation<T, any Error>, limit: Duration, _ body: @escaping @Sendable () async throws -> T
    ) {
        let cancelled = state.withLock { state in
            state.continuation = continuation
            return state.done
        }
        if cancelled {
            finish(.failure(CancellationError()))
            return
        }
        let work = Task {
            do {
                self.finish(.success(try await body()))
            } catch {
                self.finish(.failure(error))
            }
        }
        let timer = MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: TimeAmount(limit)) {
            self.finish(.failure(DeadlineExceeded()))
        }
        let finished = state.withLock { state in
            state.work = work
            state.timer = timer
            return state.done
        }
        // Ended before the two were known: stop them now rather than at the deadline.
        if finished {
            work.cancel()
            timer.cancel()
        }
    }

    func finish(_ result: Result<T, any Error>) {
        let (continuation, work, timer) = state.withLock { state in
            state.done = true
            defer {
                state.continuation = nil
                state.work = nil
                state.timer = nil
            }
            return (state.continuation, state.work, state.timer)
        }
        guard let continuation else { return }
        work?.cancel()
        timer?.cancel()
        continuation.resume(with: result)
    }
}
