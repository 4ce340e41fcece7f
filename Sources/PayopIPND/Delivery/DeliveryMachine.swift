/// A delivery's state; stored as its raw value.
public enum DeliveryState: String, Sendable, Equatable, CaseIterable {
    case pending
    case running
    case delivered
    case dead
}

/// One hook's delivery of one event as a value: its state, its attempts and when it may run next.
/// Every change of a delivery goes through one of the `mutating` functions below (no I/O); the log
/// persists the result, and a hook is started only once `start` has been committed.
///
/// Invariants (checked by `DeliveryMachineTests` over seeded random input sequences):
/// - D1 `attempts` counts the runs that were started and ended (or were cut off by a crash), never
///   one the daemon's own shutdown interrupted.
/// - D2 Only `pending` starts, and only once due; a started run is `running` until it ends.
/// - D3 `delivered` is final except for `replay`; `dead` waits for `replay`.
/// - D4 `dead` only after `maxAttempts` failed runs, or a 410 Gone.
public struct DeliveryProgress: Sendable, Equatable {
    public private(set) var state: DeliveryState
    public private(set) var attempts: Int
    public private(set) var nextAttemptAt: Int64

    public init(state: DeliveryState, attempts: Int, nextAttemptAt: Int64) {
        self.state = state
        self.attempts = attempts
        self.nextAttemptAt = nextAttemptAt
    }

    public static func created(now: Int64) -> DeliveryProgress {
        DeliveryProgress(state: .pending, attempts: 0, nextAttemptAt: now)
    }

    /// Starts the next attempt; returns its number, or nil when the delivery may not run now.
    public mutating func start(now: Int64) -> Int? {
        guard state == .pending, nextAttemptAt <= now else { return nil }
        state = .running
        attempts += 1
        return attempts
    }

    /// How a run ended, as the log records it.
    public enum End: Sendable, Equatable {
        case delivered
        case retry(at: Int64)
        case dead
    }

    /// The run of `attempt` ended with `outcome`. Returns nil when the delivery is no longer that run
    /// (replayed meanwhile): its new state stands.
    public mutating func finish(
        attempt: Int, outcome: HookResult.Outcome, maxAttempts: Int, backoff: Backoff, now: Int64
    ) -> End? {
        guard state == .running, attempts == attempt else { return nil }
        switch outcome {
        case .delivered:
            state = .delivered
            nextAttemptAt = now
            return .delivered
        case .gone:
            state = .dead
            nextAttemptAt = now
            return .dead
        case .failed(let retryAfter):
            guard attempt < maxAttempts else {
                state = .dead
                nextAttemptAt = now
                return .dead
            }
            var delay = backoff.delayMilliseconds(afterAttempt: attempt)
            if let retryAfter, retryAfter > delay {
                delay = min(retryAfter, Int64(backoff.maxSeconds * 1000))
            }
            state = .pending
            nextAttemptAt = now + delay
            return .retry(at: nextAttemptAt)
        }
    }

    /// The daemon's own shutdown stopped the run: it runs again at the next start, and the attempt is
    /// not spent (a hook must not die of restarts).
    public mutating func interrupt(attempt: Int, now: Int64) {
        guard state == .running, attempts == attempt else { return }
        state = .pending
        attempts -= 1
        nextAttemptAt = now
    }

    /// At start, under the log's lock: a run the last daemon did not see end (a crash, kill -9) runs
    /// again; it may have run, so it counts.
    public mutating func recoverAfterCrash(now: Int64) {
        guard state == .running else { return }
        state = .pending
        nextAttemptAt = now
    }

    /// Whether the delivery's row is the only record of its last run: a first run that delivered, which
    /// is how most deliveries end. Every other finished run also gets a row of the runs' history
    /// (`delivery_attempts`), and `replay` writes this one's before the delivery starts over: a history
    /// row for it was a row and an index entry more in every delivery's commit.
    public var lastRunIsInRowOnly: Bool { state == .delivered && attempts == 1 }

    /// `replay`: anything but a running delivery starts over.
    public mutating func replay(now: Int64) {
        guard state != .running else { return }
        state = .pending
        attempts = 0
        nextAttemptAt = now
    }
}
