import Foundation
import ServiceLifecycle
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// Payop must get through whatever one other client does: the real listener on loopback, a flood of
/// idle connections from 127.0.0.1, Payop posting from 127.0.0.2.
@Suite(.serialized) struct ConnectionFloodTests {
    func withListener(
        allowed: SourcePolicy.Allowed, _ body: @escaping @Sendable (Int, SQLiteEventLog) async throws -> Void
    ) async throws {
        try await ExclusiveTiming.shared.run {
            try await withIPNListener(settings: ingressSettings(allowed: allowed), readTimeoutSeconds: 30, body)
        }
    }

    /// Opens `count` idle connections from 127.0.0.1 and keeps them until `body` returns.
    func withIdleConnections<T>(_ count: Int, port: Int, _ body: () async throws -> T) async throws -> T {
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        if limit.rlim_cur < rlim_t(count + 512) {
            limit.rlim_cur = min(limit.rlim_max, rlim_t(count + 512))
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        var sockets: [Int32] = []
        defer { for fd in sockets { close(fd) } }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        for _ in 0..<count {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { break }
            sockets.append(fd)
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        #expect(sockets.count == count)
        // The flood is in place (accepted, or refused) before Payop posts; what is measured is Payop's wait.
        try await Task.sleep(for: .milliseconds(300))
        return try await body()
    }

    func postIPN(port: Int) async throws -> (String, Duration) {
        let body = String(decoding: try Samples.data("checkout-accepted"), as: UTF8.self)
        let request =
            "POST /payop/ipn HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        let started = ContinuousClock.now
        let answer = try await rawExchange(port: port, send: request, from: "127.0.0.2")
        return (answer, ContinuousClock.now - started)
    }

    @Test func payopGetsThroughTwoThousandIdleConnectionsFromAnAllowedClient() async throws {
        try await withListener(allowed: .any) { port, _ in
            let (answer, took) = try await withIdleConnections(2000, port: port) { try await postIPN(port: port) }
            #expect(answer.hasPrefix("HTTP/1.1 200"))
            #expect(took < .seconds(2))
        }
    }

    @Test func disallowedFloodIsTurnedAwayAtAcceptAndPayopGetsThrough() async throws {
        try await withListener(allowed: .only([CIDR("127.0.0.2")!])) { port, log in
            let (answer, took) = try await withIdleConnections(2000, port: port) { try await postIPN(port: port) }
            #expect(answer.hasPrefix("HTTP/1.1 200"))
            #expect(took < .seconds(2))
            #expect(try await log.counts().receipts == 1)
        }
    }

    @Test func disallowedSourceIsAnswered403BeforeItsRequestIsRead() async throws {
        try await withListener(allowed: .only([CIDR("127.0.0.2")!])) { port, log in
            let answer = try await rawExchange(
                port: port, send: "POST /payop/ipn HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n\r\n{}")
            #expect(answer.hasPrefix("HTTP/1.1 403"))
            #expect(try await log.counts().receipts == 0)
        }
    }

    @Test func gateBoundsOneAddressAndKeepsAReserveForPrivilegedPeers() {
        var limits = ConnectionGate.Limits()
        limits.maxConnections = 10
        limits.reserve = 4
        limits.maxPerAddress = 3
        let gate = ConnectionGate(limits: limits) { SourcePolicy(allowed: .any) }
        let flooder = IPAddress("198.51.100.7")
        let flood = (0..<5).map { _ in gate.admit(flooder) }
        #expect(flood.map(\.decision) == [.admit, .admit, .admit, .drop, .drop])
        var others = (1...3).map { gate.admit(IPAddress("198.51.100.\(10 + $0)")) }
        #expect(others.allSatisfy { $0.decision == .admit })
        #expect(gate.admit(IPAddress("198.51.100.20")).decision == .drop)  // only the reserve is left
        others += (0..<4).map { _ in gate.admit(IPAddress("3.125.109.58")) }  // Payop
        #expect(others.allSatisfy { $0.decision == .admit })
        #expect(gate.admit(IPAddress("3.125.109.58")).decision == .drop)
        for ticket in flood + others { gate.release(ticket) }
        #expect(gate.openConnections == 0)
        #expect((0..<3).map { _ in gate.admit(flooder).decision } == [.admit, .admit, .admit])
    }

    @Test func listedAddressIsCappedTooAndReloadCannotSkewTheCounts() {
        var limits = ConnectionGate.Limits()
        limits.maxPerAddress = 2
        let listed = Shared(SourcePolicy(allowed: .only([CIDR("10.0.0.0/8")!])))
        let gate = ConnectionGate(limits: limits) { listed.withLock { $0 } }
        let client = IPAddress("10.1.2.3")
        let tickets = (0..<3).map { _ in gate.admit(client) }
        #expect(tickets.map(\.decision) == [.admit, .admit, .drop])
        listed.withLock { $0 = SourcePolicy(allowed: .any, trustedProxies: [CIDR("10.0.0.0/8")!]) }
        for ticket in tickets { gate.release(ticket) }
        #expect(gate.openConnections == 0)
    }
}
