import Foundation
import Logging
import PostgresNIO
import Synchronization
import Testing

@testable import PayopIPND

/// The PostgreSQL server the PostgreSQL tests use, from `PAYOP_IPND_TEST_POSTGRES`:
///
/// - unset or empty: those tests do not run (a merchant's plain `swift test` needs no database);
/// - `start`: a throwaway cluster of Debian's `postgresql` package, made with `initdb` in a temporary
///   folder, served by `pg_ctl` on a free port of 127.0.0.1 with `fsync` on, stopped and deleted when
///   the test process exits (`scripts/pg-test.sh` runs them this way);
/// - `postgres://user:password@host:port/database[?sslmode=...]`: an existing server, where the user
///   may create schemas (each test gets its own schema, dropped afterwards).
enum PostgresTestServer {
    static let setting = ProcessInfo.processInfo.environment["PAYOP_IPND_TEST_POSTGRES"] ?? ""
    static var isConfigured: Bool { !setting.isEmpty }

    /// Where to connect as an administrator (the cluster's superuser, or the given URL's user).
    struct Endpoint: Sendable {
        var host: String
        var port: Int
        var username: String
        var password: String?
        var database: String
        var tls: PostgresEventLogConfiguration.TLSMode
    }

    private static let endpoint = Mutex<Task<Endpoint, any Error>?>(nil)

    /// The server, started on first use when the setting is `start`.
    static func shared() async throws -> Endpoint {
        let task = endpoint.withLock { current -> Task<Endpoint, any Error> in
            if let current { return current }
            // One start for the whole test process, whichever test asks first.
            let task = Task<Endpoint, any Error> {
                if setting == "start" { return try ThrowawayCluster.start() }
                return try parse(setting)
            }
            current = task
            return task
        }
        return try await task.value
    }

    static func parse(_ text: String) throws -> Endpoint {
        guard let url = URLComponents(string: text), let host = url.host, let user = url.user else {
            throw TestServerError("PAYOP_IPND_TEST_POSTGRES is neither 'start' nor a postgres:// URL with a user and host")
        }
        let mode = url.queryItems?.first { $0.name == "sslmode" }?.value
        return Endpoint(
            host: host, port: url.port ?? 5432, username: user, password: url.password,
            database: String(url.path.drop { $0 == "/" }).isEmpty ? "postgres" : String(url.path.drop { $0 == "/" }),
            tls: mode.flatMap(PostgresEventLogConfiguration.TLSMode.init(rawValue:)) ?? .disable)
    }

    /// A schema of its own for one test: the configuration of a log in it, for `nodeID`.
    static func freshSchema() async throws -> String {
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        try await admin("CREATE SCHEMA \(unescaped: name)")
        return name
    }

    static func dropSchema(_ name: String) async {
        try? await admin("DROP SCHEMA IF EXISTS \(unescaped: name) CASCADE")
    }

    static func configuration(schema: String, nodeID: String, database: String? = nil) async throws
        -> PostgresEventLogConfiguration
    {
        let server = try await shared()
        return PostgresEventLogConfiguration(
            host: server.host, port: server.port, username: server.username, password: server.password,
            database: database ?? server.database, schema: schema, tls: server.tls, poolSize: 8, nodeID: nodeID)
    }

    /// Runs one statement as the administrator, on a connection of its own.
    static func admin(_ query: PostgresQuery, database: String? = nil) async throws {
        let server = try await shared()
        var configuration = PostgresConnection.Configuration(
            host: server.host, port: server.port, username: server.username, password: server.password,
            database: database ?? server.database, tls: .disable)
        if server.tls != .disable {
            var context = TLSConfiguration.makeClientConfiguration()
            context.certificateVerification = .none
            configuration.tls = .require(try NIOSSLContext(configuration: context))
        }
        let connection = try await PostgresConnection.connect(
            configuration: configuration, id: 1, logger: quietLogger)
        do {
            try await connection.query(query, logger: quietLogger)
        } catch {
            try? await connection.close()
            throw error
        }
        try await connection.close()
    }
}

struct TestServerError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A PostgreSQL cluster that lives as long as the test process.
enum ThrowawayCluster {
    private static let started = Mutex<(directory: String, binaries: String)?>(nil)

    static func start() throws -> PostgresTestServer.Endpoint {
        let binaries = try binariesDirectory()
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("payop-ipnd-pg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // initdb refuses to run as root: as root (tests and CI) the cluster belongs to the `postgres`
        // user that Debian's package creates; otherwise to whoever runs the tests.
        let asRoot = geteuid() == 0
        if asRoot {
            try run("/bin/chown", ["postgres:postgres", directory])
        }
        // initdb's own final sync is skipped (a throwaway cluster); the server itself runs fsync=on.
        try run(
            "\(binaries)/initdb",
            ["-D", "\(directory)/data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            asPostgres: asRoot)
        started.withLock { $0 = (directory, binaries) }
        atexit { ThrowawayCluster.stop() }
        var lastError: (any Error)?
        for _ in 0..<5 {
            let port = try freePort()
            let options = [
                "-c listen_addresses=127.0.0.1", "-c port=\(port)", "-c unix_socket_directories=\(directory)",
                "-c fsync=on", "-c synchronous_commit=on", "-c max_connections=300",
            ].joined(separator: " ")
            do {
                try run(
                    "\(binaries)/pg_ctl",
                    ["-D", "\(directory)/data", "-l", "\(directory)/server.log", "-w", "-t", "30", "-o", options, "start"],
                    asPostgres: asRoot)
                return PostgresTestServer.Endpoint(
                    host: "127.0.0.1", port: port, username: "postgres", password: nil, database: "postgres",
                    tls: .disable)
            } catch {
                // Another process took the port between the probe and the start: another port.
                lastError = error
            }
        }
        throw lastError ?? TestServerError("the throwaway PostgreSQL cluster did not start")
    }

    /// At the test process's exit: the server stopped, its folder removed.
    static func stop() {
        guard let (directory, binaries) = started.withLock({ $0 }) else { return }
        try? run(
            "\(binaries)/pg_ctl", ["-D", "\(directory)/data", "-m", "immediate", "-w", "stop"], asPostgres: geteuid() == 0)
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The newest installed version's programs (`/usr/lib/postgresql/N/bin`, Debian's layout).
    static func binariesDirectory() throws -> String {
        let base = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: base)) ?? [])
            .compactMap(Int.init).sorted()
        guard let newest = versions.last(where: { FileManager.default.isExecutableFile(atPath: "\(base)/\($0)/bin/initdb") })
        else {
            throw TestServerError(
                "PAYOP_IPND_TEST_POSTGRES=start needs PostgreSQL's server programs: apt-get install -y postgresql")
        }
        return "\(base)/\(newest)/bin"
    }

    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestServerError("no socket for a port probe") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Bool in
                bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else { throw TestServerError("cannot probe for a free port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Runs a program to its end with posix_spawn and waitpid. Not Foundation's `Process`: it watches
    /// a child through a descriptor the child inherits, and the server `pg_ctl` starts keeps that
    /// descriptor for its whole life, so `pg_ctl start` would never seem to end.
    static func run(_ program: String, _ arguments: [String], asPostgres: Bool = false) throws {
        let command = asPostgres ? ["/usr/sbin/runuser", "-u", "postgres", "--", program] + arguments : [program] + arguments
        // From "/": a folder the postgres user may enter, whatever the tests' own working directory.
        let argv = ["/bin/sh", "-c", "cd / && exec \"$0\" \"$@\""] + command
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("payop-ipnd-pg-\(UUID().uuidString).out")
        defer { try? FileManager.default.removeItem(at: output) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output.path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let cArguments = argv.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/bin/sh", &actions, nil, cArguments, environ)
        guard spawned == 0 else { throw TestServerError("cannot run \(program): \(String(cString: strerror(spawned)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        let text = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        // WIFEXITED and WEXITSTATUS by hand (macros Swift does not import).
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else {
            throw TestServerError("\(program) \(arguments.joined(separator: " ")) failed: \(text)")
        }
    }
}

/// A fresh, empty PostgreSQL log in a schema of its own, dropped afterwards.
func withEmptyPostgresLog(
    clock: TestClock, nodeID: String = "node-b", _ body: @Sendable (PostgresEventLog) async throws -> Void
) async throws {
    let schema = try await PostgresTestServer.freshSchema()
    let configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: nodeID)
    do {
        try await PostgresEventLog.withLog(configuration: configuration, clock: clock) { try await body($0) }
    } catch {
        await PostgresTestServer.dropSchema(schema)
        throw error
    }
    await PostgresTestServer.dropSchema(schema)
}
