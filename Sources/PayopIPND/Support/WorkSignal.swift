import Dispatch
import Synchronization

/// Wakes a background loop when there is new work, or lets it sleep until its next due time.
/// Signals sent while nobody waits are remembered (once), so no wake-up is lost.
///
/// A wait is one continuation and no task: a busy stage waits hundreds of times a second, and a task
/// group racing a `Task.sleep` cost five task switches per wait. Its timeout is one dispatch timer per
/// signal, re-armed lazily: a timer that fires before the current waiter's deadline (it was set for an
/// earlier wait that a signal ended) re-arms itself for the rest instead of waking the loop, so a busy
/// stage pays about one timer per timeout, not one per wait.
public final class WorkSignal: Sendable {
    private struct State {
        var pending = false
        var waiter: UnsafeContinuation<Void, Never>?
        /// When the waiter's timeout ends (uptime nanoseconds); nil: it waits for a signal only.
        var deadline: UInt64?
        /// Which wait `waiter` belongs to: a cancellation that comes after its wait ended touches nothing.
        var generation: UInt64 = 0
        /// The earliest armed timer, if any (uptime nanoseconds).
        var timerAt: UInt64?
    }

    private let state = Mutex(State())
    private let firings = Atomic<Int>(0)
    /// Timers that have fired so far: a few per timeout, never a stream (a test's measure of spinning).
    var timersFired: Int { firings.load(ordering: .relaxed) }

    public init() {}

    public func signal() {
        let waiter = state.withLock { state -> UnsafeContinuation<Void, Never>? in
            guard let waiter = state.waiter else {
                state.pending = true
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume()
    }

    /// Returns on a signal, after `timeout` (nil: no timeout), or when the task is cancelled.
    public func wait(timeout: Duration?) async {
        // A signal already there ends the wait at once; otherwise this wait gets its generation.
        let started = state.withLock { state -> UInt64? in
            if state.pending {
                state.pending = false
                return nil
            }
            state.generation &+= 1
            return state.generation
        }
        guard let generation = started else { return }
        let deadline = timeout.map { DispatchTime.now().uptimeNanoseconds &+ Self.nanoseconds($0) }
        await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                let (resumeNow, arm) = state.withLock { state -> (Bool, UInt64?) in
                    if state.pending || Task.isCancelled || state.generation != generation {
                        state.pending = false
                        return (true, nil)
                    }
                    if let deadline, deadline <= DispatchTime.now().uptimeNanoseconds { return (true, nil) }
                    state.waiter = continuation
                    state.deadline = deadline
                    return (false, Self.timerToArm(&state, for: deadline))
                }
                if resumeNow { continuation.resume() }
                if let arm { armTimer(at: arm) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> UnsafeContinuation<Void, Never>? in
                guard state.generation == generation else { return nil }
                // Bumped: a cancellation that lands before the continuation is stored resumes it at once.
                state.generation &+= 1
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume()
        }
    }

    /// The time to arm a timer at for `deadline` (at most `longestTimer` ahead), unless one already
    /// fires by then.
    private static func timerToArm(_ state: inout State, for deadline: UInt64?) -> UInt64? {
        guard let deadline else { return nil }
        let at = min(deadline, DispatchTime.now().uptimeNanoseconds &+ longestTimer)
        if let armed = state.timerAt, armed <= at { return nil }
        state.timerAt = at
        return at
    }

    /// A timer is armed at most this far ahead; a longer wait is re-armed for the rest when it fires.
    static let longestTimer: UInt64 = 3_600_000_000_000

    private func armTimer(at uptime: UInt64) {
        DispatchQueue.global().asyncAfter(deadline: DispatchTime(uptimeNanoseconds: uptime)) { [self] in
            timerFired(armedAt: uptime)
        }
    }

    /// Ends the wait whose deadline has passed; a wait with time left gets a timer for the rest.
    private func timerFired(armedAt uptime: UInt64) {
        firings.add(1, ordering: .relaxed)
        let now = DispatchTime.now().uptimeNanoseconds
        let (waiter, arm) = state.withLock { state -> (UnsafeContinuation<Void, Never>?, UInt64?) in
            if state.timerAt == uptime { state.timerAt = nil }
            guard state.waiter != nil, let deadline = state.deadline else { return (nil, nil) }
            if deadline <= now {
                defer { state.waiter = nil }
                return (state.waiter, nil)
            }
            return (nil, Self.timerToArm(&state, for: deadline))
        }
        waiter?.resume()
        if let arm { armTimer(at: arm) }
    }

    /// `duration` in nanoseconds: 0 when it is not positive, at most about 36 years (so that a
    /// deadline never nears the top bits dispatch gives other meanings to).
    static func nanoseconds(_ duration: Duration) -> UInt64 {
        let ceiling: UInt64 = 1 << 60
        guard duration > .zero else { return 0 }
        // Before `components`, which traps on a duration of more seconds than an Int64 holds.
        guard duration < .seconds(Int64(ceiling / 1_000_000_000)) else { return ceiling }
        let (seconds, attoseconds) = duration.components
        return UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
    }
}
