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

/// A checkout IPN (state 2) logged as Payop would post it, unsigned: its event waits for verification.
func ingestCheckout(_ log: SQLiteEventLog, clock: TestClock, _ transaction: String) async throws {
    let body = checkoutBody(transaction: transaction, state: 2)
    _ = try await log.ingest(
        IncomingIPN(
            receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
            notification: try NotificationParser.parse(body).get(), verifiedBySignature: false))
}

/// A log whose runs are claimed in the commit that makes them due (`EarlyStarts`), with the dispatcher
/// that admits them, as the daemon wires them on one machine.
struct EarlyStartHarness {
    let dir: TemporaryDirectory
    let clock = TestClock()
    let log: SQLiteEventLog
    let store: ClaimCountingStore
    let runner: RecordingHookRunner
    let dispatcher: Dispatcher

    init(
        perHook: Int = 16, runner: RecordingHookRunner = RecordingHookRunner(),
        pause: @escaping @Sendable (Duration) async -> Void = { try? await Task.sleep(for: $0) }
    ) async throws {
        self.runner = runner
        dir = try TemporaryDirectory()
        log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        log.setHooks([commandHook("fulfil", "/bin/true")])
        store = ClaimCountingStore(log)
        dispatcher = Self.dispatcher(log, store: store, runner: runner, clock: clock, perHook: perHook, pause: pause)
        _ = dispatcher.acceptEarlyStarts(true)
        log.startDeliveriesEarly(with: dispatcher)
        // Its first pass finds nothing due: caught up, it admits runs claimed early from now on.
        #expect(try await dispatcher.dispatchDue() == 0)
    }

    /// A dispatcher over `store` (the log, seen through a test's store), as the harness's own.
    static func dispatcher(
        _ log: SQLiteEventLog, store: any DeliveryStore, runner: RecordingHookRunner, clock: TestClock, perHook: Int,
        pause: @escaping @Sendable (Duration) async -> Void = { try? await Task.sleep(for: $0) }
    ) -> Dispatcher {
        Dispatcher(
            store: store, runner: runner, hooks: { [log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 100, jitter: Backoff.noJitter), killGraceSeconds: 0.1,
                shutdownGraceSeconds: 0.2, perHookConcurrency: perHook),
            clock: clock, logger: quietLogger, pause: pause)
    }

    func verifier() -> Verifier { Self.verifier(log, clock: clock) }

    static func verifier(_ log: SQLiteEventLog, clock: TestClock) -> Verifier {
        Verifier(
            store: log, payop: FakePayop(),
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 0,
                reconcileIntervalMilliseconds: 3_600_000),
            clock: clock, logger: quietLogger)
    }

    func ingestCheckout(_ transaction: String) async throws {
        try await PayopIPNDTests.ingestCheckout(log, clock: clock, transaction)
    }

    func deliveries() async throws -> [Delivery] {
        try await log.deliveries(state: nil, hook: nil, limit: 100).reversed()
    }

    /// A signed IPN whose write fails: no slot is kept and no delivery exists.
    func expectSignedIPNRefusedHoldingNothing(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        await #expect(throws: EventLogError.self, sourceLocation: sourceLocation) {
            try await ingestSigned(log, clock: clock)
        }
        #expect(dispatcher.running == 0, sourceLocation: sourceLocation)
        #expect(try await deliveries().isEmpty, sourceLocation: sourceLocation)
    }

    /// Makes every commit that records a run as started fail at `COMMIT` (a deferred foreign key the
    /// claim's own statement violates), after the write itself has succeeded; `false` lifts it.
    func failCommitsOfClaims(_ fail: Bool) async throws {
        try await breakClaims(fail, with: """
            INSERT INTO receipts (received_at, source_ip, path, answer, size, body, event_id)
            VALUES (0, 'test', 'test', 200, 0, x'', 'no-such-event');
            """)
    }

    /// Makes the statement that records a run as started fail: the write that claims it fails alone
    /// (its savepoint rolled back, the rest of its group commit kept); `false` lifts it.
    func failClaims(_ fail: Bool) async throws {
        try await breakClaims(fail, with: "SELECT RAISE(ABORT, 'claims refused by the test');")
    }

    private func breakClaims(_ fail: Bool, with action: String) async throws {
        try await log.write { db in
            if fail {
                try db.execute(
                    sql: """
                        CREATE TEMP TRIGGER break_claims AFTER UPDATE OF state ON main.deliveries
                        WHEN NEW.state = 'running' BEGIN \(action) END
                        """)
            } else {
                try db.execute(sql: "DROP TRIGGER temp.break_claims")
            }
        }
    }
}

@Suite struct EarlyStartTests {
    @Test func aVerifiedEventsRunIsClaimedInTheCommitThatVerifiesIt() async throws {
        let h = try await EarlyStartHarness()
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
        let h = try await EarlyStartHarness()
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

    @Test func aRunAtItsHooksLimitWaitsPendingAndTakesTheSlotOfTheRunBeforeIt() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await h.deliveries().map(\.state) == [.running, .pending])
        #expect(h.dispatcher.running == 1)
        #expect(try await h.dispatcher.dispatchDue() == 2)
        #expect(h.store.count == 0)  // the second, claimed in the commit of the first's outcome
        #expect(h.runner.all.map(\.entity) == ["1", "2"])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered])
    }

    /// Hands the run the log claimed for the dispatcher (it must be the only one) to a pass, which
    /// starts it: returns it, not run yet.
    private func startClaimedEarly(_ h: EarlyStartHarness, sourceLocation: SourceLocation = #_sourceLocation)
        async throws -> (DeliveryClaim, HookConfig)
    {
        var spawned: [(DeliveryClaim, HookConfig)] = []
        #expect(try await h.dispatcher.startDue { spawned.append(($0, $1)) } == 1, sourceLocation: sourceLocation)
        return try #require(spawned.first, sourceLocation: sourceLocation)
    }

    /// Starts the run the log claimed for the dispatcher (it must be the only one) and runs it to its
    /// end; returns the run its outcome handed the slot to, if any (not started).
    private func runClaimedEarly(_ h: EarlyStartHarness, sourceLocation: SourceLocation = #_sourceLocation)
        async throws -> (DeliveryClaim, HookConfig)?
    {
        let (claim, hook) = try await startClaimedEarly(h, sourceLocation: sourceLocation)
        await h.dispatcher.execute(claim, hook: hook)
        return await h.dispatcher.successor(of: claim.delivery.id)
    }

    @Test func aRunThatEndsHandsItsSlotToItsHooksNextRunInTheCommitOfItsOutcome() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        for order in ["1", "2", "3"] { try await ingestSigned(h.log, clock: h.clock, order: order) }
        #expect(try await h.deliveries().map(\.state) == [.running, .pending, .pending])
        let before = h.log.commitCount
        let second = try #require(try await runClaimedEarly(h))
        // One commit: the first's outcome, and the second recorded as running, its slot the first's.
        #expect(h.log.commitCount == before + 1)
        #expect(second.0.delivery.id == (try await h.deliveries())[1].id)
        #expect(try await h.deliveries().map(\.state) == [.delivered, .running, .pending])
        #expect(h.dispatcher.running == 1)
        // The first's task runs it, and the third the same way: no pass of the dispatcher between them.
        #expect(await h.dispatcher.run(second.0, hook: second.1) == 1)
        #expect(try await h.dispatcher.dispatchDue() == 0)
        #expect(h.store.count == 0)
        #expect(h.runner.all.map(\.entity) == ["1", "2", "3"])
        #expect(h.runner.all.map(\.attempt) == [1, 1, 1])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered, .delivered])
        #expect(h.dispatcher.running == 0)
    }

    @Test func aFailedRunHandsItsSlotToAnotherEntityNotToTheStatusBehindIt() async throws {
        let runner = RecordingHookRunner { invocation in
            invocation.event.entityID == "A" && invocation.event.type == "checkout.accepted" && invocation.attempt == 1
                ? HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 1, error: "exited with status 1")
                : HookResult(outcome: .delivered, exitCode: 0)
        }
        let h = try await EarlyStartHarness(perHook: 1, runner: runner)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "A", status: "success")
        try await ingestSigned(h.log, clock: h.clock, order: "A", status: "error")
        try await ingestSigned(h.log, clock: h.clock, order: "B")
        let b = try #require(try await runClaimedEarly(h))
        // A's first status waits for its retry; its second waits behind it; B gets the slot.
        #expect(try await h.deliveries().map(\.state) == [.pending, .pending, .running])
        #expect(b.0.event.entityID == "B")
        #expect(await h.dispatcher.run(b.0, hook: b.1) == 0)  // A's retry is not due yet
        h.clock.advance(milliseconds: 2_000)
        #expect(try await h.dispatcher.dispatchDue() == 2)
        let (accepted, failed) = ("checkout.accepted", "checkout.failed")
        #expect(h.runner.all.map(\.type) == [accepted, accepted, accepted, failed])
        #expect(h.runner.all.map(\.entity) == ["A", "B", "A", "A"])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered, .delivered])
    }

    @Test func aRunEndingAfterTheDispatcherStoppedHandsNothingOver() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        let (claim, hook) = try await startClaimedEarly(h)
        #expect(h.dispatcher.acceptEarlyStarts(false).isEmpty)
        let before = h.log.commitCount
        await h.dispatcher.execute(claim, hook: hook)
        #expect(h.log.commitCount == before + 1)  // the outcome alone: nothing claimed, nothing undone
        #expect(await h.dispatcher.successor(of: claim.delivery.id) == nil)
        let states = try await h.deliveries()
        #expect(states.map(\.state) == [.delivered, .pending])
        #expect(states.last?.attempts == 0)
        #expect(h.dispatcher.running == 0)
    }

    @Test func aRunHandedASlotButNotStartedWhenTheDispatcherStopsRunsAgainUnspent() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        let (claim, hook) = try await startClaimedEarly(h)
        await h.dispatcher.execute(claim, hook: hook)
        #expect(try await h.deliveries().map(\.state) == [.delivered, .running])
        // Stopping before the first's task starts it: the second is given back, its attempt unspent.
        let unstarted = h.dispatcher.acceptEarlyStarts(false)
        #expect(unstarted.map(\.delivery.id) == [try await h.deliveries()[1].id])
        await h.dispatcher.interruptUnstarted(unstarted)
        #expect(await h.dispatcher.successor(of: claim.delivery.id) == nil)
        let states = try await h.deliveries()
        #expect(states.map(\.state) == [.delivered, .pending])
        #expect(states.last?.attempts == 0)
        #expect(h.dispatcher.running == 0)
        #expect(h.runner.all.count == 1)
    }

    /// A dispatcher of its own over the harness's log, whose outcomes first run `beforeOutcome` (with the
    /// dispatcher): what holds between a hook's exit and its outcome's transaction.
    private func probedDispatcher(_ h: EarlyStartHarness, beforeOutcome: @escaping @Sendable (Dispatcher) -> Void)
        -> Dispatcher
    {
        final class ProbingStore: ForwardingDeliveryStore, @unchecked Sendable {
            let probe = Shared<(@Sendable () -> Void)?>(nil)
            override func finishDelivery(
                id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
            ) async throws(EventLogError) -> DeliveryProgress.End? {
                probe.withLock { $0 }?()
                return try await super.finishDelivery(
                    id: id, attempt: attempt, result: result, maxAttempts: maxAttempts, backoff: backoff, now: now)
            }
        }
        let store = ProbingStore(h.log)
        let dispatcher = EarlyStartHarness.dispatcher(h.log, store: store, runner: h.runner, clock: h.clock, perHook: 1)
        store.probe.withLock { $0 = { beforeOutcome(dispatcher) } }
        _ = dispatcher.acceptEarlyStarts(true)
        h.log.startDeliveriesEarly(with: dispatcher)
        return dispatcher
    }

    @Test func anExitedHookNoLongerCountsAsRunningWhileItsSlotWaitsForTheHandOver() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        let seen = Shared<[(running: Int, hooks: Int, slotFree: Bool)]>([])
        let dispatcher = probedDispatcher(h) { dispatcher in
            seen.withLock { $0.append((dispatcher.running, dispatcher.runningHooks, dispatcher.hasFreeSlot("fulfil"))) }
        }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await dispatcher.dispatchDue() == 2)
        // Between a hook's exit and its outcome: its slot is held for the hand-over, its process is gone
        // (shutdown's grace waits for processes, not for outcomes).
        let probed = seen.withLock { $0 }
        #expect(probed.map(\.running) == [1, 1])
        #expect(probed.map(\.hooks) == [0, 0])
        #expect(probed.map(\.slotFree) == [false, false])
        #expect(try await h.deliveries().map(\.state) == [.delivered, .delivered])
    }

    @Test func aDispatcherStoppingBetweenAHooksExitAndItsOutcomeGetsNothingHandedOver() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        let dispatcher = probedDispatcher(h) { dispatcher in
            #expect(dispatcher.acceptEarlyStarts(false).isEmpty)
        }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        var spawned: [(DeliveryClaim, HookConfig)] = []
        #expect(try await dispatcher.startDue { spawned.append(($0, $1)) } == 1)
        let (claim, hook) = try #require(spawned.first)
        let before = h.log.commitCount
        #expect(await dispatcher.run(claim, hook: hook) == 0)
        #expect(h.log.commitCount == before + 1)  // the outcome alone: nothing claimed, nothing undone
        let states = try await h.deliveries()
        #expect(states.map(\.state) == [.delivered, .pending])
        #expect(states.last?.attempts == 0)
        #expect(dispatcher.running == 0)
        #expect(h.runner.all.map(\.entity) == ["1"])
    }

    @Test func aClaimHandedOnAfterTheDispatcherStoppedIsRecordedInterruptedByTheRunsTask() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        let first = try await startClaimedEarly(h).0
        let second = try #require(try await h.deliveries().last)
        // The outcome's transaction hands the slot over while runs are started; its commit lands once the
        // dispatcher has stopped starting them.
        #expect(h.dispatcher.handOver(from: first.delivery.id, to: second.id, hook: "fulfil"))
        let claim = try #require(try await h.log.claimDelivery(id: second.id, now: h.clock.nowMilliseconds()))
        #expect(h.dispatcher.acceptEarlyStarts(false).isEmpty)
        h.dispatcher.start([claim])
        #expect(try await h.deliveries().last?.state == .running)  // parked for the first run's task
        // The first run's task, not a task of its own, records it interrupted: shutdown waits for it.
        #expect(await h.dispatcher.successor(of: first.delivery.id) == nil)
        let waiting = try #require(try await h.deliveries().last)
        #expect(waiting.state == .pending && waiting.attempts == 0)
        #expect(h.runner.all.isEmpty)
    }

    /// Two runs of the hook and one slot: the first runs while `breaking` holds, and its outcome must be
    /// written without handing the slot on; once `mending` is done, the dispatcher runs the second.
    private func expectTheOutcomeWrittenAlone(
        _ h: EarlyStartHarness, breaking: () async throws -> Void, mending: () async throws -> Void,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        try await breaking()
        #expect(try await runClaimedEarly(h) == nil, sourceLocation: sourceLocation)
        try await mending()
        let states = try await h.deliveries()
        #expect(states.map(\.state) == [.delivered, .pending], sourceLocation: sourceLocation)
        #expect(states.last?.attempts == 0, sourceLocation: sourceLocation)
        #expect(h.dispatcher.running == 0, sourceLocation: sourceLocation)
        #expect(try await h.dispatcher.dispatchDue() == 1, sourceLocation: sourceLocation)
        #expect(h.runner.all.map(\.entity) == ["1", "2"], sourceLocation: sourceLocation)
    }

    @Test func aClaimFailingAtCommitLeavesTheOutcomeToBeWrittenAlone() async throws {
        // The outcome's tries: a second one must succeed. Past 10 the log is closed, so that a regression
        // fails the test instead of retrying forever.
        let tries = Shared(0)
        let giveUp = Shared<(@Sendable () -> Void)?>(nil)
        let h = try await EarlyStartHarness(
            perHook: 1,
            pause: { _ in
                if tries.withLock({ $0 += 1; return $0 }) > 10 { giveUp.withLock { $0 }?() }
                await Task.yield()
            })
        giveUp.withLock { $0 = { [log = h.log] in log.close() } }
        defer {
            #expect(tries.withLock { $0 } == 1)
            h.log.close()
        }
        // Every commit that records a run as started fails, after its write succeeded: the outcome's
        // first try (with the second claimed) fails whole; its next try hands nothing over and is kept.
        try await expectTheOutcomeWrittenAlone(
            h, breaking: { try await h.failCommitsOfClaims(true) }, mending: { try await h.failCommitsOfClaims(false) })
    }

    @Test func aHeadOfLineReadThatFailsLeavesTheOutcomeWritten() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        // The index the read walks is gone (the read fails on its own, not the database).
        try await expectTheOutcomeWrittenAlone(
            h, breaking: { try await h.log.write { db in try db.execute(sql: "DROP INDEX deliveries_due") } },
            mending: {
                try await h.log.write { db in
                    try db.execute(
                        sql: "CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending'")
                }
            })
    }

    @Test func aRunBehindManyDueRunsOfOtherHooksIsLeftToTheDispatcher() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        // More due runs of a removed hook than the hand-over looks at, ahead of the hook's own.
        h.log.setHooks([commandHook("gone", "/bin/true")])
        for n in 0..<(SQLiteEventLog.firstRunnableWindow + 1) {
            try await ingestSigned(h.log, clock: h.clock, order: "gone-\(n)")
        }
        h.log.setHooks([commandHook("fulfil", "/bin/true")])
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await runClaimedEarly(h) == nil)
        let fulfil = try await h.log.deliveries(state: nil, hook: "fulfil", limit: 10)
        #expect(fulfil.map(\.state) == [.pending, .delivered])  // newest first
        #expect(h.dispatcher.running == 0)
        #expect(try await h.dispatcher.dispatchDue() == 1)
        #expect(h.runner.all.map(\.entity) == ["1", "2"])
    }

    @Test func aNextRunThatCannotBeClaimedLeavesTheOutcomeWrittenAndTheSlotFree() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        try await h.failClaims(true)
        #expect(try await runClaimedEarly(h) == nil)
        let states = try await h.deliveries()
        #expect(states.map(\.state) == [.delivered, .pending])
        #expect(states.last?.attempts == 0)
        #expect(h.dispatcher.running == 0)
        // The dispatcher meets the same refusal on its own path; once claims work, the run starts.
        await #expect(throws: EventLogError.self) { try await h.dispatcher.dispatchDue() }
        try await h.failClaims(false)
        #expect(try await h.dispatcher.dispatchDue() == 1)
        #expect(h.runner.all.map(\.entity) == ["1", "2"])
    }

    @Test func aReloadThatLowersTheLimitIsKeptByTheHandOver() async throws {
        let h = try await EarlyStartHarness(perHook: 2)
        defer { h.log.close() }
        for order in ["1", "2", "3"] { try await ingestSigned(h.log, clock: h.clock, order: order) }
        var spawned: [(DeliveryClaim, HookConfig)] = []
        #expect(try await h.dispatcher.startDue { spawned.append(($0, $1)) } == 2)
        h.dispatcher.reload(
            DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 100, jitter: Backoff.noJitter), killGraceSeconds: 0.1,
                shutdownGraceSeconds: 0.2, perHookConcurrency: 1))
        // One run still runs: the one that ends may not hand its slot on (two would then run).
        let (first, hook) = try #require(spawned.first)
        await h.dispatcher.execute(first, hook: hook)
        #expect(await h.dispatcher.successor(of: first.delivery.id) == nil)
        #expect(try await h.deliveries().map(\.state) == [.delivered, .running, .pending])
        #expect(h.dispatcher.running == 1)
    }

    @Test func aRunBehindAnEarlierOneOfItsEntityIsNotClaimedAndKeepsItsOrder() async throws {
        let h = try await EarlyStartHarness()
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
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        try await h.failCommitsOfClaims(true)
        try await h.expectSignedIPNRefusedHoldingNothing()
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

    @Test func aClaimThatFailsAloneHoldsNoSlotAndLeavesItsWriteUndone() async throws {
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        try await h.failClaims(true)
        try await h.expectSignedIPNRefusedHoldingNothing()
        try await h.failClaims(false)
        try await ingestSigned(h.log, clock: h.clock)
        #expect(try await h.deliveries().map(\.state) == [.running])
    }

    @Test func aFreshRunNeverTakesTheSlotOfOneThatWaitedForIt() async throws {
        let h = try await EarlyStartHarness(perHook: 1)
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock, order: "A")
        try await ingestSigned(h.log, clock: h.clock, order: "B")  // the hook is at its limit: B waits
        let (claimA, hook) = try await startClaimedEarly(h)
        // A's outcome cannot hand its slot to B (B's claim fails): the slot is free, and B waits for it.
        try await h.failClaims(true)
        await h.dispatcher.execute(claimA, hook: hook)
        try await h.failClaims(false)
        #expect(await h.dispatcher.successor(of: claimA.delivery.id) == nil)
        #expect(h.dispatcher.running == 0)
        // C, fresh, must not take the slot B waits for.
        try await ingestSigned(h.log, clock: h.clock, order: "C")
        #expect(try await h.deliveries().map(\.state) == [.delivered, .pending, .pending])
        #expect(try await h.dispatcher.dispatchDue() == 2)
        #expect(h.runner.all.map(\.entity) == ["A", "B", "C"])
    }

    @Test func aRunRefusedASlotWhileAPassReadsKeepsTheHookBehind() async throws {
        /// Runs `during` between the pass's read of the log and its use: admissions racing the pass.
        final class InterleavingStore: ForwardingDeliveryStore, @unchecked Sendable {
            let during = Mutex<(@Sendable () -> Void)?>(nil)
            override func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError)
                -> [Delivery]
            {
                let rows = try await base.runnableDeliveries(now: now, hooks: hooks, limit: limit)
                during.withLock { $0 }?()
                return rows
            }
        }
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        let store = InterleavingStore(h.log)
        let dispatcher = EarlyStartHarness.dispatcher(h.log, store: store, runner: h.runner, clock: h.clock, perHook: 2)
        _ = dispatcher.acceptEarlyStarts(true)
        #expect(try await dispatcher.dispatchDue() == 0)  // caught up
        #expect(dispatcher.admit(id: 1001, hook: "fulfil"))
        store.during.withLock {
            $0 = {
                #expect(dispatcher.admit(id: 1002, hook: "fulfil"))  // the last slot
                #expect(!dispatcher.admit(id: 1003, hook: "fulfil"))  // refused: 1003 now waits
            }
        }
        #expect(try await dispatcher.startDue { _, _ in } == 0)
        store.during.withLock { $0 = nil }
        dispatcher.withdraw([1001])
        // A slot is free, and 1003 waits for it: a fresh run is not admitted ahead of it.
        #expect(!dispatcher.admit(id: 1004, hook: "fulfil"))
        dispatcher.withdraw([1002])
    }

    @Test func runsClaimedButNotStartedWhenTheDispatcherStopsRunAgainUnspent() async throws {
        let h = try await EarlyStartHarness()
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

    @Test func aRunClaimedForAHookAReloadRemovedIsRecordedInterrupted() async throws {
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        try await ingestSigned(h.log, clock: h.clock)
        h.log.setHooks([commandHook("other", "/bin/true")])
        #expect(try await h.dispatcher.dispatchDue() == 0)
        let waiting = try #require(try await h.deliveries().first)
        #expect(waiting.state == .pending && waiting.attempts == 0)
        #expect(h.dispatcher.running == 0)
        #expect(h.runner.all.isEmpty)
    }

    @Test func aClaimCommittedAfterTheDispatcherStoppedIsRecordedInterrupted() async throws {
        let h = try await EarlyStartHarness()
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
