/// One hook's delivery of one event (the contract's delivery object).
public struct Delivery: Sendable, Equatable, Encodable {
    public var id: Int64
    public var eventID: String
    public var hook: String
    public var state: DeliveryState
    public var attempts: Int
    public var nextAttemptAt: Int64?
    public var lastExitCode: Int?
    public var lastHTTPStatus: Int?
    public var lastError: String?
    public var output: String?
    public var deliveredAt: Int64?
    /// The daemon that claimed it last (`storage.node_id`); only a PostgreSQL log, shared by several, keeps it.
    public var nodeID: String?

    public init(
        id: Int64, eventID: String, hook: String, state: DeliveryState, attempts: Int, nextAttemptAt: Int64?,
        lastExitCode: Int? = nil, lastHTTPStatus: Int? = nil, lastError: String? = nil, output: String? = nil,
        deliveredAt: Int64? = nil
    ) {
        self.id = id
        self.eventID = eventID
        self.hook = hook
        self.state = state
        self.attempts = attempts
        self.nextAttemptAt = state == .pending ? nextAttemptAt : nil
        self.lastExitCode = lastExitCode
        self.lastHTTPStatus = lastHTTPStatus
        self.lastError = lastError
        self.output = output
        self.deliveredAt = deliveredAt
    }

    enum CodingKeys: String, CodingKey {
        case id, eventID = "event_id", hook, state, attempts, nextAttemptAt = "next_attempt_at"
        case lastExitCode = "last_exit_code", lastHTTPStatus = "last_http_status", lastError = "last_error", output
        case deliveredAt = "delivered_at", nodeID = "node_id"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(eventID, forKey: .eventID)
        try c.encode(hook, forKey: .hook)
        try c.encode(state.rawValue, forKey: .state)
        try c.encode(attempts, forKey: .attempts)
        try c.encode(nextAttemptAt.map { Timestamp.format(milliseconds: $0) }, forKey: .nextAttemptAt)
        try c.encode(lastExitCode, forKey: .lastExitCode)
        try c.encode(lastHTTPStatus, forKey: .lastHTTPStatus)
        try c.encode(lastError, forKey: .lastError)
        try c.encode(output, forKey: .output)
        try c.encode(deliveredAt.map { Timestamp.format(milliseconds: $0) }, forKey: .deliveredAt)
        try c.encodeIfPresent(nodeID, forKey: .nodeID)
    }
}

/// A delivery whose run was recorded as started: the hook may now run, once.
public struct DeliveryClaim: Sendable {
    public var delivery: Delivery
    /// The attempt just recorded as running.
    public var attempt: Int
    public var event: Event
}

/// What delivery needs of the event log. The log runs `DeliveryProgress`'s transitions inside its own
/// transactions and persists what they return; nothing else changes a delivery's state.
public protocol DeliveryStore: Sendable {
    /// Pending deliveries of `hooks` due at `now` whose (hook, kind, entity) has nothing earlier
    /// pending or running: a later status never overtakes an earlier one.
    func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery]
    /// When the earliest delivery of `hooks` that could run falls due (ordering respected), if ever.
    func nextRunnableDelivery(hooks: [String]) async throws(EventLogError) -> Int64?
    /// Records the next attempt as running, if the delivery may still run now; the hook is started only
    /// after this returns.
    func claimDelivery(id: Int64, now: Int64) async throws(EventLogError) -> DeliveryClaim?
    /// Records how attempt `attempt` ended; returns what became of the delivery (nil: replayed meanwhile).
    func finishDelivery(
        id: Int64, attempt: Int, result: HookResult, maxAttempts: Int, backoff: Backoff, now: Int64
    ) async throws(EventLogError) -> DeliveryProgress.End?
    /// The daemon's own shutdown stopped attempt `attempt`: pending again, the attempt not spent.
    func interruptDelivery(id: Int64, attempt: Int, now: Int64) async throws(EventLogError)
    /// Pending deliveries per hook that is not in `configured` (removed or renamed hooks).
    func orphanedDeliveries(configured: [String]) async throws(EventLogError) -> [String: Int]
    /// How often a running attempt's claim must be renewed while its hook runs, when claims are leases
    /// that another daemon takes over once they lapse (a shared log); nil when they never lapse.
    var leaseRenewal: Duration? { get }
    /// Keeps attempt `attempt`'s claim alive; false when it is no longer this daemon's.
    func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool
    /// Whether `finishDelivery` offers the ended run's slot to its hook's next due run, claimed in the
    /// outcome's own transaction, through `starts` (`EarlyStarts.handOver`). That dispatcher then keeps
    /// the slot from the hook's exit until that transaction gives it on (or a try of the outcome fails),
    /// instead of freeing it for a pass of its own.
    func handsOverRunSlots(to starts: any EarlyStarts) -> Bool
}

extension DeliveryStore {
    /// One daemon per log (SQLite): a claim holds until the daemon records the outcome or restarts.
    public var leaseRenewal: Duration? { nil }
    public func renewLease(id: Int64, attempt: Int, now: Int64) async throws(EventLogError) -> Bool { true }
    public func handsOverRunSlots(to starts: any EarlyStarts) -> Bool { false }
}

/// Runs a log may claim itself, in the very transaction that makes them due (an event verified, a
/// signed IPN logged), instead of leaving them for the dispatcher's next pass: one commit, one read and
/// one hand-off less between Payop's answer and the hook. The dispatcher is the one that admits them.
/// Only a log that one daemon owns does this (SQLite); a shared log's claims are leases taken apart.
public protocol EarlyStarts: AnyObject, Sendable {
    /// Takes one of `hook`'s run slots for delivery `id`; false when the hook is at its limit, is not
    /// configured, or runs are not being started (the dispatcher is not running, or is stopping).
    func admit(id: Int64, hook: String) -> Bool
    /// Gives back the slots of `ids`: their claims were not made, or not committed.
    func withdraw(_ ids: [Int64])
    /// Claims now on disk, in the log's order: their hooks run.
    func start(_ claims: [DeliveryClaim])
    /// Run `finished` of `hook` has ended, and the transaction recording how is open: its slot goes to
    /// `next`, that hook's first due run, which the same transaction then claims (no pass, no read and
    /// no commit of the dispatcher's own in between). False when there is no `next`, the slot is no
    /// longer held (freed when the hook exited, or by a failed try of this outcome), runs are not being
    /// started, the hook is not configured, it would exceed its limit, or `next` is in flight already:
    /// the slot is then simply free. Either way `finished` no longer counts against the limit.
    func handOver(from finished: Int64, to next: Int64?, hook: String) -> Bool
    /// Whether run `finished` still holds its slot while runs are being started: only then can its
    /// outcome's transaction hand the slot over (`handOver`), and only then is the next run looked for.
    func holdsSlot(of finished: Int64) -> Bool
}
