import Logging
import Synchronization

/// Whether Payop accepts the merchant's JWT, as last seen; `/readyz` reports it.
public final class PayopAccess: Sendable {
    private let problem = Mutex<String?>(nil)
    public init() {}
    public var currentProblem: String? { problem.withLock { $0 } }

    /// Records the latest finding; true when it changed (so it is logged once per change).
    func update(_ newProblem: String?) -> Bool {
        problem.withLock { current in
            defer { current = newProblem }
            return current != newProblem
        }
    }
}

/// What the verifier reports; the daemon's Prometheus metrics in production.
public protocol VerificationMetrics: Sendable {
    func verification(outcome: String, latencyMilliseconds: Int64?)
    func payopError(code: String)
    /// One request to Payop's API: about one entity (`lookup`) or a batch of checkouts (`filter`),
    /// asked as the IPN arrived (`early`) or when its check was due.
    func payopRequest(endpoint: String, early: Bool)
}

/// Asks Payop about every event whose question is due: fresh IPNs, copies of rejected ones,
/// contradicted claims within Payop's retry window, and verified statuses that can still change
/// (the reconciler's re-checks). Payop's answer is the truth; `EventVerification` decides what it
/// means and the log records it. Network trouble is never an answer: such events wait and are asked
/// again with backoff, and are never delivered unverified.
public final class Verifier: Sendable {
    private let store: any VerificationStore
    private let payop: any PayopAPI
    private let policy: Mutex<VerificationPolicy>
    private let clock: any WallClock
    private let logger: Logger
    public let access: PayopAccess
    private let metrics: (any VerificationMetrics)?
    /// Told of events that became verified (the dispatcher starts their deliveries).
    private let onVerified: @Sendable ([VerifiedEvent]) -> Void
    /// Questions to Payop in flight at once.
    static let concurrency = 8
    /// Checkout ids per `/v1/transactions/filter` question when several are due together.
    static let filterBatch = 20
    /// Questions asked as soon as an IPN is parsed, while its receipt commits (entity key -> the answer
    /// to come), so that the question is not asked only after the commit.
    private let early = Mutex<[String: EarlyAnswer]>([:])
    private let asksEarly: Bool
    private struct EarlyAnswer {
        let askedAt: Int64
        let answer: Task<PayopAnswer, Never>
    }
    /// An early answer is used for a question due within this long of asking it, else asked again.
    static let earlyFreshnessMilliseconds: Int64 = 2_000
    /// Early questions waiting to be used at most (IPN copies of decided events never use theirs).
    static let earlyLimit = 256
    /// Early questions on their way to Payop at once, besides the verifier's own.
    static let earlyConcurrency = concurrency
    private let earlyInFlight = Atomic<Int>(0)
    /// The last pass found a full batch due: early answers would be stale before a pass reached them,
    /// so none are asked until the verifier has caught up.
    private let behind = Atomic<Bool>(false)

    public init(
        store: any VerificationStore, payop: any PayopAPI, policy: VerificationPolicy,
        clock: any WallClock = SystemWallClock(), access: PayopAccess = PayopAccess(), logger: Logger,
        metrics: (any VerificationMetrics)? = nil, asksEarly: Bool = false,
        onVerified: @escaping @Sendable ([VerifiedEvent]) -> Void = { _ in }
    ) {
        self.asksEarly = asksEarly
        self.store = store
        self.payop = payop
        self.policy = Mutex(policy)
        self.clock = clock
        self.access = access
        self.logger = logger
        self.metrics = metrics
        self.onVerified = onVerified
    }

    public func reload(_ newPolicy: VerificationPolicy) { policy.withLock { $0 = newPolicy } }

    /// Asks about what is due now, at most one question per entity (so answers apply in the order
    /// Payop gave them), and records every answer. Returns how many events were asked about; throws
    /// when an answer could not be recorded (the event stays due, and the caller backs off).
    @discardableResult
    public func verifyDue(batch: Int = 64) async throws(EventLogError) -> Int {
        // Without a JWT there is nobody to ask: events wait, untouched, until a reload brings one.
        if let reason = payop.unusableReason {
            let waiting = try await store.nextCheckDue() != nil
            noteAccess(waiting ? PayopError(.unauthorized, reason) : nil)
            return 0
        }
        let now = clock.nowMilliseconds()
        var entities = Set<String>()
        let found = try await store.dueChecks(now: now, limit: batch)
        behind.store(found.count >= batch, ordering: .relaxed)
        let due = found.filter { entities.insert($0.entityKey).inserted }
        let policy = policy.withLock { $0 }
        let checkouts = due.filter { $0.kind == .checkout }
        var questions: [[DueCheck]] =
            checkouts.count > 1
            ? stride(from: 0, to: checkouts.count, by: Self.filterBatch).map {
                Array(checkouts[$0..<min($0 + Self.filterBatch, checkouts.count)])
            }
            : checkouts.map { [$0] }
        questions += due.filter { $0.kind != .checkout }.map { [$0] }
        // One question (an IPN at a time, the usual case) is asked on this task: a child task would cost
        // a hop between threads on the way from Payop's answer to the hook.
        if questions.count == 1, let failure = await ask(questions[0], policy: policy) { throw failure }
        guard questions.count > 1 else { return due.count }
        let failure = await withTaskGroup(of: EventLogError?.self) { group in
            var running = 0
            var failure: EventLogError?
            for question in questions {
                if running == Self.concurrency, let result = await group.next() {
                    failure = failure ?? result
                    running -= 1
                }
                group.addTask { await self.ask(question, policy: policy) }
                running += 1
            }
            for await result in group { failure = failure ?? result }
            return failure
        }
        if let failure { throw failure }
        return due.count
    }

    /// One question to Payop (one entity, or a batch of checkouts), then its answers recorded together
    /// (each in its own transaction, one entity each, sharing a group commit on SQLite).
    private func ask(_ checks: [DueCheck], policy: VerificationPolicy) async -> EventLogError? {
        let answers = await answers(for: checks)
        if checks.count == 1 { return await record(answers[0], to: checks[0], policy: policy) }
        return await withTaskGroup(of: EventLogError?.self) { group in
            for (check, answer) in zip(checks, answers) {
                group.addTask { await self.record(answer, to: check, policy: policy) }
            }
            var failure: EventLogError?
            for await error in group { failure = failure ?? error }
            return failure
        }
    }

    private func record(_ answer: PayopAnswer, to check: DueCheck, policy: VerificationPolicy) async -> EventLogError? {
        do {
            let applied = try await store.applyAnswer(answer, to: check, now: clock.nowMilliseconds(), policy: policy)
            report(applied, check)
            if !applied.verified.isEmpty { onVerified(applied.verified) }
            return nil
        } catch {
            logger.error(
                "verification not recorded; asking again once the event log works",
                metadata: ["event.id": "\(check.eventID)", "error": "\(error)"])
            return error
        }
    }

    /// Asks Payop about an IPN's entity now, while its receipt is being made durable: the verifier's
    /// question about it then takes this answer (asked after the IPN arrived, so no staler than asking
    /// a millisecond later) instead of asking only once the commit is done. Only where one daemon owns
    /// the log (a shared log's questions are claimed first, and answered only after the claim).
    ///
    /// Bounded: at most `earlyConcurrency` on their way and `earlyLimit` waiting, none while the
    /// verifier is behind (they would be stale by the time it got to them, and asked twice); a newer IPN
    /// about the same entity replaces the older one's question, so its check gets an answer asked after it.
    public func askEarly(_ kind: IPNKind, entityID: String) {
        guard asksEarly, payop.unusableReason == nil, !behind.load(ordering: .relaxed) else { return }
        let key = DueCheck.entityKey(kind, entityID)
        let now = clock.nowMilliseconds()
        early.withLock { pending in
            if pending.count >= Self.earlyLimit {
                pending = pending.filter { entry in
                    let fresh = now - entry.value.askedAt < Self.earlyFreshnessMilliseconds
                    if !fresh { entry.value.answer.cancel() }
                    return fresh
                }
            }
            // Checked under the lock every increment takes: the bound is exact across event loops.
            guard earlyInFlight.load(ordering: .relaxed) < Self.earlyConcurrency,
                pending[key] != nil || pending.count < Self.earlyLimit
            else { return }
            pending[key]?.answer.cancel()
            earlyInFlight.add(1, ordering: .relaxed)
            pending[key] = EarlyAnswer(
                askedAt: now,
                answer: Task {
                    defer { earlyInFlight.subtract(1, ordering: .relaxed) }
                    return await self.askPayop([DueCheck.about(kind, entityID)], early: true)[0]
                })
        }
    }

    /// Early questions not yet taken by a due check, and those of them still on their way to Payop.
    var earlyQuestions: Int { early.withLock { $0.count } }
    var earlyQuestionsInFlight: Int { earlyInFlight.load(ordering: .relaxed) }

    /// The early answer for `check`, if one was asked recently enough.
    private func earlyAnswer(for check: DueCheck) -> Task<PayopAnswer, Never>? {
        guard asksEarly, let taken = early.withLock({ $0.removeValue(forKey: check.entityKey) }) else { return nil }
        return clock.nowMilliseconds() - taken.askedAt < Self.earlyFreshnessMilliseconds ? taken.answer : nil
    }

    private func answers(for checks: [DueCheck]) async -> [PayopAnswer] {
        guard asksEarly else { return await askPayop(checks) }
        var answers = [PayopAnswer?](repeating: nil, count: checks.count)
        for (index, check) in checks.enumerated() {
            if let answer = earlyAnswer(for: check) { answers[index] = await answer.value }
        }
        let unanswered = checks.indices.filter { answers[$0] == nil }
        for (index, answer) in zip(unanswered, await askPayop(unanswered.map { checks[$0] })) { answers[index] = answer }
        return answers.map { $0 ?? .notFound }
    }

    /// Payop's answers about `checks` (one entity, or a batch of checkouts), in their order; a failure
    /// to get any is an answer too (`unanswered`).
    private func askPayop(_ checks: [DueCheck], early: Bool = false) async -> [PayopAnswer] {
        guard !checks.isEmpty else { return [] }
        metrics?.payopRequest(endpoint: checks.count == 1 ? "lookup" : "filter", early: early)
        do {
            if checks.count == 1, let check = checks.first {
                let record = try await payop.lookup(check.kind, id: check.entityID)
                noteAccess(nil)
                return [record.map(PayopAnswer.record) ?? .notFound]
            }
            let records = try await payop.lookupTransactions(ids: checks.map(\.entityID))
            noteAccess(nil)
            let byID = Dictionary(records.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
            var answers: [PayopAnswer] = []
            for check in checks {
                if let record = byID[check.entityID] {
                    answers.append(.record(record))
                } else {
                    // Absent from the list is not proof: the filter endpoint may page or lag. Ask alone.
                    answers += await askPayop([check])
                }
            }
            return answers
        } catch {
            // An early question replaced by a newer one is cancelled: not Payop's error.
            if !Task.isCancelled {
                noteAccess(error)
                metrics?.payopError(code: error.code.rawValue)
            }
            return checks.map { _ in .unanswered(code: error.code.rawValue, detail: error.description) }
        }
    }

    /// Whether a freshly stored IPN gives the verifier anything to do. Not when it cannot ask Payop (no
    /// JWT) and has already reported that events wait for one: waking it for every commit would only read
    /// the schedule again. The reload that brings a JWT wakes it.
    public var wantsFreshIPNs: Bool { payop.unusableReason == nil || access.currentProblem == nil }

    public func nextDue() async throws(EventLogError) -> Int64? {
        if payop.unusableReason != nil { return nil }
        return try await store.nextCheckDue()
    }

    private func noteAccess(_ error: PayopError?) {
        let problem = error?.code == .unauthorized ? error?.description : nil
        guard error == nil || error?.code == .unauthorized, access.update(problem) else { return }
        if let problem {
            logger.error("Payop refuses the JWT: events wait until it is fixed", metadata: ["error": "\(problem)"])
        } else {
            logger.notice("Payop accepts the JWT again")
        }
    }

    private func report(_ applied: AppliedAnswer, _ check: DueCheck) {
        var metadata: Logger.Metadata = [
            "event.id": "\(check.eventID)", "entity.id": "\(check.entityID)", "outcome": "\(applied.outcome)",
        ]
        if let detail = applied.detail { metadata["detail"] = "\(detail)" }
        switch applied.outcome {
        case "verified":
            logger.info("event verified", metadata: metadata)
        case "rejected":
            logger.warning("event rejected", metadata: metadata)
        case "unchanged":
            logger.debug("re-check: Payop reports the same status", metadata: metadata)
        case "changed":
            logger.info("re-check: Payop reports a new status", metadata: metadata)
        default:
            logger.notice("verification deferred", metadata: metadata)
        }
        for verified in applied.verified where verified.eventID != check.eventID {
            logger.info(
                "Payop's own status recorded as a verified event",
                metadata: ["event.id": "\(verified.eventID)", "event.type": "\(verified.type)"])
        }
        guard let metrics else { return }
        let now = clock.nowMilliseconds()
        for verified in applied.verified {
            metrics.verification(outcome: "verified", latencyMilliseconds: now - verified.receivedAt)
        }
        if applied.outcome != "verified" {
            metrics.verification(outcome: applied.state?.reason?.rawValue ?? applied.outcome, latencyMilliseconds: nil)
        }
    }
}
