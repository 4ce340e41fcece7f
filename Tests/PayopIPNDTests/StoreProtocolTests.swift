import Foundation
import Testing

@testable import PayopIPND

/// The store-protocol tests run against any event log.
typealias LogUnderTest = EventLog

extension LogUnderTest {
    func event(id: String) async throws(EventLogError) -> EventDetail? {
        try await event(id: id, receiptBodies: nil, receiptLimit: nil)
    }
}

/// The backends the store-protocol suite runs against: SQLite always, PostgreSQL when
/// `PAYOP_IPND_TEST_POSTGRES` names a server (see `PostgresTestServer`).
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgresql

    static var enabled: [Backend] { PostgresTestServer.isConfigured ? [.sqlite, .postgresql] : [.sqlite] }

    var testDescription: String { rawValue }

    /// Runs `body` with a fresh, empty log of this backend (a new file, or a new schema).
    func withLog(clock: TestClock, _ body: @Sendable (any LogUnderTest) async throws -> Void) async throws {
        switch self {
        case .sqlite:
            let dir = try TemporaryDirectory(preferMemory: true)
            let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
            defer { log.close() }
            try await body(log)
        case .postgresql:
            try await withEmptyPostgresLog(clock: clock, nodeID: "node-a") { try await body($0) }
        }
    }
}

let storeStart: Int64 = 1_795_000_000_000

func storeIPN(_ body: [UInt8], at ms: Int64 = storeStart) throws -> IncomingIPN {
    let notification = try NotificationParser.parse(body).get()
    return IncomingIPN(
        receivedAt: ms, sourceIP: "3.125.109.58", path: "/payop/ipn", body: body, notification: notification,
        verifiedBySignature: notification.legacy != nil)
}

/// A legacy V1 IPN (verified by its signature at the door); `wait` is pending, `success` accepted.
func signedIPN(order: String, status: String = "success", at ms: Int64 = storeStart) throws -> IncomingIPN {
    let signature = try #require(
        LegacySignature.expected(amount: "10.00", currency: "EUR", orderID: order, status: status, secretKey: "k"))
    let object = ["orderId": order, "amount": "10.00", "currency": "EUR", "status": status, "signature": signature]
    return try storeIPN(Array(try JSONSerialization.data(withJSONObject: object, options: .sortedKeys)), at: ms)
}

func acceptedRecord(_ transaction: String) -> PayopRecord {
    PayopRecord(
        kind: .checkout, id: transaction, status: .checkout(state: 2, errorMessage: nil), orderID: "order-\(transaction)")
}

let storePolicy = VerificationPolicy(
    backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 600_000,
    reconcileIntervalMilliseconds: 300_000)
let deliveryBackoff = Backoff(initialSeconds: 2, maxSeconds: 10800, jitter: Backoff.noJitter)

func storeHook(_ name: String, events: [String] = ["*"], attempts: Int = 30) -> HookConfig {
    HookConfig(name: name, target: .command(["/bin/true"]), events: events, timeoutSeconds: 10, maxAttempts: attempts)
}

/// What the tests of the migrations that took out a delivered first run's history row (SQLite `0007`,
/// PostgreSQL 3) read back from the same fixture: every run, in the order they finished, and the
/// history rows kept.
enum FirstRunsMigrationFixture {
    static func runs(_ detail: EventDetail?) throws -> [String] {
        try #require(detail).deliveryAttempts.map {
            "\($0.deliveryID)/\($0.attempt) \($0.outcome) \($0.finishedAt) \($0.output ?? "-")"
        }
    }

    static let expectedRuns = [
        "1/1 delivered 1010 a1", "2/1 failed 1020 b1", "2/2 delivered 1030 b2", "3/1 delivered 1040 c1a",
        "3/1 delivered 1060 c1b", "4/1 failed 1070 d1",
    ]
    static let keptOutputs = ["b1", "b2", "c1a", "d1"]
}

/// The same behaviours, pinned against every backend: what the daemon relies on of any event log.
@Suite struct StoreProtocolTests {
    @Test(arguments: Backend.enabled)
    func duplicateIPNMakesOneEventAndANewStatusASecond(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let first = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 4)))
            let again = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 4), at: storeStart + 1))
            let next = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2), at: storeStart + 2))
            #expect(!first.duplicate && again.duplicate && !next.duplicate)
            #expect(first.eventID == again.eventID && first.eventID != next.eventID)
            #expect(again.receiptID > first.receiptID)
            let counts = try await log.counts()
            #expect(counts.events == 2 && counts.receipts == 3)
            let detail = try #require(try await log.event(id: first.eventID))
            #expect(detail.event.duplicates == 1 && detail.event.state == "received" && detail.event.source == "ipn")
            #expect(detail.receipts.map(\.id) == [first.receiptID, again.receiptID])
            #expect(detail.event.ipn == checkoutBody(transaction: "tx-1", state: 4))
            #expect(detail.event.orderID == "order-tx-1" && detail.event.invoiceID == "inv-tx-1")
        }
    }

    @Test(arguments: Backend.enabled)
    func anEventsCopiesCanBeReadFirstOnesOnlyWithTheirBodiesCut(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let body = checkoutBody(transaction: "tx-copies", state: 2)
            var first: IngestOutcome?
            for copy in 0..<5 {
                let outcome = try await log.ingest(try storeIPN(body, at: storeStart + Int64(copy)))
                if first == nil { first = outcome }
            }
            let id = try #require(first?.eventID)
            let plain = try #require(try await log.event(id: id))
            #expect(plain.receipts.count == 5 && plain.receipts.allSatisfy { $0.body == nil })
            let shown = try #require(try await log.event(id: id, receiptBodies: 10, receiptLimit: 3))
            #expect(shown.receipts.map(\.id) == Array(plain.receipts.map(\.id).prefix(3)))
            #expect(shown.receipts.allSatisfy { $0.body == Array(body.prefix(10)) })
        }
    }

    @Test(arguments: Backend.enabled)
    func signedLegacyIPNIsVerifiedOnArrivalWithItsDeliveries(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil", events: ["checkout.accepted"]), storeHook("crm"), storeHook("refunds", events: ["refund.*"])])
            let outcome = try await log.ingest(try signedIPN(order: "1042"))
            let event = try #require(try await log.event(id: outcome.eventID))
            #expect(event.event.state == "verified" && event.event.verification == "signature" && event.event.legacy)
            #expect(event.event.verifiedAt == storeStart && event.event.amount == "10.00")
            #expect(event.deliveries.map(\.hook) == ["fulfil", "crm"])
            #expect(event.deliveries.allSatisfy { $0.state == .pending && $0.attempts == 0 })
            #expect(try await log.dueChecks(now: storeStart + 1_000_000, limit: 10).isEmpty)
        }
    }

    @Test(arguments: Backend.enabled)
    func refusedRequestsAreReceiptsWithoutEvents(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            try await log.recordRefused(
                RefusedIPN(
                    receivedAt: storeStart, sourceIP: "3.125.109.58", path: "/payop/ipn", reason: .invalidJSON,
                    body: Array("nope".utf8), notification: nil))
            _ = try await log.ingest(try storeIPN(try Samples.data("checkout-accepted"), at: storeStart + 1))
            let refused = try await log.receipts(refusedOnly: true, since: nil, limit: 50)
            #expect(refused.count == 1)
            #expect(refused.first?.answer == 400 && refused.first?.reason == "invalid_json")
            #expect(refused.first?.eventID == nil && refused.first?.size == 4)
            #expect(try await log.receipts(refusedOnly: false, since: nil, limit: 50).count == 2)
            #expect(try await log.receipts(refusedOnly: false, since: storeStart + 1, limit: 50).count == 1)
            #expect(try await log.counts().events == 1)
        }
    }

    @Test(arguments: Backend.enabled)
    func payopConfirmingAnIPNVerifiesItAndCreatesDeliveriesForMatchingHooks(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil", events: ["checkout.accepted"]), storeHook("withdrawals", events: ["withdrawal.*"])])
            let outcome = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2)))
            #expect(try await log.nextCheckDue() == storeStart)
            let due = try await log.dueChecks(now: storeStart, limit: 10)
            #expect(due.map(\.eventID) == [outcome.eventID])
            let check = try #require(due.first)
            let applied = try await log.applyAnswer(
                .record(acceptedRecord("tx-1")), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.state == .verified && applied.outcome == "verified")
            #expect(applied.verified.map(\.eventID) == [outcome.eventID] && applied.verified.first?.deliveries == 1)
            let detail = try #require(try await log.event(id: outcome.eventID))
            #expect(detail.event.state == "verified" && detail.event.verification == "payop_api")
            #expect(detail.event.verifiedAt == storeStart + 5)
            #expect(detail.verificationAttempts.map(\.outcome) == ["verified"])
            #expect(detail.verificationAttempts.first?.payopState == 2)
            #expect(detail.deliveries.map(\.hook) == ["fulfil"])
            // Accepted is final: nothing left to ask.
            #expect(try await log.nextCheckDue() == nil)
        }
    }

    @Test(arguments: Backend.enabled)
    func aContradictedCopyIsRejectedAndAnotherCopyIsAskedAboutAgain(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil")])
            let outcome = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2)))
            let check = try #require(try await log.dueChecks(now: storeStart, limit: 10).first)
            var record = acceptedRecord("tx-1")
            record.orderID = "someone-else"
            let applied = try await log.applyAnswer(.record(record), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.state == .rejected(.orderMismatch) && applied.verified.isEmpty)
            #expect(try await log.dueChecks(now: storeStart + 10_000_000, limit: 10).isEmpty)
            #expect(try await log.event(id: outcome.eventID)?.deliveries.isEmpty == true)
            // Another copy of the IPN: asked about again at once.
            log.setVerificationPolicy(storePolicy)
            let copy = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2), at: storeStart + 60_000))
            #expect(copy.duplicate)
            let again = try await log.dueChecks(now: storeStart + 60_000, limit: 10)
            #expect(again.map(\.eventID) == [outcome.eventID])
            let confirmed = try await log.applyAnswer(
                .record(acceptedRecord("tx-1")), to: try #require(again.first), now: storeStart + 60_005, policy: storePolicy)
            #expect(confirmed.state == .verified && confirmed.verified.first?.deliveries == 1)
        }
    }

    @Test(arguments: Backend.enabled)
    func payopReportingAnotherStatusRecordsItAsItsOwnVerifiedEvent(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil")])
            let pending = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 4)))
            let check = try #require(try await log.dueChecks(now: storeStart, limit: 10).first)
            let applied = try await log.applyAnswer(
                .record(acceptedRecord("tx-1")), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.state == .rejected(.statusMismatch))
            let reported = try #require(applied.verified.first)
            #expect(reported.type == "checkout.accepted" && reported.deliveries == 1 && reported.eventID != pending.eventID)
            let detail = try #require(try await log.event(id: reported.eventID))
            #expect(detail.event.source == "reconcile" && detail.event.state == "verified")
            #expect(detail.event.orderID == "order-tx-1" && detail.event.ipn == nil)
            #expect(detail.verificationAttempts.first?.detail == "Payop reported it when asked about \(pending.eventID)")
            #expect(try await log.counts().events == 2)
            // The contradicted claim is still watched (Payop's API can lag its own IPNs).
            #expect(try await log.nextCheckDue() != nil)
        }
    }

    @Test(arguments: Backend.enabled)
    func aVerifiedEventKeepsPayopsStateNumberNotTheOneItsIPNClaimed(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil")])
            // Checkout states 3 and 5 (without Payop's two special messages) are both `failed`.
            let outcome = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 5, message: "declined")))
            #expect(try await log.event(id: outcome.eventID)?.event.payopState == 5)
            let check = try #require(try await log.dueChecks(now: storeStart, limit: 10).first)
            let record = PayopRecord(
                kind: .checkout, id: "tx-1", status: .checkout(state: 3, errorMessage: "declined"), orderID: "order-tx-1",
                errorMessage: "declined")
            let applied = try await log.applyAnswer(.record(record), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.state == .verified && applied.verified.first?.deliveries == 1)
            let event = try #require(try await log.event(id: outcome.eventID)?.event)
            #expect(event.type == "checkout.failed" && event.payopState == 3 && event.errorMessage == "declined")
            #expect(event.source == "ipn")
            // The copy Payop confirmed is still the event's `ipn`, as received (its state 5 and all).
            #expect(event.ipn == checkoutBody(transaction: "tx-1", state: 5, message: "declined"))
        }
    }

    @Test(arguments: Backend.enabled)
    func aStatusPayopReportsWithoutConfirmingAnyCopyCarriesNoIPNBody(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil")])
            let genuine = checkoutBody(transaction: "tx-1", state: 4)
            let forged = Array(String(decoding: checkoutBody(transaction: "tx-1", state: 2), as: UTF8.self)
                .replacingOccurrences(of: "order-tx-1", with: "forged").utf8)
            let pending = try await log.ingest(try storeIPN(genuine))
            let accepted = try await log.ingest(try storeIPN(forged, at: storeStart + 1))
            // Payop already says accepted: the pending copy is contradicted, and its answer verifies the
            // accepted status, whose only copy names another order.
            let checks = try await log.dueChecks(now: storeStart + 1, limit: 10)
            let check = try #require(checks.first { $0.eventID == pending.eventID })
            let applied = try await log.applyAnswer(
                .record(acceptedRecord("tx-1")), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.verified.map(\.eventID) == [accepted.eventID])
            let event = try #require(try await log.event(id: accepted.eventID)?.event)
            #expect(event.state == "verified" && event.orderID == "order-tx-1" && event.payopState == 2)
            #expect(event.ipn == nil, "the forged copy's body reached the event object")
            // Payop's API, not an IPN, brought the status: `reconcile`, whose `ipn` is null.
            #expect(event.source == "reconcile")
            #expect(!String(decoding: event.hookBody, as: UTF8.self).contains("forged"))
        }
    }

    @Test(arguments: Backend.enabled)
    func payopUnreachableLeavesTheEventWaitingWithBackoff(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let outcome = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2)))
            let check = try #require(try await log.dueChecks(now: storeStart, limit: 10).first)
            let applied = try await log.applyAnswer(
                .unanswered(code: "unavailable", detail: "HTTP 503"), to: check, now: storeStart + 5, policy: storePolicy)
            #expect(applied.state == .received && applied.outcome == "unavailable")
            #expect(try await log.dueChecks(now: storeStart + 5, limit: 10).isEmpty)
            #expect(try await log.nextCheckDue() == storeStart + 1_005)
            #expect(try await log.dueChecks(now: storeStart + 1_005, limit: 10).map(\.eventID) == [outcome.eventID])
        }
    }

    @Test(arguments: Backend.enabled)
    func dueChecksGiveOneQuestionPerEntity(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 4)))
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-1", state: 2), at: storeStart + 1))
            _ = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-2", state: 2), at: storeStart + 2))
            let due = try await log.dueChecks(now: storeStart + 10, limit: 10)
            // The SQLite log lists every due event and the verifier keeps the first per entity; the
            // PostgreSQL log claims only those. Either way the first per entity leads, in due order.
            var entities = Set<String>()
            let asked = due.filter { entities.insert($0.entityKey).inserted }
            #expect(asked.map(\.entityID) == ["tx-1", "tx-2"] && asked.first?.status.name == "pending")
        }
    }

    @Test(arguments: Backend.enabled)
    func claimFinishAndInterruptFollowTheDeliveryMachine(_ backend: Backend) async throws {
        let clock = TestClock(storeStart)
        try await backend.withLog(clock: clock) { log in
            log.setHooks([storeHook("fulfil")])
            let eventID = try await log.ingest(try signedIPN(order: "1042")).eventID
            let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 10).first)
            #expect(delivery.eventID == eventID && delivery.state == .pending)
            #expect(try await log.nextRunnableDelivery(hooks: ["fulfil"]) == storeStart)
            #expect(try await log.runnableDeliveries(now: storeStart, hooks: ["other"], limit: 10).isEmpty)

            let claim = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
            #expect(claim.attempt == 1 && claim.delivery.state == .running && claim.event.id == eventID)
            #expect(claim.event.type == "checkout.accepted")
            #expect(try await log.claimDelivery(id: delivery.id, now: storeStart) == nil)
            #expect(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 10).isEmpty)

            let failed = HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 1, output: "boom\n")
            let end = try await log.finishDelivery(
                id: delivery.id, attempt: 1, result: failed, maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 10)
            #expect(end == .retry(at: storeStart + 2_010))
            #expect(try await log.runnableDeliveries(now: storeStart + 2_009, hooks: ["fulfil"], limit: 10).isEmpty)
            #expect(try await log.nextRunnableDelivery(hooks: ["fulfil"]) == storeStart + 2_010)
            // A stale finish of the same attempt changes nothing.
            #expect(
                try await log.finishDelivery(
                    id: delivery.id, attempt: 1, result: failed, maxAttempts: 30, backoff: deliveryBackoff,
                    now: storeStart + 11) == nil)

            let second = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart + 2_010))
            #expect(second.attempt == 2)
            try await log.interruptDelivery(id: delivery.id, attempt: 2, now: storeStart + 2_020)
            var row = try #require(try await log.event(id: eventID)?.deliveries.first)
            #expect(row.state == .pending && row.attempts == 1 && row.nextAttemptAt == storeStart + 2_020)

            let third = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart + 2_020))
            #expect(third.attempt == 2)
            let done = try await log.finishDelivery(
                id: delivery.id, attempt: 2, result: HookResult(outcome: .delivered, exitCode: 0), maxAttempts: 30,
                backoff: deliveryBackoff, now: storeStart + 2_030)
            #expect(done == .delivered)
            let detail = try #require(try await log.event(id: eventID))
            row = try #require(detail.deliveries.first)
            #expect(row.state == .delivered && row.attempts == 2 && row.deliveredAt == storeStart + 2_030)
            #expect(row.lastExitCode == 0 && row.nextAttemptAt == nil)
            #expect(detail.deliveryAttempts.map(\.attempt) == [1, 2])
            #expect(detail.deliveryAttempts.map(\.outcome) == ["failed", "delivered"])
            #expect(detail.deliveryAttempts.first?.output == "boom\n")
            #expect(try await log.nextRunnableDelivery(hooks: ["fulfil"]) == nil)
        }
    }

    @Test(arguments: Backend.enabled)
    func aLaterStatusWaitsForTheEarlierOneOfItsEntityAndHook(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil"), storeHook("crm")])
            _ = try await log.ingest(try signedIPN(order: "7", status: "wait"))
            _ = try await log.ingest(try signedIPN(order: "7", status: "success", at: storeStart + 1))
            _ = try await log.ingest(try signedIPN(order: "8", status: "success", at: storeStart + 2))
            let all = try await log.deliveries(state: nil, hook: "fulfil", eventID: nil, deadFirst: false, limit: 10)
                .sorted { $0.id < $1.id }
            #expect(all.count == 3)
            let (pending7, accepted7, accepted8) = (all[0], all[1], all[2])
            let runnable = try await log.runnableDeliveries(now: storeStart + 10, hooks: ["fulfil"], limit: 10)
            #expect(Set(runnable.map(\.id)) == [pending7.id, accepted8.id])
            #expect(try await log.claimDelivery(id: accepted7.id, now: storeStart + 10) == nil)

            // While the earlier one runs, the later one still waits.
            let first = try #require(try await log.claimDelivery(id: pending7.id, now: storeStart + 10))
            #expect(try await log.claimDelivery(id: accepted7.id, now: storeStart + 10) == nil)
            #expect(!(try await log.runnableDeliveries(now: storeStart + 10, hooks: ["fulfil"], limit: 10)
                .contains { $0.id == accepted7.id }))
            // Another hook's line is its own.
            let crm = try await log.runnableDeliveries(now: storeStart + 10, hooks: ["crm"], limit: 10)
            #expect(crm.count == 2)

            _ = try await log.finishDelivery(
                id: pending7.id, attempt: first.attempt, result: HookResult(outcome: .gone, httpStatus: 410),
                maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 20)
            // Dead counts as done for the line: the later status goes.
            let next = try #require(try await log.claimDelivery(id: accepted7.id, now: storeStart + 20))
            #expect(next.event.status == "accepted")
        }
    }

    @Test(arguments: Backend.enabled)
    func everyRunOfADeliveryIsInItsHistoryAcrossReplaysWhenAFirstRunDeliveredIsKeptInTheRowAlone(
        _ backend: Backend
    ) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("fulfil")])
            let eventID = try await log.ingest(try signedIPN(order: "77")).eventID
            let id = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first).id
            func run(at now: Int64, _ result: HookResult) async throws {
                let claim = try #require(try await log.claimDelivery(id: id, now: now))
                _ = try await log.finishDelivery(
                    id: id, attempt: claim.attempt, result: result, maxAttempts: 30, backoff: deliveryBackoff, now: now + 5)
            }
            func runs() async throws -> [String] {
                try #require(try await log.event(id: eventID)).deliveryAttempts.map {
                    "\($0.attempt) \($0.outcome) \($0.finishedAt - storeStart) \($0.exitCode ?? -1) \($0.output ?? "-")"
                }
            }
            // A first run that delivered: the delivery's row is its only record, and the history shows it.
            try await run(at: storeStart, HookResult(outcome: .delivered, exitCode: 0, output: "one\n"))
            #expect(try await runs() == ["1 delivered 5 0 one\n"])
            // Replayed twice before it runs again: the run is kept once, and the next first run joins it.
            #expect(try await log.replay(eventID: eventID, hook: nil, hooks: [storeHook("fulfil")], now: storeStart + 10) == 1)
            #expect(try await log.replay(eventID: eventID, hook: nil, hooks: [storeHook("fulfil")], now: storeStart + 11) == 1)
            #expect(try await runs() == ["1 delivered 5 0 one\n"])
            try await run(at: storeStart + 20, HookResult(outcome: .delivered, exitCode: 0, output: "two\n"))
            #expect(try await runs() == ["1 delivered 5 0 one\n", "1 delivered 25 0 two\n"])
            // Replayed again, a failed run then a delivered one: every run, in the order they ended.
            #expect(try await log.replay(eventID: eventID, hook: nil, hooks: [storeHook("fulfil")], now: storeStart + 30) == 1)
            try await run(
                at: storeStart + 40, HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 3, output: "three\n"))
            try await run(at: storeStart + 2_045, HookResult(outcome: .delivered, exitCode: 0, output: "four\n"))
            #expect(
                try await runs() == [
                    "1 delivered 5 0 one\n", "1 delivered 25 0 two\n", "1 failed 45 3 three\n", "2 delivered 2050 0 four\n",
                ])
            let row = try #require(try await log.event(id: eventID)?.deliveries.first)
            #expect(row.state == .delivered && row.attempts == 2 && row.output == "four\n")
        }
    }

    @Test(arguments: Backend.enabled)
    func theRunsOfSeveralHooksAreListedInTheOrderTheyFinishedAfterAReplay(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let hooks = [storeHook("a"), storeHook("b")]
            log.setHooks(hooks)
            let eventID = try await log.ingest(try signedIPN(order: "78")).eventID
            let due = try await log.runnableDeliveries(now: storeStart, hooks: ["a", "b"], limit: 2)
            let a = try #require(due.first { $0.hook == "a" }).id
            let b = try #require(due.first { $0.hook == "b" }).id
            func run(_ id: Int64, at now: Int64, _ outcome: HookResult.Outcome) async throws {
                let claim = try #require(try await log.claimDelivery(id: id, now: now))
                _ = try await log.finishDelivery(
                    id: id, attempt: claim.attempt, result: HookResult(outcome: outcome), maxAttempts: 30,
                    backoff: deliveryBackoff, now: now)
            }
            try await run(a, at: storeStart + 10, .delivered)
            try await run(b, at: storeStart + 20, .failed(retryAfterMilliseconds: nil))
            try await run(b, at: storeStart + 2_030, .delivered)
            // a's first run goes to the history at the replay, after b's runs were written: listed first still.
            #expect(try await log.replay(eventID: eventID, hook: "a", hooks: hooks, now: storeStart + 2_040) == 1)
            try await run(a, at: storeStart + 2_050, .delivered)
            let runs = try #require(try await log.event(id: eventID)).deliveryAttempts.map {
                "\($0.deliveryID == a ? "a" : "b")\($0.attempt) \($0.finishedAt - storeStart)"
            }
            #expect(runs == ["a1 10", "b1 20", "b2 2030", "a1 2050"])
        }
    }

    @Test(arguments: Backend.enabled)
    func replayRunsADeadDeliveryAgainFromTheStart(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let hooks = [storeHook("fulfil", attempts: 1)]
            log.setHooks(hooks)
            let eventID = try await log.ingest(try signedIPN(order: "9")).eventID
            let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
            _ = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
            let end = try await log.finishDelivery(
                id: delivery.id, attempt: 1, result: HookResult(outcome: .failed(retryAfterMilliseconds: nil)),
                maxAttempts: 1, backoff: deliveryBackoff, now: storeStart + 1)
            #expect(end == .dead)
            #expect(try await log.deliveries(state: "dead", hook: nil, eventID: nil, deadFirst: true, limit: 10).count == 1)
            #expect(try await log.runnableDeliveries(now: storeStart + 99_999_999, hooks: ["fulfil"], limit: 1).isEmpty)
            // A hook added since gets its delivery too.
            let more = hooks + [storeHook("crm")]
            #expect(try await log.replay(eventID: eventID, hook: nil, hooks: more, now: storeStart + 100) == 2)
            let claim = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart + 100))
            #expect(claim.attempt == 1)
            await #expect(throws: EventLogError.self) {
                _ = try await log.replay(eventID: "evt_missing", hook: nil, hooks: more, now: storeStart)
            }
            // An event not verified (still waiting for Payop) is never delivered, replayed or not.
            let waiting = try await log.ingest(try storeIPN(checkoutBody(transaction: "tx-waiting", state: 2))).eventID
            await #expect(throws: EventLogError.self) {
                _ = try await log.replay(eventID: waiting, hook: nil, hooks: more, now: storeStart)
            }
            #expect(try await log.deliveries(state: nil, hook: nil, eventID: waiting, deadFirst: false, limit: 10).isEmpty)
        }
    }

    @Test(arguments: Backend.enabled)
    func deliveriesOfRemovedHooksAreCountedAsOrphans(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            log.setHooks([storeHook("old"), storeHook("kept")])
            _ = try await log.ingest(try signedIPN(order: "1"))
            _ = try await log.ingest(try signedIPN(order: "2"))
            #expect(try await log.orphanedDeliveries(configured: ["kept"]) == ["old": 2])
            #expect(try await log.orphanedDeliveries(configured: ["kept", "old"]).isEmpty)
        }
    }

    // MARK: - What the console and the command-line tools ask

    /// Three checkouts and a signed order, two hooks: one event dead for "fulfil", one delivered.
    static func populate(_ log: any LogUnderTest) async throws -> (dead: String, delivered: String) {
        log.setHooks([storeHook("fulfil", attempts: 1), storeHook("crm", events: ["refund.*"])])
        for (index, state) in [4, 2, 2].enumerated() {
            _ = try await log.ingest(
                try storeIPN(checkoutBody(transaction: "tx-\(index)", state: state), at: storeStart + Int64(index)))
        }
        let dead = try await log.ingest(try signedIPN(order: "o-dead", at: storeStart + 10)).eventID
        let delivered = try await log.ingest(try signedIPN(order: "o-done", at: storeStart + 11)).eventID
        for (eventID, outcome) in [(dead, HookResult.Outcome.failed(retryAfterMilliseconds: nil)), (delivered, .delivered)] {
            let delivery = try #require(
                try await log.deliveries(state: "pending", hook: "fulfil", eventID: eventID, deadFirst: false, limit: 1)
                    .first)
            _ = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart + 20))
            _ = try await log.finishDelivery(
                id: delivery.id, attempt: 1, result: HookResult(outcome: outcome), maxAttempts: 1,
                backoff: deliveryBackoff, now: storeStart + 30)
        }
        return (dead, delivered)
    }

    @Test(arguments: Backend.enabled)
    func eventsAreFoundByAnyOfTheirIdsAndPagedNewestFirstWithoutGaps(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            _ = try await Self.populate(log)
            let all = try await log.events(EventFilter(limit: 50))
            #expect(all.count == 5 && all.map(\.receivedAt) == all.map(\.receivedAt).sorted(by: >))
            #expect(try await log.events(EventFilter(query: "order-tx-1")).map(\.orderID) == ["order-tx-1"])
            #expect(try await log.events(EventFilter(query: "tx-2")).map(\.transactionID) == ["tx-2"])
            #expect(try await log.events(EventFilter(query: "o-dead")).count == 1)
            let type = try #require(all.first { $0.transactionID == "tx-0" }).type
            let ofType = try await log.events(EventFilter(type: type))
            #expect(ofType.contains { $0.transactionID == "tx-0" } && ofType.allSatisfy { $0.type == type })
            #expect(try await log.events(EventFilter(state: "verified")).count == 2)
            #expect(try await log.events(EventFilter(status: "accepted", since: storeStart + 2)).count == 3)
            var pages: [String] = []
            var cursor: EventCursor?
            repeat {
                let page = try await log.events(EventFilter(before: cursor, limit: 2))
                pages += page.map(\.id)
                cursor = page.last.map { EventCursor(receivedAt: $0.receivedAt, id: $0.id) }
            } while cursor != nil
            #expect(pages == all.map(\.id))
        }
    }

    @Test(arguments: Backend.enabled)
    func overviewCountsTheDayAndDeliveriesAndReplayDeadRequeuesOneHooksDeadOnes(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let (dead, _) = try await Self.populate(log)
            try await log.recordRefused(
                RefusedIPN(
                    receivedAt: storeStart + 40, sourceIP: "198.51.100.7", path: "/payop/ipn", reason: .invalidJSON,
                    body: Array("x".utf8), notification: nil))
            let now = storeStart + 60_000
            let overview = try await log.overview(now: now)
            #expect(overview.ipnsLastHour == 5 && overview.ipnsLastDay == 5 && overview.refusedLastDay == 1)
            #expect(overview.eventsLastHour == 5 && overview.awaitingVerification == 3)
            #expect(overview.deliveries == DeliveryCounts(pending: 0, running: 0, dead: 1))
            #expect(overview.lastIPNAt == storeStart + 11 && overview.ipnsPerMinute.reduce(0, +) == 5)
            #expect(overview.ipnsPerMinute.count == 1440 && overview.ipnsPerMinute[1438...].reduce(0, +) == 5)
            #expect(try await log.deliveryCounts() == DeliveryCounts(pending: 0, running: 0, dead: 1))
            #expect(try await log.deadDeliveriesByHook() == ["fulfil": 1])
            #expect(try await log.replayDead(hook: "crm", now: now) == 0)
            #expect(try await log.replayDead(hook: "fulfil", now: now) == 1)
            let requeued = try await log.deliveries(state: "pending", hook: "fulfil", eventID: dead, deadFirst: false, limit: 5)
            #expect(requeued.count == 1 && requeued.first?.lastError == nil)
            #expect(try await log.deadDeliveriesByHook().isEmpty)
        }
    }

    @Test(arguments: Backend.enabled)
    func replaySkipsHooksNoLongerConfigured(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let (_, delivered) = try await Self.populate(log)
            #expect(try await log.replay(eventID: delivered, hook: nil, hooks: [storeHook("crm", events: ["refund.*"])], now: storeStart + 99) == 0)
            #expect(try await log.replay(eventID: delivered, hook: nil, hooks: [storeHook("fulfil")], now: storeStart + 99) == 1)
        }
    }

    @Test(arguments: Backend.enabled)
    func pruneKeepsEventsTheirFirstCopyAndDeadDeliveries(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            let (dead, delivered) = try await Self.populate(log)
            _ = try await log.ingest(try signedIPN(order: "o-done", at: storeStart + 50))  // a later copy
            let result = try await log.prune(before: storeStart + 1_000)
            #expect(result == PruneResult(receipts: 1, deliveries: 1))
            #expect(try await log.counts() == (events: 5, receipts: 5))
            let kept = try #require(try await log.event(id: delivered))
            #expect(kept.event.ipn != nil && kept.deliveries.isEmpty && kept.deliveryAttempts.isEmpty)
            #expect(try await log.event(id: dead)?.deliveries.map(\.state) == [.dead])
            #expect(try await log.prune(before: storeStart + 1_000) == PruneResult(receipts: 0, deliveries: 0))
        }
    }

    @Test(arguments: Backend.enabled)
    func aWritableLogSaysSo(_ backend: Backend) async throws {
        try await backend.withLog(clock: TestClock()) { log in
            try await log.checkWritable()
            #expect(!log.location.isEmpty)
        }
    }
}
