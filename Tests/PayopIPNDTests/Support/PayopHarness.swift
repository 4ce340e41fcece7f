import AsyncHTTPClient
import Foundation
import Logging
import PayopSimulator
import ServiceLifecycle
import Synchronization
import Testing

@testable import PayopIPND

/// Collects every log line, to check what reaches logs (and what must not).
final class CapturedLogs: Sendable {
    private let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    var text: String { all.joined(separator: "\n") }
    func append(_ line: String) { lines.withLock { $0.append(line) } }

    var logger: Logger {
        Logger(label: "payop-ipnd.tests") { _ in CapturingHandler(logs: self) }
    }

    struct CapturingHandler: LogHandler {
        let logs: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let merged = metadata.merging(event.metadata ?? [:]) { $1 }
            logs.append("\(event.level) \(event.message) \(merged.map { "\($0)=\($1)" }.sorted().joined(separator: " "))")
        }
    }
}

/// A real SQLite event log, the simulator on a real loopback port, and the real Payop HTTP client
/// between them; the clock is the test's.
final class PayopHarness: Sendable {
    let directory: TemporaryDirectory
    let log: SQLiteEventLog
    let payop: SimulatedPayop
    let client: PayopHTTPClient
    let http: HTTPClient
    let clock: TestClock
    let logs = CapturedLogs()
    let jwt: String

    /// Runs `body` with the simulator serving, then stops it.
    static func with(_ body: @Sendable (PayopHarness, Int) async throws -> Void) async throws {
        let directory = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: directory.file("events.sqlite3"), mode: .daemon, clock: clock)
        let jwtValue = "test-jwt-\(UUID().uuidString)"
        let payop = SimulatedPayop(jwt: jwtValue)
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = SimulatorServer.makeApplication(payop: payop, port: 0, logger: quietLogger) { continuation.yield($0) }
        let group = ServiceGroup(services: [app], logger: quietLogger)
        let http = PayopHTTPClient.makeHTTPClient(timeoutSeconds: 5)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            let client = PayopHTTPClient(
                http: http, baseURL: "http://127.0.0.1:\(port)", timeoutSeconds: 5, jwt: SecretBox(jwtValue))
            let harness = PayopHarness(
                directory: directory, log: log, payop: payop, client: client, http: http, clock: clock, jwt: jwtValue)
            do {
                try await body(harness, port)
            } catch {
                await group.triggerGracefulShutdown()
                try? await http.shutdown()
                log.close()
                throw error
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        try await http.shutdown()
        log.close()
    }

    init(
        directory: TemporaryDirectory, log: SQLiteEventLog, payop: SimulatedPayop, client: PayopHTTPClient,
        http: HTTPClient, clock: TestClock, jwt: String
    ) {
        self.directory = directory
        self.log = log
        self.payop = payop
        self.client = client
        self.http = http
        self.clock = clock
        self.jwt = jwt
    }

    func verifier(notFoundRetryMinutes: Double = 10, payop: (any PayopAPI)? = nil) -> Verifier {
        Verifier(
            store: log, payop: payop ?? client,
            policy: VerificationPolicy(
                backoff: Backoff(initialSeconds: 1, maxSeconds: 300, jitter: Backoff.noJitter),
                notFoundRetryMilliseconds: Int64(notFoundRetryMinutes * 60_000), reconcileIntervalMilliseconds: 300_000),
            clock: clock, logger: logs.logger)
    }

    /// Posts `body` into the log as the listener would (at the test clock's time).
    @discardableResult
    func receive(_ body: Data) async throws -> IngestOutcome {
        let bytes = Array(body)
        let notification = try NotificationParser.parse(bytes).get()
        return try await log.ingest(
            IncomingIPN(
                receivedAt: clock.nowMilliseconds(), sourceIP: "3.125.109.58", path: "/payop/ipn", body: bytes,
                notification: notification, verifiedBySignature: false))
    }

    func event(_ id: String) async throws -> Event {
        try #require(try await log.event(id: id)?.event)
    }
}
