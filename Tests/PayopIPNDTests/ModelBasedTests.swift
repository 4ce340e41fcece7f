import Foundation
import GRDB
import PayopSimulator
import Synchronization
import Testing

@testable import PayopIPND

/// Payop's API answered by the simulator in-process (its answers parsed as the HTTP client parses
/// them), recording every status it reports: what Payop "confirmed".
final class InProcessPayop: PayopAPI {
    let simulator: SimulatedPayop
    let reported = Mutex<Set<String>>([])

    init(_ simulator: SimulatedPayop) { self.simulator = simulator }

    func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
        let (path, query): (String, [String: String]) =
            switch kind {
            case .checkout: ("/v2/transactions/\(id)", [:])
            case .refund: ("/v1/refunds/user-refunds", ["query[identifier]": id])
            case .withdrawal: ("/v1/withdrawals/user-withdrawals", ["query[identifier]": id])
            }
        let (status, body) = await simulator.answer(path: path, query: query, authorization: "Bearer \(simulator.jwt)")
        if status == 404 || status == 422 { return nil }
        guard status == 200 else { throw PayopError(.unavailable, "simulated failure", httpStatus: status) }
        let record =
            kind == .checkout
            ? try PayopAnswers.single(body, kind: kind, id: id)
            : try PayopAnswers.list(body, kind: kind).first { $0.id == id }
        if let record { reported.withLock { _ = $0.insert("\(kind.rawValue)/\(id)/\(record.status.dedupeKey)") } }
        return record
    }

    func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] {
        let (status, body) = await simulator.answer(
            path: "/v1/transactions/filter", query: ["query[identifiers]": ids.joined(separator: ",")],
            authorization: "Bearer \(simulator.jwt)")
        guard status == 200 else { throw PayopError(.unavailable, "simulated failure", httpStatus: status) }
        let records = try PayopAnswers.list(body, kind: .checkout)
        reported.withLock { set in
            for record in records { set.insert("checkout/\(record.id)/\(record.status.dedupeKey)") }
        }
        return records
    }
}

/// One random scenario against the real components: the SQLite log on disk, the verifier asking the
/// simulator, the dispatcher running a recording hook; Payop moving entities through their statuses
/// and posting IPNs late, repeated and out of order; forged copies; Payop's API lagging and failing;
/// hooks failing; the log locked; crashes mid-run and restarts. Time is the test clock's.
final class Scenario {
    let seed: UInt64
    var random: SeededRandom
    let dir: TemporaryDirectory
    let clock = TestClock()
    let simulator = SimulatedPayop(jwt: "model-jwt")
    let payop: InProcessPayop
    let runner: RecordingHookRunner
    let hookRandom: Shared<SeededRandom>
    /// Every run's start and end as the hook saw them, in the order they happened: the hook's own view
    /// of the order it was given events in, and of how many runs overlapped (each run yields once, so
    /// runs the dispatcher lets overlap do).
    let journal = Shared<[HookJournalEntry]>([])
    /// Runs of the hook allowed at once (`delivery.per_hook_concurrency`).
    var perHookLimit: Int { [1, 2, 16][Int((seed / 4) % 3)] }
    var log: SQLiteEventLog
    var verifier: Verifier!
    var dispatcher: Dispatcher!
    /// The other writer that locks the log (a backup, say); the stages reach it through this box, so
    /// locking does not replace them (a replaced dispatcher would drop the runs the log claimed for it).
    let lockerBox = Shared<DatabaseQueue?>(nil)
    var locker: DatabaseQueue? { lockerBox.withLock { $0 } }
    let locked = Shared(false)
    /// IPN bodies Payop still has to get a 200 for, and copies it may send again.
    var outbox: [Data] = []
    /// Per entity: its status path and how far Payop has come along it.
    var entities: [(entity: SimulatedPayop.Entity, path: [Int], at: Int)] = []
    /// Event ids whose delivery was cut off by a crash: at least once, not exactly once.
    var crashed: Set<String> = []
    var trace: [String] = []

    static let policy = VerificationPolicy(
        backoff: Backoff(initialSeconds: 1, maxSeconds: 3_600, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 600_000,
        reconcileIntervalMilliseconds: 3_600_000)

    init(seed: UInt64) throws {
        self.seed = seed
        random = SeededRandom(seed: seed)
        dir = try TemporaryDirectory(preferMemory: true)
        payop = InProcessPayop(simulator)
        hookRandom = Shared(SeededRandom(seed: seed ^ 0xA5A5))
        let hookRandom = hookRandom
        let journal = journal
        runner = RecordingHookRunner { invocation in
            journal.withLock { $0.append(.started(invocation.deliveryID)) }
            await Task.yield()
            let fails = hookRandom.withLock { $0.chance(0.2) }
            journal.withLock { $0.append(.ended(invocation.deliveryID, delivered: !fails)) }
            return fails
                ? HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 1, error: "exited with status 1")
                : HookResult(outcome: .delivered, exitCode: 0)
        }
        log = try Self.openLog(dir)
        makeStages()
    }

    static func openLog(_ dir: TemporaryDirectory) throws -> SQLiteEventLog {
        let log = try SQLiteEventLog.open(
            path: dir.file("events.sqlite3"), mode: .daemon, lockDeadlineSeconds: 0.01)
        log.setHooks([HookConfig(name: "fulfil", target: .command(["/bin/true"]), events: ["*"], timeoutSeconds: 10, maxAttempts: 60)])
        return log
    }

    func makeStages() {
        // Half the scenarios ask Payop early (while the receipt commits), as the daemon does on one machine.
        verifier = Verifier(
            store: log, payop: payop, policy: Self.policy, clock: clock, logger: quietLogger, asksEarly: seed % 2 == 0)
        let locked = locked
        let lockerBox = lockerBox
        dispatcher = Dispatcher(
            store: log, runner: runner, hooks: { [log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 60, jitter: Backoff.noJitter), killGraceSeconds: 0.1,
                // A third of the scenarios let one run at a time, a third two: runs wait for slots, and a
                // run that ends hands its slot on (when the log claims early, below).
                shutdownGraceSeconds: 1, perHookConcurrency: perHookLimit),
            clock: clock, logger: quietLogger,
            pause: { _ in
                // The other writer finishes (a backup ends) while the dispatcher waits to record an outcome.
                if locked.withLock({ $0 }) {
                    try? await lockerBox.withLock({ $0 })?.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
                    locked.withLock { $0 = false }
                }
            })
        // Half the scenarios (independently of the above) let the log claim runs in the commit that makes
        // them due, as the daemon does on one machine. Half of those start them as the daemon does, on the
        // hook reapers' launchers as soon as the claims are on disk (each step then waits for those runs to
        // end: `settleLaunches`); the others at the dispatcher's next pass.
        if (seed / 2) % 2 == 0 {
            if launches {
                let launchers = ProcessReaper.all.map(RunLauncher.init)
                _ = dispatcher.acceptEarlyStarts(true, launchers: launchers)
                let dispatcher = dispatcher!
                launcherTasks = launchers.map { launcher in
                    Task(executorPreference: launcher.reaper) { await dispatcher.launchRuns(from: launcher) }
                }
            } else {
                _ = dispatcher.acceptEarlyStarts(true)
            }
            log.startDeliveriesEarly(with: dispatcher)
        }
    }

    /// Runs claimed early start on launchers, as in the daemon (half the scenarios that claim early).
    var launches: Bool { (seed / 2) % 2 == 0 && (seed / 16) % 2 == 0 }
    var launcherTasks: [Task<Void, Never>] = []

    /// Waits until the runs launchers started have ended and their outcomes are written: a step's
    /// effects are then all in the log, as after a dispatcher's pass.
    func settleLaunches() async {
        guard launches else { return }
        for _ in 0..<10_000 where dispatcher.running > 0 { try? await Task.sleep(for: .milliseconds(1)) }
        if dispatcher.running > 0 { Issue.record("seed \(seed): runs started by launchers did not end") }
    }

    /// The dispatcher stops starting runs (a crash, or the scenario's end): its launchers' tasks end.
    func stopLaunches() async {
        guard launches else { return }
        #expect(dispatcher.acceptEarlyStarts(false).isEmpty, "seed \(seed): claims left in a launcher")
        for task in launcherTasks { await task.value }
        launcherTasks = []
    }

    // MARK: - Payop's side

    func addEntity() {
        let n = entities.count
        if random.chance(0.3) {
            let refund = simulator.create(
                .refund, id: "R\(n)", state: 1, amount: random.pick(["1.00", "25.50", "100"]), currency: "EUR",
                sourceTransactionID: "S\(n)")
            entities.append((refund, random.pick([[1, 2], [2], [1, 3]]), -1))
        } else {
            let checkout = simulator.create(.checkout, id: "T\(n)", state: 1, amount: "10.00", orderID: "O\(n)")
            entities.append((checkout, random.pick([[4, 2], [2], [4, 3, 2], [9, 2], [4, 15], [3, 2], [1, 4, 2]]), -1))
        }
    }

    /// Payop moves an entity to its next status and starts posting its IPN; its API may lag behind.
    func advance(_ index: Int) {
        var item = entities[index]
        guard item.at + 1 < item.path.count else { return }
        let previous = item.at >= 0 ? item.path[item.at] : nil
        item.at += 1
        let state = item.path[item.at]
        item.entity = simulator.setState(item.entity.kind, id: item.entity.id, state: state)!
        entities[index] = item
        if let previous, random.chance(0.3) {
            simulator.updateFaults { $0.reportState[item.entity.id] = previous }  // the API lags
            trace.append("lag \(item.entity.id) at \(previous)")
        } else {
            simulator.updateFaults { $0.reportState[item.entity.id] = nil }
        }
        outbox.append(SimulatedPayop.ipnBody(for: item.entity))
        trace.append("payop \(item.entity.id) -> \(state)")
    }

    func forgedCopy() {
        guard let item = entities.randomElement(using: &random) else { return }
        var forged = item.entity
        if forged.kind == .refund {
            if random.chance(0.5) { forged.amount = "1000.00" } else { forged.sourceTransactionID = "T-victim" }
        } else {
            forged.orderID = "forged"
        }
        let claimed = random.pick(item.path)
        outbox.append(SimulatedPayop.ipnBody(for: forged, claimingState: claimed))
        trace.append("forged \(forged.id) claims \(claimed)")
    }

    // MARK: - Our side

    /// Posts one IPN from Payop's outbox as the listener would; Payop keeps it until it gets a 200.
    func deliverIPN() async {
        guard !outbox.isEmpty else { return }
        let index = Int.random(in: 0..<outbox.count, using: &random)
        let body = Array(outbox[index])
        guard case .success(let notification) = NotificationParser.parse(body) else {
            outbox.remove(at: index)
            return
        }
        let ipn = IncomingIPN(
            receivedAt: clock.nowMilliseconds(), sourceIP: "3.125.109.58", path: "/payop/ipn", body: body,
            notification: notification, verifiedBySignature: false)
        verifier.askEarly(notification.kind, entityID: notification.entityID)
        if (try? await log.ingest(ipn)) != nil, !random.chance(0.3) {
            outbox.remove(at: index)  // 200: Payop stops sending (or sends once more)
        }
    }

    func lock() throws {
        guard !locked.withLock({ $0 }) else { return }
        var configuration = Configuration()
        configuration.allowsUnsafeTransactions = true
        configuration.busyMode = .timeout(1)
        let queue = try locker ?? DatabaseQueue(path: dir.file("events.sqlite3"), configuration: configuration)
        lockerBox.withLock { $0 = queue }
        try queue.writeWithoutTransaction { db in try db.execute(sql: "BEGIN IMMEDIATE") }
        locked.withLock { $0 = true }
        trace.append("lock")
    }

    func unlock() throws {
        guard locked.withLock({ $0 }) else { return }
        try locker?.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
        locked.withLock { $0 = false }
        trace.append("unlock")
    }

    /// kill -9 while a hook runs (it may or may not have run), then a restart.
    func crashAndRestart() async throws {
        try unlock()
        if let due = try await log.runnableDeliveries(now: clock.nowMilliseconds(), hooks: ["fulfil"], limit: 1).first,
            let claim = try await log.claimDelivery(id: due.id, now: clock.nowMilliseconds())
        {
            crashed.insert(claim.event.id)
            if random.chance(0.5) {
                _ = await runner.run(
                    HookInvocation(
                        deliveryID: claim.delivery.id, hook: log.hooks[0], event: claim.event, body: [],
                        attempt: claim.attempt, killGraceSeconds: 0))
            }
        }
        // Runs the log claimed in the commit that made them due, not yet started: the crash cuts them off
        // too (their attempt counts, as for any run the daemon did not see end).
        let running = try await log.deliveries(state: "running", hook: nil, limit: 100_000)
        for delivery in running { crashed.insert(delivery.eventID) }
        await stopLaunches()
        log.close()
        log = try Self.openLog(dir)
        try await log.recoverInterruptedDeliveries(now: clock.nowMilliseconds())
        // Whatever the hook saw of them, the log runs them again: pending, not delivered.
        journal.withLock { journal in journal.append(contentsOf: running.map { .recovered($0.id) }) }
        makeStages()
        trace.append("crash+restart")
    }

    func step() async throws {
        clock.advance(milliseconds: Int64.random(in: 0...120_000, using: &random))
        switch Int.random(in: 0..<20, using: &random) {
        case 0...2: advance(Int.random(in: 0..<entities.count, using: &random))
        case 3...7: await deliverIPN()
        case 8: forgedCopy()
        case 9: simulator.updateFaults { $0.failNext = Int.random(in: 1...3, using: &random) }
        case 10...12: _ = try? await verifier.verifyDue()
        case 13...15: _ = try? await dispatcher.dispatchDue()
        case 16: if random.chance(0.5) { try lock() } else { try unlock() }
        case 17: if random.chance(0.3) { try await crashAndRestart() }
        default: clock.advance(milliseconds: Int64.random(in: 0...3_600_000, using: &random))
        }
        await settleLaunches()
    }

    /// Payop finishes every timeline and delivers every IPN; faults end; the daemon works until nothing
    /// is due for a day.
    func settle() async throws {
        try unlock()
        for index in entities.indices { while entities[index].at + 1 < entities[index].path.count { advance(index) } }
        simulator.setFaults(SimulatedPayop.Faults())
        while !outbox.isEmpty { await deliverIPN() }
        await settleLaunches()
        let end = clock.nowMilliseconds() + 26 * 3_600_000
        for _ in 0..<500 {
            try await verifier.verifyDue()
            await settleLaunches()
            try await dispatcher.dispatchDue()
            let next = [try await verifier.nextDue(), try await dispatcher.nextDue()].compactMap { $0 }.min()
            guard let next, next <= end else { return }
            if next > clock.nowMilliseconds() { clock.advance(milliseconds: next - clock.nowMilliseconds()) }
        }
        Issue.record("seed \(seed): did not settle in 500 rounds")
    }

    // MARK: - Invariants

    func check() async throws {
        let context = "seed \(seed) (replay: PAYOP_IPND_SEED=\(seed) swift test --filter ModelBasedTests)\n"
            + trace.joined(separator: "; ")
        let runs = runner.all
        let events = try await log.events(.init(limit: 100_000))
        let confirmed = payop.reported.withLock { $0 }
        let byID = Dictionary(events.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        for item in entities {
            let kind = item.entity.kind.rawValue
            let entityRuns = runs.filter { byID[$0.eventID]?.entityID == item.entity.id && byID[$0.eventID]?.kind == kind }
            let statuses = entityRuns.map { byID[$0.eventID]!.status }
            // Nothing reaches a hook that Payop did not confirm, and confirmed facts only.
            for run in entityRuns {
                let event = byID[run.eventID]!
                #expect(confirmed.contains("\(kind)/\(item.entity.id)/\(event.status)"), "unconfirmed \(event.type): \(context)")
                if item.entity.kind == .refund {
                    #expect(run.amount.map { Amount.same($0, item.entity.amount) } == true, "amount \(run): \(context)")
                    #expect(run.transactionID == item.entity.sourceTransactionID, "transaction \(run): \(context)")
                }
                // The IPN body the hook gets is a copy Payop confirmed (or none): not a forged one.
                if let body = run.ipn, case .success(let copy) = NotificationParser.parse(body) {
                    switch item.entity.kind {
                    case .refund:
                        #expect(copy.amount.map { Amount.same($0, item.entity.amount) } ?? true, "ipn amount \(run): \(context)")
                        #expect(copy.transactionID == item.entity.sourceTransactionID, "ipn transaction \(run): \(context)")
                    default:
                        #expect(copy.orderID == item.entity.orderID, "ipn order \(run): \(context)")
                    }
                }
            }
            // Every status Payop ends at, and every one its API reported, reaches the hook.
            let finalStatus = PaymentStatus.status(
                kind: IPNKind(rawValue: kind)!, state: item.path[item.path.count - 1], errorMessage: nil
            ).dedupeKey
            #expect(statuses.contains(finalStatus), "final \(finalStatus) of \(item.entity.id) missing: \(context)")
            // Every status Payop's API reported, once the log recorded the answer (an answer the log
            // could not take is asked again, and Payop may have moved on meanwhile). A status Payop
            // confirmed only for a copy with forged fields waits for the genuine copy; if Payop moves on
            // first, the later status supersedes it.
            for event in events where event.kind == kind && event.entityID == item.entity.id {
                if event.state == "verified" {
                    #expect(statuses.contains(event.status), "verified \(event.type) never delivered: \(context)")
                }
                let attempts = try await log.event(id: event.id)?.verificationAttempts ?? []
                let reports = attempts.filter { $0.outcome != "rejected" || $0.detail?.hasPrefix("status_mismatch") == true }
                for state in Set(reports.compactMap(\.payopState)) {
                    let status = PaymentStatus.status(kind: IPNKind(rawValue: kind)!, state: state, errorMessage: nil)
                    #expect(
                        statuses.contains(status.dedupeKey),
                        "reported \(kind)/\(item.entity.id)/\(status.dedupeKey) never delivered: \(context)")
                }
            }
            // In order: the first delivery of each status follows Payop's path.
            var firsts: [String] = []
            for status in statuses where !firsts.contains(status) { firsts.append(status) }
            let path = item.path.map {
                PaymentStatus.status(kind: IPNKind(rawValue: kind)!, state: $0, errorMessage: nil).dedupeKey
            }
            let positions = firsts.compactMap { path.firstIndex(of: $0) }
            #expect(positions == positions.sorted(), "out of order \(firsts) on \(path): \(context)")
        }
        // Exactly once unless a crash cut a run off (then at least once).
        let delivered = try await log.deliveries(state: nil, hook: nil, limit: 100_000)
        for delivery in delivered {
            let successes = runs.filter { $0.deliveryID == delivery.id }.count
            #expect(delivery.state == .delivered, "delivery \(delivery.id) is \(delivery.state): \(context)")
            #expect(delivery.state != .running, "\(context)")
            if !crashed.contains(delivery.eventID) {
                #expect(successes == delivery.attempts, "delivery \(delivery.id) ran \(successes)x for \(delivery.attempts) attempts: \(context)")
            }
        }
        // In order per (hook, kind, entity): a run starts only after every earlier delivery of its line
        // has had a run that ended delivered, and not one a crash cut off (the log runs that again);
        // never beside one, never ahead of one.
        let line = { (delivery: Delivery) in
            "\(delivery.hook)/\(byID[delivery.eventID]?.kind ?? "?")/\(byID[delivery.eventID]?.entityID ?? "?")"
        }
        let lines = Dictionary(grouping: delivered, by: line)
        let deliveryByID = Dictionary(delivered.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        var deliveredRuns: Set<Int64> = []
        for entry in journal.withLock({ $0 }) {
            let started: Int64
            switch entry {
            case .ended(let id, delivered: true): deliveredRuns.insert(id); continue
            case .ended: continue
            case .recovered(let id): deliveredRuns.remove(id); continue
            case .started(let id): started = id
            }
            guard let delivery = deliveryByID[started] else {
                Issue.record("a run of delivery \(started), which the log does not hold: \(context)")
                continue
            }
            let ahead = (lines[line(delivery)] ?? []).filter { $0.id < delivery.id && !deliveredRuns.contains($0.id) }
            #expect(
                ahead.isEmpty,
                "delivery \(delivery.id) started before \(ahead.map(\.id)) of \(line(delivery)) was delivered: \(context)")
        }
        // Every run slot is free again: none kept by a claim that was not started, or not committed.
        #expect(dispatcher.running == 0, "\(context)")
        // Never more runs of the hook at once than it allows.
        var running = 0
        var most = 0
        for entry in journal.withLock({ $0 }) {
            switch entry {
            case .started: running += 1
            case .ended: running -= 1
            case .recovered: continue
            }
            most = max(most, running)
        }
        #expect(most <= perHookLimit, "\(most) runs at once, \(perHookLimit) allowed: \(context)")
        // The daemon idles when nothing is due.
        let now = clock.nowMilliseconds()
        #expect((try await dispatcher.nextDue()).map { $0 > now } ?? true, "\(context)")
        #expect((try await verifier.nextDue()).map { $0 > now } ?? true, "\(context)")
    }

    func run(steps: Int) async throws {
        for _ in 0..<Int.random(in: 1...3, using: &random) { addEntity() }
        for _ in 0..<steps { try await step() }
        try await settle()
        try await check()
        await stopLaunches()
        log.close()
    }
}

@Suite struct ModelBasedTests {
    @Test(arguments: scenarioSeeds(count: 300, base: 90_000))
    func randomScenariosKeepThePromise(seed: UInt64) async throws {
        try await ExclusiveTiming.shared.run { try await Scenario(seed: seed).run(steps: 40) }
    }
}

/// One line of a scenario's hook journal: a run of a delivery started or ended, or a restart found
/// the delivery running and made it pending again.
enum HookJournalEntry: Sendable {
    case started(Int64)
    case ended(Int64, delivered: Bool)
    case recovered(Int64)
}

/// A value shared with closures the scenario hands out.
final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<T>(_ body: (inout Value) -> T) -> T { mutex.withLock { body(&$0) } }
}
