import Logging
import ServiceLifecycle

/// The verifier as a long-running service: woken by fresh IPNs, else asleep until a question falls due.
struct VerifierService: Service {
    let verifier: Verifier
    let signal: WorkSignal
    let clock: any WallClock
    let logger: Logger

    func run() async throws {
        let loop = DueWorkLoop(name: "verifier", signal: signal, clock: clock, logger: logger)
        await cancelWhenGracefulShutdown {
            await loop.run(while: { !Task.isCancelled }) {
                let asked = try await verifier.verifyDue()
                return (asked, try await verifier.nextDue())
            }
        }
    }
}
