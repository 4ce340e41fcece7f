import Hummingbird
import Logging
import NIOCore

/// The admin port (loopback by default): `/healthz`, `/readyz`, `/metrics`, open to monitoring, and
/// the merchant's console at `/` (behind `admin.token_file` when set). Never served on the IPN port.
enum AdminListener {
    static func makeApplication(
        address: ListenAddress, log: any EventLog, access: PayopAccess, metrics: DaemonMetrics, console: Console,
        logger: Logger, onRunning: @escaping @Sendable (Int) async -> Void
    ) -> some ApplicationProtocol {
        let router = Router()
        console.register(on: router)
        router.get("/healthz") { _, _ in "ok\n" }
        router.get("/readyz") { _, _ -> Response in
            let problems = await readinessProblems(log: log, access: access)
            let text = problems.isEmpty ? "ready\n" : "not ready: " + problems.joined(separator: "; ") + "\n"
            return Response(
                status: problems.isEmpty ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        router.get("/metrics") { _, _ -> Response in
            if let counts = try? await withDeadline(.seconds(2), { try await log.deliveryCounts() }) {
                metrics.deliveryBacklog(pending: counts.pending + counts.running, dead: counts.dead)
            }
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(string: metrics.render())))
        }
        return Application(
            router: router, configuration: .init(address: .hostname(address.host, port: address.port), serverName: nil),
            onServerRunning: { await onRunning($0.localAddress?.port ?? address.port) }, logger: logger)
    }

    /// Why the daemon cannot do its job now; empty when it can.
    static func readinessProblems(log: any EventLog, access: PayopAccess) async -> [String] {
        var problems: [String] = []
        do {
            try await log.checkWritable()
        } catch {
            problems.append("event log not writable (\(error))")
        }
        if let problem = access.currentProblem {
            problems.append("Payop refuses the JWT: \(problem)")
        }
        return problems
    }
}
