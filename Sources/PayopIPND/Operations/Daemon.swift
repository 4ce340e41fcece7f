import AsyncHTTPClient
import Foundation
import HummingbirdCore
import Logging
import PayopSimulator
import ServiceLifecycle
import Synchronization

/// Assembles the long-running parts into one ServiceGroup, in the order of an IPN's life: event log,
/// Payop client, dispatcher, verifier, listeners; plus the operations around them.
public struct Daemon: Sendable {
    public var config: DaemonConfig
    /// Where `config` came from: SIGHUP reads it again.
    public var configPath: String?
    public var logger: Logger
    public var logLevel: LogLevelControl
    public var clock: any WallClock
    public var environment: [String: String]
    public var metrics: DaemonMetrics
    /// The sandbox's built-in Payop, served on its own port next to the daemon.
    public var simulator: (payop: SimulatedPayop, port: Int)?
    /// Called once every listener is bound, with the ports actually bound (0 in config means any).
    public var onReady: @Sendable (_ ports: BoundPorts) async -> Void

    public struct BoundPorts: Sendable {
        public var ipn: Int
        public var admin: Int
    }

    public init(
        config: DaemonConfig, configPath: String? = nil, logger: Logger, logLevel: LogLevelControl? = nil,
        clock: any WallClock = SystemWallClock(), environment: [String: String] = ProcessInfo.processInfo.environment,
        metrics: DaemonMetrics = DaemonMetrics(), simulator: (payop: SimulatedPayop, port: Int)? = nil,
        onReady: @escaping @Sendable (BoundPorts) async -> Void = { _ in }
    ) {
        self.config = config
        self.configPath = configPath
        self.logger = logger
        self.logLevel = logLevel ?? LogLevelControl(config.logLevel)
        self.clock = clock
        self.environment = environment
        self.metrics = metrics
        self.simulator = simulator
        self.onReady = onReady
    }

    public func run() async throws {
        let secrets = try Secrets.load(config)
        switch config.storage.backend {
        case .sqlite:
            // One daemon per log, decided before anything is touched: a second one exits naming the first.
            let lock = try EventLogLock.acquire(logPath: config.storage.path)
            defer { lock.release() }
            let log = try SQLiteEventLog.open(path: config.storage.path, mode: .daemon, clock: clock)
            try await run(
                log: log, secrets: secrets,
                logServices: [
                    .init(service: EventLogService(log: log)), .init(service: CheckpointService(log: log, logger: logger)),
                ])
        case .postgresql:
            let log = PostgresEventLog(
                configuration: try config.storage.postgres(password: secrets.storagePassword), clock: clock,
                logger: logger, metrics: metrics)
            // The pool runs for the whole life of the daemon, and stops after every service has.
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await log.run() }
                defer { group.cancelAll() }
                try await log.open()
                // One daemon per node id, decided before anything is touched, as with one SQLite file.
                let wake = WakeUps()
                let session = try await PostgresSession.start(log: log, logger: logger) { work in
                    switch work {
                    case .verify: wake.verify.signal()
                    case .deliver: wake.deliver.signal()
                    }
                }
                try await run(
                    log: log, secrets: secrets, wake: wake,
                    logServices: [.init(service: EventLogService(log: log)), .init(service: session)])
            }
        }
    }

    /// The signals that start the verifier and the dispatcher at once rather than at their next due time.
    struct WakeUps: Sendable {
        let verify = WorkSignal()
        let deliver = WorkSignal()
    }

    /// The daemon on an open log. `logServices` run first and stop last (the log's own upkeep).
    private func run(
        log: any EventLog, secrets: Secrets, wake: WakeUps = WakeUps(),
        logServices: [ServiceGroupConfiguration.ServiceConfiguration]
    ) async throws {
        let notifier = SystemdNotifier(environment: environment)
        log.setHooks(config.hooks)
        log.setVerificationPolicy(VerificationPolicy(config))
        let recovered = try await log.recoverInterruptedDeliveries(now: clock.nowMilliseconds())
        if recovered > 0 {
            logger.notice("deliveries interrupted by the last stop will run again", metadata: ["count": "\(recovered)"])
        }
        let http = PayopHTTPClient.makeHTTPClient(timeoutSeconds: config.payop.timeoutSeconds)
        let payop = PayopHTTPClient(
            http: http, baseURL: config.payop.apiBaseURL, timeoutSeconds: config.payop.timeoutSeconds, jwt: secrets.jwt)
        let runner = LocalHookRunner(
            commands: CommandHookRunner(),
            urls: URLHookRunner(http: http, secrets: { name in secrets.hookSigning.withLock { $0[name] } }, clock: clock))
        let dispatcher = Dispatcher(
            store: log, runner: runner, hooks: { log.hooks }, policy: DeliveryPolicy(config), clock: clock,
            logger: logger, metrics: metrics, signal: wake.deliver)
        // One daemon owns a SQLite log: a verification (or a signed IPN) claims its deliveries' runs in
        // its own commit, and the dispatcher starts them.
        (log as? SQLiteEventLog)?.startDeliveriesEarly(with: dispatcher)
        let verifySignal = wake.verify
        let verifier = Verifier(
            store: log, payop: payop, policy: VerificationPolicy(config), clock: clock, logger: logger, metrics: metrics,
            asksEarly: config.storage.backend == .sqlite, onVerified: { _ in dispatcher.signal.signal() })
        let ingress = IPNIngress(
            settings: Self.ingressSettings(config, legacySecretKey: secrets.legacyKey), store: log, clock: clock,
            logger: logger, metrics: metrics,
            onAccepting: { ipn in
                if !ipn.verifiedBySignature { verifier.askEarly(ipn.notification.kind, entityID: ipn.notification.entityID) }
            },
            onStored: { _, ipn in
                if ipn.verifiedBySignature {
                    dispatcher.signal.signal()
                } else if verifier.wantsFreshIPNs {
                    verifySignal.signal()
                }
            })
        let ports = Mutex(BoundPorts(ipn: 0, admin: 0))
        let onReady = self.onReady
        let readiness = Readiness(listeners: 2, notifier: notifier) { await onReady(ports.withLock { $0 }) }
        let server = IPNListener.makeServer(
            host: config.server.listen.host, port: config.server.listen.port, ingress: ingress,
            readTimeoutSeconds: config.server.readTimeoutSeconds, logger: logger,
            onRunning: { port in
                ports.withLock { $0.ipn = port }
                await readiness.listenerBound()
            })
        let console = Console(
            log: log, access: verifier.access,
            security: ConsoleGuard(token: secrets.adminToken, loopbackOnly: config.admin.listen.isLoopback, clock: clock),
            hooks: { log.hooks }, wakeDispatcher: { dispatcher.signal.signal() }, clock: clock, logger: logger)
        let admin = AdminListener.makeApplication(
            address: config.admin.listen, log: log, access: verifier.access, metrics: metrics, console: console,
            logger: logger,
            onRunning: { port in
                ports.withLock { $0.admin = port }
                await readiness.listenerBound()
            })
        let running = Mutex(config)
        let reload: @Sendable () async throws -> Void = { [configPath, logLevel, logger] in
            guard let configPath else { throw ConfigError(path: "(none)", problems: []) }
            let (next, warnings) = try ConfigLoader.load(path: configPath)
            let nextSecrets = try Secrets.load(next)
            for warning in warnings { logger.warning("configuration: \(warning)") }
            let previous = running.withLock { current in
                defer { current = next }
                return current
            }
            for (key, changed) in [
                ("server.listen", previous.server.listen != next.server.listen),
                ("admin.listen", previous.admin.listen != next.admin.listen),
                ("storage", previous.storage.backend != next.storage.backend || previous.storage.path != next.storage.path
                    || previous.storage.url != next.storage.url || previous.storage.nodeID != next.storage.nodeID
                    || previous.storage.poolSize != next.storage.poolSize
                    || previous.storage.leaseSeconds != next.storage.leaseSeconds
                    || previous.storage.passwordFile != next.storage.passwordFile),
                ("payop.api_base_url", previous.payop.apiBaseURL != next.payop.apiBaseURL),
                ("server.read_timeout_seconds", previous.server.readTimeoutSeconds != next.server.readTimeoutSeconds),
            ] where changed {
                logger.warning("\(key) changed: it takes effect at the next restart")
            }
            ingress.reload(Self.ingressSettings(next, legacySecretKey: nextSecrets.legacyKey))
            secrets.jwt.set(nextSecrets.jwt.get())
            console.security.replaceToken(nextSecrets.adminToken.get())
            secrets.hookSigning.withLock { $0 = nextSecrets.hookSigning.withLock { $0 } }
            log.setHooks(next.hooks)
            log.setVerificationPolicy(VerificationPolicy(next))
            verifier.reload(VerificationPolicy(next))
            dispatcher.reload(DeliveryPolicy(next))
            await dispatcher.checkOrphans()
            logLevel.set(next.logLevel)
            dispatcher.signal.signal()
            verifySignal.signal()
        }
        logger.info(
            "payop-ipnd starting",
            metadata: [
                "ipn.listen": "\(config.server.listen)", "admin.listen": "\(config.admin.listen)",
                "storage": "\(config.storage.backend.rawValue) \(log.location)", "payop.api": "\(config.payop.apiBaseURL)",
                "hooks": "\(config.hooks.map(\.name))",
            ])
        // Services stop in reverse order: STOPPING=1 first, then the listeners (no new IPNs), the
        // verifier, the dispatcher (running hooks get their grace), and the event log
        // last, after everything answered is committed.
        var services = logServices + [.init(service: HTTPClientService(client: http))]
        if let simulator {
            services.append(
                .init(service: SimulatorServer.makeApplication(payop: simulator.payop, port: simulator.port, logger: logger)))
        }
        services += [
            .init(
                service: DispatcherService(
                    dispatcher: dispatcher, clock: clock, logger: logger,
                    shutdownGrace: .milliseconds(Int64(config.delivery.shutdownGraceSeconds * 1000)))),
            .init(service: VerifierService(verifier: verifier, signal: verifySignal, clock: clock, logger: logger)),
            .init(service: ReloadService(notifier: notifier, logger: logger, reload: reload)),
            .init(service: admin),
            .init(service: server),
        ]
        if let interval = SystemdNotifier.watchdogInterval(environment: environment) {
            services.append(
                .init(
                    service: WatchdogService(
                        interval: interval, notifier: notifier, log: log, probesLog: config.storage.backend == .sqlite
                    ) {
                        // Bounded: the ping must not wait on a database that does not answer.
                        let counts = try? await withDeadline(.seconds(2)) { try await log.deliveryCounts() }
                        let access = verifier.access.currentProblem.map { _ in "; Payop refuses the JWT" } ?? ""
                        return "\(counts?.pending ?? 0) deliveries pending, \(counts?.dead ?? 0) dead\(access)"
                    }))
        }
        services.append(.init(service: StoppingNotifierService(notifier: notifier, logger: logger)))
        var groupConfiguration = ServiceGroupConfiguration(
            services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        // A stop always ends: past the hooks' grace (and their kill grace) the stop turns into
        // cancellation, and a part that ignores cancellation ends the process (what was answered is on
        // disk; a run still marked running runs again at the next start).
        let stopBudget =
            config.server.readTimeoutSeconds + config.payop.timeoutSeconds + config.delivery.shutdownGraceSeconds
            + config.delivery.killGraceSeconds + 10
        groupConfiguration.maximumGracefulShutdownDuration = .milliseconds(Int64(stopBudget * 1000))
        groupConfiguration.maximumCancellationDuration = .milliseconds(
            Int64((config.delivery.killGraceSeconds + 5) * 1000))
        let group = ServiceGroup(configuration: groupConfiguration)
        try await group.run()
        logger.info("payop-ipnd stopped")
    }

    public static func ingressSettings(_ config: DaemonConfig, legacySecretKey: String?) -> IngressSettings {
        IngressSettings(
            paths: Set(config.server.ipnPaths), maxBodyBytes: config.server.maxBodyBytes,
            sources: SourcePolicy(allowed: config.server.allowedSources, trustedProxies: config.server.trustedProxies),
            legacySecretKey: legacySecretKey)
    }
}

/// The secrets the daemon holds, read from their files.
final class Secrets: Sendable {
    let jwt: SecretBox
    let legacyKey: String?
    /// `signing_secret_file` of each url hook, by hook name.
    let hookSigning: Mutex<[String: String]>
    /// `admin.token_file`: the console's token.
    let adminToken: SecretBox
    /// `storage.password_file`: the PostgreSQL password (read once, at start).
    let storagePassword: String?

    /// Shorter tokens could be guessed by anyone who can reach a non-loopback console.
    static let minimumAdminTokenLength = 16

    init(
        jwt: SecretBox, legacyKey: String?, hookSigning: [String: String], adminToken: String? = nil,
        storagePassword: String? = nil
    ) {
        self.jwt = jwt
        self.legacyKey = legacyKey
        self.hookSigning = Mutex(hookSigning)
        self.adminToken = SecretBox(adminToken)
        self.storagePassword = storagePassword
    }

    static func load(_ config: DaemonConfig) throws(ConfigError) -> Secrets {
        let token = try read(config.admin.tokenFile, key: "admin.token_file")
        if let token, token.count < minimumAdminTokenLength, let path = config.admin.tokenFile {
            throw ConfigError(
                path: path,
                problems: [
                    .init(
                        severity: .error, key: "admin.token_file", line: nil,
                        message: "the token in \(path) is \(token.count) characters: use at least "
                            + "\(minimumAdminTokenLength), e.g. openssl rand -hex 24 > \(path)")
                ])
        }
        return Secrets(
            jwt: SecretBox(try read(config.payop.jwtFile, key: "payop.jwt_file")),
            legacyKey: try read(config.payop.secretKeyFile, key: "payop.secret_key_file"),
            hookSigning: try hookSecrets(config), adminToken: token,
            storagePassword: try read(config.storage.passwordFile, key: "storage.password_file"))
    }

    /// The PostgreSQL log's settings with the password read from `storage.password_file`: what the tools
    /// connect with (the daemon reads the password with its other secrets, in `load`).
    static func postgres(_ config: DaemonConfig) throws -> PostgresEventLogConfiguration {
        try config.storage.postgres(password: try read(config.storage.passwordFile, key: "storage.password_file"))
    }

    static func hookSecrets(_ config: DaemonConfig) throws(ConfigError) -> [String: String] {
        var secrets: [String: String] = [:]
        for hook in config.hooks {
            if let secret = try read(hook.signingSecretFile, key: "hooks[\(hook.name)].signing_secret_file") {
                secrets[hook.name] = secret
            }
        }
        return secrets
    }

    static func read(_ path: String?, key: String) throws(ConfigError) -> String? {
        guard let path else { return nil }
        do {
            return try SecretFile.read(path)
        } catch {
            throw ConfigError(
                path: path,
                problems: [
                    .init(severity: .error, key: key, line: nil, message: "cannot read \(path): \(ConfigLoader.reason(error))")
                ])
        }
    }
}

/// Keeps the event log's writer alive for the daemon's life and drains it last on shutdown.
struct EventLogService: Service {
    let log: any EventLog

    func run() async throws {
        try? await gracefulShutdown()
        log.close()
    }
}

/// Shuts the shared HTTP client down once everything that uses it has stopped.
struct HTTPClientService: Service {
    let client: HTTPClient

    func run() async throws {
        try? await gracefulShutdown()
        try await client.shutdown()
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
        var busy = false
        var checkpointed = -1
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            // While IPNs pour in (the WAL past an eighth of its limit a second after the last pass), look
            // again ten times sooner: the WAL then starts over every few tenths of a second, mostly
            // below the size SQLite truncates it to at a restart (a truncation costs that commit
            // milliseconds).
            try? await Task.sleep(for: busy ? interval / 10 : interval)
            // Nothing written since the last checkpoint: nothing to move, and an idle daemon stays idle.
            let commits = log.commitCount
            if commits == checkpointed && !failing {
                busy = false
                continue
            }
            do {
                let frames = try await withCheckedThrowingContinuation { (done: CheckedContinuation<Int, any Error>) in
                    queue.async { done.resume(with: Result { try log.checkpoint() }) }
                }
                busy = frames > log.walRestartFrames / 8
                if failing { logger.notice("event log checkpoints work again") }
                failing = false
                checkpointed = commits
            } catch {
                if !failing { logger.warning("event log checkpoint failed", metadata: ["error": "\(error)"]) }
                failing = true
            }
        }
    }
}
