import Foundation
import HummingbirdCore
import Logging
import ServiceLifecycle

/// Assembles the long-running parts into one ServiceGroup: event log, IPN listener, checkpointer.
public struct Daemon: Sendable {
    public var config: DaemonConfig
    public var logger: Logger
    /// Called once every listener is bound, with the IPN port actually bound (0 in config means any).
    public var onReady: @Sendable (_ ipnPort: Int) async -> Void

    public init(config: DaemonConfig, logger: Logger, onReady: @escaping @Sendable (Int) async -> Void = { _ in }) {
        self.config = config
        self.logger = logger
        self.onReady = onReady
    }

    public func run() async throws {
        let log = try SQLiteEventLog.open(path: config.storage.path, mode: .daemon)
        let settings = try Self.ingressSettings(config)
        let ingress = IPNIngress(settings: settings, store: log, logger: logger)
        let server = IPNListener.makeServer(
            host: config.server.listen.host, port: config.server.listen.port, ingress: ingress,
            readTimeoutSeconds: config.server.readTimeoutSeconds, logger: logger, onRunning: onReady)
        logger.info(
            "payop-ipnd starting",
            metadata: ["ipn.listen": "\(config.server.listen)", "storage.path": "\(config.storage.path)"])
        // Services stop in reverse order: the listener first (no new IPNs), then the checkpointer,
        // and the event log last, after every answered IPN is committed.
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: EventLogService(log: log)),
                    .init(service: CheckpointService(log: log, logger: logger)),
                    .init(service: server),
                ],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await group.run()
    }

    public static func ingressSettings(_ config: DaemonConfig) throws -> IngressSettings {
        let secret = try config.payop.secretKeyFile.map { path in
            do {
                return try SecretFile.read(path)
            } catch {
                throw ConfigError(
                    path: path,
                    problems: [.init(severity: .error, key: "payop.secret_key_file", line: nil, message: "cannot read \(path)")])
            }
        }
        return IngressSettings(
            paths: Set(config.server.ipnPaths), maxBodyBytes: config.server.maxBodyBytes,
            sources: SourcePolicy(allowed: config.server.allowedSources, trustedProxies: config.server.trustedProxies),
            legacySecretKey: secret)
    }
}

/// Keeps the event log's writer alive for the daemon's life and drains it last on shutdown.
struct EventLogService: Service {
    let log: SQLiteEventLog

    func run() async throws {
        try? await gracefulShutdown()
        log.close()
    }
}

/// Checkpoints the WAL from its own connection once a second, off the commit path, on its own
/// dispatch queue: a checkpoint fsyncs, and fsync must not block the Swift concurrency pool.
struct CheckpointService: Service {
    let log: SQLiteEventLog
    let logger: Logger
    var interval: Duration = .seconds(1)
    private let queue = DispatchQueue(label: "payop-ipnd.checkpoint")

    init(log: SQLiteEventLog, logger: Logger) {
        self.log = log
        self.logger = logger
    }

    func run() async throws {
        var failing = false
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            try? await Task.sleep(for: interval)
            do {
                try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, any Error>) in
                    queue.async { done.resume(with: Result { try log.checkpoint() }) }
                }
                if failing { logger.notice("event log checkpoints work again") }
                failing = false
            } catch {
                if !failing { logger.warning("event log checkpoint failed", metadata: ["error": "\(error)"]) }
                failing = true
            }
        }
    }
}
