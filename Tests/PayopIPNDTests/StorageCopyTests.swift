import ArgumentParser
import Foundation
import PostgresNIO
import Testing

@testable import PayopIPND

/// A refused request's body that is no text at all: it must come out of PostgreSQL byte for byte.
let refusedBody: [UInt8] = [0xff, 0x00, 0x7b, 0x80, 0x0a, 0xc3]

/// An SQLite log with a bit of everything, written through the daemon's own paths: receipts refused and
/// accepted (duplicates too), events verified by signature and by Payop, an unanswered question, a
/// delivered run, a failed run waiting to retry, and a run still `running` as a stopped daemon leaves it.
/// Returns the running delivery's id.
func populateForCopy(_ log: SQLiteEventLog) async throws -> Int64 {
    log.setHooks([storeHook("fulfil"), storeHook("crm", events: ["checkout.accepted"])])
    try await log.recordRefused(
        RefusedIPN(
            receivedAt: storeStart, sourceIP: "3.125.109.58", path: "/payop/ipn", reason: .invalidJSON,
            body: refusedBody, notification: nil))
    for n in 0..<12 {
        _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-\(n)", state: 2), at: storeStart + Int64(n)))
    }
    _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-0", state: 2), at: storeStart + 100))
    _ = try await log.ingest(try signedIPN(order: "7", at: storeStart + 200))
    for check in try await log.dueChecks(now: storeStart + 1_000, limit: 100) {
        let number = Int(check.entityID.dropFirst(3)) ?? 0
        guard number <= 6 else { continue }
        let answer: PayopAnswer =
            number == 6 ? .unanswered(code: "unavailable", detail: "HTTP 503") : .record(acceptedRecord(check.entityID))
        _ = try await log.applyAnswer(answer, to: check, now: storeStart + 1_000, policy: storePolicy)
    }
    let due = try await log.runnableDeliveries(now: storeStart + 2_000, hooks: ["fulfil", "crm"], limit: 100)
    try #require(due.count >= 3)
    _ = try #require(try await log.claimDelivery(id: due[0].id, now: storeStart + 2_000))
    _ = try await log.finishDelivery(
        id: due[0].id, attempt: 1, result: HookResult(outcome: .delivered, exitCode: 0), maxAttempts: 30,
        backoff: deliveryBackoff, now: storeStart + 2_010)
    _ = try #require(try await log.claimDelivery(id: due[1].id, now: storeStart + 2_000))
    _ = try await log.finishDelivery(
        id: due[1].id, attempt: 1, result: HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 3, output: "no\n"),
        maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 2_020)
    _ = try #require(try await log.claimDelivery(id: due[2].id, now: storeStart + 2_000))
    return due[2].id
}

func maxIDs(_ log: SQLiteEventLog) async throws -> [String: Int64] {
    try await log.read { db in
        var ids: [String: Int64] = [:]
        for table in ["receipts", "verification_attempts", "deliveries", "delivery_attempts"] {
            ids[table] = try Int64.fetchOne(db, sql: "SELECT max(id) FROM \(table)") ?? 0
        }
        return ids
    }
}

func maxIDs(_ log: PostgresEventLog) async throws -> [String: Int64] {
    try await log.read("test") { connection, logger in
        var ids: [String: Int64] = [:]
        for table in ["receipts", "verification_attempts", "deliveries", "delivery_attempts"] {
            ids[table] = try await connection.query("SELECT max(id) FROM \(unescaped: table)", logger: logger)
                .collect().first?.decode(Int64?.self) ?? 0
        }
        return ids
    }
}

/// `storage copy` against a real PostgreSQL server.
@Suite(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
struct StorageCopyTests {
    @Test func aPopulatedLogComesOutTheSameWithItsRunningDeliveryDueAndNewIDsAfterIt() async throws {
        let dir = try TemporaryDirectory(preferMemory: true)
        let sqlite = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: TestClock())
        defer { sqlite.close() }
        let running = try await populateForCopy(sqlite)
        let copied = try await maxIDs(sqlite)
        let clock = TestClock(storeStart + 50_000)
        try await withEmptyPostgresLog(clock: clock) { pg in
            // Three rows per INSERT: every table takes several pages.
            let counts = try await pg.copy(from: sqlite, batchSize: 3)
            #expect(counts.map(\.table) == ["events", "receipts", "verification_attempts", "deliveries", "delivery_attempts"])
            #expect(counts.allSatisfy { $0.sqlite == $0.postgresql && $0.sqlite > 0 }, "\(counts)")
            #expect(counts.first?.sqlite == 13 && counts.dropFirst().first?.sqlite == 15)
            let postgresCounts = try await pg.counts()
            #expect(postgresCounts.events == 13 && postgresCounts.receipts == 15)

            // Every event with its whole history, ids, times and bodies, as the SQLite log shows it.
            let events = try await sqlite.events(EventFilter(limit: 100))
            #expect(events.count == 13)
            for event in events {
                let before = try #require(try await sqlite.event(id: event.id, receiptBodies: 1 << 20, receiptLimit: nil))
                let after = try #require(try await pg.event(id: event.id, receiptBodies: 1 << 20, receiptLimit: nil))
                #expect(after.event == before.event)
                #expect(after.receipts.allSatisfy { $0.nodeID == "node-b" && $0.body != nil })
                #expect(after.receipts.map { var r = $0; r.nodeID = nil; return r } == before.receipts)
                #expect(after.verificationAttempts == before.verificationAttempts)
                #expect(after.deliveryAttempts == before.deliveryAttempts)
                #expect(after.deliveries.filter { $0.id != running } == before.deliveries.filter { $0.id != running })
            }
            #expect(try await pg.receipts(refusedOnly: true, since: nil, limit: 10).map(\.reason) == ["invalid_json"])
            let bodies = try await pg.read("test") { connection, logger in
                try await connection.query("SELECT body FROM receipts WHERE answer <> 200", logger: logger).collect()
                    .map { Array(try $0.decode(Data.self)) }
            }
            #expect(bodies == [refusedBody])

            // The run the stopped daemon never saw end is due now, its attempt counted, as a restart would.
            let recovered = try #require(
                try await pg.deliveries(state: nil, hook: nil, eventID: nil, deadFirst: false, limit: 100)
                    .first { $0.id == running })
            #expect(recovered.state == .pending && recovered.attempts == 1 && recovered.nextAttemptAt == clock.nowMilliseconds())
            #expect(try await pg.deliveries(state: "running", hook: nil, eventID: nil, deadFirst: false, limit: 10).isEmpty)

            // New rows of every table take ids after the copied ones.
            pg.setHooks([storeHook("fulfil")])
            let signed = try await pg.ingest(try signedIPN(order: "after-copy", at: clock.nowMilliseconds()))
            #expect(signed.receiptID > copied["receipts"]!)
            _ = try await pg.ingest(try storeIPN(checkoutBody(transaction: "tx-new", state: 2), at: clock.nowMilliseconds()))
            let check = try #require(
                try await pg.dueChecks(now: clock.nowMilliseconds(), limit: 100).first { $0.entityID == "tx-new" })
            _ = try await pg.applyAnswer(
                .record(acceptedRecord("tx-new")), to: check, now: clock.nowMilliseconds(), policy: storePolicy)
            let delivery = try #require(try await pg.event(id: signed.eventID)?.deliveries.first)
            _ = try #require(try await pg.claimDelivery(id: delivery.id, now: clock.nowMilliseconds()))
            // A run that failed: a first run that delivered would leave no row of the runs' history.
            _ = try await pg.finishDelivery(
                id: delivery.id, attempt: 1, result: HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 1),
                maxAttempts: 30, backoff: deliveryBackoff, now: clock.nowMilliseconds())
            let now = try await maxIDs(pg)
            for (table, id) in copied { #expect(now[table]! > id, "\(table)") }
        }
    }

    @Test func aTargetThatHoldsAnythingIsRefusedAndLeftAsItWas() async throws {
        let dir = try TemporaryDirectory(preferMemory: true)
        let sqlite = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: TestClock())
        defer { sqlite.close() }
        _ = try await populateForCopy(sqlite)
        try await withEmptyPostgresLog(clock: TestClock()) { pg in
            let own = try await pg.ingest(try storeIPN(checkoutBody(transaction: "tx-own", state: 4)))
            do {
                _ = try await pg.copy(from: sqlite)
                Issue.record("a copy into a log holding an event went ahead")
            } catch let error as EventLogError {
                #expect(error.code == .inUse && error.message.contains("is not empty (1 events, 1 receipts)") && error.message.contains("nothing was copied"))
            }
            let counts = try await pg.counts()
            #expect(counts.events == 1 && counts.receipts == 1)
            #expect(try await pg.event(id: own.eventID)?.receipts.map(\.id) == [own.receiptID])
            #expect(try await maxIDs(pg) == ["receipts": own.receiptID, "verification_attempts": 0, "deliveries": 0, "delivery_attempts": 0])
        }
    }

    @Test func theCommandCopiesBetweenTwoConfigurationsAndPrintsTheCounts() async throws {
        let server = try await PostgresTestServer.shared()
        let database = "t_copy_\(UUID().uuidString.prefix(8).lowercased())"
        try await PostgresTestServer.admin("CREATE DATABASE \(unescaped: database)")
        do {
            let dir = try TemporaryDirectory()
            let logPath = dir.file("events.sqlite3")
            do {
                let sqlite = try SQLiteEventLog.open(path: logPath, mode: .daemon, clock: TestClock())
                _ = try await populateForCopy(sqlite)
                sqlite.close()
            }
            // A daemon ran on it once (its lock file is there) and is stopped now.
            try EventLogLock.acquire(logPath: logPath).release()
            let source = try dir.write("payop-ipnd.yaml", "storage:\n  path: \(logPath)\n")
            var storage = """
                storage:
                  backend: postgresql
                  url: postgres://\(server.username)@\(server.host):\(server.port)/\(database)?sslmode=\(server.tls.rawValue)
                  node_id: shop-2

                """
            if let password = server.password {
                storage += "  password_file: \(try dir.write("db-password", password + "\n"))\n"
            }
            let target = try dir.write("shared.yaml", storage)
            let command = try #require(
                try PayopIPNDCommand.parseAsRoot(["storage", "copy", "--config", source, "--to-config", target])
                    as? StorageCommand.Copy)
            try await command.run()
            // Once copied, the target is no longer empty: the command says so and fails.
            await #expect(throws: ExitCode(1)) { try await command.run() }
            let configuration = try await PostgresTestServer.configuration(schema: "public", nodeID: "test", database: database)
            try await PostgresEventLog.withLog(configuration: configuration) { pg in
                let counts = try await pg.counts()
                #expect(counts.events == 13 && counts.receipts == 15)
                let nodes = try await pg.read("test") { connection, logger in
                    try await connection.query("SELECT DISTINCT node_id FROM receipts", logger: logger).collect()
                        .map { try $0.decode(String.self) }
                }
                #expect(nodes == ["shop-2"])
            }
        } catch {
            try? await PostgresTestServer.admin("DROP DATABASE \(unescaped: database) WITH (FORCE)")
            throw error
        }
        try await PostgresTestServer.admin("DROP DATABASE \(unescaped: database) WITH (FORCE)")
    }
}

/// `storage copy` refusing what it must not copy, without a database.
@Suite struct StorageCopyCommandTests {
    static let postgresTarget = """
        storage:
          backend: postgresql
          url: postgres://payop@127.0.0.1:1/payop?sslmode=disable
          node_id: shop-2

        """

    func failure(_ source: String, _ target: String) async -> String? {
        do {
            _ = try await StorageCommand.Copy.copy(from: source, to: target)
            return nil
        } catch let failure as CommandFailure {
            #expect(failure.exitCode == 1)
            return failure.message
        } catch {
            return "unexpected: \(error)"
        }
    }

    @Test func aTargetOnSQLiteIsRefusedWithWhatToName() async throws {
        let dir = try TemporaryDirectory()
        let source = try dir.write("payop-ipnd.yaml", "storage:\n  path: \(dir.file("events.sqlite3"))\n")
        let target = try dir.write("new.yaml", "storage:\n  backend: sqlite\n  path: \(dir.file("other.sqlite3"))\n")
        let message = try #require(await failure(source, target))
        #expect(message.contains("keeps its event log in sqlite") && message.contains("storage.backend: postgresql"))
        let command = try #require(
            try PayopIPNDCommand.parseAsRoot(["storage", "copy", "--config", source, "--to-config", target])
                as? StorageCommand.Copy)
        await #expect(throws: ExitCode(1)) { try await command.run() }
        #expect(!FileManager.default.fileExists(atPath: dir.file("other.sqlite3")))
    }

    @Test func aSourceOnPostgreSQLIsRefused() async throws {
        let dir = try TemporaryDirectory()
        let source = try dir.write("payop-ipnd.yaml", Self.postgresTarget)
        let target = try dir.write("new.yaml", Self.postgresTarget)
        let message = try #require(await failure(source, target))
        #expect(message.contains("storage copy reads an SQLite log"))
    }

    @Test func aLogItsDaemonStillServesIsRefused() async throws {
        let dir = try TemporaryDirectory()
        let logPath = dir.file("events.sqlite3")
        try SQLiteEventLog.open(path: logPath, mode: .daemon).close()
        let lock = try EventLogLock.acquire(logPath: logPath)
        defer { lock.release() }
        let source = try dir.write("payop-ipnd.yaml", "storage:\n  path: \(logPath)\n")
        let target = try dir.write("new.yaml", Self.postgresTarget)
        let message = try #require(await failure(source, target))
        #expect(message.contains("(pid \(getpid()))") && message.contains("stop the daemon first (systemctl stop payop-ipnd)"))
    }

    @Test func theCommandParses() throws {
        let command = try #require(
            try PayopIPNDCommand.parseAsRoot(["storage", "copy", "--to-config", "/etc/payop-ipnd/shared.yaml"])
                as? StorageCommand.Copy)
        #expect(command.toConfig == "/etc/payop-ipnd/shared.yaml" && command.config.config == nil)
        #expect(throws: (any Error).self) { try PayopIPNDCommand.parseAsRoot(["storage", "copy"]) }
    }
}
