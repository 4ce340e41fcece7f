import Foundation
import Logging

/// `host:port` for a listener; `[::1]:9181` for IPv6.
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(_ text: String) {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                return nil
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard let port = Int(portText), (0...65535).contains(port), portText.allSatisfy(\.isNumber),
            host == "localhost" || IPAddress(host) != nil
        else { return nil }
        self.host = String(host)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// Only this machine can connect: 127.0.0.0/8, ::1 or localhost.
    public var isLoopback: Bool { Self.isLoopback(host) }

    private static let loopback = [CIDR("127.0.0.0/8"), CIDR("::1/128")].compactMap { $0 }

    /// `localhost` or a literal loopback address; `127.0.0.1.attacker.example` is neither.
    static func isLoopback(_ name: String) -> Bool {
        if name == "localhost" { return true }
        guard let address = IPAddress(name) else { return false }
        return loopback.contains { $0.contains(address) }
    }
}

/// The daemon's configuration: every documented key, with its default.
public struct DaemonConfig: Sendable {
    public struct Server: Sendable {
        public var listen = ListenAddress(host: "0.0.0.0", port: 8080)
        public var ipnPaths = ["/payop/ipn"]
        public var maxBodyBytes = 65536
        public var allowedSources = SourcePolicy.Allowed.only(SourcePolicy.payopAddresses.compactMap { CIDR($0) })
        public var trustedProxies: [CIDR] = []
        public var readTimeoutSeconds = 10.0
    }

    public struct Admin: Sendable {
        public var listen = ListenAddress(host: "127.0.0.1", port: 9181)
        /// The console's bearer token; required when `listen` is not loopback.
        public var tokenFile: String?
    }

    public struct Storage: Sendable {
        public enum Backend: String, Sendable, CaseIterable {
            /// One SQLite file on this machine, one daemon: the default.
            case sqlite
            /// One PostgreSQL database shared by any number of daemons.
            case postgresql
        }

        public var backend = Backend.sqlite
        public var path = "/var/lib/payop-ipnd/events.sqlite3"
        public var retentionDays = 400
        /// postgresql: `postgres://USER@HOST:5432/DATABASE?sslmode=verify-full`, without the password.
        public var url: String?
        /// postgresql: the secret file holding the database password.
        public var passwordFile: String?
        /// postgresql: this daemon's name among those sharing the log; the host name by default.
        public var nodeID = Storage.hostName
        /// postgresql: connections this daemon keeps at most.
        public var poolSize = 8
        /// postgresql: how long a delivery a daemon claimed stays its own without a renewal (renewed every
        /// third of it while the hook runs); a delivery whose daemon died is taken over after it.
        public var leaseSeconds = 60

        public static var hostName: String {
            let name = ProcessInfo.processInfo.hostName
            return name.isEmpty ? "payop-ipnd" : name
        }

        /// The PostgreSQL log's settings, with the password read from its file.
        public func postgres(password: String?) throws(EventLogError) -> PostgresEventLogConfiguration {
            guard let url else { throw EventLogError(.misconfigured, "storage.url is not set") }
            var configuration = try PostgresEventLogConfiguration(url: url, password: password, nodeID: nodeID)
            configuration.poolSize = poolSize
            configuration.deliveryLeaseMilliseconds = Int64(leaseSeconds) * 1000
            // A question to Payop must end (payop.timeout_seconds, 10 by default) well inside its claim.
            configuration.checkLeaseMilliseconds = Int64(max(leaseSeconds * 2, 30)) * 1000
            return configuration
        }
    }

    public struct Payop: Sendable {
        public var apiBaseURL = "https://api.payop.com"
        public var jwtFile: String?
        public var secretKeyFile: String?
        public var timeoutSeconds = 10.0
        public var retryInitialSeconds = 1.0
        public var retryMaxSeconds = 300.0
        public var notFoundRetryMinutes = 10.0
    }

    public struct Reconcile: Sendable {
        public var intervalSeconds = 300.0
    }

    public struct Delivery: Sendable {
        public var retryInitialSeconds = 2.0
        public var retryMaxSeconds = 10800.0
        public var killGraceSeconds = 5.0
        public var shutdownGraceSeconds = 10.0
    }

    public var logLevel = Logger.Level.info
    public var server = Server()
    public var admin = Admin()
    public var storage = Storage()
    public var payop = Payop()
    public var reconcile = Reconcile()
    public var delivery = Delivery()
    public var hooks: [HookConfig] = []

    public init() {}
}
