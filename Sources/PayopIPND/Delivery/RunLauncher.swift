import Synchronization

/// Hands the runs the log claimed early (`EarlyStarts`) to a task that waits on one hook reaper's
/// thread (`Dispatcher.launchRuns`), which starts them there. The commit that claimed them wakes that
/// thread alone: not a pass of the dispatcher on a pool thread, which would then hand each run to a
/// reaper (a thread woken less between Payop's answer and the hook).
final class RunLauncher: Sendable {
    let reaper: ProcessReaper
    private let state = Mutex(State())
    private struct State {
        var claims: [DeliveryClaim] = []
        var waiting: CheckedContinuation<Void, Never>?
        /// Closed (the dispatcher stops starting runs) or its task cancelled: it takes no more claims.
        var closed = false
    }

    init(reaper: ProcessReaper) { self.reaper = reaper }

    /// The waiting task, to resume once the caller has let go of its own locks (`resume`): a wake-up
    /// enqueues the task on its reaper and writes to that thread's wake pipe.
    struct Wake {
        fileprivate let waiting: CheckedContinuation<Void, Never>?
        func resume() { waiting?.resume() }
    }

    /// Queues `claims` for the waiting task, and returns it to wake; nil, queuing nothing, once closed.
    func push(_ claims: [DeliveryClaim]) -> Wake? {
        state.withLock { state in
            guard !state.closed else { return nil }
            guard !claims.isEmpty else { return Wake(waiting: nil) }
            state.claims += claims
            defer { state.waiting = nil }
            return Wake(waiting: state.waiting)
        }
    }

    /// Takes no more claims; returns those queued and not yet taken by the task, and the task to wake
    /// (it then ends).
    func close() -> ([DeliveryClaim], Wake) {
        state.withLock { state in
            state.closed = true
            defer {
                state.claims.removeAll()
                state.waiting = nil
            }
            return (state.claims, Wake(waiting: state.waiting))
        }
    }

    /// The claims queued since the last call, waiting for some; nil once closed (or the task is
    /// cancelled) with nothing queued. One task calls it.
    func next() async -> [DeliveryClaim]? {
        while true {
            let taken = state.withLock { state -> [DeliveryClaim]?? in
                if !state.claims.isEmpty {
                    defer { state.claims.removeAll() }
                    return .some(state.claims)
                }
                return state.closed ? .some(nil) : .none
            }
            if let taken { return taken }
            await withTaskCancellationHandler {
                await withCheckedContinuation { continuation in
                    let ready = state.withLock { state in
                        precondition(state.waiting == nil, "one task waits on a launcher")
                        guard state.claims.isEmpty, !state.closed else { return true }
                        state.waiting = continuation
                        return false
                    }
                    if ready { continuation.resume() }
                }
            } onCancel: {
                _ = state.withLock { state in
                    state.closed = true
                    defer { state.waiting = nil }
                    return state.waiting
                }?.resume()
            }
        }
    }
}
