import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization
import Testing

@testable import PayopIPND

/// Writes an executable script and returns its path.
func script(_ dir: TemporaryDirectory, _ name: String, _ body: String) throws -> String {
    try dir.write(name, "#!/bin/sh\n" + body + "\n", mode: 0o755)
}

/// A verified event in a real log, with the given hooks configured.
struct DeliveryHarness {
    let dir: TemporaryDirectory
    let log: SQLiteEventLog
    let clock = TestClock()

    init(hooks: [HookConfig]) throws {
        dir = try TemporaryDirectory()
        log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        log.setHooks(hooks)
    }

    /// A legacy V1 IPN: verified on arrival, so its deliveries exist at once.
    @discardableResult
    func verifiedEvent(order: String = "1042", status: String = "success", amount: String = "100.0000") async throws -> String {
        let signature = try #require(
            LegacySignature.expected(amount: amount, currency: "EUR", orderID: order, status: status, secretKey: "k"))
        let object: [String: String] = [
            "orderId": order, "amount": amount, "currency": "EUR", "status": status, "signature": signature,
        ]
        let body = Array(try JSONSerialization.data(withJSONObject: object))
        let notification = try NotificationParser.parse(body).get()
        return try await log.ingest(
            IncomingIPN(
                receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
                notification: notification, verifiedBySignature: true)
        ).eventID
    }

    func dispatcher(runner: any HookRunner = CommandHookRunner(path: "/usr/bin:/bin")) -> Dispatcher {
        Dispatcher(
            store: log, runner: runner, hooks: { [log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 10800, jitter: Backoff.noJitter), killGraceSeconds: 0.2,
                shutdownGraceSeconds: 1),
            clock: clock, logger: quietLogger)
    }

    func deliveries() async throws -> [Delivery] {
        try await log.deliveries(state: nil, hook: nil, limit: 100).reversed()
    }
}

func commandHook(_ name: String, _ path: String, events: [String] = ["*"], timeout: Double = 10, attempts: Int = 30)
    -> HookConfig
{
    HookConfig(name: name, target: .command([path]), events: events, timeoutSeconds: timeout, maxAttempts: attempts)
}

/// Runs hooks with `inner` and records the threads each run starts its hook on and goes on on once its
/// hook has exited.
final class ThreadRecordingRunner: HookRunner {
    let inner: any HookRunner
    let threads = Mutex<[[String]]>([])
    init(inner: any HookRunner) { self.inner = inner }
    func run(_ invocation: HookInvocation) async -> HookResult {
        let before = threadName()
        let result = await inner.run(invocation)
        let after = threadName()
        threads.withLock { $0.append([before, after]) }
        return result
    }
}

/// Records the thread each delivery's outcome is reported on.
final class ThreadRecordingMetrics: DeliveryMetrics {
    let threads = Mutex<[String]>([])
    func delivery(hook: String, outcome: String, milliseconds: Int64) {
        let name = threadName()
        threads.withLock { $0.append(name) }
    }
    func orphanedDeliveries(_ count: Int) {}
}

@Suite struct CommandHookTests {
    @Test func hookGetsTheEventOnStdinAndOnlyPathAndPayopVariables() async throws {
        setenv("PAYOP_IPND_TEST_DATABASE_PASSWORD", "hunter2", 1)
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "dump", "env > '\(dir.file("env"))'; cat > '\(dir.file("stdin"))'; pwd > '\(dir.file("pwd"))'")
        let h = try DeliveryHarness(hooks: [commandHook("dump", hook)])
        let eventID = try await h.verifiedEvent()
        #expect(try await h.dispatcher().dispatchDue() == 1)
        let env = try String(contentsOfFile: dir.file("env"), encoding: .utf8).split(separator: "\n").map(String.init)
        let names = Set(env.compactMap { $0.split(separator: "=", maxSplits: 1).first.map(String.init) })
        let expected: Set = [
            "PATH", "PAYOP_EVENT_ID", "PAYOP_EVENT_TYPE", "PAYOP_KIND", "PAYOP_STATUS", "PAYOP_TRANSACTION_ID",
            "PAYOP_INVOICE_ID", "PAYOP_ORDER_ID", "PAYOP_AMOUNT", "PAYOP_CURRENCY", "PAYOP_ATTEMPT", "PAYOP_HOOK_NAME",
        ]
        // `sh` itself adds PWD (and may add SHLVL, _): nothing of the daemon's own environment arrives.
        #expect(names.subtracting(["PWD", "SHLVL", "_"]) == expected)
        #expect(env.contains("PAYOP_EVENT_ID=\(eventID)"))
        #expect(env.contains("PAYOP_TRANSACTION_ID="))
        #expect(env.contains("PAYOP_ATTEMPT=1"))
        #expect(!env.joined().contains("hunter2"))
        let stdin = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir.file("stdin"))))
        #expect((stdin as? [String: Any])?["id"] as? String == eventID)
        #expect((stdin as? [String: Any])?["type"] as? String == "checkout.accepted")
        #expect(try String(contentsOfFile: dir.file("pwd"), encoding: .utf8) == "/\n")
        let delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .delivered && delivery.lastExitCode == 0)
    }

    @Test func aRunGoesOnOnTheHookThreadAfterItsHookExitsAndAfterItsOutcomeIsWritten() async throws {
        // The thread that learns of the exit runs the task waiting for it: no pool thread is woken per
        // delivery, neither for the exit nor for the outcome's commit.
        let h = try DeliveryHarness(hooks: [commandHook("true", "/bin/true")])
        try await h.verifiedEvent()
        let metrics = ThreadRecordingMetrics()
        let runner = ThreadRecordingRunner(inner: CommandHookRunner(path: "/usr/bin:/bin"))
        let dispatcher = Dispatcher(
            store: h.log, runner: runner, hooks: { [log = h.log] in log.hooks },
            policy: DeliveryPolicy(
                backoff: Backoff(initialSeconds: 2, maxSeconds: 10800, jitter: Backoff.noJitter), killGraceSeconds: 0.2,
                shutdownGraceSeconds: 1),
            clock: h.clock, logger: quietLogger, metrics: metrics)
        #expect(try await dispatcher.dispatchDue() == 1)
        // One reaper thread all along: the one the hook started on learnt of its exit and ran the rest.
        let threads = try #require(runner.threads.withLock { $0 }.first)
        #expect(threads[0].hasPrefix("ipnd-hook-reap"))
        #expect(threads == [threads[0], threads[0]])
        #expect(metrics.threads.withLock { $0 } == [threads[0]])
    }

    @Test func aTaskKnowsWhichReaperItRunsOnAndThePoolIsNone() async {
        #expect(ProcessReaper.current == nil)
        for reaper in ProcessReaper.all {
            let current = await Task(executorPreference: reaper) { ProcessReaper.current }.value
            #expect(current === reaper)
        }
    }

    @Test func theReaperThreadsBlockNeitherSIGCHLDNorTheSignalsAFaultRaises() async throws {
        // SIGCHLD unblocked, so that a hook's exit wakes no thread; a fault's signal blocked would kill the
        // process without a handler (Swift's backtracer) running. Every other signal is the main thread's.
        _ = ProcessReaper.all
        var masks: [String: UInt64] = [:]
        for _ in 0..<200 where masks.count < ProcessReaper.all.count {
            masks = [:]
            for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
                let name = threadName(task: task)
                guard name.hasPrefix("ipnd-hook-reap"), let mask = ProcessStatus("self/task/\(task)")?.mask("SigBlk")
                else { continue }
                masks[name] = mask
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(masks.keys.sorted() == ["ipnd-hook-reap0", "ipnd-hook-reap1"])
        for (name, mask) in masks {
            for signal in [SIGCHLD, SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE, SIGSYS, SIGABRT] {
                #expect(mask & (1 << UInt64(signal - 1)) == 0, "\(name) blocks signal \(signal)")
            }
            #expect(mask & (1 << UInt64(SIGTERM - 1)) != 0, "\(name) does not block SIGTERM")
        }
    }

    @Test func failingTwiceThenSucceedingRunsThreeTimesWithAttemptNumbers() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(
            dir, "flaky", "echo \"$PAYOP_ATTEMPT\" >> '\(dir.file("attempts"))'; [ \"$PAYOP_ATTEMPT\" -ge 3 ]")
        let h = try DeliveryHarness(hooks: [commandHook("flaky", hook)])
        try await h.verifiedEvent()
        let dispatcher = h.dispatcher()
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(try await h.deliveries().first?.state == .pending)
        // Retries are due after 2 s, then 4 s: not a millisecond before.
        h.clock.advance(milliseconds: 1_999)
        #expect(try await dispatcher.dispatchDue() == 0)
        h.clock.advance(milliseconds: 1)
        #expect(try await dispatcher.dispatchDue() == 1)
        h.clock.advance(milliseconds: 3_999)
        #expect(try await dispatcher.dispatchDue() == 0)
        h.clock.advance(milliseconds: 1)
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(try String(contentsOfFile: dir.file("attempts"), encoding: .utf8) == "1\n2\n3\n")
        let delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .delivered && delivery.attempts == 3)
    }

    @Test func alwaysFailingHookIsDeadAfterMaxAttemptsThenReplayDeliversIt() async throws {
        let dir = try TemporaryDirectory()
        let fixed = dir.file("fixed")
        let hook = try script(dir, "broken", "echo boom >&2; [ -e '\(fixed)' ]")
        let config = commandHook("broken", hook, attempts: 3)
        let h = try DeliveryHarness(hooks: [config])
        let eventID = try await h.verifiedEvent()
        let dispatcher = h.dispatcher()
        for _ in 0..<3 {
            try await dispatcher.dispatchDue()
            h.clock.advance(milliseconds: 10_800_000)
        }
        var delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .dead && delivery.attempts == 3)
        #expect(delivery.lastExitCode == 1 && delivery.output == "boom\n")
        #expect(try await dispatcher.dispatchDue() == 0)
        FileManager.default.createFile(atPath: fixed, contents: nil)
        #expect(try await h.log.replay(eventID: eventID, hook: nil, hooks: [config], now: h.clock.nowMilliseconds()) == 1)
        #expect(try await dispatcher.dispatchDue() == 1)
        delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .delivered)
    }

    @Test func hookThatExitsLeavingAChildOnItsStdoutIsDeliveredOnceWhenItExits() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(
            dir, "detach", "echo started; setsid sleep 20 & echo $! > '\(dir.file("child"))'; echo done; exit 0")
        let h = try DeliveryHarness(hooks: [commandHook("detach", hook, timeout: 10)])
        try await h.verifiedEvent()
        let started = ContinuousClock.now
        #expect(try await h.dispatcher().dispatchDue() == 1)
        // Not the 20 s its child holds the output (with room for a stall of the whole suite at its start).
        #expect(ContinuousClock.now - started < .seconds(15))
        let delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .delivered && delivery.attempts == 1)
        #expect(delivery.output == "started\ndone\n")
        let child = try String(contentsOfFile: dir.file("child"), encoding: .utf8)
        if let pid = Int32(child.trimmingCharacters(in: .whitespacesAndNewlines)) { kill(pid, SIGKILL) }
    }

    @Test func hangingHookIsKilledWithItsChildrenAndRetried() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "hang", "sleep 300 & echo $! > '\(dir.file("child"))'; sleep 300")
        let h = try DeliveryHarness(hooks: [commandHook("hang", hook, timeout: 0.5)])
        try await h.verifiedEvent()
        let started = ContinuousClock.now
        try await h.dispatcher().dispatchDue()
        #expect(ContinuousClock.now - started < .seconds(30))  // killed at 0.5 s, not after its 300 s
        let delivery = try #require(try await h.deliveries().first)
        #expect(delivery.state == .pending)
        #expect(delivery.lastError?.contains("timed out") == true)
        let child = try #require(Int32(try String(contentsOfFile: dir.file("child"), encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        // The child got the group's signal too; give the kernel a moment to reap it.
        var alive = true
        for _ in 0..<50 where alive {
            alive = kill(child, 0) == 0 && !isZombie(child)
            if alive { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(!alive)
    }

    func isZombie(_ pid: Int32) -> Bool {
        ProcessStat(pid)?.isZombie ?? true
    }

    @Test func shellMetacharactersInIPNFieldsArePassedVerbatim() async throws {
        let dir = try TemporaryDirectory()
        let marker = dir.file("pwned")
        let nasty = "1042$(touch \(marker));`touch \(marker)`|&;<>'\""
        let hook = try script(dir, "echo", "printf '%s' \"$PAYOP_ORDER_ID\" > '\(dir.file("order"))'")
        let h = try DeliveryHarness(hooks: [commandHook("echo", hook)])
        try await h.verifiedEvent(order: nasty)
        try await h.dispatcher().dispatchDue()
        #expect(try String(contentsOfFile: dir.file("order"), encoding: .utf8) == nasty)
        #expect(!FileManager.default.fileExists(atPath: marker))
    }

    @Test func laterStatusWaitsForTheEarlierOnesSlowDelivery() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(
            dir, "slow",
            "[ \"$PAYOP_STATUS\" = pending ] && sleep 0.5; echo \"$PAYOP_STATUS\" >> '\(dir.file("order"))'")
        let h = try DeliveryHarness(hooks: [commandHook("slow", hook)])
        try await h.verifiedEvent(order: "A-1", status: "wait")
        try await h.verifiedEvent(order: "A-1", status: "success")
        try await h.verifiedEvent(order: "B-2", status: "success")
        let dispatcher = h.dispatcher()
        // One pass starts the pending of A-1 and B-2's event; A-1's accepted must wait for its pending.
        #expect(try await dispatcher.dispatchDue() == 3)
        let lines = try String(contentsOfFile: dir.file("order"), encoding: .utf8).split(separator: "\n")
        #expect(lines.firstIndex(of: "pending")! < lines.lastIndex(of: "accepted")!)
        #expect(lines.count == 3)
    }

    @Test func laterStatusStartsAsSoonAsTheEarlierOnesOutcomeIsWrittenNotAtTheNextRecheck() async throws {
        let h = try DeliveryHarness(hooks: [commandHook("fulfil", "/bin/true")])
        try await h.verifiedEvent(order: "A-1", status: "wait")
        try await h.verifiedEvent(order: "A-1", status: "success")
        // The dispatcher's loop, told to look at the log unprompted only once an hour: the second
        // delivery can only start because the first one's written outcome wakes it.
        let service = DispatcherService(
            dispatcher: h.dispatcher(), clock: h.clock, logger: quietLogger, shutdownGrace: .seconds(1),
            recheck: .seconds(3600))
        let group = ServiceGroup(services: [service], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let deadline = ContinuousClock.now + .seconds(20)
            while try await h.log.deliveries(state: "delivered", hook: nil, limit: 5).count < 2, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(try await h.log.deliveries(state: "delivered", hook: nil, limit: 5).count == 2)
    }

    @Test func deliveryRunningWhenTheDaemonDiedRunsAgainAfterRestart() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "ok", "echo \"$PAYOP_ATTEMPT\" >> '\(dir.file("runs"))'")
        let path = dir.file("events.sqlite3")
        let clock = TestClock()
        let first = try SQLiteEventLog.open(path: path, mode: .daemon, clock: clock)
        first.setHooks([commandHook("ok", hook)])
        let h = DeliveryHarnessView(log: first, clock: clock)
        try await h.verified()
        let due = try await first.runnableDeliveries(now: clock.nowMilliseconds(), hooks: ["ok"], limit: 10)
        #expect(try await first.claimDelivery(id: try #require(due.first).id, now: clock.nowMilliseconds())?.attempt == 1)
        first.close()  // "kill -9": the run never finished, the log says running
        let second = try SQLiteEventLog.open(path: path, mode: .daemon, clock: clock)
        defer { second.close() }
        second.setHooks([commandHook("ok", hook)])
        #expect(try await second.recoverInterruptedDeliveries(now: clock.nowMilliseconds()) == 1)
        let dispatcher = Dispatcher(
            store: second, runner: CommandHookRunner(), hooks: { second.hooks },
            policy: DeliveryPolicy(backoff: Backoff(initialSeconds: 1, maxSeconds: 10), killGraceSeconds: 1, shutdownGraceSeconds: 1),
            clock: clock, logger: quietLogger)
        #expect(try await dispatcher.dispatchDue() == 1)
        #expect(try String(contentsOfFile: dir.file("runs"), encoding: .utf8) == "2\n")
    }

    @Test func pruneDeletesOldDeliveredDeliveriesAndKeepsDeadOnes() async throws {
        let h = try DeliveryHarness(hooks: [commandHook("ok", "/bin/true"), commandHook("no", "/bin/false", attempts: 1)])
        try await h.verifiedEvent()
        try await h.dispatcher().dispatchDue()
        #expect(Set(try await h.deliveries().map(\.state)) == [.delivered, .dead])
        #expect(try await h.log.prune(before: h.clock.nowMilliseconds() + 1).deliveries == 1)
        #expect(try await h.deliveries().map(\.state) == [.dead])
    }

    @Test func onlyMatchingHooksGetDeliveries() async throws {
        let h = try DeliveryHarness(hooks: [
            commandHook("paid", "/bin/true", events: ["checkout.accepted"]),
            commandHook("refunds", "/bin/true", events: ["refund.*"]),
            commandHook("all", "/bin/true", events: ["*"]),
        ])
        try await h.verifiedEvent()
        #expect(Set(try await h.deliveries().map(\.hook)) == ["paid", "all"])
    }
}

/// Just enough to make a verified event in a log opened by the test itself.
struct DeliveryHarnessView {
    let log: SQLiteEventLog
    let clock: TestClock

    func verified() async throws {
        let signature = try #require(
            LegacySignature.expected(amount: "1", currency: "EUR", orderID: "9", status: "success", secretKey: "k"))
        let body = Array(
            #"{"orderId":"9","amount":"1","currency":"EUR","status":"success","signature":"\#(signature)"}"#.utf8)
        _ = try await log.ingest(
            IncomingIPN(
                receivedAt: clock.nowMilliseconds(), sourceIP: "127.0.0.1", path: "/payop/ipn", body: body,
                notification: try NotificationParser.parse(body).get(), verifiedBySignature: true))
    }
}

@Suite struct URLHookTests {
    struct Received: Sendable {
        var headers: [String: String]
        var body: [UInt8]
    }

    /// A loopback endpoint answering `status` (with `extra` headers), recording what it received.
    func withEndpoint(
        status: HTTPResponse.Status = .ok, extra: HTTPFields = [:],
        _ body: @Sendable (Int, @Sendable () -> [Received]) async throws -> Void
    ) async throws {
        let received = Mutex<[Received]>([])
        let router = Router()
        router.post("/hook") { request, _ -> Response in
            var request = request
            let bytes = try await request.collectBody(upTo: 1 << 20)
            var headers: [String: String] = [:]
            for field in request.headers { headers[field.name.canonicalName] = field.value }
            received.withLock { $0.append(Received(headers: headers, body: Array(bytes.readableBytesView))) }
            return Response(status: status, headers: extra)
        }
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { continuation.yield($0.localAddress?.port ?? 0) }, logger: quietLogger)
        let group = ServiceGroup(services: [app], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            try await body(port) { received.withLock { $0 } }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    func runner(secret: String?, clock: TestClock) -> (URLHookRunner, () async throws -> Void) {
        let http = PayopHTTPClient.makeHTTPClient(timeoutSeconds: 5)
        return (URLHookRunner(http: http, secrets: { _ in secret }, clock: clock), { try await http.shutdown() })
    }

    @Test func signatureVerifiesWithAnIndependentImplementation() async throws {
        let secretBytes = Data((0..<24).map { UInt8($0 * 7 & 0xff) })
        let secret = "whsec_" + secretBytes.base64EncodedString()
        try await withEndpoint { port, received in
            let (h, eventID) = try await deliverOnce(to: port, secret: secret)
            let request = try #require(received().first)
            #expect(request.headers["webhook-id"] == eventID)
            #expect(request.headers["webhook-timestamp"] == String(h.clock.nowMilliseconds() / 1000))
            let signature = try #require(request.headers["webhook-signature"])
            // Python's hmac module, not our OpenSSL wrapper, checks it.
            let dir = try TemporaryDirectory()
            let bodyPath = dir.file("body")
            try Data(request.body).write(to: URL(fileURLWithPath: bodyPath))
            let check = Process()
            check.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            check.arguments = [
                "python3", "-c",
                """
                import base64, hashlib, hmac, sys
                secret, msg_id, ts, sig, path = sys.argv[1:]
                key = base64.b64decode(secret[len("whsec_"):])
                body = open(path, "rb").read()
                mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
                sys.exit(0 if hmac.compare_digest(sig, "v1," + base64.b64encode(mac).decode()) else 1)
                """,
                secret, eventID, request.headers["webhook-timestamp"] ?? "", signature, bodyPath,
            ]
            try check.run()
            check.waitUntilExit()
            #expect(check.terminationStatus == 0)
            #expect(try await h.deliveries().first?.state == .delivered)
            #expect(try await h.deliveries().first?.lastHTTPStatus == 200)
        }
    }

    /// One verified event delivered once to a url hook on `port`; returns the harness to inspect.
    func deliverOnce(to port: Int, secret: String? = nil) async throws -> (DeliveryHarness, eventID: String) {
        let h = try DeliveryHarness(hooks: [
            HookConfig(
                name: "crm", target: .url("http://127.0.0.1:\(port)/hook"), events: ["*"], timeoutSeconds: 5,
                maxAttempts: 30)
        ])
        let eventID = try await h.verifiedEvent()
        let (runner, shutdown) = runner(secret: secret, clock: h.clock)
        try await h.dispatcher(runner: runner).dispatchDue()
        try await shutdown()
        return (h, eventID)
    }

    @Test func goneMakesTheDeliveryDeadAtOnce() async throws {
        try await withEndpoint(status: .gone) { port, _ in
            let (h, _) = try await deliverOnce(to: port)
            let delivery = try #require(try await h.deliveries().first)
            #expect(delivery.state == .dead && delivery.attempts == 1 && delivery.lastHTTPStatus == 410)
        }
    }

    @Test func retryAfterLongerThanTheBackoffReplacesIt() async throws {
        try await withEndpoint(status: .tooManyRequests, extra: [.retryAfter: "120"]) { port, _ in
            let (h, _) = try await deliverOnce(to: port)
            let delivery = try #require(try await h.deliveries().first)
            #expect(delivery.state == .pending)
            #expect(delivery.nextAttemptAt == h.clock.nowMilliseconds() + 120_000)
        }
    }

    @Test func retryAfterHTTPDateIsUnderstood() {
        let now = Timestamp.parse("2026-11-26T12:00:00Z")!
        #expect(URLHookRunner.retryAfterMilliseconds("Thu, 26 Nov 2026 12:01:30 GMT", now: now) == 90_000)
        #expect(URLHookRunner.retryAfterMilliseconds("45", now: now) == 45_000)
        #expect(URLHookRunner.retryAfterMilliseconds("soon", now: now) == nil)
    }
}

@Suite struct HookResourceTests {
    @Test func runningHooksLeaksNoFileDescriptors() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "ok", "echo out; echo err >&2; exit 0")
        let runner = CommandHookRunner(path: "/usr/bin:/bin")
        let event = Event(
            id: "evt_fd", kind: "checkout", status: "accepted", state: "verified", source: "ipn", legacy: false,
            receivedAt: 0, duplicates: 0)
        func openDescriptors() throws -> Int { try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count }
        let invocation = HookInvocation(
            deliveryID: 1, hook: commandHook("ok", hook), event: event, body: Array("{}".utf8), attempt: 1,
            killGraceSeconds: 0.1)
        _ = await runner.run(invocation)
        let before = try openDescriptors()
        for _ in 0..<200 {
            let result = await runner.run(invocation)
            #expect(result.outcome == .delivered && result.output == "out\nerr\n")
        }
        // Other tests open and close files meanwhile; a leak of one per run would be 200.
        #expect(try openDescriptors() - before < 60)
    }

    @Test func hugeOutputIsReadAndDroppedNotStored() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "loud", "head -c 5000000 /dev/zero | tr '\\0' a; exit 0")
        let result = await runOnce(hook, body: [])
        #expect(result.outcome == .delivered, "\(result.error ?? "")")
        #expect(result.output.utf8.count < HookResult.maxOutputBytes + 100)
        #expect(result.output.hasSuffix("[... \(5_000_000 - HookResult.maxOutputBytes) more bytes not kept]"))
    }

    @Test func aWriterThatNeverStopsNeitherKeepsItsRunGoingNorStallsOtherRuns() async throws {
        let dir = try TemporaryDirectory()
        // `yes` writes on the hook's stdout as fast as the pipe is read, for the 6 s the hook lives, and
        // outlives it.
        let endless = try script(dir, "endless", "yes & sleep 6; exit 0")
        let quick = try script(dir, "quick", "echo done")
        let started = ContinuousClock.now
        async let flood = { () async -> (HookResult, ContinuousClock.Instant) in
            (await runOnce(endless, body: [], timeout: 60), ContinuousClock.now)
        }()
        try await Task.sleep(for: .milliseconds(200))
        #expect(await runOnce(quick, body: []).output == "done\n")
        // The reaper still reaps and reads the others: the quick run ends while the flood goes on, at
        // least 6 s (a tighter wall-clock bound, and a flood of one second, flaked: the whole suite stalls
        // for seconds at its start on this machine).
        let quickEnded = ContinuousClock.now
        let (result, floodEnded) = await flood
        #expect(quickEnded < floodEnded)
        // Ended a second after the hook exited (the reader closes the pipe; `yes` then dies of SIGPIPE):
        // about 7 s; a run kept going would last until its 60 s timeout.
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(result.outcome == .delivered)
        #expect(result.output.contains("more bytes not kept]"))
    }

    private func runOnce(
        _ path: String, body: [UInt8] = Array("{}".utf8), timeout: Double = 10, killGrace: Double = 0.1
    ) async -> HookResult {
        let event = Event(
            id: "evt_spawn", kind: "checkout", status: "accepted", state: "verified", source: "ipn", legacy: false,
            receivedAt: 0, duplicates: 0)
        return await CommandHookRunner(path: "/usr/bin:/bin").run(
            HookInvocation(
                deliveryID: 1, hook: commandHook("spawn", path, timeout: timeout), event: event, body: body, attempt: 1,
                killGraceSeconds: killGrace))
    }

    @Test func hookStartsWithEverySignalAtItsDefaultAndNoneBlocked() async throws {
        // The daemon ignores SIGPIPE (and its lifecycle SIGTERM, SIGINT, SIGHUP); ignored signals survive
        // exec, and a hook ignoring SIGTERM could not be stopped gently. This process ignores SIGPIPE too
        // (the runner sets it), so the hook must have had it reset.
        _ = CommandHookRunner()
        let ownIgnored = try #require(ProcessStatus("self")?.mask("SigIgn"))
        #expect(ownIgnored & (1 << (UInt64(SIGPIPE) - 1)) != 0)
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "signals", "exec grep -E '^Sig(Ign|Blk)' /proc/self/status")
        let result = await runOnce(hook)
        #expect(result.outcome == .delivered)
        // glibc's own 32 and 33 (its thread machinery) too: the start resets every signal.
        let masks = ProcessStatus(text: result.output)
        #expect(masks.mask("SigBlk") == 0)
        #expect(masks.mask("SigIgn") == 0, "\(result.output)")
    }

    @Test func hookInheritsNoDescriptorOfTheDaemonButItsStandardThree() async throws {
        // Opened without close-on-exec, as a careless library might: the hook must still not get it.
        let leaky = open("/dev/null", O_RDONLY)
        #expect(leaky > 2)
        defer { close(leaky) }
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "fds", "exec ls /proc/self/fd")
        let result = await runOnce(hook)
        #expect(result.outcome == .delivered)
        // `ls` holds one more, the directory it lists.
        let listed = Set(result.output.split(separator: "\n").map(String.init))
        #expect(listed.isSuperset(of: ["0", "1", "2"]) && listed.subtracting(["0", "1", "2", "3"]).isEmpty, "\(listed)")
        #expect(!listed.contains("\(leaky)") || leaky == 3)
    }

    @Test func bodyLargerThanAPipeReachesTheHookWholeAndAHookIgnoringItStillSucceeds() async throws {
        let dir = try TemporaryDirectory()
        let counter = try script(dir, "count", "wc -c")
        let ignorer = try script(dir, "ignore", "exit 0")
        for size in [0, 65_536, 3_000_000] {
            let body = [UInt8](repeating: UInt8(ascii: "x"), count: size)
            let counted = await runOnce(counter, body: body)
            #expect(counted.outcome == .delivered)
            #expect(counted.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(size)")
            #expect(await runOnce(ignorer, body: body).outcome == .delivered)
        }
    }

    @Test func programThatCannotBeStartedIsAFailedRunNamingWhy() async throws {
        let dir = try TemporaryDirectory()
        let result = await runOnce(dir.file("gone"))
        #expect(result.outcome == .failed(retryAfterMilliseconds: nil))
        #expect(result.error == "could not run \(dir.file("gone")): No such file or directory")
        let notExecutable = dir.file("plain")
        try "#!/bin/sh\n".write(toFile: notExecutable, atomically: true, encoding: .utf8)
        #expect(await runOnce(notExecutable).error == "could not run \(notExecutable): Permission denied")
    }

    @Test func aStartThatFailsLeavesNoChildBehindAndNoStartChangesTheCallersSignalMask() async throws {
        // The child is cloned with every signal blocked, so the calling thread blocks them around the
        // clone; it must get its own mask back. A child that failed before exec must be reaped: nobody
        // else knows its id. It never exec'd, so it bears this thread's name.
        let name = "ipnd-spawn-test"
        let result = await withCheckedContinuation { (finished: CheckedContinuation<(masksKept: Bool, failure: Int32?), Never>) in
            Thread {
                nameCurrentThread(name)
                var extra = sigset_t()
                sigemptyset(&extra)
                sigaddset(&extra, SIGUSR2)
                pthread_sigmask(SIG_BLOCK, &extra, nil)
                func blocked() -> [Int32] {
                    var now = sigset_t()
                    pthread_sigmask(SIG_BLOCK, nil, &now)
                    return (1..<65).map { sigismember(&now, Int32($0)) }
                }
                let before = blocked()
                var failure: Int32?
                do throws(SystemError) {
                    _ = try HookProcess.spawn(argv: ["/nonexistent/hook"], environment: [], input: [], output: 2)
                } catch {
                    failure = error.code
                }
                let afterFailure = blocked()
                let started = try? HookProcess.spawn(argv: ["/bin/true"], environment: [], input: [], output: 2)
                let afterStart = blocked()
                let kept = started != nil && before[Int(SIGUSR2) - 1] == 1 && afterFailure == before && afterStart == before
                finished.resume(returning: (kept, failure))
            }.start()
        }
        #expect(result.failure == ENOENT)
        #expect(result.masksKept)
        #expect(zombieChildren(named: name).isEmpty)
    }

    /// Children of this process that have exited and are not reaped, whose name is `name`.
    private func zombieChildren(named name: String) -> [String] {
        let own = getpid()
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.filter { entry in
            guard Int32(entry) != nil, let stat = ProcessStat(entry) else { return false }
            return stat.name == name && stat.isZombie && stat.parent == own
        }
    }

    @Test func withoutPidfdsEachHookIsWaitedForOnItsOwnThreadAndCanStillBeStopped() async throws {
        let fallback: (HookProcess) -> Void = { $0.reapOnItsOwnThread() }
        let exits = try HookProcess.spawn(
            argv: ["/bin/sh", "-c", "exit 3"], environment: [], input: [], output: 2, watch: fallback)
        #expect(HookProcess.Termination(status: await exits.exitStatus) == .exited(3))
        let sleeper = try HookProcess.spawn(
            argv: ["/bin/sleep", "30"], environment: [], input: [], output: 2, watch: fallback)
        // Signalling does not wait for the process (the waiting thread holds no lock).
        let before = ContinuousClock.now
        sleeper.signalGroup(0)
        #expect(ContinuousClock.now - before < .seconds(1))
        sleeper.terminate(grace: .seconds(5))
        #expect(HookProcess.Termination(status: await sleeper.exitStatus) == .signaled(SIGTERM))
    }

    @Test func withoutPidfdsOutputHeldOpenByWhatAHookLeftBehindEndsASecondAfterTheHookExits() async throws {
        // The thread waiting for the hook sets its output's deadline, then must wake the reaper if it
        // polls: a reaper asleep without that deadline would read on until the pipe's EOF (30 s here).
        // (The interleaving that lost the wake-up cannot be forced from here: this holds the path.)
        try await withThrowingTaskGroup(of: (Duration, String).self) { group in
            for _ in 0..<4 {
                group.addTask {
                    let output = try OutputPipe.open()
                    let hook = try HookProcess.spawn(
                        argv: ["/bin/sh", "-c", "sleep 30 & echo started"], environment: [], input: [],
                        output: output.writeEnd, watch: { ProcessReaper.shared.watch($0, output: output, pidfds: false) })
                    output.closeWriteEnd()
                    _ = await hook.exitStatus
                    let exited = ContinuousClock.now
                    let text = await output.finish()
                    return (ContinuousClock.now - exited, text)
                }
            }
            for try await (lingered, text) in group {
                #expect(text == "started\n")
                #expect(lingered < .seconds(15), "output ended \(lingered) after its hook exited")
            }
        }
    }

    @Test(arguments: [true, false])
    func theReaperReadsOutputAndKeepsTheTimeoutWithOrWithoutPidfds(pidfds: Bool) async throws {
        let output = try OutputPipe.open()
        let talker = try HookProcess.spawn(
            argv: ["/bin/sh", "-c", "echo hello; echo world >&2"], environment: [], input: [], output: output.writeEnd,
            watch: { ProcessReaper.shared.watch($0, output: output, pidfds: pidfds) })
        output.closeWriteEnd()
        #expect(HookProcess.Termination(status: await talker.exitStatus) == .exited(0))
        #expect(await output.finish() == "hello\nworld\n")
        // Past its timeout the reaper runs the expiry once, and the process ends with what it sends.
        let fired = Mutex(0)
        let sleeper = try HookProcess.spawn(
            argv: ["/bin/sleep", "30"], environment: [], input: [], output: 2,
            watch: { process in
                ProcessReaper.shared.watch(process, output: nil, timeout: .milliseconds(50), pidfds: pidfds) {
                    fired.withLock { $0 += 1 }
                    process.terminate(grace: .seconds(5))
                }
            })
        #expect(HookProcess.Termination(status: await sleeper.exitStatus) == .signaled(SIGTERM))
        #expect(fired.withLock { $0 } == 1)
    }

    @Test func whatATimedOutHookLeavesBehindIgnoringSIGTERMIsKilledWithIt() async throws {
        let dir = try TemporaryDirectory()
        let pidFile = dir.file("child")
        // The child writes its pid once it ignores SIGTERM; the hook waits for that before it waits on.
        let hook = try script(
            dir, "stubborn",
            "sh -c 'trap \"\" TERM; echo $$ > \(pidFile).tmp; mv \(pidFile).tmp \(pidFile); exec sleep 30' & "
                + "while [ ! -e '\(pidFile)' ]; do sleep 0.01; done; wait")
        // A long kill grace: the child must die when the hook is reaped, not when the grace ends.
        let result = await runOnce(hook, body: [], timeout: 2, killGrace: 30)
        #expect(result.error?.hasPrefix("timed out after 2.0 s") == true, "\(result.error ?? "")")
        let child = try #require(Int32(try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        func alive() -> Bool {
            // Gone, or a zombie waiting for whoever inherited it.
            guard let stat = ProcessStat(child) else { return false }
            return !stat.isZombie
        }
        let deadline = ContinuousClock.now + .seconds(5)
        while alive(), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!alive())
    }

    @Test func manyHooksExitingTogetherAreEachReapedOnceWithTheirOwnStatus() async throws {
        let dir = try TemporaryDirectory()
        let hook = try script(dir, "exit", "read code; exit \"$code\"")
        let results = await withTaskGroup(of: (Int, HookResult).self) { group in
            for code in 0..<64 {
                group.addTask { (code, await runOnce(hook, body: Array("\(code)\n".utf8))) }
            }
            return await group.reduce(into: [:]) { $0[$1.0] = $1.1 }
        }
        for code in 0..<64 {
            #expect(results[code]?.exitCode == code, "run \(code)")
        }
    }
}
