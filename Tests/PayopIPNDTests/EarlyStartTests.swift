import Foundation
import GRDB
import Synchronization
import Testing

@testable import PayopIPND

/// The SQLite log's deliveries, counting the claims the dispatcher makes itself.
final class ClaimCountingStore: ForwardingDeliveryStore, @unchecked Sendable {
    let claims = Mutex(0)
    override func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
        claims.withLock { $0 += 1 }
        return try await base.claimDelivery(id: id, now: now)
    }
    var count: Int { claims.withLock { $0 } }
}

/// A log whose runs are claimed in the commit that makes them due (`EarlyStarts`), with the dispatcher
/// that admits them, as the daemon wires them on one machine.
struct EarlyStartHarness {
    let dir: TemporaryDirectory
    let clock = TestClock()
    let log: SQLiteEventLog
    let store: ClaimCountingStore
    let runner = RecordingHookRunner()
    let dispatcher: Dispatcher

    init(perHook: Int = 16) throws {
        dir = try TemporaryDirectory()
        log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        log.setHooks([commandHook("fulfil", "/bin/true")])
        store = ClaimCountingStore(log)
        dispatcher = Dispatcher(
            store: store, runner: runner, hooks: { [log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 100, jitter: Backoff.noJitter), killGraceSeconds: 0.1,
                shutdownGraceSeconds: 0.2, perHookConcurrency: perHook),
            clock: clock, logger: quietLogger)
        _ = dispatcher.acceptEarlyStarts(true)
        log.startDeliveriesEarly(with: dispatcher)
    }

    func verifier() -> Verifier {
        Verifier(
            store: log, payop: FakePayop(),
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 0,
                reconcileIntervalMilliseconds: 3_600_000),
            clock: clock, logger: quietLogger)
    }

    func ingestCheckout(_ transaction: String) async throws {
        let body = checkoutBody(transaction: transaction, state: 2)
        _ = try await log.ingest(
            IncomingIPN(
                receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
                notification: try NotificationParser.parse(body).get(), verifiedBySignature: false))
    }

    func deliveries() async throws -> [Delivery] {
        try await log.deliveries(state: nil, hook: nil, limit: 100).reversed()
    }

    /// Makes every commit that records a run as started fail at `COMMIT` (a deferred foreign key the
    /// claim's own statement violates), after the write itself has succeeded; `false` lifts it.
    func failCommitsOfClaims(_ fail: Bool) async throws {
        try await log.write { db in
            if fail {
                try db.execute(
                    sql: """
                        CREATE TEMP TRIGGER claim_breaks_commit AFTER UPDATE OF state ON main.deliveries
                        WHEN NEW.state = 'running' BEGIN
                            INSERT INTO receipts (received_at, source_ip, path, answer, size, body, event_id)
                            VALUES (0, 'test', 'test', 200, 0, x'', 'no-such-event');
                        END
                        """)
            } else {
                try db.execute(sql: "DROP TRIGGER temp.claim_breaks_commit")
            }
        }
    }
}

@Suite struct EarlyStartTests {
    @Test func aVerifiedEventsRunIsClaimedInTheCommitThatVerifiesIt() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        try await h.ingestCheckout("tx-1")
        let before = h.log.commitCount
        #expect(try await h.verifier().verifyDue() == 1)
        #expect(h.log.commitCount == before + 1)
        let claimed = try #require(try await h.deliveries().first)
        #expect(claimed.state == .running && claimed.attempts == 1)
        #expect(h.dispatcher.running == 1)
        // The dispatcher starts it without a claim of its own, then records how it ended.
        #expect(try await h.dispatcher.dispatchDue() == 1)
        #expect(h.store.count == 0)
        #expect(h.runner.all.map(\.attempt) == [1])
        #expect(try await h.deliveries().map(\.state) == [.delivered])
        #expect(h.dispatcher.running == 0)
    }

    @Test func aSignedIPNsRunIsClaimedInTheCommitOfItsReceipt() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        let before = h.log.commitCount
        try await ingestSigned(h.log, clock: h.clock)
        #expect(h.log.commitCount == before + 1)
        #expect(try await h.deliveries().map(\.state) == [.running])
        #expect(try await h.dispatcher.dispatchDue() == 1)
        #expect(h.store.count == 0)
        #expect(h.runner.all.count == 1)
        #expect(try await h.deliveries().map(\.state) == [.delivered])
    }

    @Test func aHookAtItsLimitLeavesTheRunPendingForTheDispatcher() async throws {
        let h = try EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await h.deliveries().map(\.state) == [.running, .pending])
        #expect(h.dispatcher.running == 1)
        #expect(try await h.dispatcher.dispatchDue() == 2)
        #expect(h.store.count == 1)  // the second, claimed by the dispatcher once the first had ended
        #expect(h.runner.all.map(\.entity) == ["1", "2"])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered])
    }

    @Test func aRunBehindAnEarlierOneOfItsEntityIsNotClaimedAndKeepsItsOrder() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1042", status: "success")
        try await ingestSigned(h.log, clock: h.clock, order: "1042", status: "error")
        // The first is running; the second waits for it, its admission given back.
        #expect(try await h.deliveries().map(\.state) == [.running, .pending])
        #expect(h.dispatcher.running == 1)
        #expect(try await h.dispatcher.dispatchDue() == 2)
        #expect(h.runner.all.map(\.type) == ["checkout.accepted", "checkout.failed"])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered])
    }

    @Test func aClaimWhoseCommitFailsHoldsNoSlotAndRunsNothing() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        try await h.failCommitsOfClaims(true)
        await #expect(throws: EventLogError.self) { try await ingestSigned(h.log, clock: h.clock) }
        #expect(h.dispatcher.running == 0)
        #expect(try await h.deliveries().isEmpty)
        // Payop's answer the same way: the verification is not recorded, and nothing is claimed.
        try await h.failCommitsOfClaims(false)
        try await h.ingestCheckout("tx-1")
        try await h.failCommitsOfClaims(true)
        await #expect(throws: EventLogError.self) { try await h.verifier().verifyDue() }
        #expect(h.dispatcher.running == 0)
        #expect(try await h.deliveries().isEmpty)
        #expect(try await h.dispatcher.dispatchDue() == 0)
        #expect(h.runner.all.isEmpty)
        // Once commits work again, the event is verified and its run claimed as usual.
        try await h.failCommitsOfClaims(false)
        #expect(try await h.verifier().verifyDue() == 1)
        #expect(try await h.dispatcher.dispatchDue() == 1)
        #expect(h.store.count == 0)
        #expect(try await h.deliveries().map(\.state) == [.delivered])
    }

    @Test func runsClaimedButNotStartedWhenTheDispatcherStopsRunAgainUnspent() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        #expect(try await h.deliveries().map(\.state) == [.running])
        // Stopping: what was claimed for the dispatcher and not started is pending again, its attempt unspent.
        await h.dispatcher.interruptUnstarted(h.dispatcher.acceptEarlyStarts(false))
        let interrupted = try #require(try await h.deliveries().first)
        #expect(interrupted.state == .pending && interrupted.attempts == 0)
        #expect(h.dispatcher.running == 0)
        // A stopped dispatcher admits nothing: a later run is left pending for the next start.
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await h.deliveries().map(\.state) == [.pending, .pending])
        #expect(h.runner.all.isEmpty)
    }

    @Test func aClaimCommittedAfterTheDispatcherStoppedIsRecordedInterrupted() async throws {
        let h = try EarlyStartHarness()
        defer { h.log.close() }
        h.log.startDeliveriesEarly(with: nil)
        try await ingestSigned(h.log, clock: h.clock)
        let pending = try #require(try await h.deliveries().first)
        // Admitted while the dispatcher ran; its commit lands once it has stopped.
        #expect(h.dispatcher.admit(id: pending.id, hook: "fulfil"))
        let claim = try #require(try await h.log.claimDelivery(id: pending.id, now: h.clock.nowMilliseconds()))
        #expect(h.dispatcher.acceptEarlyStarts(false).isEmpty)
        h.dispatcher.start([claim])
        var state = try await h.deliveries().first
        for _ in 0..<10 where state?.state != .pending {
            await h.dispatcher.signal.wait(timeout: .seconds(1))
            state = try await h.deliveries().first
        }
        #expect(state?.state == .pending)
        #expect(state?.attempts == 0)
        #expect(h.dispatcher.running == 0)
        #expect(h.runner.all.isEmpty)
    }
}
