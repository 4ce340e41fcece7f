import ArgumentParser
import Foundation
import Logging

/// `payop-ipnd`: the daemon and the tools that read its event log (README, Command line).
public struct PayopIPNDCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "payop-ipnd",
        abstract: "Turns Payop's payment notifications (IPNs) into verified, deduplicated events for local hooks.",
        discussion: """
            Start with 'payop-ipnd serve --sandbox' (no Payop account needed), then write a configuration: \
            every key is in the example config (installed as /etc/payop-ipnd/payop-ipnd.yaml by the Debian \
            package), checked by 'payop-ipnd check-config' and, before going live, 'payop-ipnd doctor'. \
            The running daemon's console is at http://127.0.0.1:9181/ (admin.listen). The README (in \
            /usr/share/doc/payop-ipnd/ when installed from the package) covers hooks, Payop's side, \
            systemd, upgrades, backups and what to do when something goes wrong.
            """,
        version: PayopIPNDVersion.current,
        subcommands: [
            ServeCommand.self, CheckConfigCommand.self, EventsCommand.self, ReceiptsCommand.self, PruneCommand.self,
            DeliveriesCommand.self, ReplayCommand.self, SimulateCommand.self, DoctorCommand.self, StorageCommand.self,
        ])

    public init() {}
}

/// What every command that reads the event log takes.
struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "The configuration file (default: $PAYOP_IPND_CONFIG, else /etc/payop-ipnd/payop-ipnd.yaml).")
    var config: String?

    var path: String { config ?? ConfigLoader.defaultPath() }
}

/// A failure a person can act on, with the exit code the README documents.
struct CommandFailure: Error, CustomStringConvertible {
    var message: String
    var exitCode: Int32

    static func user(_ message: String) -> CommandFailure { .init(message: message, exitCode: 1) }
    static func unavailable(_ message: String) -> CommandFailure { .init(message: message, exitCode: 69) }

    var description: String { message }
}

extension AsyncParsableCommand {
    /// Runs `body`, turning our errors into one clear message on stderr and the documented exit codes.
    func reportingFailures(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let failure as CommandFailure {
            printError(failure.message)
            throw ExitCode(failure.exitCode)
        } catch let error as ConfigError {
            printError(error.description)
            throw ExitCode(1)
        } catch let error as EventLogError {
            printError(error.description)
            throw ExitCode(error.code == .unavailable || error.code == .closed ? 69 : 1)
        }
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data(("payop-ipnd: " + message + "\n").utf8))
}

/// Loads the configuration and opens its event log for a tool (never creating an SQLite file).
func openEventLog(_ option: ConfigOption) async throws -> (DaemonConfig, any EventLog) {
    let (config, _) = try ConfigLoader.load(path: option.path)
    return (config, try await openEventLog(config))
}

/// The configured event log, for a tool: `close()` it when done.
func openEventLog(_ config: DaemonConfig) async throws -> any EventLog {
    switch config.storage.backend {
    case .sqlite:
        return try SQLiteEventLog.open(path: config.storage.path, mode: .tool, create: false)
    case .postgresql:
        return try await PostgresEventLog.start(configuration: try Secrets.postgres(config))
    }
}

func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    FileHandle.standardOutput.write(try encoder.encode(value) + Data("\n".utf8))
}

/// Left-aligned columns for people; scripts use --json.
func printTable(_ header: [String], _ rows: [[String]]) {
    let widths = header.indices.map { column in
        ([header] + rows).map { $0[column].count }.max() ?? 0
    }
    for row in [header] + rows {
        let line = row.enumerated().map { column, cell in
            column == row.count - 1 ? cell : cell.padding(toLength: widths[column], withPad: " ", startingAt: 0)
        }
        print(line.joined(separator: "  "))
    }
}

/// `--since`: RFC 3339 or a duration back from now (`90m`, `24h`, `7d`).
struct SinceArgument: ExpressibleByArgument {
    var milliseconds: Int64

    init?(argument: String) {
        if let absolute = Timestamp.parse(argument) {
            milliseconds = absolute
            return
        }
        guard let unit = argument.last, let amount = Int64(argument.dropLast()), amount > 0 else { return nil }
        let factor: Int64
        switch unit {
        case "s": factor = 1000
        case "m": factor = 60_000
        case "h": factor = 3_600_000
        case "d": factor = 86_400_000
        default: return nil
        }
        // Further back than a clock can count is a mistake, not a time: a usage error.
        let (span, overflow) = amount.multipliedReportingOverflow(by: factor)
        guard !overflow else { return nil }
        milliseconds = SystemWallClock().nowMilliseconds() - span
    }

    static var defaultValueDescription: String { "RFC 3339 time or duration like 90m, 24h, 7d" }
}

/// `--limit`: any positive number.
struct LimitOption: ParsableArguments {
    @Option(help: "How many at most (a positive number).")
    var limit: Int = 50

    func validate() throws {
        guard limit > 0 else { throw ValidationError("--limit must be a positive number, not \(limit)") }
    }
}

struct CheckConfigCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config",
        abstract: "Validate the configuration and the files it names (and connect to PostgreSQL when it is the log).")

    @OptionGroup var config: ConfigOption

    func run() async throws {
        try await reportingFailures {
            let loaded: DaemonConfig
            do {
                let (config, warnings) = try ConfigLoader.load(path: config.path)
                for warning in warnings { print(warning) }
                loaded = config
            } catch let error as ConfigError {
                for problem in error.problems { print(problem) }
                throw CommandFailure.user("\(config.path): \(error.problems.filter { $0.severity == .error }.count) problem(s)")
            }
            if loaded.storage.backend == .postgresql {
                // A shared log is only as good as the connection to it: try it now, as the daemon will.
                let configuration = try Secrets.postgres(loaded)
                let report = try await PostgresEventLog.probe(configuration)
                print("storage: \(configuration.displayName): \(report.summary)")
                if report.nodeInUse {
                    print("storage: a daemon with node_id \(configuration.nodeID) is connected now (this one, if it runs here)")
                }
            }
            print("\(config.path): ok")
        }
    }
}

struct EventsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "events", abstract: "Read the event log.", subcommands: [List.self, Show.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Recent events, newest first.")

        @OptionGroup var config: ConfigOption
        @Option(help: "Only this event type, like checkout.accepted.") var type: String?
        @Option(help: "Only this payment status, like accepted.") var status: String?
        @Option(help: "Only this verification state: received, verified or rejected.") var state: String?
        @Option(help: "Only events received since then.") var since: SinceArgument?
        @OptionGroup var limit: LimitOption
        @Flag(help: "Print a JSON array of event objects.") var json = false

        func validate() throws {
            if let state, !["received", "verified", "rejected"].contains(state) {
                throw ValidationError("--state must be received, verified or rejected, not \(state)")
            }
        }

        func run() async throws {
            try await reportingFailures {
                let (_, log) = try await openEventLog(config)
                defer { log.close() }
                let events = try await log.events(
                    .init(type: type, status: status, state: state, since: since?.milliseconds, limit: limit.limit))
                if json { return try printJSON(events) }
                printTable(
                    ["ID", "TYPE", "STATE", "ENTITY", "AMOUNT", "RECEIVED", "DUPLICATES"],
                    events.map { event in
                        [
                            event.id, event.type, event.rejectionReason.map { "\(event.state) (\($0))" } ?? event.state,
                            event.entityID ?? "-",
                            [event.amount, event.currency].compactMap { $0 }.joined(separator: " "),
                            Timestamp.format(milliseconds: event.receivedAt), String(event.duplicates),
                        ]
                    })
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One event with its IPN receipts.")

        @OptionGroup var config: ConfigOption
        @Argument(help: "The event id (evt_...).") var id: String
        @Flag(help: "Print the event object as JSON.") var json = false

        func run() async throws {
            try await reportingFailures {
                let (_, log) = try await openEventLog(config)
                defer { log.close() }
                guard let detail = try await log.event(id: id, receiptBodies: nil, receiptLimit: nil) else {
                    throw CommandFailure.user("no event \(id): list them with 'payop-ipnd events list'")
                }
                if json { return try printJSON(detail) }
                let event = detail.event
                let fields: [(String, String?)] = [
                    ("id", event.id), ("type", event.type), ("state", event.state),
                    ("rejection reason", event.rejectionReason), ("source", event.source),
                    ("verification", event.verification), ("transaction", event.transactionID),
                    ("invoice", event.invoiceID), ("order", event.orderID), ("refund", event.refundID),
                    ("withdrawal", event.withdrawalID), ("amount", event.amount), ("currency", event.currency),
                    ("payop state", event.payopState.map(String.init)), ("error", event.errorMessage),
                    ("received at", Timestamp.format(milliseconds: event.receivedAt)),
                    ("verified at", event.verifiedAt.map { Timestamp.format(milliseconds: $0) }),
                    ("duplicates", String(event.duplicates)),
                ]
                for (name, value) in fields { print("\(name.padding(toLength: 17, withPad: " ", startingAt: 0))\(value ?? "-")") }
                print("\nreceipts:")
                let nodes = detail.receipts.contains { $0.nodeID != nil }
                printTable(
                    ["RECEIVED", "SOURCE", "ANSWER"] + (nodes ? ["NODE"] : []),
                    detail.receipts.map {
                        [Timestamp.format(milliseconds: $0.receivedAt), $0.sourceIP, String($0.answer)]
                            + (nodes ? [$0.nodeID ?? "-"] : [])
                    })
                print("\nverification attempts:")
                printTable(
                    ["AT", "OUTCOME", "PAYOP STATE", "DETAIL"],
                    detail.verificationAttempts.map {
                        [
                            Timestamp.format(milliseconds: $0.at), $0.outcome, $0.payopState.map(String.init) ?? "-",
                            $0.detail ?? "-",
                        ]
                    })
                print("\ndeliveries:")
                printDeliveries(detail.deliveries)
                if !detail.deliveryAttempts.isEmpty {
                    print("\nhook runs:")
                    printTable(
                        ["DELIVERY", "ATTEMPT", "FINISHED", "OUTCOME", "EXIT", "HTTP", "ERROR"],
                        detail.deliveryAttempts.map {
                            [
                                String($0.deliveryID), String($0.attempt), Timestamp.format(milliseconds: $0.finishedAt),
                                $0.outcome, $0.exitCode.map(String.init) ?? "-", $0.httpStatus.map(String.init) ?? "-",
                                $0.error ?? "-",
                            ]
                        })
                }
            }
        }
    }
}

struct ReceiptsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receipts", abstract: "Every IPN request recorded.", subcommands: [List.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "IPN requests, accepted or refused, newest first.")

        @OptionGroup var config: ConfigOption
        @Flag(help: "Only refused requests (400, 401).") var refused = false
        @Option(help: "Only requests received since then.") var since: SinceArgument?
        @OptionGroup var limit: LimitOption
        @Flag(help: "Print a JSON array.") var json = false

        func run() async throws {
            try await reportingFailures {
                let (_, log) = try await openEventLog(config)
                defer { log.close() }
                let receipts = try await log.receipts(refusedOnly: refused, since: since?.milliseconds, limit: limit.limit)
                if json { return try printJSON(receipts) }
                printTable(
                    ["ID", "RECEIVED", "SOURCE", "ANSWER", "REASON", "KIND", "ENTITY", "EVENT"],
                    receipts.map {
                        [
                            String($0.id), Timestamp.format(milliseconds: $0.receivedAt), $0.sourceIP, String($0.answer),
                            $0.reason ?? "-", $0.kind ?? "-", $0.entityID ?? "-", $0.eventID ?? "-",
                        ]
                    })
            }
        }
    }
}

struct PruneCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Delete receipts and delivered deliveries older than the retention; events and dead deliveries stay.")

    @OptionGroup var config: ConfigOption
    @Option(name: .customLong("older-than"), help: "Days to keep (default: storage.retention_days).")
    var olderThan: Int?

    func validate() throws {
        if let olderThan, olderThan < 0 { throw ValidationError("--older-than must be 0 or more days") }
    }

    func run() async throws {
        try await reportingFailures {
            let (config, log) = try await openEventLog(config)
            defer { log.close() }
            let days = olderThan ?? config.storage.retentionDays
            // More days than a clock counts keep everything.
            let (span, overflow) = Int64(days).multipliedReportingOverflow(by: 86_400_000)
            let cutoff = overflow ? Int64.min : SystemWallClock().nowMilliseconds() - span
            let result = try await log.prune(before: cutoff)
            print(
                "deleted \(result.receipts) receipt(s) and \(result.deliveries) delivered deliver\(result.deliveries == 1 ? "y" : "ies") older than \(days) day(s)"
            )
        }
    }
}
