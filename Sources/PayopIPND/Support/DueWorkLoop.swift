import Logging

/// The loop of a background stage: do what is due, then sleep until the next due time, a signal, or
/// `recheck`. It never spins: a pass that did nothing while work seems due waits at least `idleFloor`,
/// and a failing pass (the event log unavailable) backs off, doubling up to `maxBackoff`, logged once
/// per failure spell.
struct DueWorkLoop: Sendable {
    let name: String
    let signal: WorkSignal
    let clock: any WallClock
    let logger: Logger
    /// The longest sleep, even with nothing due; nil: only a signal or a due time wakes the loop.
    var recheck: Duration? = nil
    var idleFloor: Duration = .seconds(1)
    var maxBackoff: Duration = .seconds(30)

    /// `pass` does what is due now: how many things it did, and when something next falls due, if ever.
    func run(while keepGoing: () -> Bool, pass: () async throws -> (worked: Int, next: Int64?)) async {
        var backoff: Duration = .zero
        while keepGoing() {
            var timeout = recheck
            do {
                let (worked, next) = try await pass()
                if let next {
                    var wait = Duration.milliseconds(max(0, next - clock.nowMilliseconds()))
                    if worked == 0, wait < idleFloor { wait = idleFloor }
                    timeout = timeout.map { min($0, wait) } ?? wait
                }
                if backoff != .zero { logger.notice("\(name) works again") }
                backoff = .zero
            } catch {
                if !keepGoing() { return }
                if backoff == .zero {
                    logger.error("\(name) pass failed; retrying with backoff", metadata: ["error": "\(error)"])
                }
                backoff = backoff == .zero ? idleFloor : min(backoff * 2, maxBackoff)
                timeout = backoff
            }
            if timeout == .zero { continue }
            await signal.wait(timeout: timeout)
        }
    }
}
