/// An event whose question to Payop is due.
public struct DueCheck: Sendable, Equatable, Hashable {
    public var eventID: String
    public var kind: IPNKind
    public var entityID: String
    public var status: PaymentStatus

    public init(eventID: String, kind: IPNKind, entityID: String, status: PaymentStatus) {
        self.eventID = eventID
        self.kind = kind
        self.entityID = entityID
        self.status = status
    }

    /// Questions about one entity are asked one at a time, so Payop's answers are applied in the
    /// order Payop gave them.
    public var entityKey: String { Self.entityKey(kind, entityID) }

    static func entityKey(_ kind: IPNKind, _ entityID: String) -> String { "\(kind.rawValue)/\(entityID)" }

    /// A question about an entity, not yet about one of its events (an early question).
    static func about(_ kind: IPNKind, _ entityID: String) -> DueCheck {
        DueCheck(eventID: "", kind: kind, entityID: entityID, status: PaymentStatus(name: "", payopState: nil))
    }
}

/// An event that just became verified, with how many deliveries were created for it.
public struct VerifiedEvent: Sendable, Equatable {
    public var eventID: String
    /// `checkout.accepted`, ...
    public var type: String
    public var receivedAt: Int64
    public var deliveries: Int

    public init(eventID: String, type: String, receivedAt: Int64, deliveries: Int) {
        self.eventID = eventID
        self.type = type
        self.receivedAt = receivedAt
        self.deliveries = deliveries
    }
}

/// What one answer did, for logs and metrics.
public struct AppliedAnswer: Sendable {
    /// The event's state afterwards; nil when the event no longer exists.
    public var state: VerificationState?
    /// As recorded with the attempt: `verified`, `rejected`, `not_found`, `unavailable`, ...
    public var outcome: String
    public var detail: String?
    /// Events that became verified: the asked one, or Payop's own status of its entity.
    public var verified: [VerifiedEvent]

    public init(state: VerificationState?, outcome: String, detail: String?, verified: [VerifiedEvent]) {
        self.state = state
        self.outcome = outcome
        self.detail = detail
        self.verified = verified
    }
}

/// What verification needs of the event log. The log runs `EventVerification`'s transitions inside
/// its own transactions and persists what they return; nothing else changes a verification state.
public protocol VerificationStore: Sendable {
    /// Events whose next question to Payop is due at `now`, oldest due first.
    func dueChecks(now: Int64, limit: Int) async throws(EventLogError) -> [DueCheck]
    /// When the next question falls due, if ever.
    func nextCheckDue() async throws(EventLogError) -> Int64?
    /// Applies Payop's answer about `check`'s event (and whatever it says of its entity's other
    /// statuses) in one transaction; returns the events that became verified, deliveries created.
    func applyAnswer(_ answer: PayopAnswer, to check: DueCheck, now: Int64, policy: VerificationPolicy)
        async throws(EventLogError) -> AppliedAnswer
}
