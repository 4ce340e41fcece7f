import HTTPTypes
import HummingbirdCore
import HummingbirdTesting
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif
import Foundation

@testable import PayopIPND

/// The IPN listener on a real loopback socket, writing to a real SQLite file.
@Suite struct ListenerLiveTests {
    /// Runs the listener on an ephemeral port for the duration of `body`. These tests time the real
    /// network stack on event loops every test shares, and one of them floods a loop for seconds: each
    /// takes the machine for itself.
    func withListener(
        maxBodyBytes: Int = 1024, readTimeoutSeconds: Double = 5, _ body: @escaping @Sendable (TestClient, SQLiteEventLog, Int) async throws -> Void
    ) async throws {
        try await ExclusiveTiming.shared.run {
            try await withIPNListener(
                settings: ingressSettings(maxBodyBytes: maxBodyBytes), readTimeoutSeconds: readTimeoutSeconds
            ) { port, log in
                try await TestClient.withClient(host: "127.0.0.1", port: port) { client in
                    try await body(client, log, port)
                }
            }
        }
    }

    @Test func postedIPNIsOnDiskWhenThe200Arrives() async throws {
        try await withListener { client, log, _ in
            let response = try await client.post(
                "/payop/ipn", body: ByteBuffer(bytes: try Samples.data("checkout-accepted")))
            #expect(response.status == .ok)
            #expect(try await log.counts() == (events: 1, receipts: 1))
        }
    }

    @Test func bodyOneByteOverTheLimitIs413AndAtTheLimitIsRead() async throws {
        let limit = 1024
        try await withListener(maxBodyBytes: limit) { client, log, _ in
            let atLimit = ByteBuffer(bytes: [UInt8](repeating: UInt8(ascii: " "), count: limit))
            let read = try await client.post("/payop/ipn", body: atLimit)
            #expect(read.status == .badRequest)
            let over = ByteBuffer(bytes: [UInt8](repeating: UInt8(ascii: " "), count: limit + 1))
            let refused = try await client.post("/payop/ipn", body: over)
            #expect(refused.status == .contentTooLarge)
        }
    }

    @Test func streamedBodyOverTheLimitIs413WithoutBeingBuffered() async throws {
        try await withListener(maxBodyBytes: 1024) { client, _, _ in
            let response = try await client.execute(
                .init(
                    "/payop/ipn", method: .post, headers: [.transferEncoding: "chunked"],
                    body: ByteBuffer(bytes: [UInt8](repeating: 0x20, count: 5000))))
            #expect(response.status == .contentTooLarge)
        }
    }

    @Test func getOnTheIPNPathIs405WithAllow() async throws {
        try await withListener { client, _, _ in
            let response = try await client.get("/payop/ipn")
            #expect(response.status == .methodNotAllowed)
            #expect(response.head.headerFields[.allow] == "POST")
        }
    }

    /// Read timeout for tests that need it to fire but do not time it: long enough that a test
    /// client descheduled between its connect and its send (the whole suite on two cores) is not
    /// taken for a slow one.
    static let unmeasuredReadTimeout = 1.5

    @Test func clientTricklingItsBodyIsAnswered408AndNothingIsStored() async throws {
        try await withListener(readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, log, port in
            // Promise 100 bytes, send 10, then go quiet: a raw socket, since HTTP clients won't.
            let answer = try await rawExchange(
                port: port, send: "POST /payop/ipn HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"invoice\"")
            #expect(answer.hasPrefix("HTTP/1.1 408"))
            #expect(try await log.counts() == (events: 0, receipts: 0))
        }
    }

    @Test func clientTricklingItsHeadersIsDisconnectedAfterTheReadTimeout() async throws {
        try await withListener(readTimeoutSeconds: 0.3) { _, _, port in
            let started = ContinuousClock.now
            // Headers never finished: no response can be given, the connection is closed.
            let answer = try await rawExchange(port: port, send: "POST /payop/ipn HTTP/1.1\r\nHost: x\r\n")
            #expect(answer.isEmpty)
            // The read timeout closed it, not the idle backstop (four times longer).
            #expect(ContinuousClock.now - started < .milliseconds(1000))
        }
    }

    @Test func keepAliveConnectionLeftIdleAfterAnAnswerIsClosedAfterTheReadTimeout() async throws {
        try await withListener(readTimeoutSeconds: 0.3) { _, _, port in
            let started = ContinuousClock.now
            // Answered and kept open; then nothing more comes: the wait for the next head ends it.
            let answer = try await rawExchange(port: port, send: "GET /payop/ipn HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(Self.statuses(answer) == [405])
            #expect(!answer.lowercased().contains("connection: close"))
            let elapsed = ContinuousClock.now - started
            #expect(elapsed >= .milliseconds(300) && elapsed < .milliseconds(2000))
        }
    }

    /// Each wait is measured from its own start (the previous answer, the head), however long the
    /// connection has been open: a request every 0.5 s with a 1 s timeout is served past twice the
    /// timeout, and a body that starts 0.5 s after an answer and ends 0.5 s later is read whole.
    @Test func readTimeoutCountsFromEachWaitsStartOnALongConnection() async throws {
        try await withListener(maxBodyBytes: 64 * 1024, readTimeoutSeconds: 1) { _, log, port in
            let body = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            let request = Self.ipnRequest(body)
            let split = request.index(request.endIndex, offsetBy: -body.utf8.count / 2)
            let get = "GET /payop/ipn HTTP/1.1\r\nHost: x\r\n\r\n"
            let started = ContinuousClock.now
            let answer = try await rawConversation(
                port: port, sends: [get, get, get, String(request[..<split]), String(request[split...])],
                pause: .milliseconds(500))
            #expect(Self.statuses(answer) == [405, 405, 405, 200])
            #expect(try await log.counts() == (events: 1, receipts: 1))
            // Then idle: closed one read timeout after the last answer (about 2 s + 1 s).
            #expect(ContinuousClock.now - started >= .milliseconds(2500))
        }
    }

    @Test func unwantedBodyTricklingToAnotherPathIsCutOffAfterTheReadTimeout() async throws {
        try await withListener(readTimeoutSeconds: 0.3) { _, _, port in
            let started = ContinuousClock.now
            // A 404 is decided at the head; the body never ends: the connection must not stay open.
            _ = try await rawExchange(
                port: port,
                send: "POST /elsewhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            #expect(ContinuousClock.now - started < .milliseconds(2000))
        }
    }

    @Test func http10KeepAliveIsAnsweredInHTTP10AndHeadGetsNoBody() async throws {
        try await withListener(readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, _, port in
            let old = try await rawExchange(
                port: port, send: "GET /payop/ipn HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            #expect(old.hasPrefix("HTTP/1.0 405"))
            #expect(old.lowercased().contains("connection: keep-alive"))
            let head = try await rawExchange(port: port, send: "HEAD /payop/ipn HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(head.hasPrefix("HTTP/1.1 405"))
            #expect(head.hasSuffix("\r\n\r\n"))  // headers only
        }
    }

    /// An IPN request written out in full, for a raw socket.
    static func ipnRequest(_ body: String, close: Bool = false) -> String {
        "POST /payop/ipn HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n"
            + (close ? "Connection: close\r\n" : "") + "\r\n" + body
    }

    /// The status codes of the answers in `text`, in order.
    static func statuses(_ text: String) -> [Int] {
        text.components(separatedBy: "HTTP/1.1 ").dropFirst().compactMap { Int($0.prefix(3)) }
    }

    @Test func pipelinedRequestsAreAnsweredInOrderAndEachIPNIsStored() async throws {
        try await withListener(maxBodyBytes: 64 * 1024, readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, log, port in
            let first = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            let second = try String(decoding: Samples.data("refund-accepted"), as: UTF8.self)
            // The first two in one write: the second arrives while the first waits for the log, and the
            // socket is not read meanwhile. The third comes once both are answered: it is read only if
            // that hold was released.
            let answer = try await rawConversation(
                port: port,
                sends: [
                    Self.ipnRequest(first) + "GET /payop/ipn HTTP/1.1\r\nHost: x\r\n\r\n",
                    Self.ipnRequest(second, close: true),
                ],
                pause: .milliseconds(300))
            #expect(Self.statuses(answer) == [200, 405, 200])
            #expect(try await log.counts() == (events: 2, receipts: 2))
        }
    }

    @Test func clientPipeliningMoreThanTheQueueHoldsGetsItsIPNAnsweredThenIsDisconnected() async throws {
        try await withListener(maxBodyBytes: 64 * 1024, readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, log, port in
            let body = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            // 60 requests (120 parts: a head and an end each) behind the IPN, in one write: decoded before its commit can answer.
            let flood = String(repeating: "GET /payop/ipn HTTP/1.1\r\nHost: x\r\n\r\n", count: 60)
            let started = ContinuousClock.now
            let answer = try await rawExchange(port: port, send: Self.ipnRequest(body) + flood)
            #expect(Self.statuses(answer) == [200])
            #expect(answer.lowercased().contains("connection: close"))
            #expect(ContinuousClock.now - started < .milliseconds(1000))
            #expect(try await log.counts() == (events: 1, receipts: 1))
        }
    }

    @Test func malformedHTTPPipelinedBehindAnIPNIsAnswered400AfterIts200() async throws {
        try await withListener(maxBodyBytes: 64 * 1024, readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, log, port in
            let body = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            let answer = try await rawExchange(port: port, send: Self.ipnRequest(body) + "NOT HTTP AT ALL\r\n\r\n")
            #expect(Self.statuses(answer) == [200, 400])
            #expect(answer.lowercased().contains("connection: close"))
            #expect(try await log.counts() == (events: 1, receipts: 1))
        }
    }

    @Test func malformedHTTPIsAnswered400AndTheConnectionCloses() async throws {
        try await withListener(readTimeoutSeconds: Self.unmeasuredReadTimeout) { _, _, port in
            let started = ContinuousClock.now
            let answer = try await rawExchange(port: port, send: "\u{1}\u{2}garbage\r\n\r\n")
            #expect(Self.statuses(answer) == [400])
            #expect(answer.hasSuffix("malformed HTTP request\n"))
            // Closed by the server, not by the client's 5 s receive timeout nor the read timeout.
            #expect(ContinuousClock.now - started < .milliseconds(1000))
        }
    }

    @Test(.timeLimit(.minutes(1))) func stoppingAnswersTheIPNInProgressThenClosesItsConnection() async throws {
        let store = GatedEventStore()
        let ingress = IPNIngress(settings: ingressSettings(), store: store, logger: quietLogger)
        try await runIPNListener(ingress: ingress, readTimeoutSeconds: 5) { port, group in
            let body = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            let started = ContinuousClock.now
            async let answer = rawExchange(port: port, send: Self.ipnRequest(body))
            await store.firstArrival()
            await group.triggerGracefulShutdown()
            // The stop has reached the connection before its receipt is answered: the listener stopped
            // accepting, and every event loop has run what was queued with that (the connection's
            // notice to stop among it), so the answer's turn comes after it.
            while connects(port: port) { try await Task.sleep(for: .milliseconds(10)) }
            for loop in MultiThreadedEventLoopGroup.singleton.makeIterator() { try await loop.submit {}.get() }
            store.release()
            let text = try await answer
            // Answered, saying so, then closed by the server: not left open until the client's 5 s timeout.
            #expect(Self.statuses(text) == [200])
            #expect(text.lowercased().contains("connection: close"))
            #expect(ContinuousClock.now - started < .seconds(4))
        }
    }

    /// A client that sends request after request without reading the answers: once they back up, the
    /// socket is not read, so the client's sends block instead of the daemon's memory growing; once it
    /// reads, every whole request it sent is answered.
    @Test func clientSendingWithoutReadingItsAnswersIsNotReadUntilItDoes() async throws {
        try await withListener(readTimeoutSeconds: 10) { _, _, port in
            let request = Array("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
            let chunk = Array([[UInt8]](repeating: request, count: 100).joined())
            // The kernel's socket buffers take a few MiB of answers (send buffers grow to 4 MiB by default).
            let cap = 16 << 20
            let (sent, answers) = try await onRawSocket(port: port, bufferBytes: 16 * 1024) { fd in
                var sent = 0
                while sent < cap {
                    // On from where the last send stopped (a send that times out may have sent part of it).
                    let at = sent % chunk.count
                    let count = chunk.withUnsafeBytes { send(fd, $0.baseAddress! + at, chunk.count - at, Int32(MSG_NOSIGNAL)) }
                    if count <= 0 { break }  // blocked for the whole send timeout: the daemon stopped reading
                    sent += count
                }
                let expected = sent / request.count
                var text = ""
                var buffer = [UInt8](repeating: 0, count: 65536)
                var answers = 0
                while answers < expected {
                    let count = recv(fd, &buffer, buffer.count, 0)
                    if count <= 0 { break }
                    text += String(decoding: buffer.prefix(count), as: UTF8.self)
                    let parts = text.components(separatedBy: "HTTP/1.1 404")
                    answers += parts.count - 1
                    text = parts.last ?? ""
                }
                return (sent, answers)
            }
            #expect(sent < 8 << 20, "the daemon read \(sent) bytes from a client that read none of its answers")
            #expect(answers == sent / request.count, "sent \(sent) bytes (\(sent % request.count) over whole requests)")
        }
    }

    /// After an `Upgrade` or `CONNECT` request NIO's decoder parses nothing more: the answer closes the
    /// connection at once rather than leaving it open, buffering, until the read timeout.
    @Test func requestThatEndsHTTPOnItsConnectionIsAnsweredThenTheConnectionCloses() async throws {
        try await withListener(maxBodyBytes: 64 * 1024, readTimeoutSeconds: 4) { _, log, port in
            let started = ContinuousClock.now
            let answer = try await rawExchange(
                port: port,
                send: "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                    + "GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(Self.statuses(answer) == [404])
            #expect(answer.lowercased().contains("connection: close"))
            #expect(ContinuousClock.now - started < .milliseconds(1000))
            // An IPN posted as `curl --http2` posts over plain HTTP is stored and answered, then closed.
            let body = try String(decoding: Samples.data("checkout-accepted"), as: UTF8.self)
            let ipn = try await rawExchange(
                port: port,
                send: Self.ipnRequest(body).replacingOccurrences(
                    of: "Host: x\r\n", with: "Host: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"))
            #expect(Self.statuses(ipn) == [200])
            #expect(ipn.lowercased().contains("connection: close"))
            #expect(try await log.counts() == (events: 1, receipts: 1))
        }
    }

    /// A closing answer shuts the connection's output before closing it: the client reads the answer
    /// and an orderly end, and what it still sends is read and dropped, not met with a reset (which, on a
    /// real network, can take an answer still in flight with it).
    @Test func closingAnswerEndsTheOutputFirstSoInputStillArrivingIsNotReset() async throws {
        try await withListener(readTimeoutSeconds: 4) { _, _, port in
            let (answer, late) = try await onRawSocket(port: port) { fd in
                let request = "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                _ = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                let received = receiveUntilEnd(fd)
                // The answer and its end are in, and the client still sends. The second send comes after the
                // server's close: had that close left the first unread, it would have reset the connection,
                // and this send would fail.
                var late: [Int] = []
                for _ in 0..<2 {
                    late.append("more".withCString { send(fd, $0, 4, Int32(MSG_NOSIGNAL)) })
                    usleep(300_000)
                }
                return (received, late)
            }
            #expect(Self.statuses(answer) == [404])
            #expect(late == [4, 4], "a send after the answer failed: the connection was reset")
        }
    }

    @Test func metricsAreNotServedOnTheIPNPort() async throws {
        try await withListener { client, _, _ in
            let response = try await client.get("/metrics")
            #expect(response.status == .notFound)
        }
    }
}

/// Sends `text` on a fresh connection (from `source`, a loopback address) and reads until the server
/// closes or 5 s pass.
func rawExchange(port: Int, send text: String, from source: String? = nil) async throws -> String {
    try await rawConversation(port: port, sends: [text], from: source)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
func connects(port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    } == 0
}

/// Sends each of `sends` on one fresh connection, `pause` apart, then reads until the server closes or
/// 5 s pass (a send after the server closed is lost, not a crash).
func rawConversation(
    port: Int, sends: [String], pause: Duration = .zero, from source: String? = nil
) async throws -> String {
    try await onRawSocket(port: port, from: source) { fd in
        for (index, text) in sends.enumerated() {
            if index > 0 {
                Thread.sleep(forTimeInterval: Double(pause.components.seconds) + Double(pause.components.attoseconds) / 1e18)
            }
            _ = text.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        }
        return receiveUntilEnd(fd)
    }
}

/// What arrives on `fd` until the server closes or a receive times out.
func receiveUntilEnd(_ fd: Int32) -> String {
    var received = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = recv(fd, &buffer, buffer.count, 0)
        if count <= 0 { break }
        received += buffer.prefix(count)
    }
    return String(decoding: received, as: UTF8.self)
}

/// Runs `body` on a thread with a blocking socket connected to 127.0.0.1:`port` from `source` (a
/// loopback address) if given, its receive and send buffers set to `bufferBytes` when given; sends and
/// receives time out after 1 and 5 s.
func onRawSocket<T: Sendable>(
    port: Int, from source: String? = nil, bufferBytes: Int32? = nil, _ body: @escaping @Sendable (Int32) -> T
) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            if let source {
                var local = sockaddr_in()
                local.sin_family = sa_family_t(AF_INET)
                local.sin_addr.s_addr = inet_addr(source)
                _ = withUnsafePointer(to: &local) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            }
            if var size = bufferBytes {
                setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
                setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            }
            var sendTimeout = timeval(tv_sec: 1, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &sendTimeout, socklen_t(MemoryLayout<timeval>.size))
            var receiveTimeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &receiveTimeout, socklen_t(MemoryLayout<timeval>.size))
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard connected == 0 else {
                continuation.resume(throwing: POSIXError(.ECONNREFUSED))
                return
            }
            continuation.resume(returning: body(fd))
        }
        thread.start()
    }
}

/// The real IPN listener on an ephemeral loopback port, over a real SQLite log, for `body`.
func withIPNListener(
    settings: IngressSettings, readTimeoutSeconds: Double, _ body: @Sendable (Int, SQLiteEventLog) async throws -> Void
) async throws {
    let dir = try TemporaryDirectory()
    let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
    defer { log.close() }
    let ingress = IPNIngress(settings: settings, store: log, logger: quietLogger)
    try await runIPNListener(ingress: ingress, readTimeoutSeconds: readTimeoutSeconds) { port, _ in
        try await body(port, log)
    }
}

/// The real IPN listener for `ingress` on an ephemeral loopback port, for `body`, which gets its port
/// and its service group (to stop it early); stopped gracefully when `body` returns.
func runIPNListener(
    ingress: IPNIngress, readTimeoutSeconds: Double, _ body: @Sendable (Int, ServiceGroup) async throws -> Void
) async throws {
    let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
    let server = IPNListener.makeServer(
        host: "127.0.0.1", port: 0, ingress: ingress, readTimeoutSeconds: readTimeoutSeconds, logger: quietLogger,
        onRunning: { continuation.yield($0) })
    let group = ServiceGroup(services: [server], logger: quietLogger)
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        var iterator = ports.makeAsyncIterator()
        let port = try #require(await iterator.next())
        do {
            try await body(port, group)
        } catch {
            await group.triggerGracefulShutdown()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
    }
}

/// An event log slow to commit: every receipt's answer is held until `release()`.
final class GatedEventStore: EventStore {
    private let inner = FakeEventStore()
    private let held = Mutex<[@Sendable () -> Void]>([])
    private let arrivals: AsyncStream<Void>
    private let arrived: AsyncStream<Void>.Continuation

    init() { (arrivals, arrived) = AsyncStream.makeStream() }

    func ingest(_ ipn: IncomingIPN, completion: @escaping @Sendable (Result<IngestOutcome, EventLogError>) -> Void) {
        inner.ingest(ipn) { result in
            self.held.withLock { $0.append { completion(result) } }
            self.arrived.yield()
        }
    }

    func recordRefused(_ refused: RefusedIPN, completion: @escaping @Sendable (EventLogError?) -> Void) {
        inner.recordRefused(refused, completion: completion)
    }

    /// Returns once a receipt is being held.
    func firstArrival() async {
        var iterator = arrivals.makeAsyncIterator()
        _ = await iterator.next()
    }

    func release() {
        for answer in held.withLock({ held in defer { held.removeAll() }; return held }) { answer() }
    }
}
