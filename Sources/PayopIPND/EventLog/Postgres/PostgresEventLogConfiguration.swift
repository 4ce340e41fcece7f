import Foundation
import PostgresNIO

/// Where the shared event log lives and how this daemon takes part in it (config `storage.*` with
/// `backend: postgresql`).
public struct PostgresEventLogConfiguration: Sendable {
    /// How the connection is protected; the names are libpq's `sslmode` values.
    public enum TLSMode: String, Sendable, CaseIterable {
        /// Plain TCP: only for a server on this machine or a private network the merchant trusts.
        case disable
        /// Encrypted, but the server's certificate is not checked (libpq's meaning of `require`).
        case require
        /// Encrypted, the certificate checked against the system's CAs, the host name not.
        case verifyCA = "verify-ca"
        /// Encrypted, the certificate and the host name checked: the default.
        case verifyFull = "verify-full"
    }

    public var host: String
    public var port: Int
    public var username: String
    public var password: String?
    public var database: String
    /// The schema the log's tables live in (the connections' `search_path`); nil: the role's default.
    public var schema: String?
    public var tls: TLSMode
    /// PEM file of the CA(s) that sign the server's certificate (`sslrootcert`); nil: the system's CAs.
    public var rootCertificateFile: String?
    /// Connections this daemon keeps at most.
    public var poolSize: Int
    /// This daemon's name among those sharing the log (`storage.node_id`): recorded with what it
    /// receives, asks and runs, and the owner of its claims. Must differ between daemons.
    public var nodeID: String
    /// How long a claimed delivery stays this daemon's without a renewal; after it, another daemon may
    /// take the delivery over (at least once: the hook may have run).
    public var deliveryLeaseMilliseconds: Int64
    /// How long a claimed question to Payop stays this daemon's; after it, another daemon may ask.
    public var checkLeaseMilliseconds: Int64
    /// How long opening the log may take (connecting, checking, migrating) before it is reported unreachable.
    public var openTimeout: Duration

    public init(
        host: String, port: Int = 5432, username: String, password: String? = nil, database: String,
        schema: String? = nil, tls: TLSMode = .verifyFull, poolSize: Int = 10, nodeID: String,
        deliveryLeaseMilliseconds: Int64 = 60_000, checkLeaseMilliseconds: Int64 = 120_000,
        openTimeout: Duration = .seconds(15)
    ) {
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.database = database
        self.schema = schema
        self.tls = tls
        self.poolSize = poolSize
        self.nodeID = nodeID
        self.deliveryLeaseMilliseconds = deliveryLeaseMilliseconds
        self.checkLeaseMilliseconds = checkLeaseMilliseconds
        self.openTimeout = openTimeout
    }

    /// From `storage.url` (`postgres://user@host:5432/db?sslmode=verify-full`) and the password read from
    /// `storage.password_file`. A password inside the URL is refused: it would sit in the config file,
    /// which is not a secret file.
    public init(url text: String, password: String?, nodeID: String) throws(EventLogError) {
        guard let url = URLComponents(string: text), let scheme = url.scheme,
            ["postgres", "postgresql"].contains(scheme.lowercased())
        else {
            throw EventLogError(
                .misconfigured, "storage.url must look like postgres://USER@HOST:5432/DATABASE?sslmode=verify-full")
        }
        guard url.password == nil else {
            throw EventLogError(
                .misconfigured, "storage.url must not contain the password: put it in the file storage.password_file names")
        }
        guard let host = url.host, !host.isEmpty else {
            throw EventLogError(.misconfigured, "storage.url names no host: postgres://USER@HOST:5432/DATABASE")
        }
        guard let user = url.user, !user.isEmpty else {
            throw EventLogError(.misconfigured, "storage.url names no user: postgres://USER@HOST:5432/DATABASE")
        }
        let database = String(url.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else {
            throw EventLogError(.misconfigured, "storage.url names no database: postgres://USER@HOST:5432/DATABASE")
        }
        var tls = TLSMode.verifyFull
        var rootCertificate: String?
        for item in url.queryItems ?? [] {
            switch item.name {
            case "sslrootcert":
                guard let path = item.value, path.hasPrefix("/") else {
                    throw EventLogError(
                        .misconfigured, "storage.url: sslrootcert must be an absolute path to the CA's PEM file")
                }
                rootCertificate = path
            case "sslmode":
                guard let mode = item.value.flatMap(TLSMode.init(rawValue:)) else {
                    throw EventLogError(
                        .misconfigured,
                        "storage.url: sslmode \(item.value ?? "") is not one of "
                            + TLSMode.allCases.map(\.rawValue).joined(separator: ", "))
                }
                tls = mode
            default:
                throw EventLogError(
                    .misconfigured, "storage.url: unknown parameter \(item.name) (only sslmode and sslrootcert are read)")
            }
        }
        self.init(
            host: host, port: url.port ?? 5432, username: user, password: password, database: database, tls: tls,
            nodeID: nodeID)
        self.rootCertificateFile = rootCertificate
    }

    /// The TLS settings `tls` asks for; nil: plain TCP.
    var tlsConfiguration: TLSConfiguration? {
        switch tls {
        case .disable:
            return nil
        case .require:
            var context = TLSConfiguration.makeClientConfiguration()
            context.certificateVerification = .none
            return context
        case .verifyCA:
            var context = TLSConfiguration.makeClientConfiguration()
            context.certificateVerification = .noHostnameVerification
            if let rootCertificateFile { context.trustRoots = .file(rootCertificateFile) }
            return context
        case .verifyFull:
            var context = TLSConfiguration.makeClientConfiguration()
            if let rootCertificateFile { context.trustRoots = .file(rootCertificateFile) }
            return context
        }
    }

    /// Set on every connection: nothing the daemon does may hold a lock or a connection forever.
    /// - `lock_timeout`, `statement_timeout`: a statement waiting on another's lock (an IPN's dedupe key
    ///   held by a daemon that lost power mid-transaction) or running away fails instead of waiting;
    /// - `idle_in_transaction_session_timeout`: such a dead daemon's open transaction is ended;
    /// - `tcp_keepalives_*`: the server notices a vanished daemon within about half a minute, ending
    ///   its session, and with it its node lock and reconcile leadership.
    private var startupParameters: [(String, String)] {
        [
            ("application_name", "payop-ipnd \(nodeID)"), ("lock_timeout", "10s"), ("statement_timeout", "60s"),
            ("idle_in_transaction_session_timeout", "60s"), ("tcp_keepalives_idle", "15"),
            ("tcp_keepalives_interval", "5"), ("tcp_keepalives_count", "3"),
        ] + (schema.map { [("search_path", $0)] } ?? [])
    }

    /// postgres-nio's view of it: the pool, opening connections as they are needed (up to
    /// `poolSize`) and closing those idle for `idleTimeout`.
    ///
    /// Each time a connection is handed back the pool starts an idle timer and a keep-alive timer, and
    /// the next lease cancels them; a cancelled timer keeps its memory until its deadline
    /// (swiftlang/swift#60441). With postgres-nio's defaults (60 s, 30 s) one of each per IPN held 90 s
    /// of IPNs' timers: about 65 MB at 2,000 IPNs a second. So the idle timeout is short and there is
    /// no keep-alive ping (no connection stays idle long enough to need one). A fixed-size pool
    /// (minimum = maximum) would start no idle timer at all, but postgres-nio's pool traps
    /// (`precondition`) when a server restart leaves it with fewer live connections than its minimum.
    var clientConfiguration: PostgresClient.Configuration {
        var configuration = PostgresClient.Configuration(
            host: host, port: port, username: username, password: password, database: database,
            tls: tlsConfiguration.map { .require($0) } ?? .disable)
        configuration.options.maximumConnections = max(poolSize, 1)
        configuration.options.connectionIdleTimeout = Self.idleTimeout
        configuration.options.keepAliveBehavior = nil
        configuration.options.connectTimeout = .seconds(10)
        configuration.options.additionalStartupParameters = startupParameters
        return configuration
    }

    /// How long a pooled connection may stay idle before it is closed: a busy daemon keeps its
    /// connections; a quiet one reconnects (a few milliseconds) for an IPN minutes after the last.
    static let idleTimeout: Duration = .seconds(5)

    /// postgres-nio's view of it: the session's own connection, outside the pool.
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        var configuration = PostgresConnection.Configuration(
            host: host, port: port, username: username, password: password, database: database,
            tls: try tlsConfiguration.map { .require(try NIOSSLContext(configuration: $0)) } ?? .disable)
        configuration.options.connectTimeout = .seconds(10)
        configuration.options.additionalStartupParameters = startupParameters
        return configuration
    }

    /// `host:port/database`, for messages (never the password).
    var displayName: String { "\(host):\(port)/\(database)" }
}
