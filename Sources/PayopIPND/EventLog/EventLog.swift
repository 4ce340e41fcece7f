/// An event log, whichever database holds it: the three stores the daemon's stages use, plus what
/// operations ask of it (the console, the command-line tools, readiness). `SQLiteEventLog` (one
/// machine, the default) and `PostgresEventLog` (several daemons sharing one database) both conform,
/// and `StoreProtocolTests` runs the same behaviours against both.
public protocol EventLog: EventStore, VerificationStore, DeliveryStore {
    /// Where the log is, for messages: a file path, or `host:port/database`.
    var location: String { get }

    /// The hooks deliveries are created for from now on (at start and on reload).
    var hooks: [HookConfig] { get }
    func setHooks(_ hooks: [HookConfig])
    /// How a repeated IPN's event is scheduled (at start and on reload).
    func setVerificationPolicy(_ policy: VerificationPolicy)

    /// At start: deliveries this daemon left `running` when it stopped run again. Returns how many.
    func recoverInterruptedDeliveries(now: Int64) async throws(EventLogError) -> Int
    /// Proves the log takes writes now (readiness, the watchdog); throws the reason it does not.
    func checkWritable() async throws(EventLogError)
    /// Stops this log's writes; what was acknowledged is committed.
    func close()

    // Reading, for people and scripts.
    /// Newest first.
    func events(_ filter: EventFilter) async throws(EventLogError) -> [Event]
    /// The event with its history. `receiptBodies`: each copy's body too, cut to that many bytes;
    /// `receiptLimit`: the first copies only (a flood of copies stays cheap to show).
    func event(id: String, receiptBodies: Int?, receiptLimit: Int?) async throws(EventLogError) -> EventDetail?
    /// Newest first; `refusedOnly` keeps the 400 and 401 answers.
    func receipts(refusedOnly: Bool, since: Int64?, limit: Int) async throws(EventLogError) -> [Receipt]
    func counts() async throws(EventLogError) -> (events: Int, receipts: Int)
    /// Newest first; `deadFirst` puts the dead ones (what needs a person) before the rest.
    func deliveries(state: String?, hook: String?, eventID: String?, deadFirst: Bool, limit: Int)
        async throws(EventLogError) -> [Delivery]
    func deliveryCounts() async throws(EventLogError) -> DeliveryCounts
    /// Dead deliveries per hook: what the console offers to replay in bulk.
    func deadDeliveriesByHook() async throws(EventLogError) -> [String: Int]
    /// What the console's overview shows.
    func overview(now: Int64) async throws(EventLogError) -> EventLogOverview

    // Changing, on a person's word.
    /// Delivers an event again to every matching configured hook (or one), whatever its deliveries'
    /// state, creating deliveries for hooks added since. Returns how many deliveries are now pending.
    func replay(eventID: String, hook: String?, hooks: [HookConfig], now: Int64) async throws(EventLogError) -> Int
    /// Every dead delivery of `hook` runs again (after the merchant fixed the hook). Returns how many.
    func replayDead(hook: String, now: Int64) async throws(EventLogError) -> Int
    /// Deletes receipts received before `cutoff` and deliveries delivered before it (with their runs).
    /// Events are kept, and with them the receipt of each one's first IPN; dead deliveries are kept.
    func prune(before cutoff: Int64) async throws(EventLogError) -> PruneResult
}

/// What a shared log reports about its connections and claims (`/metrics`).
public protocol StorageMetrics: Sendable {
    func storageConnections(inUse: Int, poolSize: Int)
    func storageConnectionWait(milliseconds: Int64)
    /// How long claiming took: `delivery` (a hook's run) or `check` (questions to Payop).
    func storageClaim(_ what: String, milliseconds: Int64)
    func reconcileLeader(_ leader: Bool)
}

public struct EventFilter: Sendable {
    public var type: String?
    public var status: String?
    public var state: String?
    public var since: Int64?
    /// An id to find: the event's own, or its order, transaction, invoice, refund or withdrawal id.
    public var query: String?
    /// Events older than this one only (the next page after it).
    public var before: EventCursor?
    public var limit: Int

    public init(
        type: String? = nil, status: String? = nil, state: String? = nil, since: Int64? = nil,
        query: String? = nil, before: EventCursor? = nil, limit: Int = 50
    ) {
        self.type = type
        self.status = status
        self.state = state
        self.since = since
        self.query = query
        self.before = before
        self.limit = limit
    }
}

/// A place in the newest-first list of events: `received_at` and id of the last event shown.
public struct EventCursor: Sendable, Equatable {
    public var receivedAt: Int64
    public var id: String

    public init(receivedAt: Int64, id: String) {
        self.receivedAt = receivedAt
        self.id = id
    }

    /// `1764400000000.evt_...`, as it travels in a page link.
    public init?(_ text: String) {
        guard let dot = text.firstIndex(of: "."), let at = Int64(text[..<dot]) else { return nil }
        self.init(receivedAt: at, id: String(text[text.index(after: dot)...]))
    }

    public var text: String { "\(receivedAt).\(id)" }
}


public struct PruneResult: Sendable, Equatable {
    public var receipts: Int
    public var deliveries: Int
}


public struct EventLogOverview: Sendable, Equatable {
    public var ipnsLastHour = 0
    public var ipnsLastDay = 0
    public var refusedLastDay = 0
    public var eventsLastHour = 0
    public var eventsLastDay = 0
    /// Events still waiting for Payop's word.
    public var awaitingVerification = 0
    public var deliveries = DeliveryCounts(pending: 0, running: 0, dead: 0)
    /// The last IPN answered 200.
    public var lastIPNAt: Int64?
    /// The last question to Payop and how it went (verified, not_found, unavailable, unauthorized, ...).
    public var lastVerificationAt: Int64?
    public var lastVerificationOutcome: String?
    /// IPNs per minute over the day up to `now`, oldest minute first (1440 values, `now` in the last).
    public var ipnsPerMinute: [Int] = []
}


public struct DeliveryCounts: Sendable, Equatable {
    public var pending: Int
    public var running: Int
    public var dead: Int
}

