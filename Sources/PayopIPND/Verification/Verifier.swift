import Foundation
import Logging
import Synchronization

/// How verification retries and re-checks are timed (config `payop.*` and `reconcile.*`).
public struct VerificationPolicy: Sendable {
    public var backoff: Backoff
    /// How long Payop's "not found" is asked again before it is final (its API may lag its own IPN).
    public var notFoundRetryMilliseconds: Int64
    public var reconcileIntervalMilliseconds: Int64

    public init(backoff: Backoff, notFoundRetryMilliseconds: Int64, reconcileIntervalMilliseconds: Int64) {
        self.backoff = backoff
        self.notFoundRetryMilliseconds = notFoundRetryMilliseconds
        self.reconcileIntervalMilliseconds = reconcileIntervalMilliseconds
    }

    public init(_ config: DaemonConfig, jitter: @escaping @Sendable () -> Double = Backoff.randomJitter) {
        self.init(
            backoff: Backoff(
                initialSeconds: config.payop.retryInitialSeconds, maxSeconds: config.payop.retryMaxSeconds, jitter: jitter),
            notFoundRetryMilliseconds: Int64(config.payop.notFoundRetryMinutes * 60_000),
            reconcileIntervalMilliseconds: Int64(config.reconcile.intervalSeconds * 1000))
    }
}

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

/// Proves each V2 event against Payop's API: Payop's answer is the truth. Network trouble is never an
/// answer: such events wait and are asked again with backoff, and are never delivered unverified.
public final class Verifier: Sendable {
    private let log: SQLiteEventLog
    private let payop: any PayopAPI
    private let policy: Mutex<VerificationPolicy>
    private let clock: any WallClock
    private let logger: Logger
    public let access: PayopAccess
    /// Told of events that became verified (the dispatcher starts their deliveries).
    private let onVerified: @Sendable ([VerifiedEvent]) -> Void
    /// Fresh IPNs handed over by the listener, verified without first being looked up in the log.
    private let inbox = Mutex<[PendingVerification]>([])
    /// Events being verified now, so a pass over the log does not take them twice.
    private let inFlight = Mutex<Set<String>>([])
    /// Questions to Payop in flight at once.
    private let concurrency = 8
    private let metrics: DaemonMetrics?

    public init(
        log: SQLiteEventLog, payop: any PayopAPI, policy: VerificationPolicy, clock: any WallClock = SystemWallClock(),
        access: PayopAccess = PayopAccess(), logger: Logger, metrics: DaemonMetrics? = nil,
        onVerified: @escaping @Sendable ([VerifiedEvent]) -> Void = { _ in }
    ) {
        self.metrics = metrics
        self.log = log
        self.payop = payop
        self.policy = Mutex(policy)
        self.clock = clock
        self.access = access
        self.logger = logger
        self.onVerified = onVerified
    }

    public func reload(_ newPolicy: VerificationPolicy) { policy.withLock { $0 = newPolicy } }

    /// Hands over an event the listener just made durable, so it is verified at once. If the daemon
    /// stops first, the log still has it due, and it is verified after the restart.
    /// Past `inboxLimit` waiting hand-overs (Payop slow, IPNs flooding in), new ones are not kept: they
    /// are due in the log and found there, so memory stays bounded.
    public func submit(_ pending: PendingVerification) {
        inbox.withLock { inbox in
            if inbox.count < Self.inboxLimit { inbox.append(pending) }
        }
    }

    static let inboxLimit = 1024

    /// Verifies what was handed over and every event due now in the log; returns how many were asked
    /// about. A pass with handed-over events skips the log: retries are found on the next quiet pass.
    @discardableResult
    public func verifyDue(batch: Int = 64) async throws(EventLogError) -> Int {
        let now = clock.nowMilliseconds()
        // Without a JWT there is nobody to ask: events wait, untouched, until a reload brings one.
        // Reported (in /readyz too) only once an event is kept waiting by it.
        if let reason = payop.unusableReason {
            let handedOver = inbox.withLock { inbox in
                defer { inbox.removeAll() }
                return !inbox.isEmpty
            }
            var waiting = handedOver
            if !waiting { waiting = try await log.nextVerificationDue() != nil }
            noteAccess(waiting ? PayopError(.unauthorized, reason) : nil)
            return 0
        }
        var due = inbox.withLock { inbox in
            let taken = Array(inbox.prefix(batch))
            inbox.removeFirst(taken.count)
            return taken
        }
        if due.isEmpty {
            due = try await log.dueForVerification(now: now, limit: batch)
        }
        due = inFlight.withLock { running in
            let fresh = due.filter { !running.contains($0.eventID) }
            running.formUnion(fresh.map(\.eventID))
            return fresh
        }
        let policy = policy.withLock { $0 }
        await withTaskGroup(of: Void.self) { group in
            var running = 0
            for pending in due {
                if running == concurrency {
                    await group.next()
                    running -= 1
                }
                group.addTask { await self.verify(pending, policy: policy) }
                running += 1
            }
        }
        return due.count
    }

    private func verify(_ pending: PendingVerification, policy: VerificationPolicy) async {
        defer { inFlight.withLock { _ = $0.remove(pending.eventID) } }
        let outcome = await decide(pending, policy: policy)
        let now = clock.nowMilliseconds()
        do {
            let verified = try await log.applyVerification(
                outcome, to: pending, now: now, reconcileInterval: policy.reconcileIntervalMilliseconds)
            report(outcome, pending)
            record(outcome, pending, now: now)
            if !verified.isEmpty { onVerified(verified) }
        } catch {
            logger.error("verification not recorded", metadata: ["event.id": "\(pending.eventID)", "error": "\(error)"])
        }
    }

    func decide(_ pending: PendingVerification, policy: VerificationPolicy) async -> VerificationOutcome {
        let now = clock.nowMilliseconds()
        let retryAt = now + policy.backoff.delayMilliseconds(afterAttempt: pending.attempts + 1)
        let record: PayopRecord?
        do {
            record = try await payop.lookup(pending.kind, id: pending.entityID)
        } catch {
            noteAccess(error)
            return .retry(outcome: error.code.rawValue, detail: error.description, retryAt: retryAt)
        }
        noteAccess(nil)
        guard let record else {
            if now - pending.receivedAt < policy.notFoundRetryMilliseconds {
                return .retry(outcome: "not_found", detail: "Payop does not know it yet; asking again", retryAt: retryAt)
            }
            return .rejected(reason: "not_found", record: nil)
        }
        return Self.compare(pending, with: record)
    }

    /// The IPN against Payop's record: status first (by Payop's state), then order, amount, currency
    /// wherever both sides have them.
    static func compare(_ pending: PendingVerification, with record: PayopRecord) -> VerificationOutcome {
        guard record.status.dedupeKey == pending.status.dedupeKey else { return .statusMismatch(record) }
        if let mine = pending.orderID, let theirs = record.orderID, pending.kind == .checkout, mine != theirs {
            return .rejected(reason: "order_mismatch", record: record)
        }
        if let mine = pending.amount, let theirs = record.amount, !sameAmount(mine, theirs) {
            return .rejected(reason: "amount_mismatch", record: record)
        }
        if let mine = pending.currency, let theirs = record.currency, mine.uppercased() != theirs.uppercased() {
            return .rejected(reason: "currency_mismatch", record: record)
        }
        return .verified(record)
    }

    static func sameAmount(_ a: String, _ b: String) -> Bool {
        let posix = Locale(identifier: "en_US_POSIX")
        guard let x = Decimal(string: a, locale: posix), let y = Decimal(string: b, locale: posix) else { return a == b }
        return x == y
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

    private func report(_ outcome: VerificationOutcome, _ pending: PendingVerification) {
        let metadata: Logger.Metadata = ["event.id": "\(pending.eventID)", "entity.id": "\(pending.entityID)"]
        switch outcome {
        case .verified:
            logger.info("event verified", metadata: metadata)
        case .rejected(let reason, _):
            logger.warning("event rejected", metadata: metadata.merging(["reason": "\(reason)"]) { $1 })
        case .statusMismatch(let record):
            logger.warning(
                "event rejected: Payop reports another status",
                metadata: metadata.merging(["reason": "status_mismatch", "payop.status": "\(record.status.name)"]) { $1 })
        case .retry(let outcome, let detail, _):
            logger.notice("verification deferred", metadata: metadata.merging(["outcome": "\(outcome)", "detail": "\(detail)"]) { $1 })
        }
    }

    private func record(_ outcome: VerificationOutcome, _ pending: PendingVerification, now: Int64) {
        guard let metrics else { return }
        switch outcome {
        case .verified: metrics.verification(outcome: "verified", latencyMilliseconds: now - pending.receivedAt)
        case .rejected(let reason, _): metrics.verification(outcome: reason, latencyMilliseconds: nil)
        case .statusMismatch: metrics.verification(outcome: "status_mismatch", latencyMilliseconds: nil)
        case .retry(let outcome, _, _):
            metrics.verification(outcome: "deferred", latencyMilliseconds: nil)
            if outcome != "not_found" { metrics.payopError(code: outcome) }
        }
    }

    public func nextDue() async -> Int64? {
        if payop.unusableReason != nil { return nil }
        if inbox.withLock({ !$0.isEmpty }) { return clock.nowMilliseconds() }
        return try? await log.nextVerificationDue()
    }
}
