import ArgumentParser
import Foundation

/// `storage`: for a merchant outgrowing one machine. The daemons of the new setup start on a copy of
/// the old log, so nothing received, verified or delivered before the move is asked about or run again.
struct StorageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "storage", abstract: "Move the event log between backends.", subcommands: [Copy.self])

    struct Copy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy the SQLite event log into an empty PostgreSQL one.",
            discussion: """
                Reads the SQLite log of --config (stop its daemon first) and writes every event, receipt, \
                verification attempt, delivery and hook run, with their ids and times, into the empty \
                PostgreSQL database of --to-config's storage section, in one transaction. Deliveries that \
                were running become due at once, as the stopped daemon would have run them at its next \
                start. Prints the rows of each table on both sides; exits 1 if they differ.
                """)

        @OptionGroup var config: ConfigOption
        @Option(
            name: .customLong("to-config"),
            help: "The configuration whose storage section names the PostgreSQL log (storage.backend: postgresql).")
        var toConfig: String

        func run() async throws {
            try await reportingFailures {
                let counts = try await Self.copy(from: config.path, to: toConfig)
                printTable(
                    ["TABLE", "SQLITE", "POSTGRESQL"],
                    counts.map { [$0.table, String($0.sqlite), String($0.postgresql)] })
                let differing = counts.filter { $0.sqlite != $0.postgresql }.map(\.table)
                guard differing.isEmpty else {
                    throw CommandFailure.user(
                        "the copy holds other counts than the SQLite log (\(differing.joined(separator: ", "))): do not "
                            + "start daemons on it; empty the PostgreSQL database and copy again with the daemon stopped")
                }
            }
        }

        /// The copy from the log of the configuration at `sourcePath` into the one at `targetPath`, after
        /// checking both backends and that no daemon serves the source.
        static func copy(from sourcePath: String, to targetPath: String) async throws -> [PostgresEventLog.CopyCount] {
            let (source, _) = try ConfigLoader.load(path: sourcePath)
            let (target, _) = try ConfigLoader.load(path: targetPath)
            guard source.storage.backend == .sqlite else {
                throw CommandFailure.user(
                    "\(sourcePath) keeps its event log in PostgreSQL: storage copy reads an SQLite log (storage.backend: "
                        + "sqlite); pass that configuration with --config")
            }
            guard target.storage.backend == .postgresql else {
                throw CommandFailure.user(
                    "\(targetPath) keeps its event log in \(target.storage.backend.rawValue): --to-config must name a "
                        + "configuration with storage.backend: postgresql and its storage.url")
            }
            let path = source.storage.path
            let lock = try holdLock(of: path)
            defer { lock?.release() }
            let log = try SQLiteEventLog.open(path: path, mode: .tool, create: false)
            defer { log.close() }
            return try await PostgresEventLog.withLog(configuration: try Secrets.postgres(target)) {
                try await $0.copy(from: log)
            }
        }

        /// The source log's lock, held for the whole copy when a daemon ever made the lock file: a daemon
        /// started meanwhile would take IPNs the copy misses, and fails to start instead.
        static func holdLock(of path: String) throws -> EventLogLock? {
            if let pid = EventLogLock.holder(logPath: path) { throw daemonServing(path, pid: pid) }
            guard FileManager.default.fileExists(atPath: EventLogLock.lockPath(forLog: path)) else { return nil }
            do {
                return try EventLogLock.acquire(logPath: path)
            } catch {
                // Not `catch where`: Swift 6.3's SILGen crashes on it with a typed throw.
                guard error.code == .inUse else { throw error }
                throw daemonServing(path, pid: EventLogLock.holder(logPath: path) ?? 0)
            }
        }

        static func daemonServing(_ path: String, pid: Int) -> CommandFailure {
            .user(
                "a payop-ipnd daemon\(pid > 0 ? " (pid \(pid))" : "") is serving \(path): stop the daemon first "
                    + "(systemctl stop payop-ipnd)")
        }
    }
}
