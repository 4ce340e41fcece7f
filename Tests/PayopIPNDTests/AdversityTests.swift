import Foundation
import GRDB
import Logging
import PayopSimulator
import ServiceLifecycle
import Synchronization
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// The hook boundary, in memory: records every run and answers as told.
final class RecordingHookRunner: HookRunner {
    struct Run: Sendable, Equatable {
        var deliveryID: Int64
        var hook: String
        var eventID: String
        var type: String
        var entity: String
        var amount: String?
        var transactionID: String?
        var attempt: Int
        /// The event object's `ipn`: the body of the copy the event shows.
        var ipn: [UInt8]?
    }

    let runs = Mutex<[Run]>([])
    let answer: @Sendable (HookInvocation) async -> HookResult

    init(answer: @escaping @Sendable (HookInvocation) async -> HookResult = { _ in HookResult(outcome: .delivered) }) {
        self.answer = answer
    }

    func run(_ invocation: HookInvocation) async -> HookResult {
        let event = invocation.event
        runs.withLock {
            $0.append(
                Run(
                    deliveryID: invocation.deliveryID, hook: invocation.hook.name, eventID: event.id, type: event.type,
                    entity: event.entityID ?? "", amount: event.amount, transactionID: event.transactionID,
                    attempt: invocation.attempt, ipn: event.wellFormedIPN))
        }
        return await answer(invocation)
    }

    var all: [Run] { runs.withLock { $0 } }
}

extension PayopHarness {
    /// A verifier re-checking every 2 s (the lagging-API scenario's reconcile interval).
    func quickVerifier() -> Verifier {
        Verifier(
            store: log, payop: client,
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter),
                notFoundRetryMilliseconds: 600_000, reconcileIntervalMilliseconds: 2_000),
            clock: clock, logger: logs.logger)
    }

    func dispatcher(_ runner: RecordingHookRunner) -> Dispatcher {
        Dispatcher(
            store: log, runner: runner, hooks: { [log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 10_800, jitter: Backoff.noJitter), killGraceSeconds: 0.2,
                shutdownGraceSeconds: 1),
            clock: clock, logger: logs.logger)
    }
}

/// The defects of issue 8, each as the sequence Payop or the operating system really produces.
@Suite struct AdversityTests {
    @Test func paidOrderIsDeliveredWhenPayopsAPILagsItsOwnIPN() async throws {
        try await PayopHarness.with { h, _ in
            h.log.setHooks([commandHook("fulfil", "/bin/true")])
            let runner = RecordingHookRunner()
            let entity = h.payop.create(.checkout, state: 4)  // the API still says pending
            let accepted = try await h.receive(SimulatedPayop.ipnBody(for: entity, claimingState: 2))
            let verifier = h.quickVerifier()
            let dispatcher = h.dispatcher(runner)
            try await verifier.verifyDue()
            try await dispatcher.dispatchDue()
            #expect(try await h.event(accepted.eventID).rejectionReason == "status_mismatch")
            #expect(runner.all.map(\.type) == ["checkout.pending"])
            // Payop catches up; it will not post again. The contradicted claim is still asked about.
            _ = h.payop.setState(.checkout, id: entity.id, state: 2)
            for _ in 0..<3 {
                h.clock.advance(milliseconds: 2_000)
                try await verifier.verifyDue()
                try await dispatcher.dispatchDue()
            }
            let event = try await h.event(accepted.eventID)
            #expect(event.state == "verified" && event.rejectionReason == nil)
            #expect(runner.all.map(\.type) == ["checkout.pending", "checkout.accepted"])
        }
    }

    @Test func forgedRefundFieldsNeverReachAHook() async throws {
        try await PayopHarness.with { h, _ in
            h.log.setHooks([commandHook("crm", "/bin/true")])
            let runner = RecordingHookRunner()
            let refund = h.payop.create(.refund, state: 2, amount: "1.00", currency: "EUR", sourceTransactionID: "X")
            // Amounts that are not whole decimals are refused at the door.
            let ingress = IPNIngress(settings: ingressSettings(), store: h.log, logger: quietLogger)
            for amount in ["\"1,000.00\"", "\"1.00abc\"", "1e3", "\"NaN\""] {
                let body = refundBody(id: refund.id, amount: amount, source: "X")
                #expect(await post(body, to: ingress) == IngressAnswer(400, "invalid_amount"))
            }
            // A source transaction Payop contradicts is rejected, and nothing is delivered.
            let forged = try await h.receive(Data(refundBody(id: refund.id, amount: "\"1.00\"", source: "T-victim")))
            try await h.quickVerifier().verifyDue()
            try await h.dispatcher(runner).dispatchDue()
            #expect(try await h.event(forged.eventID).rejectionReason == "transaction_mismatch")
            #expect(runner.all.isEmpty)
        }
    }

    @Test func forgedFirstCopyDoesNotStopTheGenuineCopyFromBeingDelivered() async throws {
        try await PayopHarness.with { h, _ in
            h.log.setHooks([commandHook("crm", "/bin/true")])
            let runner = RecordingHookRunner()
            let refund = h.payop.create(.refund, state: 2, amount: "1.00", currency: "EUR", sourceTransactionID: "X")
            let verifier = h.quickVerifier()
            let dispatcher = h.dispatcher(runner)
            let first = try await h.receive(Data(refundBody(id: refund.id, amount: "\"1000.00\"", source: "X")))
            try await verifier.verifyDue()
            #expect(try await h.event(first.eventID).rejectionReason == "amount_mismatch")
            h.clock.advance(milliseconds: 1_000)
            let genuine = try await h.receive(SimulatedPayop.ipnBody(for: refund))
            #expect(genuine.eventID == first.eventID && genuine.duplicate)
            try await verifier.verifyDue()
            try await dispatcher.dispatchDue()
            let event = try await h.event(first.eventID)
            #expect(event.state == "verified" && event.amount == "1.00" && event.transactionID == "X")
            #expect(runner.all.map(\.amount) == ["1.00"])
            // The event's `ipn` is the copy Payop confirmed, not the forged first one.
            let ipn = try #require(event.ipn)
            #expect(!String(decoding: ipn, as: UTF8.self).contains("1000.00"))
        }
    }

    @Test func hookIsNotStartedWhileTheLogCannotRecordItAndRunsOnceAfter() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { log.close() }
        let runner = RecordingHookRunner()
        let dispatcher = testDispatcher(log, runner: runner, clock: clock)
        // Another writer (a backup, a big prune) holds the log.
        let other = try lockingConnection(dir.file("events.sqlite3"))
        try await other.writeWithoutTransaction { db in try db.execute(sql: "BEGIN IMMEDIATE") }
        for _ in 0..<3 {
            await #expect(throws: EventLogError.self) { try await dispatcher.dispatchDue() }
        }
        #expect(runner.all.isEmpty)
        try await other.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(runner.all.count == 1)
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 10).count == 1)
    }

    @Test func outcomeThatCannotBeWrittenIsRetriedNotDroppedAndTheHookRunsOnce() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { log.close() }
        let other = try lockingConnection(dir.file("events.sqlite3"))
        // The hook locks the log while it runs; the dispatcher's pause (instead of a real sleep) frees it
        // after the second failed try to record the outcome.
        let runner = RecordingHookRunner { _ in
            try? await other.writeWithoutTransaction { db in try db.execute(sql: "BEGIN IMMEDIATE") }
            return HookResult(outcome: .delivered)
        }
        let pauses = Mutex(0)
        let dispatcher = testDispatcher(log, runner: runner, clock: clock, pause: { _ in
                if pauses.withLock({ $0 += 1; return $0 }) == 2 {
                    try? await other.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
                }
            })
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(pauses.withLock { $0 } == 2)
        #expect(runner.all.count == 1)
        let delivery = try #require(try await log.deliveries(state: nil, hook: nil, limit: 10).first)
        #expect(delivery.state == .delivered && delivery.attempts == 1)
    }

    @Test func verifierThatCannotRecordAnAnswerStopsAndSaysSoInsteadOfAskingAgainAtOnce() async throws {
        try await PayopHarness.with { h, _ in
            let paid = h.payop.create(.checkout, state: 2)
            _ = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            let locked = try SQLiteEventLog.open(
                path: h.log.path, mode: .tool, clock: h.clock, lockDeadlineSeconds: 0.05)
            defer { locked.close() }
            let verifier = Verifier(
                store: locked, payop: h.client,
                policy: VerificationPolicy(
                    backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter),
                    notFoundRetryMilliseconds: 600_000, reconcileIntervalMilliseconds: 300_000),
                clock: h.clock, logger: quietLogger)
            let other = try lockingConnection(h.log.path)
            try await other.writeWithoutTransaction { db in try db.execute(sql: "BEGIN IMMEDIATE") }
            await #expect(throws: EventLogError.self) { try await verifier.verifyDue() }
            #expect(h.payop.calls.count == 1)
            try await other.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
            #expect(try await verifier.verifyDue() == 1)
        }
    }

    @Test func failingPassIsRetriedWithBackoffNotInATightLoop() async throws {
        let passes = Mutex(0)
        let loop = DueWorkLoop(
            name: "test", signal: WorkSignal(), clock: SystemWallClock(), logger: quietLogger,
            idleFloor: .milliseconds(20), maxBackoff: .milliseconds(160))
        let started = ContinuousClock.now
        await loop.run(while: { ContinuousClock.now - started < .milliseconds(500) }) {
            passes.withLock { $0 += 1 }
            throw EventLogError(.unavailable, "locked (test)")
        }
        // 20 + 40 + 80 + 160 + 160 ... ms: a handful of passes in half a second, not thousands.
        #expect(passes.withLock { $0 } <= 8)
    }

    @Test func idlePassWithWorkSeeminglyDueWaitsInsteadOfSpinning() async throws {
        let passes = Mutex(0)
        let clock = SystemWallClock()
        let loop = DueWorkLoop(
            name: "test", signal: WorkSignal(), clock: clock, logger: quietLogger, idleFloor: .milliseconds(100))
        let started = ContinuousClock.now
        await loop.run(while: { ContinuousClock.now - started < .milliseconds(450) }) {
            passes.withLock { $0 += 1 }
            return (0, clock.nowMilliseconds())  // "due now", yet nothing could be done
        }
        #expect(passes.withLock { $0 } <= 6)
    }

    @Test func laterStatusBehindARunningHookIsNotReportedDue() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        log.setHooks([commandHook("slow", "/bin/true")])
        try await ingestSigned(log, clock: clock, order: "o-1", status: "wait")
        try await ingestSigned(log, clock: clock, order: "o-1", status: "success")
        let runner = RecordingHookRunner()
        let dispatcher = testDispatcher(log, runner: runner, clock: clock)
        var claims: [DeliveryClaim] = []
        #expect(try await dispatcher.startDue { claim, _ in claims.append(claim) } == 1)
        // The first is running; the second waits behind it: nothing can start, so nothing is due.
        #expect(try await dispatcher.nextDue() == nil)
        #expect(try await dispatcher.startDue { _, _ in } == 0)
    }

    @Test func deliveriesOfARemovedHookDoNotStarveTheOthers() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        log.setHooks([commandHook("removed", "/bin/true")])
        for n in 0..<(Dispatcher.batch + 10) { try await ingestSigned(log, clock: clock, order: "old-\(n)") }
        clock.advance(milliseconds: 1)
        log.setHooks([commandHook("kept", "/bin/true")])
        try await ingestSigned(log, clock: clock, order: "new")
        let runner = RecordingHookRunner()
        let dispatcher = testDispatcher(log, runner: runner, clock: clock)
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(runner.all.map(\.hook) == ["kept"])
        #expect(try await dispatcher.nextDue() == nil)
        #expect(try await log.orphanedDeliveries(configured: ["kept"]) == ["removed": Dispatcher.batch + 10])
    }

    @Test func hookStoppedByShutdownDoesNotSpendAnAttempt() async throws {
        let (dir, clock, log) = try logWithASlowHook()
        defer {
            log.close()
            withExtendedLifetime(dir) {}
        }
        try await ingestSigned(log, clock: clock)
        let dispatcher = testDispatcher(log, runner: CommandHookRunner(), clock: clock)
        let service = DispatcherService(
            dispatcher: dispatcher, clock: clock, logger: quietLogger, shutdownGrace: .milliseconds(200))
        let group = ServiceGroup(services: [service], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            while try await log.deliveries(state: "running", hook: nil, limit: 1).isEmpty {
                try await Task.sleep(for: .milliseconds(10))
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let delivery = try #require(try await log.deliveries(state: nil, hook: nil, limit: 1).first)
        // max_attempts 1: had the interrupted run counted, the delivery would now be dead.
        #expect(delivery.state == .pending && delivery.attempts == 0)
    }

    @Test func secondDaemonOnTheSameLogExitsNamingTheFirstAndTouchesNothing() async throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("events.sqlite3")
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: path, mode: .daemon, clock: clock)
        log.setHooks([commandHook("fulfil", "/bin/true")])
        try await ingestSigned(log, clock: clock)
        let first = try EventLogLock.acquire(logPath: path)
        defer { first.release() }
        let due = try await log.runnableDeliveries(now: clock.nowMilliseconds(), hooks: ["fulfil"], limit: 1)
        #expect(try await log.claimDelivery(id: try #require(due.first).id, now: clock.nowMilliseconds()) != nil)
        log.close()
        var config = DaemonConfig()
        config.storage.path = path
        config.server.listen = ListenAddress(host: "127.0.0.1", port: 0)
        config.admin.listen = ListenAddress(host: "127.0.0.1", port: 0)
        let daemon = Daemon(config: config, logger: quietLogger, environment: [:])
        let error = await #expect(throws: EventLogError.self) { try await daemon.run() }
        #expect(error?.code == .inUse)
        #expect(error?.message.contains("pid \(getpid())") == true)
        // The first daemon's running delivery is still its own.
        let reopened = try SQLiteEventLog.open(path: path, mode: .tool, create: false)
        defer { reopened.close() }
        #expect(try await reopened.deliveries(state: "running", hook: nil, limit: 10).count == 1)
    }

    @Test func lockIsFreedWhenItsHolderGoes() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("events.sqlite3")
        #expect(EventLogLock.holder(logPath: path) == nil)
        let first = try EventLogLock.acquire(logPath: path)
        #expect(throws: EventLogError.self) { _ = try EventLogLock.acquire(logPath: path) }
        #expect(EventLogLock.holder(logPath: path) == Int(getpid()))
        first.release()
        #expect(EventLogLock.holder(logPath: path) == nil)
        let second = try EventLogLock.acquire(logPath: path)
        second.release()
    }

    @Test func unitLetsTheDaemonStopItsOwnHooks() throws {
        let unit = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("systemd/payop-ipnd.service")
        let lines = try String(contentsOf: unit, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(lines.contains("KillMode=mixed"))
    }

    @Test(arguments: [
        [UInt8]("{\"transaction\":{\"id\":\"".utf8) + [0xFF, 0xFE] + [UInt8]("\",\"state\":2}}".utf8),
        [UInt8]("{\"transaction\":{\"id\":\"".utf8) + [0xC0, 0xAF] + [UInt8]("\",\"state\":2}}".utf8),
        [UInt8]("{\"transaction\":{\"id\":\"a".utf8) + [0x01] + [UInt8]("b\",\"state\":2}}".utf8),
    ])
    func hostileBytesInAStringAreInvalidJSON(body: [UInt8]) async throws {
        let store = FakeEventStore()
        let ingress = IPNIngress(settings: ingressSettings(), store: store, logger: quietLogger)
        #expect(await post(body, to: ingress) == IngressAnswer(400, "invalid_json"))
        #expect(store.ingested.isEmpty && store.refused.first?.reason == .invalidJSON)
    }

    @Test(arguments: [
        "{\"transaction\":{\"state\":2,\"amount\":1,\"currency\":\"USD\"},\"sourceTransaction\":{\"id\":\"s\",\"state\":2}}",
        "{\"transaction\":{\"refundId\":\"\",\"state\":2},\"sourceTransaction\":{\"id\":\"s\",\"state\":2}}",
    ])
    func refundWithoutItsIdIsMissingID(body: String) async throws {
        let store = FakeEventStore()
        let ingress = IPNIngress(settings: ingressSettings(), store: store, logger: quietLogger)
        #expect(await post(Array(body.utf8), to: ingress) == IngressAnswer(400, "missing_id"))
    }
}

func refundBody(id: String, amount: String, source: String) -> [UInt8] {
    Array(
        """
        {"transaction":{"refundId":"\(id)","state":2,"amount":\(amount),"currency":"EUR","error":{"message":"","code":""}},
         "sourceTransaction":{"id":"\(source)","state":2}}
        """.utf8)
}

func post(_ body: [UInt8], to ingress: IPNIngress, peer: String = "3.125.109.58") async -> IngressAnswer {
    switch ingress.preflight(
        method: "POST", path: "/payop/ipn", peer: IPAddress(peer), forwardedFor: [], contentLength: body.count)
    {
    case .answer(let answer): return answer
    case .readBody(let admitted): return await ingress.accept(body: body, from: admitted)
    }
}

/// A legacy V1 IPN (verified by its signature at the door), so its deliveries exist at once.
@discardableResult
func ingestSigned(_ log: SQLiteEventLog, clock: TestClock, order: String = "1042", status: String = "success")
    async throws -> IngestOutcome
{
    let signature = try #require(
        LegacySignature.expected(amount: "10.00", currency: "EUR", orderID: order, status: status, secretKey: "k"))
    let body = Array(
        "{\"orderId\":\"\(order)\",\"amount\":\"10.00\",\"currency\":\"EUR\",\"status\":\"\(status)\",\"signature\":\"\(signature)\"}"
            .utf8)
    return try await log.ingest(
        IncomingIPN(
            receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
            notification: try NotificationParser.parse(body).get(), verifiedBySignature: true))
}

/// A second writer on the log (a backup, a big prune, the CLI): `BEGIN IMMEDIATE` holds the lock
/// across calls until `COMMIT`.
func lockingConnection(_ path: String) throws -> DatabaseQueue {
    var configuration = Configuration()
    configuration.allowsUnsafeTransactions = true
    return try DatabaseQueue(path: path, configuration: configuration)
}

/// What the adversarial review of issue 8 found, each pinned.
@Suite struct ReviewFindingsTests {
    @Test func payopAnswerAboutAnotherSpellingOfTheIdIsNotFound() throws {
        let body = Data(#"{"data":{"identifier":"ABC-1","state":2,"amount":"1.00","currency":"EUR"},"status":1}"#.utf8)
        #expect(try PayopAnswers.single(body, kind: .checkout, id: "abc-1") == nil)
        #expect(try PayopAnswers.single(body, kind: .checkout, id: "ABC-1")?.status.name == "accepted")
    }

    @Test func payopAnswerThatDoesNotNameTheTransactionConfirmsNothing() {
        let body = Data(#"{"data":{"state":2,"amount":"1.00","currency":"EUR"},"status":1}"#.utf8)
        #expect(throws: PayopError.self) { try PayopAnswers.single(body, kind: .checkout, id: "abc-1") }
    }

    @Test func lagginAPIReportingAnOlderStatusAfterAFinalOneIsIgnored() {
        let policy = VerificationPolicy(
            backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter),
            notFoundRetryMilliseconds: 0, reconcileIntervalMilliseconds: 60_000)
        var machine = EventVerification.fresh(
            kind: .checkout, status: .checkout(state: 3, errorMessage: nil), receivedAt: 0)
        let failed = PayopRecord(kind: .checkout, id: "T", status: .checkout(state: 3, errorMessage: nil))
        _ = machine.payopAnswered(.record(failed), claims: [], now: 0, policy: policy)
        let pending = PayopRecord(kind: .checkout, id: "T", status: .checkout(state: 4, errorMessage: nil))
        let outcome = machine.payopAnswered(.record(pending), claims: [], now: 60_000, policy: policy)
        #expect(outcome.reportedStatus == nil)
        #expect(machine.nextCheckAt == 120_000)  // the failed checkout is still watched
    }

    @Test func checkoutMissingFromTheFilterAnswerIsAskedAloneNotRejected() async throws {
        final class PagingPayop: PayopAPI {
            func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
                PayopRecord(kind: kind, id: id, status: .status(kind: kind, state: 2, errorMessage: nil))
            }
            func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] {
                [try await lookup(.checkout, id: ids[0])].compactMap { $0 }  // a short page
            }
        }
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        for n in 0..<3 {
            let body = checkoutBody(transaction: "tx-\(n)", state: 2)
            _ = try await log.ingest(
                IncomingIPN(
                    receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
                    notification: try NotificationParser.parse(body).get(), verifiedBySignature: false))
        }
        let verifier = Verifier(
            store: log, payop: PagingPayop(),
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 0,
                reconcileIntervalMilliseconds: 60_000),
            clock: clock, logger: quietLogger)
        #expect(try await verifier.verifyDue() == 3)
        #expect(try await log.events(.init(state: "verified")).count == 3)
    }
}

/// A dispatcher on `log` with a 2 s initial backoff and no jitter, as most delivery tests want it.
/// A log whose one hook (`slow`, one attempt) sleeps 30 s: what shutdown's grace must stop. The
/// directory holds the log and the hook's script.
func logWithASlowHook() throws -> (TemporaryDirectory, TestClock, SQLiteEventLog) {
    let dir = try TemporaryDirectory()
    let clock = TestClock()
    let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
    log.setHooks([commandHook("slow", try script(dir, "slow", "sleep 30"), attempts: 1)])
    return (dir, clock, log)
}

func testDispatcher(
    _ log: SQLiteEventLog, store: (any DeliveryStore)? = nil, runner: any HookRunner, clock: TestClock,
    pause: @escaping @Sendable (Duration) async -> Void = { try? await Task.sleep(for: $0) }
) -> Dispatcher {
    Dispatcher(
        store: store ?? log, runner: runner, hooks: { [log] in log.hooks },
        policy: DeliveryPolicy(
            backoff: Backoff(initialSeconds: 2, maxSeconds: 100, jitter: Backoff.noJitter), killGraceSeconds: 0.1,
            shutdownGraceSeconds: 0.2),
        clock: clock, logger: quietLogger, pause: pause)
}

/// A log that gives up on another writer's lock after 50 ms, with one signed event whose delivery to
/// hook `fulfil` is due.
func logWithOneDueDelivery() async throws -> (TemporaryDirectory, TestClock, SQLiteEventLog) {
    let dir = try TemporaryDirectory()
    let clock = TestClock()
    let log = try SQLiteEventLog.open(
        path: dir.file("events.sqlite3"), mode: .daemon, clock: clock, lockDeadlineSeconds: 0.05)
    log.setHooks([commandHook("fulfil", "/bin/true")])
    try await ingestSigned(log, clock: clock)
    return (dir, clock, log)
}

/// The SQLite log's deliveries behind a store whose parts a test replaces (subclasses override what
/// they change: leases, refusals, slow writes).
class ForwardingDeliveryStore: DeliveryStore, @unchecked Sendable {
    let base: SQLiteEventLog
    init(_ base: SQLiteEventLog) { self.base = base }

    var leaseRenewal: Duration? { nil }
    func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool { true }
    func handsOverRunSlots(to starts: any EarlyStarts) -> Bool { base.handsOverRunSlots(to: starts) }
    func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery] {
        try await base.runnableDeliveries(now: now, hooks: hooks, limit: limit)
    }
    func nextRunnableDelivery(hooks: [String]) async throws(EventLogError) -> Int64? {
        try await base.nextRunnableDelivery(hooks: hooks)
    }
    func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
        try await base.claimDelivery(id: id, now: now)
    }
    func finishDelivery(
        id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
    ) async throws(EventLogError) -> DeliveryProgress.End? {
        try await base.finishDelivery(
            id: id, attempt: attempt, result: result, maxAttempts: maxAttempts, backoff: backoff, now: now)
    }
    func interruptDelivery(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) {
        try await base.interruptDelivery(id: id, attempt: attempt, now: now)
    }
    func orphanedDeliveries(configured: [String]) async throws(EventLogError) -> [String: Int] {
        try await base.orphanedDeliveries(configured: configured)
    }
}

/// A shared log's claims: the SQLite log's deliveries, with leases that must be renewed while a hook runs.
final class LeasingStore: ForwardingDeliveryStore, @unchecked Sendable {
    let renewals = Mutex<[Int]>([])  // the attempt each renewal was for
    let keep: Bool

    init(_ base: SQLiteEventLog, keep: Bool = true) {
        self.keep = keep
        super.init(base)
    }

    override var leaseRenewal: Duration? { .seconds(20) }
    override func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool {
        renewals.withLock { $0.append(attempt) }
        return keep
    }
    var count: Int { renewals.withLock { $0.count } }
}

@Suite struct LeaseRenewalTests {
    /// Runs one due delivery through a dispatcher on `store`; the hook returns once `until` holds.
    static func runOnce(store: LeasingStore, log: SQLiteEventLog, clock: TestClock, until: @escaping @Sendable () -> Bool)
        async throws -> [Duration]
    {
        let pauses = Mutex<[Duration]>([])
        let runner = RecordingHookRunner { _ in
            for _ in 0..<100_000 where !until() { await Task.yield() }
            return HookResult(outcome: .delivered, exitCode: 0)
        }
        let dispatcher = testDispatcher(log, store: store, runner: runner, clock: clock) { duration in
            pauses.withLock { $0.append(duration) }
            await Task.yield()
        }
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(runner.all.count == 1)
        return pauses.withLock { $0 }
    }

    @Test func aLongRunningHookKeepsItsClaimOnASharedLog() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        let store = LeasingStore(log)
        let pauses = try await Self.runOnce(store: store, log: log, clock: clock) { store.count >= 3 }
        #expect(store.count >= 3)
        #expect(store.renewals.withLock { $0 }.allSatisfy { $0 == 1 })  // the attempt that runs
        #expect(pauses.allSatisfy { $0 == .seconds(20) })
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
        // The run is over: no renewal outlives it.
        let after = store.count
        for _ in 0..<1000 { await Task.yield() }
        #expect(store.count == after)
    }

    @Test func aLostClaimIsToleratedAndTheOutcomeStillRecorded() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        let store = LeasingStore(log, keep: false)
        _ = try await Self.runOnce(store: store, log: log, clock: clock) { store.count >= 2 }
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
    }

    /// A shared log whose lease on a finished run lapsed while its outcome could not be written: the
    /// log offers the delivery to be taken over, and the daemon that ran it must not take its own run.
    final class LapsedStore: ForwardingDeliveryStore, @unchecked Sendable {
        let failures = Mutex(3)
        let claims = Mutex<[Int64]>([])

        override func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery] {
            let lapsed = try await base.deliveries(state: "running", hook: nil, limit: limit)
            return try await base.runnableDeliveries(now: now, hooks: hooks, limit: limit) + lapsed
        }
        override func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
            claims.withLock { $0.append(id) }
            return try await base.claimDelivery(id: id, now: now)
        }
        override func finishDelivery(
            id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
        ) async throws(EventLogError) -> DeliveryProgress.End? {
            if failures.withLock({ left in defer { left -= 1 }; return left > 0 }) {
                throw EventLogError(.unavailable, "the server is away")
            }
            return try await super.finishDelivery(
                id: id, attempt: attempt, result: result, maxAttempts: maxAttempts, backoff: backoff, now: now)
        }
    }

    @Test func aRunWhoseOutcomeIsNotWrittenYetIsNeverClaimedAgainByItsOwnDaemon() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        let store = LapsedStore(log)
        let runner = RecordingHookRunner { _ in HookResult(outcome: .delivered, exitCode: 0) }
        let dispatcher = Shared<Dispatcher?>(nil)
        let respawned = Mutex(0)
        let made = testDispatcher(log, store: store, runner: runner, clock: clock) { _ in
            // While the outcome waits for the log, the dispatcher's loop runs its passes.
            guard let dispatcher = dispatcher.withLock({ $0 }) else { return }
            _ = try? await dispatcher.startDue { _, _ in respawned.withLock { $0 += 1 } }
        }
        dispatcher.withLock { $0 = made }
        #expect(try await made.dispatchDue() == 1)
        #expect(runner.all.count == 1)
        #expect(respawned.withLock { $0 } == 0)
        #expect(store.claims.withLock { $0 }.count == 1)
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
    }

    @Test func anOutcomeStillBeingWrittenWhenTheDaemonStopsIsWrittenNotCutOff() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        let store = LapsedStore(log)  // the outcome's first writes fail
        let runner = RecordingHookRunner { _ in HookResult(outcome: .delivered, exitCode: 0) }
        let group = Shared<ServiceGroup?>(nil)
        // The hook has exited; while its outcome waits for the log, the daemon is told to stop, and the
        // log stays away longer than the shutdown grace (0.2 s).
        let dispatcher = testDispatcher(log, store: store, runner: runner, clock: clock) { _ in
            await group.withLock({ $0 })?.triggerGracefulShutdown()
            try? await Task.sleep(for: .milliseconds(300))
        }
        let service = DispatcherService(
            dispatcher: dispatcher, clock: clock, logger: quietLogger, shutdownGrace: .milliseconds(200))
        let made = ServiceGroup(services: [service], logger: quietLogger)
        group.withLock { $0 = made }
        try await made.run()
        #expect(runner.all.count == 1)
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
    }

    @Test func aSharedLogsClaimIsRenewedUntilTheOutcomeIsWrittenNotOnlyWhileTheHookRuns() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        /// A shared log's leases, whose outcome write fails three times first; it records what happened in order.
        final class SlowOutcomeStore: ForwardingDeliveryStore, @unchecked Sendable {
            let journal = Mutex<[String]>([])
            let failures = Mutex(3)
            override var leaseRenewal: Duration? { .seconds(20) }
            override func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool {
                journal.withLock { $0.append("renew") }
                return true
            }
            override func finishDelivery(
                id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
            ) async throws(EventLogError) -> DeliveryProgress.End? {
                if failures.withLock({ left in defer { left -= 1 }; return left > 0 }) {
                    journal.withLock { $0.append("outcome refused") }
                    throw EventLogError(.unavailable, "the server is away")
                }
                journal.withLock { $0.append("outcome written") }
                return try await super.finishDelivery(
                    id: id, attempt: attempt, result: result, maxAttempts: maxAttempts, backoff: backoff, now: now)
            }
        }
        let store = SlowOutcomeStore(log)
        let runner = RecordingHookRunner { _ in
            store.journal.withLock { $0.append("hook exited") }
            return HookResult(outcome: .delivered, exitCode: 0)
        }
        // Each wait lets the renewals' loop run once before the outcome is tried again.
        let dispatcher = testDispatcher(log, store: store, runner: runner, clock: clock) { _ in
            let seen = store.journal.withLock { $0.count }
            for _ in 0..<10_000 where store.journal.withLock({ $0.count }) == seen { await Task.yield() }
        }
        #expect(try await dispatcher.dispatchDue() == 1)
        let journal = store.journal.withLock { $0 }
        let exited = try #require(journal.firstIndex(of: "hook exited"))
        let written = try #require(journal.firstIndex(of: "outcome written"))
        #expect(journal[exited..<written].contains("renew"), "\(journal)")
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
    }

    /// One claim of a pass is refused by the log (the others are recorded): the recorded ones must run.
    final class OneClaimRefusedStore: ForwardingDeliveryStore, @unchecked Sendable {
        let refused = Mutex<Int64?>(nil)

        override func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim? {
            let refuse = refused.withLock { first in
                defer { first = first ?? id }
                return first == nil  // the first claim asked for, once
            }
            if refuse { throw EventLogError(.unavailable, "the log refused this one") }
            return try await base.claimDelivery(id: id, now: now)
        }
    }

    @Test func whatAPassClaimedRunsEvenWhenAnotherClaimOfThePassFails() async throws {
        let (dir, clock, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        try await ingestSigned(log, clock: clock, order: "2084")
        let store = OneClaimRefusedStore(log)
        let runner = RecordingHookRunner { _ in HookResult(outcome: .delivered, exitCode: 0) }
        let dispatcher = testDispatcher(log, store: store, runner: runner, clock: clock)
        await #expect(throws: EventLogError.self) { try await dispatcher.dispatchDue() }
        // The claimed one ran and was recorded; none is left running with nobody to run it.
        #expect(runner.all.count == 1)
        #expect(try await log.deliveries(state: "delivered", hook: nil, limit: 5).count == 1)
        #expect(try await log.deliveries(state: "running", hook: nil, limit: 5).isEmpty)
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(runner.all.count == 2)
    }

    @Test func theSQLiteLogNeverAsksForRenewals() async throws {
        let (dir, _, log) = try await logWithOneDueDelivery()
        defer { withExtendedLifetime(dir) { log.close() } }
        #expect(log.leaseRenewal == nil)
    }
}
