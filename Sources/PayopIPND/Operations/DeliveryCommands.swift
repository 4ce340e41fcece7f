import ArgumentParser
import Foundation

struct DeliveriesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deliveries", abstract: "Hook deliveries.", subcommands: [List.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Deliveries, newest first.")

        @OptionGroup var config: ConfigOption
        @Option(help: "pending, running, delivered or dead.") var state: String?
        @Option(help: "Only this hook.") var hook: String?
        @OptionGroup var limit: LimitOption
        @Flag(help: "Print a JSON array.") var json = false

        func validate() throws {
            if let state, !["pending", "running", "delivered", "dead"].contains(state) {
                throw ValidationError("--state must be pending, running, delivered or dead, not \(state)")
            }
        }

        func run() async throws {
            try await reportingFailures {
                let (daemonConfig, log) = try await openEventLog(config)
                defer { log.close() }
                let deliveries = try await log.deliveries(state: state, hook: hook, eventID: nil, deadFirst: false, limit: limit.limit)
                if json { return try printJSON(deliveries) }
                printDeliveries(deliveries)
                let orphans = try await log.orphanedDeliveries(configured: daemonConfig.hooks.map(\.name))
                for (name, count) in orphans.sorted(by: { $0.key < $1.key }) {
                    print(
                        "note: \(count) pending deliveries wait for hook \(name), which is not in the configuration: "
                            + "add it back to hooks (or rename it back) and reload")
                }
            }
        }
    }
}

/// A shared (PostgreSQL) log also names the daemon that claimed each delivery last.
func printDeliveries(_ deliveries: [Delivery]) {
    let nodes = deliveries.contains { $0.nodeID != nil }
    printTable(
        ["ID", "EVENT", "HOOK", "STATE", "ATTEMPTS", "NEXT ATTEMPT"] + (nodes ? ["NODE"] : []) + ["LAST ERROR"],
        deliveries.map {
            [
                String($0.id), $0.eventID, $0.hook, $0.state.rawValue, String($0.attempts),
                $0.nextAttemptAt.map { Timestamp.format(milliseconds: $0) } ?? "-",
            ] + (nodes ? [$0.nodeID ?? "-"] : []) + [$0.lastError ?? "-"]
        })
}

struct ReplayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replay",
        abstract: "Deliver an event again, to every matching hook or one; a running daemon picks it up within a second.")

    @OptionGroup var config: ConfigOption
    @Argument(help: "The event id (evt_...).") var id: String
    @Option(help: "Only this hook.") var hook: String?

    func run() async throws {
        try await reportingFailures {
            let (daemonConfig, log) = try await openEventLog(config)
            defer { log.close() }
            if let hook, !daemonConfig.hooks.contains(where: { $0.name == hook }) {
                throw CommandFailure.user(
                    "no hook named \(hook) in \(config.path); hooks: \(daemonConfig.hooks.map(\.name).joined(separator: ", "))")
            }
            let queued = try await log.replay(
                eventID: id, hook: hook, hooks: daemonConfig.hooks, now: SystemWallClock().nowMilliseconds())
            guard queued > 0 else {
                throw CommandFailure.user("event \(id) matches no configured hook\(hook.map { " named \($0)" } ?? "")")
            }
            print("queued \(queued) deliver\(queued == 1 ? "y" : "ies") of \(id)")
        }
    }
}
