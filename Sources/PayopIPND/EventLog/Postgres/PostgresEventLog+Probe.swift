import Foundation
import Logging
import NIOPosix
import PostgresNIO

extension PostgresEventLog {
    /// What `check-config` and `doctor` found on the server, without changing anything there.
    public struct ProbeReport: Sendable, Equatable {
        public var serverVersion: String
        public var user: String
        public var synchronousCommit: String
        /// Migrations applied / known to this build (0 before the first start: the daemon creates the tables).
        public var schemaVersion: Int64
        public var latestSchemaVersion: Int64
        /// Whether a daemon with this node id holds its session now.
        public var nodeInUse: Bool
        /// Other daemons seen in the last minute whose hooks differ from the ones given: node id -> hooks.
        public var otherHooks: [String: String] = [:]

        public var summary: String {
            let schema =
                schemaVersion == 0
                ? "no tables yet (the first daemon creates them)"
                : "schema \(schemaVersion) of \(latestSchemaVersion)"
            return "PostgreSQL \(serverVersion) as \(user), synchronous_commit \(synchronousCommit), \(schema)"
        }
    }

    /// Connects as the daemon will (one connection, outside any pool) and checks what the daemon needs:
    /// reachable within `openTimeout`, the password, TLS, a durable commit setting, a primary, the right
    /// to create the log's tables (or the tables already there), no schema newer than this build's.
    public static func probe(
        _ configuration: PostgresEventLogConfiguration, hooks: [HookConfig]? = nil,
        logger: Logger = Logger(label: "payop-ipnd.event-log", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(EventLogError) -> ProbeReport {
        let where_ = configuration.displayName
        do {
            return try await withDeadline(configuration.openTimeout) {
                let connection = try await PostgresConnection.connect(
                    on: MultiThreadedEventLoopGroup.singleton.any(), configuration: configuration.connectionConfiguration(),
                    id: 0, logger: logger)
                defer { Task { try? await connection.close() } }
                try await checkDurability(connection, logger: logger)
                guard
                    let row = try await connection.query(
                        """
                        SELECT current_setting('server_version'), current_user, current_setting('synchronous_commit'),
                               pg_is_in_recovery(), has_schema_privilege(current_schema(), 'CREATE'),
                               to_regclass('payop_ipnd_migrations') IS NOT NULL
                        """, logger: logger
                    ).collect().first
                else { throw EventLogError(.unavailable, "PostgreSQL answered nothing") }
                let (version, user, commit, standby, canCreate, hasTables) = try row.decode(
                    (String, String, String, Bool, Bool?, Bool).self)
                if standby {
                    throw EventLogError(.misconfigured, "\(where_) is a standby in recovery: point storage.url at the primary")
                }
                var applied: Int64 = 0
                if hasTables {
                    applied =
                        try await connection.query("SELECT coalesce(max(version), 0) FROM payop_ipnd_migrations", logger: logger)
                        .collect().first?.decode(Int64.self) ?? 0
                } else if canCreate != true {
                    throw EventLogError(
                        .misconfigured,
                        "\(user) may not create tables in the schema of \(where_): GRANT CREATE ON SCHEMA public TO \(user) "
                            + "(or run the first start as the database's owner)")
                }
                let latest = PostgresSchema.migrations.map(\.version).max() ?? 0
                if applied > latest {
                    throw EventLogError(
                        .misconfigured,
                        "the log in \(where_) has schema \(applied), newer than this payop-ipnd's \(latest): upgrade it")
                }
                let node = configuration.nodeID
                let inUse =
                    try await connection.query(
                        """
                        SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted
                        AND (classid::bigint << 32) | objid::bigint
                            = hashtextextended('payop-ipnd/node/' || current_schema() || '/' || \(node), 0)
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                        """, logger: logger
                    ).collect().first?.decode(Bool.self) ?? false
                var otherHooks: [String: String] = [:]
                if let hooks, applied >= 2 {
                    let fingerprint = hooksFingerprint(hooks)
                    let since = SystemWallClock().nowMilliseconds() - 60_000
                    for row in try await connection.query(
                        """
                        SELECT node_id, hooks FROM nodes
                        WHERE node_id <> \(node) AND seen_at > \(since) AND hooks <> \(fingerprint)
                        """, logger: logger
                    ).collect() {
                        let (other, theirs) = try row.decode((String, String).self)
                        otherHooks[other] = theirs
                    }
                }
                return ProbeReport(
                    serverVersion: version, user: user, synchronousCommit: commit, schemaVersion: applied,
                    latestSchemaVersion: latest, nodeInUse: inUse, otherHooks: otherHooks)
            }
        } catch let error as EventLogError {
            throw error
        } catch is DeadlineExceeded {
            throw EventLogError(
                .unavailable,
                "cannot reach PostgreSQL at \(where_) within \(configuration.openTimeout): check storage.url, that the "
                    + "server runs and accepts connections from this host (listen_addresses, pg_hba.conf, firewall)")
        } catch {
            throw mapError(error, "cannot connect to PostgreSQL at \(where_)")
        }
    }
}
