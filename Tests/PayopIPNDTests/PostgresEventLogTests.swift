import Foundation
import PostgresNIO
import Testing

@testable import PayopIPND

/// Two daemons (two `PostgresEventLog`s, two node ids, two pools) sharing one schema.
func withTwoDaemons(
    clock: TestClock = TestClock(), deliveryLease: Int64 = 60_000,
    _ body: @Sendable (PostgresEventLog, PostgresEventLog) async throws -> Void
) async throws {
    let schema = try await PostgresTestServer.freshSchema()
    var a = try await PostgresTestServer.configuration(schema: schema, nodeID: "node-a")
    var b = try await PostgresTestServer.configuration(schema: schema, nodeID: "node-b")
    a.deliveryLeaseMilliseconds = deliveryLease
    b.deliveryLeaseMilliseconds = deliveryLease
    let second = b
    do {
        try await PostgresEventLog.withLog(configuration: a, clock: clock) { first in
            try await PostgresEventLog.withLog(configuration: second, clock: clock) { other in
                try await body(first, other)
            }
        }
    } catch {
        await PostgresTestServer.dropSchema(schema)
        throw error
    }
    await PostgresTestServer.dropSchema(schema)
}

/// What only the shared log has: several daemons at once, leases, the server's own settings.
@Suite(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
struct PostgresEventLogTests {
    @Test func twoDaemonsReceivingTheSameIPNAtOnceMakeOneEventEveryTime() async throws {
        // 1,000 rounds of the same IPN sent to both daemons at the same instant (a new IPN each round).
        let rounds = 1_000
        try await withTwoDaemons { a, b in
            for round in 0..<rounds {
                let ipn = try storeIPN(checkoutBody(transaction: "tx-\(round)", state: 2), at: storeStart + Int64(round))
                async let first = a.ingest(ipn)
                async let second = b.ingest(ipn)
                let outcomes = try await [first, second]
                #expect(outcomes[0].eventID == outcomes[1].eventID, "round \(round)")
                #expect(outcomes.filter { !$0.duplicate }.count == 1, "round \(round)")
            }
            let counts = try await a.counts()
            #expect(counts.events == rounds && counts.receipts == 2 * rounds)
        }
    }

    @Test func twoDaemonsClaimingTheSameDueDeliveryGiveItToExactlyOne() async throws {
        let deliveries = 200
        try await withTwoDaemons { a, b in
            a.setHooks([storeHook("fulfil")])
            for order in 0..<deliveries { _ = try await a.ingest(try signedIPN(order: "o-\(order)")) }
            let due = try await b.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: deliveries)
            #expect(due.count == deliveries)
            var won = 0
            for delivery in due {
                async let first = a.claimDelivery(id: delivery.id, now: storeStart)
                async let second = b.claimDelivery(id: delivery.id, now: storeStart)
                let claims = try await [first, second].compactMap { $0 }
                #expect(claims.count == 1, "delivery \(delivery.id)")
                #expect(claims.first?.attempt == 1)
                won += claims.count
            }
            #expect(won == deliveries)
            #expect(try await a.deliveries(state: "running", hook: nil, eventID: nil, deadFirst: false, limit: 1000).count
                == deliveries)
        }
    }

    @Test func twoDaemonsNeverAskAboutOneEntityAtOnce() async throws {
        try await withTwoDaemons { a, b in
            for n in 0..<50 {
                // Two statuses per entity: both due, one question per entity at a time.
                _ = try await a.ingest(try storeIPN(checkoutBody(transaction: "tx-\(n)", state: 4)))
                _ = try await b.ingest(try storeIPN(checkoutBody(transaction: "tx-\(n)", state: 2), at: storeStart + 1))
            }
            async let first = a.dueChecks(now: storeStart + 10, limit: 100)
            async let second = b.dueChecks(now: storeStart + 10, limit: 100)
            let (mine, theirs) = try await (first, second)
            let all = mine + theirs
            #expect(Set(all.map(\.entityKey)).count == all.count)
            #expect(all.count == 50)
            // Claimed questions are nobody else's until answered or their claim lapses.
            #expect(try await a.dueChecks(now: storeStart + 20, limit: 100).isEmpty)
            let lapsed = try await b.dueChecks(now: storeStart + 10 + 120_000, limit: 100)
            #expect(lapsed.count == 50)
        }
    }

    @Test func ingestAndAnswersOnTwoDaemonsAtOnceMakeEachStatusOnceAndVerifyItOnce() async throws {
        // Each entity's pending and accepted IPNs go to both daemons while both answer what is due with
        // Payop's "accepted": rows of one entity are written by ingests, answers and reported statuses
        // at once (deadlocks between them are retried, never reported).
        let entities = 60
        try await withTwoDaemons { a, b in
            for log in [a, b] { log.setHooks([storeHook("fulfil", events: ["checkout.accepted"])]) }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in 0..<entities {
                    group.addTask {
                        for (offset, state) in [4, 2].enumerated() {
                            let ipn = try storeIPN(
                                checkoutBody(transaction: "tx-\(n)", state: state), at: storeStart + Int64(offset))
                            async let first = a.ingest(ipn)
                            async let second = b.ingest(ipn)
                            _ = try await (first, second)
                        }
                    }
                }
                for log in [a, b] {
                    group.addTask {
                        for _ in 0..<30 { try await answerDue(log) }
                    }
                }
                try await group.waitForAll()
            }
            // What is still due once every IPN is in.
            while try await answerDue(a) > 0 {}
            #expect(try await a.counts().events == 2 * entities)
            let verified = try await a.deliveries(state: nil, hook: "fulfil", eventID: nil, deadFirst: false, limit: 1000)
            #expect(verified.count == entities)
            let events = try await a.read("test") { connection, logger in
                try await connection.query(
                    "SELECT status, state, count(*) FROM events GROUP BY status, state ORDER BY status, state",
                    logger: logger
                ).collect().map { try $0.decode((String, String, Int64).self) }
            }
            #expect(events.map { "\($0.0)/\($0.1)/\($0.2)" } == ["accepted/verified/\(entities)", "pending/rejected/\(entities)"])
        }
    }

    @Test func aDeliveryWhoseClaimerDiedIsTakenOverWhenItsLeaseEnds() async throws {
        try await withTwoDaemons(deliveryLease: 30_000) { a, b in
            a.setHooks([storeHook("fulfil")])
            _ = try await a.ingest(try signedIPN(order: "1"))
            _ = try await a.ingest(try signedIPN(order: "1", status: "wait", at: storeStart + 1))
            let delivery = try #require(try await a.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 10).first)
            let claim = try #require(try await a.claimDelivery(id: delivery.id, now: storeStart))
            #expect(claim.attempt == 1)
            // node-a keeps it while its lease runs, and may renew it.
            #expect(try await b.claimDelivery(id: delivery.id, now: storeStart + 29_999) == nil)
            #expect(try await a.renewLease(id: delivery.id, attempt: 1, now: storeStart + 20_000))
            #expect(try await b.claimDelivery(id: delivery.id, now: storeStart + 49_999) == nil)
            #expect(try await b.nextRunnableDelivery(hooks: ["fulfil"]) == storeStart + 50_000)
            // node-a died: after the lease node-b takes it over; the cut-off run counts as an attempt.
            let runnable = try await b.runnableDeliveries(now: storeStart + 50_000, hooks: ["fulfil"], limit: 10)
            #expect(runnable.map(\.id) == [delivery.id])
            let takeover = try #require(try await b.claimDelivery(id: delivery.id, now: storeStart + 50_000))
            #expect(takeover.attempt == 2)
            // What node-a says afterwards changes nothing.
            #expect(try await a.renewLease(id: delivery.id, attempt: 1, now: storeStart + 50_001) == false)
            #expect(
                try await a.finishDelivery(
                    id: delivery.id, attempt: 1, result: HookResult(outcome: .delivered), maxAttempts: 30,
                    backoff: deliveryBackoff, now: storeStart + 50_002) == nil)
            // The later status of the entity still waits for the taken-over run.
            let waiting = try await b.runnableDeliveries(now: storeStart + 50_003, hooks: ["fulfil"], limit: 10)
            #expect(waiting.isEmpty)
            #expect(
                try await b.finishDelivery(
                    id: delivery.id, attempt: 2, result: HookResult(outcome: .delivered), maxAttempts: 30,
                    backoff: deliveryBackoff, now: storeStart + 50_004) == .delivered)
            #expect(try await a.runnableDeliveries(now: storeStart + 50_005, hooks: ["fulfil"], limit: 10).count == 1)
        }
    }

    @Test func aRestartedNodeRunsItsOwnCutOffDeliveriesAtOnceButNotAnothers() async throws {
        try await withTwoDaemons { a, b in
            a.setHooks([storeHook("fulfil")])
            _ = try await a.ingest(try signedIPN(order: "1"))
            _ = try await a.ingest(try signedIPN(order: "2"))
            let due = try await a.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 10)
            _ = try #require(try await a.claimDelivery(id: due[0].id, now: storeStart))
            _ = try #require(try await b.claimDelivery(id: due[1].id, now: storeStart))
            #expect(try await a.recoverInterruptedDeliveries(now: storeStart + 5) == 1)
            let rows = try await a.deliveries(state: nil, hook: nil, eventID: nil, deadFirst: false, limit: 10)
            #expect(rows.first { $0.id == due[0].id }?.state == .pending)
            #expect(rows.first { $0.id == due[1].id }?.state == .running)
        }
    }

    @Test func twoDaemonsOpeningTogetherMigrateOnce() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        defer { Task { await PostgresTestServer.dropSchema(schema) } }
        let configurations = try await [
            PostgresTestServer.configuration(schema: schema, nodeID: "node-a"),
            PostgresTestServer.configuration(schema: schema, nodeID: "node-b"),
        ]
        try await withThrowingTaskGroup(of: Void.self) { group in
            for configuration in configurations {
                group.addTask { try await PostgresEventLog.withLog(configuration: configuration) { _ in } }
            }
            try await group.waitForAll()
        }
        try await PostgresEventLog.withLog(configuration: configurations[0]) { log in
            let versions = try await log.read("test") { connection, logger in
                try await connection.query("SELECT version FROM payop_ipnd_migrations", logger: logger).collect()
                    .map { try $0.decode(Int64.self) }
            }
            #expect(versions == PostgresSchema.migrations.map(\.version))
        }
    }

    /// Migration 3 on a log written by an earlier version: the history row a first run that delivered
    /// had beside its delivery's row goes, and the history read back is the same (as SQLite's 0007).
    @Test func theFirstRunsInTheirRowMigrationKeepsEveryRunOfTheHistory() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        defer { Task { await PostgresTestServer.dropSchema(schema) } }
        let configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: "node-a")
        try await PostgresEventLog.withLog(configuration: configuration) { log in
            try await log.transaction("test") { connection, logger in
                for statement: PostgresQuery in [
                    """
                    INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at, verified_at)
                    VALUES ('evt_1', 'checkout', 'tx-1', 'accepted', 'accepted', 'verified', 'ipn', 1000, 1001)
                    """,
                    """
                    INSERT INTO deliveries (id, event_id, hook, kind, entity_id, state, attempts, next_attempt_at,
                                            last_exit_code, output, created_at, finished_at, delivered_at, node_id)
                    VALUES (1, 'evt_1', 'a', 'checkout', 'tx-1', 'delivered', 1, 1010, 0, 'a1', 1001, 1010, 1010, 'node-a'),
                           (2, 'evt_1', 'b', 'checkout', 'tx-1', 'delivered', 2, 1030, 0, 'b2', 1001, 1030, 1030, 'node-a'),
                           (3, 'evt_1', 'c', 'checkout', 'tx-1', 'delivered', 1, 1060, 0, 'c1b', 1001, 1060, 1060, 'node-a'),
                           (4, 'evt_1', 'd', 'checkout', 'tx-1', 'dead', 1, 1070, 1, 'd1', 1001, 1070, NULL, 'node-a')
                    """,
                    """
                    INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, output, node_id)
                    VALUES (1, 1, 1010, 'delivered', 0, 'a1', 'node-a'),
                           (2, 1, 1020, 'failed', 1, 'b1', 'node-a'), (2, 2, 1030, 'delivered', 0, 'b2', 'node-a'),
                           (3, 1, 1040, 'delivered', 0, 'c1a', 'node-a'), (3, 1, 1060, 'delivered', 0, 'c1b', 'node-a'),
                           (4, 1, 1070, 'failed', 1, 'd1', 'node-a')
                    """,
                    // As a log of the earlier version: migration 3 not yet applied.
                    "DELETE FROM payop_ipnd_migrations WHERE version = 3",
                ] {
                    try await connection.query(statement, logger: logger)
                }
            }
        }
        try await PostgresEventLog.withLog(configuration: configuration) { log in
            #expect(try FirstRunsMigrationFixture.runs(try await log.event(id: "evt_1")) == FirstRunsMigrationFixture.expectedRuns)
            let kept = try await log.read("test") { connection, logger in
                try await connection.query("SELECT output FROM delivery_attempts ORDER BY id", logger: logger).collect()
                    .map { try $0.decode(String.self) }
            }
            #expect(kept == FirstRunsMigrationFixture.keptOutputs)
        }
    }

    /// As the SQLite test of the same name: a previous version's daemon sharing the log during an upgrade
    /// also records a first run that delivered; it is listed once and a replay does not record it again.
    @Test func aFirstRunAnEarlierVersionAlsoRecordedIsShownOnceAndNotRecordedAgainByAReplay() async throws {
        let clock = TestClock(storeStart)
        try await withEmptyPostgresLog(clock: clock, nodeID: "node-a") { log in
            let hooks = [storeHook("fulfil")]
            log.setHooks(hooks)
            let eventID = try await log.ingest(try signedIPN(order: "6")).eventID
            let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
            _ = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
            _ = try await log.finishDelivery(
                id: delivery.id, attempt: 1, result: HookResult(outcome: .delivered, exitCode: 0, output: "ok\n"),
                maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 1)
            let finished = storeStart + 1
            try await log.transaction("test") { connection, logger in
                try await connection.query(
                    """
                    INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, output, node_id)
                    VALUES (\(delivery.id), 1, \(finished), 'delivered', 0, 'ok\n', 'node-old')
                    """, logger: logger)
            }
            #expect(try await log.event(id: eventID)?.deliveryAttempts.count == 1)
            #expect(try await log.replay(eventID: eventID, hook: nil, hooks: hooks, now: storeStart + 2) == 1)
            #expect(try await log.event(id: eventID)?.deliveryAttempts.map(\.output) == ["ok\n"])
            let rows = try await log.read("test") { connection, logger in
                try await connection.query("SELECT count(*) FROM delivery_attempts", logger: logger).collect()
                    .first?.decode(Int64.self)
            }
            #expect(rows == 1)
        }
    }

    @Test func aServerThatDoesNotMakeCommitsDurableIsRefused() async throws {
        let database = "t_async_\(UUID().uuidString.prefix(8).lowercased())"
        try await PostgresTestServer.admin("CREATE DATABASE \(unescaped: database)")
        try await PostgresTestServer.admin("ALTER DATABASE \(unescaped: database) SET synchronous_commit = off")
        let configuration = try await PostgresTestServer.configuration(schema: "public", nodeID: "node-a", database: database)
        do {
            try await PostgresEventLog.withLog(configuration: configuration) { _ in }
            Issue.record("a log on synchronous_commit = off opened")
        } catch let error as EventLogError {
            #expect(error.code == .misconfigured)
            #expect(error.message.contains("synchronous_commit is off"))
        }
        try await PostgresTestServer.admin("DROP DATABASE \(unescaped: database)")
    }

    @Test func anUnreachableServerFailsToOpenWithinItsDeadline() async throws {
        var configuration = try await PostgresTestServer.configuration(schema: "public", nodeID: "node-a")
        configuration.port = try ThrowawayCluster.freePort()
        configuration.openTimeout = .seconds(3)
        let started = ContinuousClock.now
        await #expect(throws: EventLogError.self) {
            try await PostgresEventLog.withLog(configuration: configuration) { _ in }
        }
        #expect(ContinuousClock.now - started < .seconds(20))
    }
}

@Suite struct PostgresConfigurationTests {
    @Test func storageURLIsReadWithVerifiedTLSByDefault() throws {
        let configuration = try PostgresEventLogConfiguration(
            url: "postgres://payop@db.internal:6432/shop", password: "secret", nodeID: "web-1")
        #expect(configuration.host == "db.internal" && configuration.port == 6432)
        #expect(configuration.username == "payop" && configuration.database == "shop")
        #expect(configuration.tls == .verifyFull && configuration.password == "secret")
        let plain = try PostgresEventLogConfiguration(
            url: "postgresql://payop@127.0.0.1/shop?sslmode=disable", password: nil, nodeID: "web-1")
        #expect(plain.tls == .disable && plain.port == 5432)
    }

    @Test(arguments: [
        "mysql://payop@db/shop", "postgres://payop:hunter2@db/shop", "postgres://db/shop", "postgres://payop@db/",
        "postgres://payop@db/shop?sslmode=sometimes", "postgres://payop@db/shop?timeout=3",
    ])
    func malformedStorageURLsAreRefusedWithTheirReason(_ url: String) {
        #expect(throws: EventLogError.self) {
            try PostgresEventLogConfiguration(url: url, password: nil, nodeID: "web-1")
        }
        do {
            _ = try PostgresEventLogConfiguration(url: url, password: nil, nodeID: "web-1")
        } catch {
            #expect(error.code == .misconfigured && error.message.hasPrefix("storage.url"))
            #expect(!error.message.contains("hunter2"))
        }
    }
}

/// Claims what is due on `log` and answers each with Payop's "accepted"; returns how many.
@discardableResult
func answerDue(_ log: PostgresEventLog) async throws -> Int {
    let due = try await log.dueChecks(now: storeStart + 10, limit: 50)
    for check in due {
        _ = try await log.applyAnswer(
            .record(acceptedRecord(check.entityID)), to: check, now: storeStart + 10, policy: storePolicy)
    }
    return due.count
}
