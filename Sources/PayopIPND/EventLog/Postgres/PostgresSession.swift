import Foundation
import Logging
import NIOPosix
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// The one connection a daemon keeps outside the pool, for what lasts as long as a session does:
///
/// - **its node id**: a session-level advisory lock on `storage.node_id`. Two daemons with one node id
///   would each take the other's running deliveries for its own crashed ones and run them again, so the
///   second is refused at start (as a second daemon on one SQLite file is).
/// - **the reconcile leadership**: `pg_try_advisory_lock`, tried every `leaderRetry`. The leader alone
///   re-asks Payop about decided events (see `PostgresEventLog.dueChecks`); when it dies, the server
///   ends its session, the lock is free, and another daemon takes over at its next try.
/// - **wake-ups**: `LISTEN payop_ipnd_work`. The log's transactions `NOTIFY` when they create work (an
///   event to verify, a delivery due or freed), so every daemon starts at once instead of at its next
///   due-time query, which stays the fallback for anything a lost notification would have said.
///
/// A lost connection is reopened every `reconnectDelay`; until then the node has no leadership, and
/// `/readyz` names the problem.
public final class PostgresSession: Service {
    /// What a notification asks for.
    public enum Work: String, Sendable {
        case verify
        case deliver
    }

    static let channel = "payop_ipnd_work"

    let log: PostgresEventLog
    let logger: Logger
    let onWork: @Sendable (Work) -> Void
    let leaderRetry: Duration
    let reconnectDelay: Duration
    private let connection: Mutex<PostgresConnection?>

    private init(
        log: PostgresEventLog, connection: PostgresConnection, logger: Logger, leaderRetry: Duration,
        reconnectDelay: Duration, onWork: @escaping @Sendable (Work) -> Void
    ) {
        self.leaderRetry = leaderRetry
        self.reconnectDelay = reconnectDelay
        self.log = log
        self.logger = logger
        self.onWork = onWork
        self.connection = Mutex(connection)
    }

    /// Connects and takes this node's lock; throws `.inUse` when another daemon holds the same node id.
    public static func start(
        log: PostgresEventLog, logger: Logger, leaderRetry: Duration = .seconds(5), reconnectDelay: Duration = .seconds(2),
        onWork: @escaping @Sendable (Work) -> Void
    ) async throws(EventLogError) -> PostgresSession {
        log.setReconcileLeader(false)
        let connection = try await connect(log: log, logger: logger)
        return PostgresSession(
            log: log, connection: connection, logger: logger, leaderRetry: leaderRetry, reconnectDelay: reconnectDelay,
            onWork: onWork)
    }

    /// The work a notification payload (`SCHEMA/WORK`) asks of a log in `schema`; nil for other schemas' logs.
    static func work(_ payload: String, schema: String) -> Work? {
        guard let slash = payload.lastIndex(of: "/"), payload[..<slash] == schema else { return nil }
        return Work(rawValue: String(payload[payload.index(after: slash)...]))
    }

    static func connect(log: PostgresEventLog, logger: Logger) async throws(EventLogError) -> PostgresConnection {
        let where_ = log.location
        let connection: PostgresConnection
        do {
            connection = try await PostgresConnection.connect(
                on: MultiThreadedEventLoopGroup.singleton.any(), configuration: log.configuration.connectionConfiguration(),
                id: 0, logger: logger)
        } catch {
            throw PostgresEventLog.mapError(error, "cannot open the session connection to \(where_)")
        }
        do {
            let node = log.nodeID
            let locked = try await connection.query(
                "SELECT pg_try_advisory_lock(hashtextextended('payop-ipnd/node/' || current_schema() || '/' || \(node), 0))",
                logger: logger
            ).collect().first?.decode(Bool.self)
            guard locked == true else {
                try? await connection.close()
                throw EventLogError(
                    .inUse,
                    "another payop-ipnd is running with storage.node_id \(node) on \(where_): give each daemon its own "
                        + "node_id (the default is the host name)")
            }
            return connection
        } catch let error as EventLogError {
            throw error
        } catch {
            try? await connection.close()
            throw PostgresEventLog.mapError(error, "cannot take this node's lock on \(where_)")
        }
    }

    public func run() async throws {
        let fatal = Mutex<EventLogError?>(nil)
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                if let connection = self.connection.withLock({ $0 }) {
                    await self.serve(connection)
                    self.log.setReconcileLeader(false)
                    try? await connection.close()
                    self.connection.withLock { $0 = nil }
                    guard !Task.isCancelled else { break }
                    // Until the node's lock is ours again, this daemon claims nothing (`claimDelivery`,
                    // `dueChecks`): another daemon could be given its node id meanwhile.
                    self.log.setSessionProblem("the session connection to PostgreSQL was lost; reconnecting")
                    self.logger.warning("PostgreSQL session lost: reconnecting", metadata: ["database": "\(self.log.location)"])
                }
                try? await Task.sleep(for: self.reconnectDelay)
                guard !Task.isCancelled else { break }
                do {
                    let connection = try await Self.connect(log: self.log, logger: self.logger)
                    self.connection.withLock { $0 = connection }
                    self.log.setSessionProblem(nil)
                    self.logger.notice("PostgreSQL session restored", metadata: ["database": "\(self.log.location)"])
                    // Whatever was notified meanwhile: look now.
                    self.onWork(.verify)
                    self.onWork(.deliver)
                } catch let error as EventLogError where error.code == .inUse {
                    // Another daemon took this node id while the session was down: two daemons must never
                    // share one, so this one stops (its running hooks' leases lapse to the other daemons).
                    self.log.setSessionProblem(error.message)
                    self.logger.critical("stopping: \(error.message)")
                    fatal.withLock { $0 = error }
                    break
                } catch let error as EventLogError {
                    self.log.setSessionProblem(error.message)
                } catch {
                    self.log.setSessionProblem("\(error)")
                }
            }
        }
        log.setReconcileLeader(false)
        if let connection = connection.withLock({ $0 }) { try? await connection.close() }
        if let error = fatal.withLock({ $0 }) { throw error }
    }

    /// The other daemons whose hooks differ from this one's, as last logged.
    private let divergent = Mutex<[String: String]>([:])

    /// Announces this daemon and warns, once per change, about daemons with other hooks.
    private func compareHooks() async {
        guard let others = try? await log.announce(now: log.clock.nowMilliseconds()) else { return }
        let changed = divergent.withLock { known in
            defer { known = others }
            return known != others
        }
        guard changed else { return }
        if others.isEmpty {
            logger.notice("every daemon on the shared log has the same hooks again")
        } else {
            for (node, hooks) in others.sorted(by: { $0.key < $1.key }) {
                logger.warning(
                    "daemon \(node) has other hooks than this one: events it verifies get other deliveries; give every machine the same hooks",
                    metadata: ["theirs": "\(hooks)", "ours": "\(PostgresEventLog.hooksFingerprint(log.hooks))"])
            }
        }
    }

    /// How long the session's own checks may take before the connection counts as lost (a server gone
    /// without closing the TCP connection answers nothing, ever).
    static let checkTimeout = Duration.seconds(10)

    /// Listens and tries for the leadership until the connection fails or the task is cancelled.
    private func serve(_ connection: PostgresConnection) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                do {
                    let schema =
                        try await connection.query("SELECT current_schema()", logger: self.logger).collect().first?
                        .decode(String?.self) ?? nil
                    try await connection.listen(on: Self.channel) { notifications in
                        for try await notification in notifications {
                            if let work = Self.work(notification.payload, schema: schema ?? "") { self.onWork(work) }
                        }
                    }
                } catch {
                    self.logger.debug("PostgreSQL notifications ended", metadata: ["error": "\(PostgresEventLog.describe(error))"])
                }
            }
            group.addTask {
                do {
                    while !Task.isCancelled {
                        let leader = self.log.isReconcileLeader
                        let logger = self.logger
                        // Trying for the leadership proves the session too; the leader proves it with SELECT 1.
                        let won = try await withDeadline(Self.checkTimeout) {
                            try await connection.query(
                                leader
                                    ? "SELECT true"
                                    : "SELECT pg_try_advisory_lock(hashtextextended('payop-ipnd/reconcile/' || current_schema(), 0))",
                                logger: logger
                            ).collect().first?.decode(Bool.self)
                        }
                        if !leader, won == true {
                            self.log.setReconcileLeader(true)
                            self.logger.notice("this daemon now re-asks Payop about decided events (reconcile leader)")
                            self.onWork(.verify)
                        }
                        await self.compareHooks()
                        try await Task.sleep(for: self.leaderRetry)
                    }
                } catch {
                    self.logger.debug("PostgreSQL session check ended", metadata: ["error": "\(PostgresEventLog.describe(error))"])
                }
                // A connection that stopped answering is closed, which also ends the listening above.
                try? await connection.close()
            }
            await group.next()
            group.cancelAll()
        }
    }
}

extension PostgresEventLog {
    /// What decides which deliveries an event gets: each hook's name and event patterns, in order.
    static func hooksFingerprint(_ hooks: [HookConfig]) -> String {
        hooks.map { "\($0.name)=\($0.events.joined(separator: ","))" }.joined(separator: "; ")
    }

    /// Records this daemon as alive with its hooks, and returns the other daemons seen in the last
    /// minute whose hooks differ: any daemon may verify an event and create its deliveries from its own
    /// hooks, so daemons with different hooks deliver differently (a hook missing on one machine misses
    /// the events that machine verifies).
    func announce(now: Int64) async throws(EventLogError) -> [String: String] {
        let node = nodeID
        let hooks = Self.hooksFingerprint(self.hooks)
        return try await transaction("cannot record this daemon in the shared log") { connection, logger in
            try await connection.query(
                """
                INSERT INTO nodes (node_id, hooks, version, seen_at)
                VALUES (\(node), \(hooks), \(PayopIPNDVersion.current), \(now))
                ON CONFLICT (node_id) DO UPDATE SET hooks = excluded.hooks, version = excluded.version,
                    seen_at = excluded.seen_at
                """, logger: logger)
            var others: [String: String] = [:]
            for row in try await connection.query(
                """
                SELECT node_id, hooks FROM nodes
                WHERE node_id <> \(node) AND seen_at > \(now - 60_000) AND hooks <> \(hooks)
                """, logger: logger
            ).collect() {
                let (other, theirs) = try row.decode((String, String).self)
                others[other] = theirs
            }
            return others
        }
    }

    /// Tells every daemon listening (this one too) that work is waiting; delivered at commit. A channel
    /// spans the database, so the payload names the log's schema (`SCHEMA/verify`): logs in other
    /// schemas of the same database ignore it.
    static func notify(_ work: PostgresSession.Work, _ connection: PostgresConnection, _ logger: Logger) async throws {
        _ = try await connection.query(
            "SELECT pg_notify(\(PostgresSession.channel), current_schema() || '/' || \(work.rawValue))", logger: logger
        ).collect()
    }
}
