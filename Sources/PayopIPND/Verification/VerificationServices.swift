import Logging
import ServiceLifecycle

/// A background stage that does what is due, then sleeps until its next due time or a signal: the
/// verifier (woken by IPNs) and the reconciler (woken by verifications) both run as one of these.
struct DueWorkService: Service {
    let name: String
    let signal: WorkSignal
    let clock: any WallClock
    let logger: Logger
    /// Does what is due now; returns when something next falls due, if ever.
    let pass: @Sendable () async throws -> Int64?

    func run() async throws {
        await cancelWhenGracefulShutdown {
            var failing = false
            while !Task.isCancelled {
                var timeout: Duration? = nil
                do {
                    if let next = try await pass() {
                        timeout = .milliseconds(max(0, next - clock.nowMilliseconds()))
                    }
                    if failing { logger.notice("\(name) works again") }
                    failing = false
                } catch {
                    if Task.isCancelled { return }
                    // A failing pass (the event log unavailable) is retried after a pause, never given up.
                    if !failing { logger.error("\(name) pass failed; retrying", metadata: ["error": "\(error)"]) }
                    failing = true
                    timeout = .seconds(1)
                }
                await signal.wait(timeout: timeout)
            }
        }
    }
}
