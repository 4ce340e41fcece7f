import Foundation
import PayopSimulator
import Synchronization
import Testing

@testable import PayopIPND

/// The verifier and reconciler against the simulator over real HTTP, on a real SQLite file.
@Suite struct VerificationTests {
    @Test func ipnWhoseStatusPayopConfirmsIsVerified() async throws {
        try await PayopHarness.with { h, _ in
            let paid = h.payop.create(.checkout, state: 2, amount: "25.50", currency: "EUR")
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            #expect(try await h.verifier().verifyDue() == 1)
            let event = try await h.event(outcome.eventID)
            #expect(event.state == "verified")
            #expect(event.verification == "payop_api")
            #expect(event.amount == "25.50" && event.currency == "EUR")
            #expect(event.verifiedAt == h.clock.nowMilliseconds())
            // Every fact the answer's one UPDATE writes, in its place.
            #expect(event.transactionID == paid.id && event.orderID == paid.orderID)
            #expect(event.invoiceID == paid.invoiceID)
            #expect(event.ipn == Array(SimulatedPayop.ipnBody(for: paid)))
        }
    }

    @Test func ipnClaimingAnotherStatusIsRejectedAndPayopsStatusBecomesItsOwnEvent() async throws {
        try await PayopHarness.with { h, _ in
            let failed = h.payop.create(.checkout, state: 3)
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: failed, claimingState: 2))
            try await h.verifier().verifyDue()
            let claimed = try await h.event(outcome.eventID)
            #expect(claimed.state == "rejected" && claimed.rejectionReason == "status_mismatch")
            let reported = try #require(try await h.log.events(.init(type: "checkout.failed")).first)
            #expect(reported.state == "verified" && reported.source == "reconcile" && reported.ipn == nil)
            #expect(reported.verification == "payop_api")
            #expect(reported.transactionID == failed.id)
        }
    }

    @Test func unknownTransactionIsRejectedNotFoundOnceTheGraceIsOver() async throws {
        try await PayopHarness.with { h, _ in
            let ghost = checkoutBody(transaction: "never-paid", state: 2)
            let outcome = try await h.receive(Data(ghost))
            let verifier = h.verifier(notFoundRetryMinutes: 10)
            try await verifier.verifyDue()
            #expect(try await h.event(outcome.eventID).state == "received")
            h.clock.advance(milliseconds: 10 * 60_000)
            try await verifier.verifyDue()
            let event = try await h.event(outcome.eventID)
            #expect(event.state == "rejected" && event.rejectionReason == "not_found")
        }
    }

    @Test func apiFailingThreeTimesVerifiesAfterRecoveryAndNotBefore() async throws {
        try await PayopHarness.with { h, _ in
            let paid = h.payop.create(.checkout, state: 2)
            h.payop.updateFaults { $0.failNext = 3 }
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            let verifier = h.verifier()
            // Backoff 1 s, 2 s, 4 s: each retry is due exactly then, and not a millisecond earlier.
            for delay: Int64 in [1_000, 2_000, 4_000] {
                #expect(try await verifier.verifyDue() == 1)
                #expect(try await h.event(outcome.eventID).state == "received")
                h.clock.advance(milliseconds: delay - 1)
                #expect(try await verifier.verifyDue() == 0)
                h.clock.advance(milliseconds: 1)
            }
            try await verifier.verifyDue()
            #expect(try await h.event(outcome.eventID).state == "verified")
            let attempts = try await h.log.event(id: outcome.eventID)?.verificationAttempts.map(\.outcome)
            #expect(attempts == ["unavailable", "unavailable", "unavailable", "verified"])
        }
    }

    @Test func rejectedJWTKeepsEventsWaitingAndIsReported() async throws {
        try await PayopHarness.with { h, _ in
            let paid = h.payop.create(.checkout, state: 2)
            h.payop.updateFaults { $0.unauthorized = true }
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            let verifier = h.verifier()
            try await verifier.verifyDue()
            #expect(try await h.event(outcome.eventID).state == "received")
            #expect(verifier.access.currentProblem?.contains("401") == true)
            #expect(h.logs.all.filter { $0.hasPrefix("error") && $0.contains("JWT") }.count == 1)
            h.payop.updateFaults { $0.unauthorized = false }
            h.clock.advance(milliseconds: 1_000)
            try await verifier.verifyDue()
            #expect(try await h.event(outcome.eventID).state == "verified")
            #expect(verifier.access.currentProblem == nil)
        }
    }

    @Test func withoutAJWTEventsWaitUntouchedUntilOneArrives() async throws {
        try await PayopHarness.with { h, port in
            let paid = h.payop.create(.checkout, state: 2)
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            let jwt = SecretBox(nil)
            let client = PayopHTTPClient(http: h.http, baseURL: "http://127.0.0.1:\(port)", timeoutSeconds: 5, jwt: jwt)
            let verifier = h.verifier(payop: client)
            // Woken by the first IPN, to report that events wait; not by every one after it.
            #expect(verifier.wantsFreshIPNs)
            #expect(try await verifier.verifyDue() == 0)
            #expect(verifier.access.currentProblem?.contains("payop.jwt_file") == true)
            #expect(!verifier.wantsFreshIPNs)
            #expect(try await h.log.event(id: outcome.eventID)?.verificationAttempts.isEmpty == true)
            #expect(h.payop.calls.isEmpty)
            jwt.set(h.jwt)  // what a reload does
            #expect(verifier.wantsFreshIPNs)
            #expect(try await verifier.verifyDue() == 1)
            #expect(try await h.event(outcome.eventID).state == "verified")
            #expect(verifier.access.currentProblem == nil)
        }
    }

    @Test func jwtIsSentAsBearerAndNeverLogged() async throws {
        try await PayopHarness.with { h, _ in
            let paid = h.payop.create(.checkout, state: 2)
            h.payop.updateFaults { $0.unauthorized = true }
            _ = try await h.receive(SimulatedPayop.ipnBody(for: paid))
            try await h.verifier().verifyDue()
            #expect(h.payop.calls.first?.authorization == "Bearer \(h.jwt)")
            #expect(!h.logs.all.isEmpty)
            #expect(!h.logs.text.contains(h.jwt))
        }
    }

    @Test func idsAreSentPercentEncodedByteByByte() {
        #expect(PayopHTTPClient.encode("3f2a-9b.c_d~E") == "3f2a-9b.c_d~E")
        #expect(PayopHTTPClient.encode("a b/é?&=#%,") == "a%20b%2F%C3%A9%3F%26%3D%23%25%2C")
        #expect(PayopHTTPClient.encode("") == "")
    }

    @Test func idsWithReservedAndNonASCIICharactersReachPayopIntact() async throws {
        try await PayopHarness.with { h, _ in
            let client = h.client
            let checkouts = ["a%41/b é?&=#", "tx 2+%2C"]
            for id in checkouts { h.payop.create(.checkout, id: id, state: 2) }
            let refund = "ref/1 é?&=#%41"
            h.payop.create(.refund, id: refund, state: 2)
            let one = try await client.lookup(.checkout, id: checkouts[0])
            let both = try await client.lookupTransactions(ids: checkouts)
            let found = try await client.lookup(.refund, id: refund)
            let near = try await client.lookup(.refund, id: "ref/1 é?&=#A")
            #expect(one?.id == checkouts[0])
            #expect(Set(both.map(\.id)) == Set(checkouts))
            #expect(found?.id == refund)
            #expect(near == nil)
        }
    }

    @Test func dotSegmentsAreNeverSentAsATransactionsPath() async throws {
        try await PayopHarness.with { h, _ in
            let client = h.client
            for id in ["", ".", ".."] {
                let record = try await client.lookup(.checkout, id: id)
                #expect(record == nil)
            }
            #expect(h.payop.calls.isEmpty)
        }
    }

    @Test func simulatorAnswersWithPayopsFieldNames() async throws {
        let payop = SimulatedPayop(jwt: "j")
        let paid = payop.create(.checkout, state: 2, amount: "25.50", currency: "EUR")
        let refund = payop.create(.refund, state: 2)
        let withdrawal = payop.create(.withdrawal, state: 3)
        func answer(_ path: String, _ query: [String: String] = [:]) async throws -> (Int, [String: Any]) {
            let (status, body) = await payop.answer(path: path, query: query, authorization: "Bearer j")
            return (status, try #require(try JSONSerialization.jsonObject(with: body) as? [String: Any]))
        }
        let (status, one) = try await answer("/v2/transactions/\(paid.id)")
        #expect(status == 200 && one["status"] as? Int == 1)
        let transaction = try #require(one["data"] as? [String: Any])
        let transactionKeys = [
            "identifier", "amount", "currency", "state", "error", "createdAt", "orderId", "resultUrl",
        ]
        #expect(Set(transaction.keys) == Set(transactionKeys))
        #expect(transaction["amount"] as? String == "25.50" && transaction["state"] as? Int == 2)
        let (_, filtered) = try await answer("/v1/transactions/filter", ["query[identifiers]": "\(paid.id),unknown"])
        #expect((filtered["data"] as? [[String: Any]])?.map { $0["identifier"] as? String } == [paid.id])
        let (_, refunds) = try await answer("/v1/refunds/user-refunds", ["query[identifier]": refund.id])
        let refundRecord = try #require((refunds["data"] as? [[String: Any]])?.first)
        let refundKeys = ["identifier", "status", "amount", "currency", "sourceTransaction", "metadata"]
        #expect(Set(refundRecord.keys) == Set(refundKeys))
        #expect(refundRecord["status"] as? Int == 2 && refundRecord["amount"] is String)
        #expect(refundRecord["metadata"] is [String: Any])
        let source = refundRecord["sourceTransaction"] as? [String: Any]
        #expect(source?["identifier"] as? String == refund.sourceTransactionID)
        let (_, withdrawals) = try await answer(
            "/v1/withdrawals/user-withdrawals", ["query[identifier]": withdrawal.id])
        let withdrawalRecord = try #require((withdrawals["data"] as? [[String: Any]])?.first)
        #expect(Set(withdrawalRecord.keys) == ["identifier", "status", "amount", "currency", "comment"])
        #expect(withdrawalRecord["status"] as? Int == 3 && withdrawalRecord["amount"] is String)
        let (missing, message) = try await answer("/v2/transactions/unknown")
        #expect(missing == 404 && message["message"] as? String == "Transaction not found")
    }

    @Test func simulatorKeepsItsLatestCallsNotEveryCall() async throws {
        let payop = SimulatedPayop(jwt: "j")
        for n in 0..<(SimulatedPayop.callsKept + 10) {
            _ = await payop.answer(path: "/v2/transactions/\(n)", query: [:], authorization: nil)
        }
        _ = await payop.answer(path: "/v2/transactions/last", query: [:], authorization: "Bearer j")
        #expect(payop.calls.count <= SimulatedPayop.callsKept)
        #expect(payop.calls.count >= SimulatedPayop.callsKept / 2)
        let last = try #require(payop.calls.last)
        #expect(last.path == "/v2/transactions/last" && last.authorization == "Bearer j" && last.answer == 404)
    }

    @Test func refundAndWithdrawalAreVerifiedThroughTheirEndpoints() async throws {
        try await PayopHarness.with { h, _ in
            let refund = h.payop.create(.refund, state: 2, amount: "100", currency: "USD")
            let withdrawal = h.payop.create(.withdrawal, state: 3, amount: "40", currency: "USD")
            let r = try await h.receive(SimulatedPayop.ipnBody(for: refund))
            let w = try await h.receive(SimulatedPayop.ipnBody(for: withdrawal))
            try await h.verifier().verifyDue()
            #expect(try await h.event(r.eventID).state == "verified")
            #expect(try await h.event(r.eventID).transactionID == refund.sourceTransactionID)
            #expect(try await h.event(w.eventID).state == "verified")
            let paths = Set(h.payop.calls.map(\.path))
            #expect(paths == ["/v1/refunds/user-refunds", "/v1/withdrawals/user-withdrawals"])
        }
    }

    @Test(arguments: [("timeout", "checkout.timeout"), (PaymentStatus.securityRejectionMessage, "checkout.rejected")])
    func stateFiveIsVerifiedWithItsMeaning(message: String, type: String) async throws {
        try await PayopHarness.with { h, _ in
            let entity = h.payop.create(.checkout, state: 5, errorMessage: message)
            let outcome = try await h.receive(SimulatedPayop.ipnBody(for: entity))
            try await h.verifier().verifyDue()
            let event = try await h.event(outcome.eventID)
            #expect(event.type == type)
            #expect(event.state == "verified")
            #expect(event.errorMessage == message)
        }
    }

    @Test func reCheckTurnsPendingPaymentsIntoAcceptedEventsWithoutAnyIPN() async throws {
        try await PayopHarness.with { h, _ in
            let entities = [h.payop.create(.checkout, state: 4), h.payop.create(.checkout, state: 4)]
            var pendings: [IngestOutcome] = []
            for entity in entities { pendings.append(try await h.receive(SimulatedPayop.ipnBody(for: entity))) }
            let verifier = h.verifier()
            try await verifier.verifyDue()
            for pending in pendings { #expect(try await h.event(pending.eventID).state == "verified") }
            for entity in entities { _ = h.payop.setState(.checkout, id: entity.id, state: 2) }
            #expect(try await verifier.verifyDue() == 0)
            h.clock.advance(milliseconds: 300_000)
            // Both re-checks in one question to Payop's filter endpoint.
            #expect(try await verifier.verifyDue() == 2)
            let accepted = try await h.log.events(.init(type: "checkout.accepted"))
            #expect(accepted.count == 2)
            #expect(accepted.allSatisfy { $0.state == "verified" && $0.source == "reconcile" && $0.ipn == nil })
            #expect(h.payop.calls.contains { $0.path == "/v1/transactions/filter" })
            h.clock.advance(milliseconds: 300_000)
            #expect(try await verifier.verifyDue() == 0)
        }
    }

    @Test func repeatOfARejectedIPNAsksPayopAgainAndVerifiesWhenPayopAgrees() async throws {
        try await PayopHarness.with { h, _ in
            let entity = h.payop.create(.checkout, state: 4)
            let body = SimulatedPayop.ipnBody(for: entity, claimingState: 2)
            let outcome = try await h.receive(body)
            let verifier = h.verifier()
            try await verifier.verifyDue()
            #expect(try await h.event(outcome.eventID).rejectionReason == "status_mismatch")
            _ = h.payop.setState(.checkout, id: entity.id, state: 2)
            h.clock.advance(milliseconds: 60_000)
            try await h.receive(body)
            try await verifier.verifyDue()
            let event = try await h.event(outcome.eventID)
            #expect(event.state == "verified" && event.rejectionReason == nil && event.duplicates == 1)
        }
    }
}

/// The comparison itself, with no Payop at all.
@Suite struct VerificationRulesTests {
    func record(state: Int = 2, amount: String? = "10.00", currency: String? = "EUR", order: String? = "o-1") -> PayopRecord {
        PayopRecord(
            kind: .checkout, id: "tx", status: .checkout(state: state, errorMessage: nil), orderID: order, amount: amount,
            currency: currency)
    }

    @Test func amountsCompareAsDecimalsNotText() {
        #expect(EventVerification.compare(IPNClaim(amount: "10"), record()) == nil)
        #expect(EventVerification.compare(IPNClaim(amount: "10.01"), record()) == .amountMismatch)
        #expect(EventVerification.compare(IPNClaim(amount: "10.00abc"), record()) == .amountMismatch)
        #expect(EventVerification.compare(IPNClaim(amount: "1e1"), record()) == .amountMismatch)
    }

    @Test func currencyOrderAndInvoiceMustAgreeWhereBothAreKnown() {
        #expect(EventVerification.compare(IPNClaim(currency: "USD"), record()) == .currencyMismatch)
        #expect(EventVerification.compare(IPNClaim(currency: "eur"), record()) == nil)
        #expect(EventVerification.compare(IPNClaim(orderID: "o-2"), record()) == .orderMismatch)
        #expect(EventVerification.compare(IPNClaim(orderID: nil), record()) == nil)
        var withInvoice = record()
        withInvoice.invoiceID = "inv-1"
        #expect(EventVerification.compare(IPNClaim(invoiceID: "inv-2"), withInvoice) == .invoiceMismatch)
    }

    @Test func twoDifferentUnknownStatesAreAMismatch() {
        var machine = EventVerification.fresh(kind: .checkout, status: .checkout(state: 7, errorMessage: nil), receivedAt: 0)
        let policy = VerificationPolicy(
            backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 0,
            reconcileIntervalMilliseconds: 60_000)
        let outcome = machine.payopAnswered(.record(record(state: 8)), claims: [], now: 0, policy: policy)
        #expect(machine.state == .rejected(.statusMismatch) && outcome.reportedStatus?.status.payopState == 8)
    }

    @Test func backoffDoublesAndIsCapped() {
        let backoff = Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter)
        #expect((1...10).map { backoff.delayMilliseconds(afterAttempt: $0) }.prefix(4) == [1_000, 2_000, 4_000, 8_000])
        #expect(backoff.delayMilliseconds(afterAttempt: 40) == 300_000)
        let jittery = Backoff(initialSeconds: 10, maxSeconds: 300, jitter: { 1.2 })
        #expect(jittery.delayMilliseconds(afterAttempt: 1) == 12_000)
    }
}

/// Many events at once, with the fake Payop and a real SQLite file.
@Suite struct VerifierBatchTests {
    @Test func everyDueEventIsAskedAboutOnceAndVerified() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        let payop = FakePayop()
        let verifier = Verifier(
            store: log, payop: payop,
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 0,
                reconcileIntervalMilliseconds: 60_000),
            clock: clock, logger: quietLogger)
        let count = 300
        try await withThrowingTaskGroup(of: Void.self) { group in
            for n in 0..<count {
                group.addTask {
                    let body = checkoutBody(transaction: "tx-\(n)", state: 2)
                    let ipn = IncomingIPN(
                        receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
                        notification: try NotificationParser.parse(body).get(), verifiedBySignature: false)
                    _ = try await log.ingest(ipn)
                }
            }
            try await group.waitForAll()
        }
        while try await verifier.verifyDue() > 0 {}
        #expect(try await log.events(.init(state: "verified", limit: 10_000)).count == count)
        #expect(try await log.events(.init(state: "received", limit: 10_000)).isEmpty)
        #expect(payop.asked.withLock { $0 } == count)
    }
}

/// Payop taking its time: every question waits until cancelled.
final class StalledPayop: PayopAPI {
    func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
        while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
        throw PayopError(.unavailable, "cancelled")
    }
    func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] { [] }
}

@Suite struct VerifierEarlyQuestionTests {
    struct Setup {
        let dir: TemporaryDirectory
        let clock = TestClock()
        let log: SQLiteEventLog
        let payop = FakePayop()
        let verifier: Verifier
        let ingress: IPNIngress

        init(asksEarly: Bool, payop other: (any PayopAPI)? = nil) throws {
            dir = try TemporaryDirectory()
            log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
            let verifier = Verifier(
                store: log, payop: other ?? payop,
                policy: VerificationPolicy(
                    backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter),
                    notFoundRetryMilliseconds: 0, reconcileIntervalMilliseconds: 60_000),
                clock: clock, logger: quietLogger, asksEarly: asksEarly)
            self.verifier = verifier
            ingress = IPNIngress(
                settings: ingressSettings(), store: log, clock: clock, logger: quietLogger,
                onAccepting: { verifier.askEarly($0.notification.kind, entityID: $0.notification.entityID) })
        }

        func post(_ transaction: String) async -> IngressAnswer {
            let body = checkoutBody(transaction: transaction, state: 2)
            guard case .readBody(let admitted) = ingress.preflight(
                method: "POST", path: "/payop/ipn", peer: IPAddress("127.0.0.1"), forwardedFor: [], contentLength: body.count)
            else { return IngressAnswer(0, "not admitted") }
            return await ingress.accept(body: body, from: admitted)
        }
    }

    @Test func ipnsQuestionIsAskedWhileItsReceiptCommitsAndOnlyOnce() async throws {
        let s = try Setup(asksEarly: true)
        defer { s.log.close() }
        #expect(await s.post("tx-early") == .accepted)
        #expect(try await s.verifier.verifyDue() == 1)
        #expect(try await s.log.events(.init(state: "verified", limit: 10)).count == 1)
        #expect(s.payop.asked.withLock { $0 } == 1)
        #expect(s.verifier.earlyQuestions == 0)
    }

    @Test func earlyAnswerOlderThanItsFreshnessIsAskedAgain() async throws {
        let s = try Setup(asksEarly: true)
        defer { s.log.close() }
        #expect(await s.post("tx-late") == .accepted)
        s.clock.advance(milliseconds: Verifier.earlyFreshnessMilliseconds)
        #expect(try await s.verifier.verifyDue() == 1)
        #expect(try await s.log.events(.init(state: "verified", limit: 10)).count == 1)
        // The early question may or may not have reached Payop yet; the answer used is a new one.
        let asked = s.payop.asked.withLock { $0 }
        #expect(asked == 1 || asked == 2)
        #expect(s.verifier.earlyQuestions == 0)
    }

    @Test func earlyQuestionsAreOffUnlessAskedForAndBounded() async throws {
        let off = try Setup(asksEarly: false)
        defer { off.log.close() }
        #expect(await off.post("tx-off") == .accepted)
        #expect(off.verifier.earlyQuestions == 0)
        #expect(try await off.verifier.verifyDue() == 1)
        #expect(off.payop.asked.withLock { $0 } == 1)
        // Copies of decided events never take theirs: what waits is bounded, and old ones make room.
        let on = try Setup(asksEarly: true)
        defer { on.log.close() }
        func drained() async {
            while on.verifier.earlyQuestionsInFlight > 0 { await Task.yield() }
        }
        for n in 0..<(Verifier.earlyLimit + 50) {
            await drained()
            on.verifier.askEarly(.checkout, entityID: "copy-\(n)")
        }
        await drained()
        #expect(on.verifier.earlyQuestions == Verifier.earlyLimit)
        // Once they are stale they make room.
        on.clock.advance(milliseconds: Verifier.earlyFreshnessMilliseconds)
        on.verifier.askEarly(.checkout, entityID: "fresh")
        #expect(on.verifier.earlyQuestions == 1)
        // At most `earlyConcurrency` on their way at once, however many IPNs arrive together.
        let slow = try Setup(asksEarly: true, payop: StalledPayop())
        defer { slow.log.close() }
        for n in 0..<50 { slow.verifier.askEarly(.checkout, entityID: "burst-\(n)") }
        #expect(slow.verifier.earlyQuestions == Verifier.earlyConcurrency)
        #expect(slow.verifier.earlyQuestionsInFlight == Verifier.earlyConcurrency)
    }

    @Test func aNewerIPNReplacesTheEarlyQuestionOfAnOlderOneAboutTheSameEntity() async throws {
        // Payop says pending until the payment is accepted, a second in.
        final class ChangingPayop: PayopAPI {
            let clock: TestClock
            let acceptedAt: Int64
            let asked = Mutex(0)
            init(clock: TestClock) {
                self.clock = clock
                acceptedAt = clock.nowMilliseconds() + 1_000
            }
            func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
                asked.withLock { $0 += 1 }
                let state = clock.nowMilliseconds() >= acceptedAt ? 2 : 1
                return PayopRecord(kind: kind, id: id, status: .status(kind: kind, state: state, errorMessage: nil))
            }
            func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] {
                var records: [PayopRecord] = []
                for id in ids { if let record = try await lookup(.checkout, id: id) { records.append(record) } }
                return records
            }
        }
        let s = try Setup(asksEarly: true)
        defer { s.log.close() }
        let payop = ChangingPayop(clock: s.clock)
        let verifier = Verifier(
            store: s.log, payop: payop,
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 10, jitter: Backoff.noJitter),
                notFoundRetryMilliseconds: 0, reconcileIntervalMilliseconds: 60_000),
            clock: s.clock, logger: quietLogger, asksEarly: true)
        // A copy of an older IPN about the entity is asked about while Payop still says pending ...
        verifier.askEarly(.checkout, entityID: "tx-same")
        while payop.asked.withLock({ $0 }) < 1 { await Task.yield() }
        // ... then Payop accepts it and sends the accepted IPN, whose question replaces that one.
        s.clock.advance(milliseconds: 1_500)
        let body = checkoutBody(transaction: "tx-same", state: 2)
        let ipn = IncomingIPN(
            receivedAt: s.clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
            notification: try NotificationParser.parse(body).get(), verifiedBySignature: false)
        verifier.askEarly(.checkout, entityID: "tx-same")
        _ = try await s.log.ingest(ipn)
        #expect(verifier.earlyQuestions == 1)
        s.clock.advance(milliseconds: 300)  // the first question is still "fresh": only replacing it helps
        #expect(try await verifier.verifyDue() == 1)
        #expect(try await s.log.events(.init(state: "verified", limit: 10)).count == 1)
        #expect(payop.asked.withLock { $0 } == 2)
    }

    @Test func noEarlyQuestionsWhileTheVerifierIsBehind() async throws {
        let s = try Setup(asksEarly: true)
        defer { s.log.close() }
        for n in 0..<3 { #expect(await s.post("tx-\(n)") == .accepted) }
        for _ in 0..<1000 where s.payop.asked.withLock({ $0 }) < 3 { await Task.yield() }
        #expect(try await s.verifier.verifyDue(batch: 2) == 2)  // a full batch: behind
        s.verifier.askEarly(.checkout, entityID: "tx-3")
        #expect(s.verifier.earlyQuestions == 1)  // tx-2's, not yet taken; none for tx-3
        #expect(try await s.verifier.verifyDue(batch: 2) == 1)  // caught up
        s.verifier.askEarly(.checkout, entityID: "tx-4")
        #expect(s.verifier.earlyQuestions == 1)
    }
}
