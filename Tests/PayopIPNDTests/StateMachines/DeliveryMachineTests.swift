import Testing

@testable import PayopIPND

private let backoff = Backoff(initialSeconds: 2, maxSeconds: 10_800, jitter: Backoff.noJitter)

@Suite struct DeliveryMachineTests {
    @Test func onlyADuePendingDeliveryStarts() {
        var delivery = DeliveryProgress(state: .pending, attempts: 0, nextAttemptAt: 10)
        #expect(delivery.start(now: 9) == nil)
        #expect(delivery.start(now: 10) == 1)
        #expect(delivery.state == .running)
        #expect(delivery.start(now: 11) == nil)
    }

    @Test func failedRunRetriesWithBackoffThenDiesAfterMaxAttempts() {
        var delivery = DeliveryProgress.created(now: 0)
        var ends: [DeliveryProgress.End?] = []
        var now: Int64 = 0
        for _ in 0..<3 {
            let attempt = delivery.start(now: now)!
            ends.append(
                delivery.finish(
                    attempt: attempt, outcome: .failed(retryAfterMilliseconds: nil), maxAttempts: 3, backoff: backoff,
                    now: now))
            now = delivery.nextAttemptAt
        }
        #expect(ends == [.retry(at: 2_000), .retry(at: 6_000), .dead])
        #expect(delivery.state == .dead && delivery.attempts == 3)
    }

    @Test func retryAfterLongerThanTheBackoffIsHonouredUpToTheCap() {
        var delivery = DeliveryProgress.created(now: 0)
        let attempt = delivery.start(now: 0)!
        let end = delivery.finish(
            attempt: attempt, outcome: .failed(retryAfterMilliseconds: 99_000_000), maxAttempts: 5, backoff: backoff,
            now: 0)
        #expect(end == .retry(at: 10_800_000))
    }

    @Test func goneIsDeadAtOnce() {
        var delivery = DeliveryProgress.created(now: 0)
        let attempt = delivery.start(now: 0)!
        #expect(delivery.finish(attempt: attempt, outcome: .gone, maxAttempts: 30, backoff: backoff, now: 1) == .dead)
    }

    @Test func shutdownInterruptionDoesNotSpendTheAttempt() {
        var delivery = DeliveryProgress(state: .pending, attempts: 2, nextAttemptAt: 0)
        let attempt = delivery.start(now: 5)!
        delivery.interrupt(attempt: attempt, now: 6)
        #expect(delivery == DeliveryProgress(state: .pending, attempts: 2, nextAttemptAt: 6))
    }

    @Test func crashRecoveryRunsItAgainAndCountsTheAttempt() {
        var delivery = DeliveryProgress.created(now: 0)
        _ = delivery.start(now: 0)
        delivery.recoverAfterCrash(now: 9)
        #expect(delivery == DeliveryProgress(state: .pending, attempts: 1, nextAttemptAt: 9))
    }

    @Test func outcomeOfAReplayedRunDoesNotOverwriteTheReplay() {
        var delivery = DeliveryProgress.created(now: 0)
        _ = delivery.start(now: 0)
        let end = delivery.finish(attempt: 2, outcome: .delivered, maxAttempts: 3, backoff: backoff, now: 1)
        #expect(end == nil && delivery.state == .running)
    }

    /// D1-D4 over seeded random input sequences.
    @Test(arguments: scenarioSeeds(count: 300, base: 5_000))
    func invariantsHoldOverRandomInputSequences(seed: UInt64) {
        var random = SeededRandom(seed: seed)
        let maxAttempts = Int.random(in: 1...5, using: &random)
        var delivery = DeliveryProgress.created(now: 0)
        var now: Int64 = 0
        var running: Int?
        var endedRuns = 0
        var lastWasGone = false
        for step in 0..<60 {
            now += Int64.random(in: 0...20_000, using: &random)
            let before = delivery
            switch Int.random(in: 0..<8, using: &random) {
            case 0, 1, 2:
                if let attempt = delivery.start(now: now) {
                    #expect(before.state == .pending && before.nextAttemptAt <= now, "seed \(seed) step \(step)")  // D2
                    running = attempt
                }
            case 3, 4, 5:
                guard let attempt = running else { continue }
                let outcome = random.pick([
                    HookResult.Outcome.delivered, .failed(retryAfterMilliseconds: nil), .failed(retryAfterMilliseconds: 50_000),
                    .gone,
                ])
                if delivery.finish(attempt: attempt, outcome: outcome, maxAttempts: maxAttempts, backoff: backoff, now: now)
                    != nil
                {
                    endedRuns += 1
                    lastWasGone = outcome == .gone
                }
                running = nil
            case 6:
                if let attempt = running { delivery.interrupt(attempt: attempt, now: now) }
                running = nil
            default:
                if delivery.state == .running { endedRuns += 1 }  // a crash: the run may have happened
                delivery.recoverAfterCrash(now: now)
                running = nil
            }
            let context = "seed \(seed) step \(step): \(before) -> \(delivery)"
            #expect(delivery.attempts == endedRuns + (delivery.state == .running ? 1 : 0), "\(context)")  // D1
            if before.state == .delivered { #expect(delivery.state == .delivered, "\(context)") }  // D3
            if before.state != .dead, delivery.state == .dead {
                #expect(delivery.attempts >= maxAttempts || lastWasGone, "\(context)")  // D4
            }
        }
    }
}
