import Foundation
import HTTPTypes
import HummingbirdTesting
import NIOCore
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`, read on a thread of its own.
final class NotifySocket: Sendable {
    let path: String
    let messages: AsyncStream<String>
    private let fd: Int32

    init(directory: TemporaryDirectory) throws {
        path = directory.file("notify.sock")
        let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        fd = descriptor
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        try #require(bound == 0)
        let (stream, continuation) = AsyncStream.makeStream(of: String.self)
        messages = stream
        let fd = descriptor
        let thread = Thread {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let count = recv(fd, &buffer, buffer.count, 0)
                if count <= 0 { break }
                continuation.yield(String(decoding: buffer.prefix(count), as: UTF8.self))
            }
            continuation.finish()
        }
        thread.start()
    }

    deinit {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }
}

extension AsyncStream<String>.Iterator {
    /// The next message containing `line`, skipping others (watchdog pings arrive in between).
    mutating func next(containing line: String) async -> String? {
        while let message = await next() {
            if message.split(separator: "\n").contains(Substring(line)) { return message }
        }
        return nil
    }
}

@Suite(.serialized) struct DaemonLifecycleTests {
    func yaml(_ dir: TemporaryDirectory, hookEvents: String, extra: String = "") -> String {
        """
        log_level: error
        server:
          listen: 127.0.0.1:0
          allowed_sources: any
        admin:
          listen: 127.0.0.1:0
        storage:
          path: \(dir.file("events.sqlite3"))
        payop:
          secret_key_file: \(dir.file("secret"))
        hooks:
          - name: recorder
            command: [/bin/true]
            events: [\(hookEvents)]
        \(extra)
        """
    }

    func legacyIPN(order: String) -> ByteBuffer {
        let signature = LegacySignature.expected(
            amount: "5.00", currency: "EUR", orderID: order, status: "success", secretKey: "k")!
        return ByteBuffer(
            string: #"{"orderId":"\#(order)","amount":"5.00","currency":"EUR","status":"success","signature":"\#(signature)"}"#)
    }

    @Test func daemonSpeaksSystemdsProtocolReloadsOnHangupAndStopsCleanlyOnTerm() async throws {
        let dir = try TemporaryDirectory()
        _ = try dir.write("secret", "k\n")
        let configPath = try dir.write("payop-ipnd.yaml", yaml(dir, hookEvents: "refund.*"), mode: 0o644)
        let notify = try NotifySocket(directory: dir)
        var messages = notify.messages.makeAsyncIterator()
        let (config, _) = try ConfigLoader.load(path: configPath)
        let (readyPorts, portsContinuation) = AsyncStream.makeStream(of: Daemon.BoundPorts.self)
        let daemon = Daemon(
            config: config, configPath: configPath, logger: quietLogger,
            environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"],
            onReady: { portsContinuation.yield($0) })
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await daemon.run() }

            // READY=1 only once both ports answer.
            #expect(await messages.next(containing: "READY=1") != nil)
            var portIterator = readyPorts.makeAsyncIterator()
            let ports = try #require(await portIterator.next())
            try await TestClient.withClient(host: "127.0.0.1", port: ports.admin) { admin in
                let response1 = try await admin.get("/healthz")
                #expect(response1.status == .ok)
                let response2 = try await admin.get("/readyz")
                #expect(response2.status == .ok)
            }
            try await TestClient.withClient(host: "127.0.0.1", port: ports.ipn) { ipn in
                let response3 = try await ipn.post("/payop/ipn", body: legacyIPN(order: "before-reload"))
                #expect(response3.status == .ok)
                let response4 = try await ipn.get("/metrics")
                #expect(response4.status == .notFound)
            }
            #expect(await messages.next(containing: "WATCHDOG=1") != nil)

            // /metrics is Prometheus text, and its counters moved with the IPN.
            try await TestClient.withClient(host: "127.0.0.1", port: ports.admin) { admin in
                let response = try await admin.get("/metrics")
                let text = String(buffer: try #require(response.body))
                let sample = try Regex(#"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? [-+0-9.eE]+(Inf)?$"#)
                for line in text.split(separator: "\n") where !line.hasPrefix("#") {
                    #expect(line.wholeMatch(of: sample) != nil, "not Prometheus text: \(line)")
                }
                #expect(text.contains(#"payop_ipnd_ipn_requests_total{kind="checkout",answer="200"} 1"#))
                #expect(text.contains(#"payop_ipnd_events_total{type="checkout.accepted"} 1"#))
                #expect(text.contains("payop_ipnd_last_ipn_timestamp_seconds "))
            }

            // SIGHUP with a changed hook filter: new events follow it.
            try yaml(dir, hookEvents: "\"checkout.*\"").write(toFile: configPath, atomically: false, encoding: .utf8)
            kill(getpid(), SIGHUP)
            #expect(await messages.next(containing: "RELOADING=1")?.contains("MONOTONIC_USEC=") == true)
            #expect(await messages.next(containing: "READY=1") != nil)
            try await TestClient.withClient(host: "127.0.0.1", port: ports.ipn) { ipn in
                let response5 = try await ipn.post("/payop/ipn", body: legacyIPN(order: "after-reload"))
                #expect(response5.status == .ok)
            }

            // SIGHUP with a broken config: refused, the old one keeps working.
            try yaml(dir, hookEvents: "\"checkout.*\"", extra: "colour: blue").write(
                toFile: configPath, atomically: false, encoding: .utf8)
            kill(getpid(), SIGHUP)
            #expect(await messages.next(containing: "READY=1")?.contains("reload refused") == true)
            try await TestClient.withClient(host: "127.0.0.1", port: ports.ipn) { ipn in
                let response6 = try await ipn.post("/payop/ipn", body: legacyIPN(order: "after-broken-reload"))
                #expect(response6.status == .ok)
            }

            let reader = try SQLiteEventLog.open(path: config.storage.path, mode: .tool, create: false)
            let delivered = try await reader.deliveries(state: nil, hook: nil, limit: 10)
            var orders: [String] = []
            for delivery in delivered {
                orders.append(try #require(try await reader.event(id: delivery.eventID)?.event.orderID))
            }
            reader.close()
            #expect(Set(orders) == ["after-reload", "after-broken-reload"])

            // SIGTERM: STOPPING=1, and run() returns normally (the process exits 0).
            kill(getpid(), SIGTERM)
            #expect(await messages.next(containing: "STOPPING=1") != nil)
            try await tasks.waitForAll()
        }
    }
}
