import HTTPTypes
import HummingbirdCore
import HummingbirdTesting
import NIOCore
import ServiceLifecycle
import Testing

@testable import PayopIPND

/// The IPN listener on a real loopback socket, writing to a real SQLite file.
@Suite struct ListenerLiveTests {
    /// Runs the listener on an ephemeral port for the duration of `body`.
    func withListener(
        maxBodyBytes: Int = 1024, _ body: @escaping @Sendable (TestClient, SQLiteEventLog) async throws -> Void
    ) async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let ingress = IPNIngress(settings: ingressSettings(maxBodyBytes: maxBodyBytes), store: log, logger: quietLogger)
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let server = IPNListener.makeServer(
            host: "127.0.0.1", port: 0, ingress: ingress, readTimeoutSeconds: 5, logger: quietLogger,
            onRunning: { continuation.yield($0) })
        let group = ServiceGroup(services: [server], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var iterator = ports.makeAsyncIterator()
            let port = try #require(await iterator.next())
            try await TestClient.withClient(host: "127.0.0.1", port: port) { client in
                try await body(client, log)
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    @Test func postedIPNIsOnDiskWhenThe200Arrives() async throws {
        try await withListener { client, log in
            let response = try await client.post(
                "/payop/ipn", body: ByteBuffer(bytes: try Samples.data("checkout-accepted")))
            #expect(response.status == .ok)
            #expect(try await log.counts() == (events: 1, receipts: 1))
        }
    }

    @Test func bodyOneByteOverTheLimitIs413AndAtTheLimitIsRead() async throws {
        let limit = 1024
        try await withListener(maxBodyBytes: limit) { client, log in
            let atLimit = ByteBuffer(bytes: [UInt8](repeating: UInt8(ascii: " "), count: limit))
            let read = try await client.post("/payop/ipn", body: atLimit)
            #expect(read.status == .badRequest)
            let over = ByteBuffer(bytes: [UInt8](repeating: UInt8(ascii: " "), count: limit + 1))
            let refused = try await client.post("/payop/ipn", body: over)
            #expect(refused.status == .contentTooLarge)
        }
    }

    @Test func streamedBodyOverTheLimitIs413WithoutBeingBuffered() async throws {
        try await withListener(maxBodyBytes: 1024) { client, _ in
            let response = try await client.execute(
                .init(
                    "/payop/ipn", method: .post, headers: [.transferEncoding: "chunked"],
                    body: ByteBuffer(bytes: [UInt8](repeating: 0x20, count: 5000))))
            #expect(response.status == .contentTooLarge)
        }
    }

    @Test func getOnTheIPNPathIs405WithAllow() async throws {
        try await withListener { client, _ in
            let response = try await client.get("/payop/ipn")
            #expect(response.status == .methodNotAllowed)
            #expect(response.head.headerFields[.allow] == "POST")
        }
    }

    @Test func metricsAreNotServedOnTheIPNPort() async throws {
        try await withListener { client, _ in
            let response = try await client.get("/metrics")
            #expect(response.status == .notFound)
        }
    }
}
