/// Why Payop's answer did not prove an event; stored as the raw value (`rejection_reason`).
public enum RejectionReason: String, Sendable, Equatable, CaseIterable {
    case notFound = "not_found"
    case statusMismatch = "status_mismatch"
    case orderMismatch = "order_mismatch"
    case amountMismatch = "amount_mismatch"
    case currencyMismatch = "currency_mismatch"
    case transactionMismatch = "transaction_mismatch"
    case invoiceMismatch = "invoice_mismatch"
}

/// An event's verification state; stored as `received`, `verified`, `rejected` plus the reason.
public enum VerificationState: Sendable, Equatable {
    case received
    case verified
    case rejected(RejectionReason)

    public var name: String {
        switch self {
        case .received: "received"
        case .verified: "verified"
        case .rejected: "rejected"
        }
    }

    public var reason: RejectionReason? {
        if case .rejected(let reason) = self { return reason }
        return nil
    }

    /// From the stored columns; nil for a row no version of the daemon writes.
    public init?(name: String, reason: String?) {
        switch name {
        case "received": self = .received
        case "verified": self = .verified
        case "rejected":
            guard let reason = reason.flatMap(RejectionReason.init(rawValue:)) else { return nil }
            self = .rejected(reason)
        default: return nil
        }
    }
}

/// What one copy of an IPN claimed besides its status; every copy is judged on its own.
public struct IPNClaim: Sendable, Equatable {
    /// The receipt that carried it: on verification it becomes the event's `ipn`.
    public var receiptID: Int64?
    public var orderID: String?
    public var amount: String?
    public var currency: String?
    public var invoiceID: String?
    /// Checkout: the transaction itself; refund: its source transaction.
    public var transactionID: String?

    public init(
        receiptID: Int64? = nil, orderID: String? = nil, amount: String? = nil, currency: String? = nil,
        invoiceID: String? = nil, transactionID: String? = nil
    ) {
        self.receiptID = receiptID
        self.orderID = orderID
        self.amount = amount
        self.currency = currency
        self.invoiceID = invoiceID
        self.transactionID = transactionID
    }
}

/// Payop's answer to one question about one entity.
public enum PayopAnswer: Sendable, Equatable {
    case record(PayopRecord)
    case notFound
    /// No answer worth acting on (network, 429, 5xx, 401, unreadable): `code` and `detail` are recorded.
    case unanswered(code: String, detail: String)
}

/// How questions to Payop are timed (config `payop.*` and `reconcile.*`).
public struct VerificationPolicy: Sendable {
    public var backoff: Backoff
    /// How long Payop's "not found" is asked again before it is final (its API may lag its own IPN).
    public var notFoundRetryMilliseconds: Int64
    /// How often a verified status that can still change is asked about again.
    public var reconcileIntervalMilliseconds: Int64
    /// How long a contradicted claim, or a verified failed checkout, keeps being asked about: Payop's
    /// own IPN retry window.
    public var watchMilliseconds: Int64

    public static let payopRetryWindowMilliseconds: Int64 = 24 * 3_600_000

    /// The configuration's defaults: retries from 1 s to 300 s, not found asked for 10 min, re-checks
    /// every 300 s.
    public static let defaults = VerificationPolicy(
        backoff: Backoff(initialSeconds: 1, maxSeconds: 300), notFoundRetryMilliseconds: 600_000,
        reconcileIntervalMilliseconds: 300_000)

    public init(
        backoff: Backoff, notFoundRetryMilliseconds: Int64, reconcileIntervalMilliseconds: Int64,
        watchMilliseconds: Int64 = VerificationPolicy.payopRetryWindowMilliseconds
    ) {
        self.backoff = backoff
        self.notFoundRetryMilliseconds = notFoundRetryMilliseconds
        self.reconcileIntervalMilliseconds = reconcileIntervalMilliseconds
        self.watchMilliseconds = watchMilliseconds
    }
}

/// The verification of one event as a value: its state and when Payop is asked next. Every change of
/// an event's verification goes through one of the `mutating` functions below, which do no I/O and
/// return what the owner must do; the event log persists the result in the same transaction.
///
/// Invariants (checked by `VerificationMachineTests` over seeded random input sequences):
/// - I1 `verified` is never left: no answer, however late or contradictory, un-verifies an event.
/// - I2 An event becomes verified only on an answer from Payop that reports its status (its own
///   question, or a question about another event of the same entity) or by a legacy signature at the
///   door; then `facts` carry Payop's values wherever Payop gave them.
/// - I3 A `received` event always has a next check: it is never forgotten.
/// - I4 A check is never scheduled in the past of the input that scheduled it, and a contradicted
///   claim is not asked about after its watch window (except once more per repeat of its IPN).
/// - I5 Legacy events are never asked about.
public struct EventVerification: Sendable, Equatable {
    public let kind: IPNKind
    public let status: PaymentStatus
    public let receivedAt: Int64
    public let legacy: Bool
    public private(set) var state: VerificationState
    /// Questions since the last settled answer; the backoff grows with it.
    public private(set) var attempts: Int
    /// When Payop is asked next; nil: not before another copy of the IPN arrives.
    public private(set) var nextCheckAt: Int64?
    /// A contradicted claim, or a verified failed checkout, is asked about until then.
    public private(set) var watchUntil: Int64?

    public init(
        kind: IPNKind, status: PaymentStatus, receivedAt: Int64, legacy: Bool, state: VerificationState, attempts: Int,
        nextCheckAt: Int64?, watchUntil: Int64?
    ) {
        self.kind = kind
        self.status = status
        self.receivedAt = receivedAt
        self.legacy = legacy
        self.state = state
        self.attempts = attempts
        self.nextCheckAt = nextCheckAt
        self.watchUntil = watchUntil
    }

    /// A V2 IPN's new event: asked about at once.
    public static func fresh(kind: IPNKind, status: PaymentStatus, receivedAt: Int64) -> EventVerification {
        EventVerification(
            kind: kind, status: status, receivedAt: receivedAt, legacy: false, state: .received, attempts: 0,
            nextCheckAt: receivedAt, watchUntil: nil)
    }

    /// A legacy V1 IPN, proven by its signature at the door: verified, never asked about.
    public static func signed(kind: IPNKind, status: PaymentStatus, receivedAt: Int64) -> EventVerification {
        EventVerification(
            kind: kind, status: status, receivedAt: receivedAt, legacy: true, state: .verified, attempts: 0,
            nextCheckAt: nil, watchUntil: nil)
    }

    /// A status Payop's API reported that the log did not have: verified as if its IPN had arrived.
    public static func reported(_ record: PayopRecord, now: Int64, policy: VerificationPolicy) -> (
        EventVerification, VerifiedFacts
    ) {
        var machine = EventVerification(
            kind: record.kind, status: record.status, receivedAt: now, legacy: false, state: .received, attempts: 0,
            nextCheckAt: now, watchUntil: nil)
        let facts = machine.becomeVerified(record, claim: nil, now: now, policy: policy)
        return (machine, facts)
    }

    // MARK: - Inputs

    /// Another copy of the IPN arrived: a rejected event is asked about again at once (Payop may have
    /// caught up, or this copy may be the genuine one), and this copy gets its own grace for Payop's
    /// API to learn of it: an early forged copy does not shorten the genuine copy's.
    public mutating func ipnRepeated(now: Int64, policy: VerificationPolicy) {
        guard !legacy, case .rejected = state else { return }
        attempts = 0
        nextCheckAt = now
        watchUntil = max(watchUntil ?? 0, now + policy.notFoundRetryMilliseconds)
    }

    /// What to do after Payop answered a question about this event.
    public struct Outcome: Sendable, Equatable {
        /// Set when the event just became verified: the values its hooks get.
        public var verified: VerifiedFacts?
        /// Payop reports another status of the entity: record it as its own verified event.
        public var reportedStatus: PayopRecord?
        /// For the attempt's record: `verified`, `rejected`, `not_found`, `unavailable`, ...
        public var attemptOutcome: String
        public var attemptDetail: String?
    }

    /// Applies Payop's answer to a question about this event. `claims` are the copies of the IPN
    /// received so far; any one that Payop confirms in full verifies the event.
    public mutating func payopAnswered(_ answer: PayopAnswer, claims: [IPNClaim], now: Int64, policy: VerificationPolicy)
        -> Outcome
    {
        guard !legacy else {
            nextCheckAt = nil
            return Outcome(attemptOutcome: "ignored")
        }
        switch answer {
        case .unanswered(let code, let detail):
            attempts += 1
            nextCheckAt = now + retryDelay(policy)
            return Outcome(attemptOutcome: code, attemptDetail: detail)
        case .notFound:
            return notFound(now: now, policy: policy)
        case .record(let record) where record.status.dedupeKey != status.dedupeKey:
            return otherStatus(record, now: now, policy: policy)
        case .record(let record):
            if state == .verified {
                attempts = 0
                nextCheckAt = recheckAfterVerified(now: now, policy: policy)
                return Outcome(attemptOutcome: "unchanged", attemptDetail: nil)
            }
            var firstMismatch: RejectionReason?
            for claim in claims.isEmpty ? [IPNClaim()] : claims {
                if let mismatch = Self.compare(claim, record) {
                    firstMismatch = firstMismatch ?? mismatch
                    continue
                }
                let facts = becomeVerified(record, claim: claim, now: now, policy: policy)
                return Outcome(verified: facts, attemptOutcome: "verified")
            }
            let reason = firstMismatch ?? .statusMismatch
            state = .rejected(reason)
            attempts = 0
            nextCheckAt = nil
            watchUntil = nil
            return Outcome(attemptOutcome: "rejected", attemptDetail: reason.rawValue)
        }
    }

    /// Payop reported this event's status while answering about another event of the same entity:
    /// Payop's word is the truth, so the status is verified with Payop's facts whatever a copy claimed.
    public mutating func reportedByPayop(_ record: PayopRecord, claims: [IPNClaim], now: Int64, policy: VerificationPolicy)
        -> VerifiedFacts?
    {
        guard !legacy, state != .verified, record.status.dedupeKey == status.dedupeKey else { return nil }
        let claim = claims.first { Self.compare($0, record) == nil }
        return becomeVerified(record, claim: claim, now: now, policy: policy)
    }

    // MARK: - Transitions

    private mutating func notFound(now: Int64, policy: VerificationPolicy) -> Outcome {
        if state == .verified {
            // Payop forgetting a transaction it confirmed is an API fault, not news: keep the schedule.
            nextCheckAt = recheckAfterVerified(now: now, policy: policy)
            return Outcome(attemptOutcome: "not_found", attemptDetail: "Payop no longer finds it; asking again later")
        }
        let watching = watchUntil.map { now < $0 } ?? false
        if now - receivedAt < policy.notFoundRetryMilliseconds || watching {
            attempts += 1
            nextCheckAt = now + retryDelay(policy)
            return Outcome(attemptOutcome: "not_found", attemptDetail: "Payop does not know it yet; asking again")
        }
        state = .rejected(.notFound)
        attempts = 0
        nextCheckAt = nil
        return Outcome(attemptOutcome: "rejected", attemptDetail: RejectionReason.notFound.rawValue)
    }

    private mutating func otherStatus(_ record: PayopRecord, now: Int64, policy: VerificationPolicy) -> Outcome {
        let detail = "Payop reports \(record.status.name)"
        if state == .verified, status.isFinal, !record.status.isFinal {
            // A final status does not go back to new or pending: a lagging API, not news.
            nextCheckAt = recheckAfterVerified(now: now, policy: policy)
            return Outcome(attemptOutcome: "unchanged", attemptDetail: "\(detail) (older than this status; ignored)")
        }
        if state == .verified {
            // Payop moved on: the new status is its own event, this one is settled.
            nextCheckAt = nil
            watchUntil = nil
            return Outcome(reportedStatus: record, attemptOutcome: "changed", attemptDetail: detail)
        }
        // The claim is contradicted, not forgotten: Payop's API can lag its own IPNs.
        state = .rejected(.statusMismatch)
        let until = max(watchUntil ?? 0, receivedAt + policy.watchMilliseconds)
        watchUntil = until
        attempts += 1
        let next = now + min(retryDelay(policy), max(policy.reconcileIntervalMilliseconds, 1))
        nextCheckAt = next < until ? next : nil
        return Outcome(
            reportedStatus: record, attemptOutcome: "rejected",
            attemptDetail: "\(RejectionReason.statusMismatch.rawValue): \(detail)")
    }

    private mutating func becomeVerified(_ record: PayopRecord, claim: IPNClaim?, now: Int64, policy: VerificationPolicy)
        -> VerifiedFacts
    {
        state = .verified
        attempts = 0
        if kind == .checkout, status.name == "failed" {
            // Failed is not final at Payop ("from failed -> accepted"): watched for its retry window.
            watchUntil = now + policy.watchMilliseconds
        } else {
            watchUntil = nil
        }
        nextCheckAt = recheckAfterVerified(now: now, policy: policy)
        return VerifiedFacts(record: record, claim: claim, kind: kind)
    }

    /// Statuses that can still change are asked about again every reconcile interval.
    private func recheckAfterVerified(now: Int64, policy: VerificationPolicy) -> Int64? {
        let next = now + max(policy.reconcileIntervalMilliseconds, 1)
        if !status.isFinal { return next }
        if let watchUntil, next < watchUntil { return next }
        return nil
    }

    private func retryDelay(_ policy: VerificationPolicy) -> Int64 {
        max(policy.backoff.delayMilliseconds(afterAttempt: attempts), 1)
    }

    /// The first thing a copy claims that Payop's record contradicts; nil when Payop confirms it all.
    static func compare(_ claim: IPNClaim, _ record: PayopRecord) -> RejectionReason? {
        if record.kind == .checkout, let mine = claim.orderID, let theirs = record.orderID, mine != theirs {
            return .orderMismatch
        }
        if let mine = claim.amount, let theirs = record.amount, !Amount.same(mine, theirs) {
            return .amountMismatch
        }
        if let mine = claim.currency, let theirs = record.currency, mine.uppercased() != theirs.uppercased() {
            return .currencyMismatch
        }
        if record.kind == .refund, let mine = claim.transactionID, let theirs = record.transactionID, mine != theirs {
            return .transactionMismatch
        }
        if let mine = claim.invoiceID, let theirs = record.invoiceID, mine != theirs {
            return .invoiceMismatch
        }
        return nil
    }
}

/// What a verified event tells its hooks: Payop's values wherever Payop gave them, else what the
/// confirmed copy of the IPN said (Payop's checkout answer has no invoice id).
public struct VerifiedFacts: Sendable, Equatable {
    public var transactionID: String?
    public var invoiceID: String?
    public var orderID: String?
    public var amount: String?
    public var currency: String?
    public var errorMessage: String?
    /// Payop's own state number: two numbers can name one status (checkout 3 and 5 are both `failed`),
    /// and the event keeps Payop's, not the one a copy claimed.
    public var payopState: Int?
    /// The receipt whose copy Payop confirmed: the event's `ipn` from now on. Nil when Payop reported
    /// the status without confirming any copy of it (all contradicted, or none received): `ipn` is then
    /// null, never a body whose fields Payop contradicted.
    public var receiptID: Int64?

    /// The event's `source` from now on, when it changes: with no copy confirmed, Payop's API, not an
    /// IPN, brought the status (`reconcile`, whose `ipn` is null, as the event object's contract says).
    public var source: String? { receiptID == nil ? "reconcile" : nil }

    init(record: PayopRecord, claim: IPNClaim?, kind: IPNKind) {
        switch kind {
        case .checkout: transactionID = record.id
        case .refund: transactionID = record.transactionID ?? claim?.transactionID
        case .withdrawal: transactionID = nil
        }
        invoiceID = record.invoiceID ?? claim?.invoiceID
        orderID = record.orderID ?? (kind == .checkout ? claim?.orderID : nil)
        amount = record.amount ?? claim?.amount
        currency = record.currency ?? claim?.currency
        errorMessage = record.errorMessage
        payopState = record.status.payopState
        receiptID = claim?.receiptID
    }
}
