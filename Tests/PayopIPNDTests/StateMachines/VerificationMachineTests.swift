import Testing

@testable import PayopIPND

private let policy = VerificationPolicy(
    backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter), notFoundRetryMilliseconds: 600_000,
    reconcileIntervalMilliseconds: 300_000)

private let accepted = PaymentStatus.checkout(state: 2, errorMessage: nil)
private let pending = PaymentStatus.checkout(state: 4, errorMessage: nil)
private let failed = PaymentStatus.checkout(state: 3, errorMessage: nil)

private func record(_ status: PaymentStatus, amount: String? = "10.00", order: String? = "o-1", kind: IPNKind = .checkout)
    -> PayopRecord
{
    PayopRecord(kind: kind, id: "T", status: status, orderID: order, amount: amount, currency: "EUR")
}

@Suite struct VerificationMachineTests {
    @Test func confirmedStatusIsVerifiedWithPayopsFacts() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        let outcome = machine.payopAnswered(
            .record(record(accepted)), claims: [IPNClaim(receiptID: 7, orderID: "o-1", invoiceID: "inv")], now: 5,
            policy: policy)
        #expect(machine.state == .verified)
        #expect(outcome.verified?.amount == "10.00" && outcome.verified?.orderID == "o-1")
        #expect(outcome.verified?.invoiceID == "inv" && outcome.verified?.receiptID == 7)
        #expect(machine.nextCheckAt == nil)  // accepted is final
    }

    @Test func laggingAPIRejectsTheClaimButKeepsAskingAndVerifiesItWhenPayopCatchesUp() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        let first = machine.payopAnswered(.record(record(pending)), claims: [IPNClaim()], now: 10, policy: policy)
        #expect(machine.state == .rejected(.statusMismatch))
        #expect(first.reportedStatus?.status == pending)
        #expect(machine.nextCheckAt == Int64(1_010))
        #expect(machine.watchUntil == VerificationPolicy.payopRetryWindowMilliseconds)
        let second = machine.payopAnswered(.record(record(accepted)), claims: [IPNClaim()], now: 1_010, policy: policy)
        #expect(machine.state == .verified)
        #expect(second.verified != nil && second.reportedStatus == nil)
    }

    @Test func contradictedClaimIsNotAskedAboutAfterPayopsRetryWindow() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        var now: Int64 = 0
        while let next = machine.nextCheckAt {
            now = next
            _ = machine.payopAnswered(.record(record(pending)), claims: [], now: now, policy: policy)
        }
        #expect(now < VerificationPolicy.payopRetryWindowMilliseconds)
        #expect(machine.state == .rejected(.statusMismatch))
        machine.ipnRepeated(now: now + 1, policy: policy)
        #expect(machine.nextCheckAt == now + 1)
    }

    @Test func forgedFirstCopyDoesNotStopTheGenuineCopy() {
        var machine = EventVerification.fresh(kind: .refund, status: .refund(state: 2), receivedAt: 0)
        let payop = record(.refund(state: 2), amount: "1.00", order: nil, kind: .refund)
        let forged = IPNClaim(receiptID: 1, amount: "1000.00")
        _ = machine.payopAnswered(.record(payop), claims: [forged], now: 1, policy: policy)
        #expect(machine.state == .rejected(.amountMismatch))
        #expect(machine.nextCheckAt == nil)
        machine.ipnRepeated(now: 2, policy: policy)
        let genuine = IPNClaim(receiptID: 2, amount: "1.0")
        let outcome = machine.payopAnswered(.record(payop), claims: [forged, genuine], now: 2, policy: policy)
        #expect(machine.state == .verified)
        #expect(outcome.verified?.receiptID == 2 && outcome.verified?.amount == "1.00")
    }

    @Test func refundWhoseSourceTransactionPayopContradictsIsRejected() {
        var machine = EventVerification.fresh(kind: .refund, status: .refund(state: 2), receivedAt: 0)
        var payop = record(.refund(state: 2), amount: "1.00", order: nil, kind: .refund)
        payop.transactionID = "X"
        _ = machine.payopAnswered(
            .record(payop), claims: [IPNClaim(amount: "1.00", transactionID: "T-victim")], now: 1, policy: policy)
        #expect(machine.state == .rejected(.transactionMismatch))
    }

    @Test func notFoundIsAskedAgainUntilTheGraceEndsThenRejected() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        _ = machine.payopAnswered(.notFound, claims: [], now: 0, policy: policy)
        #expect(machine.state == .received && machine.nextCheckAt == 1_000)
        _ = machine.payopAnswered(.notFound, claims: [], now: 600_000, policy: policy)
        #expect(machine.state == .rejected(.notFound) && machine.nextCheckAt == nil)
    }

    @Test func laterCopyGetsItsOwnNotFoundGrace() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        _ = machine.payopAnswered(.notFound, claims: [], now: 600_000, policy: policy)
        #expect(machine.state == .rejected(.notFound))
        // The genuine copy arrives half an hour after an early (forged) one; Payop's API lags it too.
        machine.ipnRepeated(now: 1_800_000, policy: policy)
        _ = machine.payopAnswered(.notFound, claims: [], now: 1_800_000, policy: policy)
        #expect(machine.nextCheckAt == 1_801_000)
        _ = machine.payopAnswered(.record(record(accepted)), claims: [], now: 1_801_000, policy: policy)
        #expect(machine.state == .verified)
    }

    @Test func statusMismatchAfterARepeatIsStillWatchedForTheWholeRetryWindow() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        _ = machine.payopAnswered(.notFound, claims: [], now: 600_000, policy: policy)
        machine.ipnRepeated(now: 700_000, policy: policy)
        _ = machine.payopAnswered(.record(record(pending)), claims: [], now: 700_000, policy: policy)
        #expect(machine.watchUntil == VerificationPolicy.payopRetryWindowMilliseconds)
    }

    @Test func unreachablePayopKeepsTheEventWaitingWithGrowingBackoff() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        var delays: [Int64] = []
        var now: Int64 = 0
        for _ in 0..<4 {
            _ = machine.payopAnswered(.unanswered(code: "unavailable", detail: "down"), claims: [], now: now, policy: policy)
            delays.append(machine.nextCheckAt! - now)
            now = machine.nextCheckAt!
        }
        #expect(delays == [1_000, 2_000, 4_000, 8_000])
        #expect(machine.state == .received)
    }

    @Test func verifiedFailedCheckoutIsWatchedForTheRetryWindow() {
        var machine = EventVerification.fresh(kind: .checkout, status: failed, receivedAt: 0)
        _ = machine.payopAnswered(.record(record(failed)), claims: [], now: 0, policy: policy)
        #expect(machine.state == .verified && machine.nextCheckAt == 300_000)
        let later = machine.payopAnswered(.record(record(accepted)), claims: [], now: 300_000, policy: policy)
        #expect(later.reportedStatus?.status == accepted)
        #expect(machine.state == .verified && machine.nextCheckAt == nil)
    }

    @Test func reportedStatusVerifiesARejectedEventWithPayopsFacts() {
        var machine = EventVerification.fresh(kind: .checkout, status: accepted, receivedAt: 0)
        _ = machine.payopAnswered(.record(record(accepted, order: "o-1")), claims: [IPNClaim(orderID: "forged")], now: 1, policy: policy)
        #expect(machine.state == .rejected(.orderMismatch))
        let facts = machine.reportedByPayop(record(accepted), claims: [IPNClaim(orderID: "forged")], now: 2, policy: policy)
        #expect(machine.state == .verified && facts?.orderID == "o-1" && facts?.receiptID == nil)
    }

    @Test func legacyEventsAreNeverAskedAbout() {
        var machine = EventVerification.signed(kind: .checkout, status: accepted, receivedAt: 0)
        machine.ipnRepeated(now: 1, policy: policy)
        _ = machine.payopAnswered(.record(record(pending)), claims: [], now: 2, policy: policy)
        #expect(machine.state == .verified && machine.nextCheckAt == nil)
    }

    /// I1-I5 over seeded random input sequences.
    @Test(arguments: scenarioSeeds(count: 300, base: 1_000))
    func invariantsHoldOverRandomInputSequences(seed: UInt64) {
        var random = SeededRandom(seed: seed)
        let statuses = [accepted, pending, failed, PaymentStatus.checkout(state: 9, errorMessage: nil)]
        let mine = random.pick(statuses)
        var machine =
            random.chance(0.1)
            ? EventVerification.signed(kind: .checkout, status: mine, receivedAt: 0)
            : EventVerification.fresh(kind: .checkout, status: mine, receivedAt: 0)
        var now: Int64 = 0
        var wasVerified = machine.state == .verified
        var confirmedByPayop = false
        for step in 0..<40 {
            now += Int64.random(in: 0...3_600_000, using: &random)
            let before = machine
            var verifiedNow: VerifiedFacts?
            switch Int.random(in: 0..<10, using: &random) {
            case 0: machine.ipnRepeated(now: now, policy: policy)
            case 1: _ = machine.payopAnswered(.notFound, claims: [], now: now, policy: policy)
            case 2: _ = machine.payopAnswered(.unanswered(code: "unavailable", detail: ""), claims: [], now: now, policy: policy)
            case 3:
                verifiedNow = machine.reportedByPayop(record(mine), claims: [IPNClaim(amount: "99")], now: now, policy: policy)
            default:
                let status = random.pick(statuses)
                let claims = random.chance(0.3) ? [IPNClaim(amount: "11.00")] : [IPNClaim(amount: "10.0")]
                verifiedNow = machine.payopAnswered(.record(record(status)), claims: claims, now: now, policy: policy).verified
                if status == mine { confirmedByPayop = true }
            }
            let context = "seed \(seed) step \(step): \(before) -> \(machine)"
            // I1
            if wasVerified { #expect(machine.state == .verified, "\(context)") }
            // I2
            if before.state != .verified, machine.state == .verified {
                #expect(confirmedByPayop || verifiedNow != nil, "\(context)")
                #expect(verifiedNow?.amount == "10.00", "\(context)")
            }
            // I3
            if machine.state == .received { #expect(machine.nextCheckAt != nil, "\(context)") }
            // I4
            if let next = machine.nextCheckAt, next != before.nextCheckAt { #expect(next >= now, "\(context)") }
            // I5
            if machine.legacy { #expect(machine.nextCheckAt == nil, "\(context)") }
            wasVerified = machine.state == .verified
        }
    }
}
