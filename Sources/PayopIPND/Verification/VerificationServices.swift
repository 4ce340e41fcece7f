import Logging
import ServiceLifecycle

/// Runs the verifier whenever an IPN brings work, and when a retry falls due.
struct VerifierService: Service {
    let verifier: Verifier
    let signal: WorkSignal
    let clock: any WallClock
    let logger: Logger

    func run() async throws {
        await cancelWhenGracefulShutdown {
            await runDueWork(signal: signal, clock: clock, logger: logger, name: "verifier") {
                try await verifier.verifyDue()
                return await verifier.nextDue()
            }
        }
    }
}

/// Runs the reconciler when re-checks fall due.
struct ReconcilerService: Service {
    let reconciler: Reconciler
    let signal: WorkSignal
    let clock: any WallClock
    let logger: Logger

    func run() async throws {
        await cancelWhenGracefulShutdown {
            await runDueWork(signal: signal, clock: clock, logger: logger, name: "reconciler") {
                try await reconciler.reconcileDue()
                return await reconciler.nextDue()
            }
        }
    }
}

/// The loop both share: do what is due, then sleep until the next due time or a signal. A failing
/// pass (the event log unavailable) is retried after a pause, never given up.
func runDueWork(
    signal: WorkSignal, clock: any WallClock, logger: Logger, name: String,
    pass: () async throws -> Int64?
) async {
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
            if !failing { logger.error("\(name) pass failed; retrying", metadata: ["error": "\(error)"]) }
            failing = true
            timeout = .seconds(1)
        }
        await signal.wait(timeout: timeout)
    }
}
