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

/// `DeliveryAttempt.history`: the runs' history rows and the runs only a delivery's row records, merged.
@Suite struct DeliveryHistoryTests {
    func run(_ delivery: Int64, _ attempt: Int, _ outcome: String, at time: Int64) -> DeliveryAttempt {
        DeliveryAttempt(
            deliveryID: delivery, attempt: attempt, finishedAt: time, outcome: outcome, exitCode: 0, httpStatus: nil,
            error: nil, output: "\(delivery)/\(attempt)@\(time)")
    }

    func delivered(_ id: Int64, attempts: Int, at time: Int64) -> Delivery {
        Delivery(
            id: id, eventID: "evt", hook: "h\(id)", state: .delivered, attempts: attempts, nextAttemptAt: nil,
            lastExitCode: 0, output: "\(id)/\(attempts)@\(time)", deliveredAt: time)
    }

    func names(_ runs: [DeliveryAttempt]) -> [String] { runs.map { $0.output ?? "-" } }

    @Test func aFirstRunThatDeliveredComesFromItsRowAlone() {
        #expect(names(DeliveryAttempt.history(recorded: [], deliveries: [delivered(1, attempts: 1, at: 5)])) == ["1/1@5"])
        // A later attempt that delivered has its own history row: the row adds nothing.
        let recorded = [run(2, 1, "failed", at: 3), run(2, 2, "delivered", at: 9)]
        #expect(names(DeliveryAttempt.history(recorded: recorded, deliveries: [delivered(2, attempts: 2, at: 9)])) == ["2/1@3", "2/2@9"])
        // A pending, running or dead delivery's row records no run of its own.
        let pending = Delivery(id: 3, eventID: "evt", hook: "h3", state: .pending, attempts: 1, nextAttemptAt: 7)
        #expect(DeliveryAttempt.history(recorded: [], deliveries: [pending]).isEmpty)
    }

    @Test func rowOnlyRunsArePlacedByWhenTheyFinishedAndAfterTheirOwnDeliverysRuns() {
        let recorded = [run(1, 1, "delivered", at: 10), run(2, 1, "failed", at: 20), run(2, 2, "delivered", at: 40)]
        // Delivery 1 replayed and delivered again at 30: between delivery 2's runs.
        #expect(
            names(DeliveryAttempt.history(recorded: recorded, deliveries: [delivered(1, attempts: 1, at: 30)]))
                == ["1/1@10", "2/1@20", "1/1@30", "2/2@40"])
        // At the same time as another's run: after it.
        #expect(
            names(DeliveryAttempt.history(recorded: recorded, deliveries: [delivered(1, attempts: 1, at: 20)]))
                == ["1/1@10", "2/1@20", "1/1@20", "2/2@40"])
        // The clock stepped back before it: still after its own delivery's earlier runs.
        #expect(
            names(DeliveryAttempt.history(recorded: recorded, deliveries: [delivered(1, attempts: 1, at: 5)]))
                == ["1/1@10", "1/1@5", "2/1@20", "2/2@40"])
    }

    @Test func aRunAnEarlierVersionAlsoRecordedIsListedOnce() {
        let copy = run(1, 1, "delivered", at: 10)
        let row = Delivery(
            id: 1, eventID: "evt", hook: "h1", state: .delivered, attempts: 1, nextAttemptAt: nil, lastExitCode: 0,
            output: copy.output, deliveredAt: 10)
        #expect(DeliveryAttempt.history(recorded: [copy], deliveries: [row]) == [copy])
        // Not the same run when anything differs (here its output): both are listed.
        var other = row
        other.output = "another"
        #expect(DeliveryAttempt.history(recorded: [copy], deliveries: [other]).count == 2)
    }
}
