import Foundation
import Synchronization
import Testing

@testable import PayopIPND

/// A daemon's session on the shared log: one daemon per node id, one reconcile leader at a time
/// (taken over when its session ends), and notifications that wake the other daemons.
@Suite(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
struct PostgresSessionTests {
    /// Logs on one fresh schema, one per node id, for the duration of `body`.
    static func withLogs(
        _ nodes: [String], _ body: @Sendable ([PostgresEventLog]) async throws -> Void
    ) async throws {
        let schema = try await PostgresTestServer.freshSchema()
        var configurations: [PostgresEventLogConfiguration] = []
        for node in nodes { configurations.append(try await PostgresTestServer.configuration(schema: schema, nodeID: node)) }
        let logs = configurations.map { PostgresEventLog(configuration: $0) }
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for log in logs { group.addTask { await log.run() } }
                defer { group.cancelAll() }
                for log in logs { try await log.open() }
                try await body(logs)
            }
        } catch {
            await PostgresTestServer.dropSchema(schema)
            throw error
        }
        await PostgresTestServer.dropSchema(schema)
    }

    /// Polls `condition` every 20 ms for up to `seconds`.
    static func eventually(_ seconds: Double = 10, _ condition: () async -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
        while ContinuousClock.now < deadline {
            if await condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return await condition()
    }

    @Test func aSecondDaemonWithTheSameNodeIDIsRefusedAndAnotherNodeIsNot() async throws {
        try await Self.withLogs(["shop-1", "shop-1", "shop-2"]) { logs in
            let first = try await PostgresSession.start(log: logs[0], logger: quietLogger) { _ in }
            do {
                _ = try await PostgresSession.start(log: logs[1], logger: quietLogger) { _ in }
                Issue.record("a second session with node id shop-1 was let in")
            } catch let error as EventLogError {
                #expect(error.code == .inUse && error.message.contains("storage.node_id shop-1"))
            }
            let other = try await PostgresSession.start(log: logs[2], logger: quietLogger) { _ in }
            // Once the first daemon's session ends, its node id is free again (a restart).
            let run = Task { try await first.run() }
            run.cancel()
            _ = try await run.value
            let again = try await PostgresSession.start(log: logs[1], logger: quietLogger) { _ in }
            for session in [other, again] {
                let task = Task { try await session.run() }
                task.cancel()
                _ = try await task.value
            }
        }
    }

    @Test func oneLeaderAtATimeAndAnotherTakesOverWhenItsDaemonGoes() async throws {
        try await Self.withLogs(["a", "b"]) { logs in
            var runs: [Task<Void, any Error>] = []
            for log in logs {
                let session = try await PostgresSession.start(
                    log: log, logger: quietLogger, leaderRetry: .milliseconds(50), reconnectDelay: .milliseconds(50)
                ) { _ in }
                runs.append(Task { try await session.run() })
            }
            #expect(await Self.eventually { logs.filter(\.isReconcileLeader).count == 1 })
            try await Task.sleep(for: .milliseconds(200))
            #expect(logs.filter(\.isReconcileLeader).count == 1)
            let leader = try #require(logs.firstIndex { $0.isReconcileLeader })
            runs[leader].cancel()
            _ = try await runs[leader].value
            #expect(!logs[leader].isReconcileLeader)
            #expect(await Self.eventually { logs[1 - leader].isReconcileLeader })
            runs[1 - leader].cancel()
            _ = try await runs[1 - leader].value
        }
    }

    @Test func anotherDaemonsNewWorkWakesThisOne() async throws {
        try await Self.withLogs(["a", "b"]) { logs in
            let heard = Mutex<[PostgresSession.Work]>([])
            let session = try await PostgresSession.start(log: logs[0], logger: quietLogger) { work in
                heard.withLock { $0.append(work) }
            }
            let run = Task { try await session.run() }
            // LISTEN is issued once the session runs: new IPNs until one is heard.
            var sent = 0
            #expect(
                await Self.eventually {
                    sent += 1
                    _ = try? await logs[1].ingest(try storeIPN(checkoutBody(transaction: "tx-wake-\(sent)", state: 2)))
                    try? await Task.sleep(for: .milliseconds(30))
                    return heard.withLock { $0.contains(.verify) }
                })
            #expect(!heard.withLock { $0.contains(.deliver) })
            logs[1].setHooks([storeHook("fulfil")])
            _ = try await logs[1].ingest(try signedIPN(order: "wake"))
            #expect(await Self.eventually { heard.withLock { $0.contains(.deliver) } })
            run.cancel()
            _ = try await run.value
        }
    }

    @Test func onlyTheLeaderReasksPayopAboutDecidedEvents() async throws {
        try await Self.withLogs(["a"]) { logs in
            let log = logs[0]
            // A pending checkout, confirmed pending: verified, and asked about again each reconcile interval.
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-pending", state: 1)))
            let check = try #require(try await log.dueChecks(now: storeStart, limit: 10).first)
            let pending = PayopRecord(
                kind: .checkout, id: "tx-pending", status: .checkout(state: 1, errorMessage: nil),
                orderID: "order-tx-pending")
            let applied = try await log.applyAnswer(.record(pending), to: check, now: storeStart + 1, policy: storePolicy)
            #expect(applied.state == .verified)
            let later = storeStart + 10 * storePolicy.reconcileIntervalMilliseconds
            log.setReconcileLeader(false)
            #expect(try await log.nextCheckDue() == nil)
            #expect(try await log.dueChecks(now: later, limit: 10).isEmpty)
            // A first question is anyone's.
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-new", state: 2), at: storeStart + 2))
            #expect(try await log.dueChecks(now: later, limit: 10).map(\.entityID) == ["tx-new"])
            log.setReconcileLeader(true)
            #expect(try await log.dueChecks(now: later, limit: 10).map(\.entityID) == ["tx-pending"])
        }
    }

    /// The server going away (here: the log's role may no longer log in, its connections cut) makes
    /// ingest fail as unavailable within its deadline (the IPN is answered 503 and Payop sends it again)
    /// and readiness say so; when the server is back, the log carries on by itself.
    @Test func aLostServerMakesIngestUnavailableInBoundedTimeAndTheLogRecovers() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        let role = "r_" + schema.dropFirst(2)
        try await PostgresTestServer.admin("CREATE ROLE \(unescaped: role) LOGIN")
        try await PostgresTestServer.admin("GRANT ALL ON SCHEMA \(unescaped: schema) TO \(unescaped: role)")
        var configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: "a")
        configuration.username = role
        configuration.password = nil
        defer {
            Task {
                await PostgresTestServer.dropSchema(schema)
                try? await PostgresTestServer.admin("DROP ROLE IF EXISTS \(unescaped: role)")
            }
        }
        try await PostgresEventLog.withLog(configuration: configuration) { log in
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-before", state: 2)))
            try await log.checkWritable()
            try await PostgresTestServer.admin("ALTER ROLE \(unescaped: role) NOLOGIN")
            try await PostgresTestServer.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = \(role)")
            let start = ContinuousClock.now
            await #expect(throws: EventLogError.self) {
                _ = try await withDeadline(.seconds(30)) {
                    try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-lost", state: 2)))
                }
            }
            #expect(ContinuousClock.now - start < PostgresEventLog.ingestTimeout + .seconds(2))
            await #expect(throws: EventLogError.self) { try await log.checkWritable() }
            try await PostgresTestServer.admin("ALTER ROLE \(unescaped: role) LOGIN")
            #expect(
                await Self.eventually(30) {
                    (try? await log.ingest(try storeIPN(checkoutBody(transaction: "tx-after", state: 2)))) != nil
                })
            try await log.checkWritable()
            #expect(try await log.counts().events == 2)
        }
    }

    @Test func claimsThePoolAndTheLeadershipAreMeasured() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        defer { Task { await PostgresTestServer.dropSchema(schema) } }
        let configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: "a")
        let metrics = DaemonMetrics()
        let log = PostgresEventLog(configuration: configuration, metrics: metrics)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await log.run() }
            defer { group.cancelAll() }
            try await log.open()
            log.setHooks([storeHook("fulfil")])
            _ = try await log.ingest(try signedIPN(order: "measured"))
            let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
            _ = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
            _ = try await log.dueChecks(now: storeStart, limit: 10)
            log.setReconcileLeader(true)
            let text = metrics.render()
            for name in [
                "payop_ipnd_storage_claim_seconds_count{what=\"delivery\"} 1",
                "payop_ipnd_storage_claim_seconds_count{what=\"check\"} 1", "payop_ipnd_storage_pool_size 8",
                "payop_ipnd_storage_connections_in_use 0", "payop_ipnd_storage_connection_wait_seconds_count",
                "payop_ipnd_reconcile_leader 1",
            ] {
                #expect(text.contains(name), "\(name) missing from:\n\(text)")
            }
        }
    }

    @Test func daemonsRunningOtherHooksAreNamedAndDoctorSeesThem() async throws {
        try await Self.withLogs(["a", "b"]) { logs in
            let (a, b) = (logs[0], logs[1])
            a.setHooks([storeHook("fulfil", events: ["checkout.accepted"])])
            b.setHooks([storeHook("fulfil", events: ["checkout.accepted"]), storeHook("crm")])
            let now = SystemWallClock().nowMilliseconds()
            #expect(try await a.announce(now: now).isEmpty)
            #expect(try await b.announce(now: now) == ["a": "fulfil=checkout.accepted"])
            #expect(try await a.announce(now: now).keys.sorted() == ["b"])
            let report = try await PostgresEventLog.probe(a.configuration, hooks: a.hooks)
            #expect(report.otherHooks.keys.sorted() == ["b"])
            // b gets the same hooks: nobody is named any more.
            b.setHooks(a.hooks)
            #expect(try await b.announce(now: now).isEmpty)
            #expect(try await a.announce(now: now).isEmpty)
            // A daemon not seen for a minute no longer counts.
            b.setHooks([storeHook("gone")])
            _ = try await b.announce(now: now - 120_000)
            #expect(try await a.announce(now: now).isEmpty)
        }
    }
}
