import Logging
import Synchronization

/// Re-asks Payop about verified events whose status can still change (new, pending, pre_approved).
/// A change found here becomes a new event exactly as if its IPN had arrived: IPNs do get lost.
/// Checkout transactions are asked in batches through `/v1/transactions/filter`; refunds and withdrawals
/// one by one, a bounded number per round.
public final class Reconciler: Sendable {
    private let log: SQLiteEventLog
    private let payop: any PayopAPI
    private let intervalMilliseconds: Mutex<Int64>
    private let clock: any WallClock
    private let logger: Logger
    private let onVerified: @Sendable ([VerifiedEvent]) -> Void
    /// Ids per `/v1/transactions/filter` call.
    static let batchSize = 20
    /// Events looked at per round: bounds the load put on Payop.
    static let perRound = 200

    public init(
        log: SQLiteEventLog, payop: any PayopAPI, intervalMilliseconds: Int64, clock: any WallClock = SystemWallClock(),
        logger: Logger, onVerified: @escaping @Sendable ([VerifiedEvent]) -> Void = { _ in }
    ) {
        self.log = log
        self.payop = payop
        self.intervalMilliseconds = Mutex(intervalMilliseconds)
        self.clock = clock
        self.logger = logger
        self.onVerified = onVerified
    }

    public func reload(intervalMilliseconds: Int64) { self.intervalMilliseconds.withLock { $0 = intervalMilliseconds } }

    /// One round over what is due now; returns how many events were looked at.
    @discardableResult
    public func reconcileDue() async throws(EventLogError) -> Int {
        let now = clock.nowMilliseconds()
        let interval = intervalMilliseconds.withLock { $0 }
        let due = try await log.dueForReconcile(now: now, limit: Self.perRound)
        var answers: [String: PayopRecord] = [:]
        var failed: Set<String> = []
        let checkouts = due.filter { $0.kind == .checkout }
        for start in stride(from: 0, to: checkouts.count, by: Self.batchSize) {
            let ids = checkouts[start..<min(start + Self.batchSize, checkouts.count)].map(\.entityID)
            do {
                for record in try await payop.lookupTransactions(ids: ids) { answers["checkout/\(record.id)"] = record }
            } catch {
                failed.formUnion(ids.map { "checkout/\($0)" })
                logger.notice("reconcile: Payop did not answer", metadata: ["error": "\(error)"])
            }
        }
        for pending in due where pending.kind != .checkout {
            do {
                if let record = try await payop.lookup(pending.kind, id: pending.entityID) {
                    answers["\(pending.kind.rawValue)/\(record.id)"] = record
                }
            } catch {
                failed.insert("\(pending.kind.rawValue)/\(pending.entityID)")
                logger.notice("reconcile: Payop did not answer", metadata: ["error": "\(error)"])
            }
        }
        var verified: [VerifiedEvent] = []
        for pending in due {
            let key = "\(pending.kind.rawValue)/\(pending.entityID)"
            // No answer is not "no change": ask again next round.
            let record = failed.contains(key) ? nil : answers[key]
            if let created = try await log.applyReconciliation(record, to: pending, now: now, reconcileInterval: interval) {
                verified.append(created)
                logger.info(
                    "reconcile found a new status",
                    metadata: ["event.id": "\(created.event.id)", "entity.id": "\(pending.entityID)", "status": "\(record?.status.name ?? "")"])
            }
        }
        if !verified.isEmpty { onVerified(verified) }
        return due.count
    }

    public func nextDue() async -> Int64? {
        try? await log.nextReconcileDue()
    }
}
