import ArgumentParser
import Foundation
import Logging
import NIOCore
import PayopSimulator

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Run the daemon.",
        discussion: """
            Takes Payop's IPNs on server.listen, answers 200 once each is on disk, verifies it against Payop's \
            API (legacy V1 by signature) and runs the configured hooks for every verified event. The console \
            and /healthz, /readyz, /metrics are on admin.listen. Under systemd (Type=notify): SIGHUP reloads \
            hooks, sources, log_level and secrets; SIGTERM stops taking IPNs, gives running hooks \
            delivery.shutdown_grace_seconds, and exits 0. A second 'serve' on the same event log exits 1.
            """)

    @OptionGroup var config: ConfigOption
    @Flag(help: "Run with no Payop account: state in ./.payop-ipnd-sandbox/, IPNs on 127.0.0.1:8080.")
    var sandbox = false
    @Option(name: .customLong("log-level"), help: "Override log_level: trace, debug, info, notice, warning, error.")
    var logLevel: Logger.Level?

    func validate() throws {
        if sandbox, config.config != nil {
            throw ValidationError("--sandbox brings its own configuration; drop --config")
        }
    }

    func run() async throws {
        let keepsFreedMemory = MemoryTuning.keepFreedMemory()
        let countsNoAllocations = MemoryTuning.skipSQLiteAllocationStatistics()
        try await reportingFailures {
            let sandboxSetup = sandbox ? try Sandbox.prepare(directory: Sandbox.defaultDirectory) : nil
            let path = sandboxSetup?.configPath ?? config.path
            var (daemonConfig, warnings) = try ConfigLoader.load(path: path)
            if let logLevel { daemonConfig.logLevel = logLevel }
            let level = LogLevelControl(daemonConfig.logLevel)
            LoggingSystem.bootstrap { label in DaemonLogHandler(label: label, control: level) }
            let logger = Logger(label: "payop-ipnd")
            if !keepsFreedMemory { logger.debug("glibc's mallopt refused the allocator's thresholds: its defaults stand") }
            logger.debug(
                countsNoAllocations
                    ? "SQLite's allocation statistics are off"
                    : "SQLite refused to turn its allocation statistics off: it keeps counting")
            for warning in warnings {
                logger.warning("configuration: \(warning.key): \(warning.message)", metadata: ["config": "\(path)"])
            }
            let daemon = Daemon(
                config: daemonConfig, configPath: path, logger: logger, logLevel: level,
                simulator: sandboxSetup.map { ($0.payop, Sandbox.simulatorPort) }
            ) { ports in
                if let sandboxSetup {
                    print(sandboxSetup.instructions(port: ports.ipn, adminPort: ports.admin))
                    fflush(nil)
                }
            }
            let listeners = "\(daemonConfig.server.listen) (server.listen) or \(daemonConfig.admin.listen) (admin.listen)"
            do {
                try await daemon.run()
            } catch let error as IOError where error.errnoCode == EADDRINUSE {
                throw CommandFailure.user(
                    "cannot listen on \(listeners): an address is already in use (is another payop-ipnd running?)")
            } catch let error as IOError where error.errnoCode == EACCES {
                throw CommandFailure.user("cannot listen on \(listeners): permission denied")
            }
        }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// `serve --sandbox`: a working daemon on embedded defaults, with nothing to set up.
enum Sandbox {
    static let defaultDirectory = ".payop-ipnd-sandbox"
    static let secretKey = "sandbox-secret-key"

    static let simulatorPort = 8081

    struct Setup {
        var directory: String
        var configPath: String
        var payop: SimulatedPayop

        func instructions(port: Int, adminPort: Int) -> String {
            // A paid checkout the built-in Payop knows, so the curl below verifies like a real payment.
            let paid = payop.create(.checkout, state: 2, amount: "25.00", currency: "EUR", orderID: "ORDER-1")
            let body = String(decoding: SimulatedPayop.ipnBody(for: paid), as: UTF8.self)
            let legacyOrder = "SANDBOX-\(Int.random(in: 1000...9999))"
            let signature =
                LegacySignature.expected(
                    amount: "10.00", currency: "EUR", orderID: legacyOrder, status: "success", secretKey: Sandbox.secretKey)
                ?? ""
            let legacy = """
                {"orderId":"\(legacyOrder)","amount":"10.00","currency":"EUR","status":"success","signature":"\(signature)"}
                """
            return """

                payop-ipnd sandbox is running
                  IPN listener  http://127.0.0.1:\(port)/payop/ipn
                  console       http://127.0.0.1:\(adminPort)/
                  Payop API     http://127.0.0.1:\(Sandbox.simulatorPort) (simulated)
                  event log     \(directory)/events.sqlite3
                  config        \(configPath)

                Send a test payment: play Payop, which creates the payment and posts its IPN:
                  swift run payop-ipnd simulate checkout --state accepted

                Or post an IPN yourself (a paid checkout the simulator knows; it is verified against it):
                  curl -i -X POST http://127.0.0.1:\(port)/payop/ipn -H 'Content-Type: application/json' \\
                    -d '\(body)'

                Or a legacy V1 IPN, verified by its signature on arrival:
                  curl -i -X POST http://127.0.0.1:\(port)/payop/ipn -H 'Content-Type: application/json' \\
                    -d '\(legacy)'

                Then look at the console, http://127.0.0.1:\(adminPort)/ (events, deliveries, replay), or the CLI,
                and at what the demo hook did:
                  swift run payop-ipnd events list --config \(configPath)
                  swift run payop-ipnd deliveries list --config \(configPath)
                  cat \(directory)/fulfilled.log

                """
        }
    }

    static func prepare(directory: String) throws -> Setup {
        let fileManager = FileManager.default
        let absolute = URL(fileURLWithPath: directory, relativeTo: URL(fileURLWithPath: fileManager.currentDirectoryPath))
            .standardizedFileURL.path
        do {
            try fileManager.createDirectory(
                atPath: absolute, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let secretPath = absolute + "/payop-secret-key"
            try writeSecret(secretKey, to: secretPath)
            let jwt = "sandbox-jwt-" + UUID().uuidString.lowercased()
            let jwtPath = absolute + "/payop-jwt"
            try writeSecret(jwt, to: jwtPath)
            let hookPath = absolute + "/demo-fulfil-hook"
            let demoHook = """
                #!/bin/sh
                # The sandbox's demo hook: "fulfils" each verified event once, idempotent on PAYOP_EVENT_ID,
                # the way a real fulfilment hook must be (see config/hooks/ in the repository).
                log='\(absolute)/fulfilled.log'
                if grep -q "^$PAYOP_EVENT_ID " "$log" 2>/dev/null; then
                    echo "already done: $PAYOP_EVENT_ID"
                    exit 0
                fi
                echo "$PAYOP_EVENT_ID $PAYOP_EVENT_TYPE order=$PAYOP_ORDER_ID amount=$PAYOP_AMOUNT $PAYOP_CURRENCY attempt=$PAYOP_ATTEMPT" >>"$log"
                echo "fulfilled $PAYOP_EVENT_TYPE for order $PAYOP_ORDER_ID"

                """
            try Data(demoHook.utf8).write(to: URL(fileURLWithPath: hookPath))
            try fileManager.setAttributes([.posixPermissions: 0o755], ofItemAtPath: hookPath)
            let configPath = absolute + "/payop-ipnd.yaml"
            let yaml = """
                # Written by `payop-ipnd serve --sandbox` on every start; delete the folder to start afresh.
                log_level: info
                server:
                  listen: 127.0.0.1:8080
                  ipn_paths: [/payop/ipn]
                  allowed_sources: any
                admin:
                  listen: 127.0.0.1:9181
                storage:
                  path: \(absolute)/events.sqlite3
                payop:
                  api_base_url: http://127.0.0.1:\(simulatorPort)
                  jwt_file: \(jwtPath)
                  secret_key_file: \(secretPath)
                  not_found_retry_minutes: 1
                reconcile:
                  interval_seconds: 30
                delivery:
                  retry_initial_seconds: 1
                hooks:
                  - name: demo-fulfil
                    command: [\(hookPath)]
                    events: ["*"]
                    timeout_seconds: 10

                """
            try Data(yaml.utf8).write(to: URL(fileURLWithPath: configPath))
            return Setup(directory: absolute, configPath: configPath, payop: SimulatedPayop(jwt: jwt))
        } catch {
            throw CommandFailure.user("cannot prepare the sandbox in \(absolute): \(ConfigLoader.reason(error))")
        }
    }

    private static func writeSecret(_ secret: String, to path: String) throws {
        FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600])
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path)
        try Data((secret + "\n").utf8).write(to: URL(fileURLWithPath: path))
    }
}
