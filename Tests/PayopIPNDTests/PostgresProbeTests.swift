import Foundation
import Testing

@testable import PayopIPND

/// What `check-config` and `doctor` say about a PostgreSQL log before a daemon uses it.
@Suite struct PostgresProbeTests {
    /// `payop-ipnd ARGS` run as a process: its exit code and what it printed.
    static func command(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: DaemonProcessTests.binary)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, output)
    }

    @Test func checkConfigConnectsAndSaysPlainlyWhenNothingListens() throws {
        let dir = try TemporaryDirectory()
        let port = DaemonProcessTests.freePort()
        let config = try dir.write(
            "payop-ipnd.yaml",
            """
            storage:
              backend: postgresql
              url: postgres://payop@127.0.0.1:\(port)/payop?sslmode=disable
            """)
        let (status, output) = try Self.command(["check-config", "--config", config])
        #expect(status == 69, "\(output)")
        #expect(output.contains("127.0.0.1:\(port)/payop") && output.contains("not reachable"), "\(output)")
    }

    @Test(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
    func aReachableServerIsDescribedAndItsNodeIDsInUseSeen() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        defer { Task { await PostgresTestServer.dropSchema(schema) } }
        let configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: "probe-a")
        let before = try await PostgresEventLog.probe(configuration)
        #expect(before.schemaVersion == 0 && !before.nodeInUse && before.synchronousCommit == "on")
        #expect(before.summary.contains("no tables yet"))
        try await PostgresEventLog.withLog(configuration: configuration) { log in
            let session = try await PostgresSession.start(log: log, logger: quietLogger) { _ in }
            let after = try await PostgresEventLog.probe(configuration)
            #expect(after.schemaVersion == after.latestSchemaVersion && after.nodeInUse)
            var other = configuration
            other.nodeID = "probe-b"
            #expect(try await PostgresEventLog.probe(other).nodeInUse == false)
            let run = Task { try await session.run() }
            run.cancel()
            _ = try await run.value
        }
    }

    @Test(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
    func aMissingDatabaseOrAMissingPrivilegeIsNamed() async throws {
        var missing = try await PostgresTestServer.configuration(schema: "public", nodeID: "a", database: "no_such_db")
        missing.openTimeout = .seconds(5)
        do {
            _ = try await PostgresEventLog.probe(missing)
            Issue.record("a missing database was accepted")
        } catch {
            #expect(error.description.contains("does not exist"), "\(error)")
        }
        let schema = try await PostgresTestServer.freshSchema()
        let role = "r_" + schema.dropFirst(2)
        try await PostgresTestServer.admin("CREATE ROLE \(unescaped: role) LOGIN")
        defer {
            Task {
                await PostgresTestServer.dropSchema(schema)
                try? await PostgresTestServer.admin("DROP ROLE IF EXISTS \(unescaped: role)")
            }
        }
        var unprivileged = try await PostgresTestServer.configuration(schema: schema, nodeID: "a")
        unprivileged.username = role
        do {
            _ = try await PostgresEventLog.probe(unprivileged)
            Issue.record("a role that may not create the tables was accepted")
        } catch {
            #expect(error.description.contains("GRANT CREATE"), "\(error)")
        }
    }

    /// The pool retries a refused connection quietly; a daemon that cannot open its log must still say why.
    @Test(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
    func aDaemonThatCannotOpenTheLogSaysWhyNotJustThatItTimedOut() async throws {
        var missing = try await PostgresTestServer.configuration(schema: "public", nodeID: "a", database: "no_such_db")
        missing.openTimeout = .seconds(3)
        do {
            try await PostgresEventLog.withLog(configuration: missing) { _ in }
            Issue.record("a log in a missing database opened")
        } catch {
            #expect("\(error)".contains("does not exist"), "\(error)")
        }
    }

    @Test(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
    func doctorDescribesTheSharedLogAndNamesWhatIsWrong() async throws {
        let server = try await PostgresTestServer.shared()
        let dir = try TemporaryDirectory()
        let good = try dir.write(
            "good.yaml",
            """
            storage:
              backend: postgresql
              url: postgres://\(server.username)@\(server.host):\(server.port)/\(server.database)?sslmode=disable
              node_id: doctor-a
            """)
        let check = try #require(await Doctor(configPath: good).run().first { $0.name == "event log" })
        #expect(check.verdict == .ok && check.detail.contains("synchronous_commit on"), "\(check.line)")
        let bad = try dir.write(
            "bad.yaml",
            """
            storage:
              backend: postgresql
              url: postgres://\(server.username)@\(server.host):\(server.port)/no_such_db?sslmode=disable
              node_id: doctor-a
            """)
        let failed = try #require(await Doctor(configPath: bad).run().first { $0.name == "event log" })
        #expect(failed.verdict == .fail && failed.detail.contains("does not exist"), "\(failed.line)")
    }
}
