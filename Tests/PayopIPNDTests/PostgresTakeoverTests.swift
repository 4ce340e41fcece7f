import Foundation
import PostgresNIO
import Testing

@testable import PayopIPND

/// What a daemon that lost its claim (lease over, session lost, crash) must not do on the shared log:
/// record a late outcome over another daemon's run, apply a stale answer from Payop, claim at all while
/// its node id is not held; and what a stuck transaction elsewhere must not do to ingest.
@Suite(.enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
struct PostgresTakeoverTests {
    @Test func aLateOutcomeFromADaemonWhoseRunWasTakenOverAndReplayedIsDropped() async throws {
        let clock = TestClock(storeStart)
        try await withTwoDaemons(clock: clock, deliveryLease: 1_000) { a, b in
            for log in [a, b] { log.setHooks([storeHook("fulfil")]) }
            let eventID = try await a.ingest(try signedIPN(order: "late")).eventID
            let delivery = try #require(try await a.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
            // a starts attempt 1, then loses the database for longer than its lease; b takes over.
            let first = try #require(try await a.claimDelivery(id: delivery.id, now: storeStart))
            #expect(first.attempt == 1)
            let takeover = try #require(try await b.claimDelivery(id: delivery.id, now: storeStart + 1_001))
            #expect(takeover.attempt == 2)
            _ = try await b.finishDelivery(
                id: delivery.id, attempt: 2, result: HookResult(outcome: .delivered), maxAttempts: 30,
                backoff: deliveryBackoff, now: storeStart + 1_100)
            // A person replays it; b runs it again, as attempt 1.
            #expect(try await b.replay(eventID: eventID, hook: nil, hooks: b.hooks, now: storeStart + 2_000) == 1)
            let again = try #require(try await b.claimDelivery(id: delivery.id, now: storeStart + 2_000))
            #expect(again.attempt == 1)
            // a's old run ends now: its outcome (and an interruption) must not stand for b's run.
            let late = try await a.finishDelivery(
                id: delivery.id, attempt: 1, result: HookResult(outcome: .failed(retryAfterMilliseconds: nil)),
                maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 2_100)
            #expect(late == nil)
            try await a.interruptDelivery(id: delivery.id, attempt: 1, now: storeStart + 2_100)
            let now = try #require(try await b.deliveries(state: nil, hook: "fulfil", eventID: eventID, deadFirst: false, limit: 1).first)
            #expect(now.state == .running && now.attempts == 1 && now.nodeID == "node-b")
        }
    }

    @Test func anAnswerFromPayopThatArrivesAfterTheClaimWasTakenIsNotApplied() async throws {
        try await withTwoDaemons { a, b in
            _ = try await a.ingest(try storeIPN(checkoutBody(transaction: "tx-slow", state: 2)))
            let mine = try #require(try await a.dueChecks(now: storeStart, limit: 10).first)
            // a's question takes longer than its claim: b asks in its turn.
            let later = storeStart + a.configuration.checkLeaseMilliseconds + 1
            let theirs = try #require(try await b.dueChecks(now: later, limit: 10).first)
            let stale = try await a.applyAnswer(.notFound, to: mine, now: later + 1, policy: storePolicy)
            #expect(stale.outcome == "claim_lost" && stale.state == nil)
            let fresh = try await b.applyAnswer(
                .record(acceptedRecord("tx-slow")), to: theirs, now: later + 2, policy: storePolicy)
            #expect(fresh.state == .verified)
            let detail = try #require(try await b.event(id: theirs.eventID))
            #expect(detail.verificationAttempts.map(\.outcome) == ["verified"])
        }
    }

    @Test func nothingIsClaimedWhileTheNodesSessionIsLostAndARestartFreesItsOwnQuestions() async throws {
        try await withTwoDaemons { a, _ in
            a.setHooks([storeHook("fulfil")])
            _ = try await a.ingest(try signedIPN(order: "paused"))
            _ = try await a.ingest(try storeIPN(checkoutBody(transaction: "tx-asked", state: 2)))
            let delivery = try #require(try await a.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
            a.setSessionProblem("the session connection to PostgreSQL was lost; reconnecting")
            await #expect(throws: EventLogError.self) { _ = try await a.claimDelivery(id: delivery.id, now: storeStart) }
            await #expect(throws: EventLogError.self) { _ = try await a.dueChecks(now: storeStart, limit: 10) }
            await #expect(throws: EventLogError.self) { try await a.checkWritable() }
            a.setSessionProblem(nil)
            // a claims the question, then dies; restarted a second later, it asks again at once.
            _ = try #require(try await a.dueChecks(now: storeStart, limit: 10).first)
            #expect(try await a.nextCheckDue() == storeStart + a.configuration.checkLeaseMilliseconds)
            _ = try await a.recoverInterruptedDeliveries(now: storeStart + 1_000)
            #expect(try await a.nextCheckDue() == storeStart + 1_000)
            #expect(try await a.dueChecks(now: storeStart + 1_000, limit: 10).map(\.entityID) == ["tx-asked"])
        }
    }

    /// A daemon that lost power mid-transaction leaves an IPN's dedupe key locked until the server ends
    /// its session: that IPN is answered 503 within the ingest deadline (Payop sends it again), and
    /// every other IPN is still taken.
    @Test func aDedupeKeyHeldByAStuckTransactionDelaysOnlyThatIPNAndOnlyBriefly() async throws {
        let schema = try await PostgresTestServer.freshSchema()
        defer { Task { await PostgresTestServer.dropSchema(schema) } }
        let configuration = try await PostgresTestServer.configuration(schema: schema, nodeID: "a")
        try await PostgresEventLog.withLog(configuration: configuration) { log in
            let server = try await PostgresTestServer.shared()
            let stuck = try await PostgresConnection.connect(
                configuration: .init(
                    host: server.host, port: server.port, username: server.username, password: server.password,
                    database: server.database, tls: .disable),
                id: 9, logger: quietLogger)
            try await stuck.query("BEGIN", logger: quietLogger)
            try await stuck.query(
                """
                INSERT INTO \(unescaped: schema).events (id, kind, entity_id, status, status_key, state, source,
                                                        received_at)
                VALUES ('evt_stuck', 'checkout', 'tx-held', 'accepted', 'accepted', 'received', 'ipn', 0)
                """, logger: quietLogger)
            let start = ContinuousClock.now
            await #expect(throws: EventLogError.self) {
                _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-held", state: 2)))
            }
            let waited = ContinuousClock.now - start
            #expect(waited < PostgresEventLog.ingestTimeout + .seconds(2), "\(waited)")
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-free", state: 2)))
            try await stuck.query("ROLLBACK", logger: quietLogger)
            try await stuck.close()
            // Payop's retry of the held IPN now goes through (a duplicate, when the first try's transaction,
            // given up on at its deadline, committed once the key was free): one event either way.
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-held", state: 2)))
            #expect(try await log.events(EventFilter(query: "tx-held")).count == 1)
        }
    }
}
