import Foundation
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// `payop-ipnd doctor`: each check passes on a good setup, and fails with its fix on a broken one.
@Suite struct DoctorTests {
    struct Setup {
        var logPath: String
        var apiBase: String
        var jwtFile: String?
        var command: String = "/bin/true"
        var url: String?
        var extra: String = ""
    }

    func config(_ dir: TemporaryDirectory, _ setup: Setup) throws -> String {
        var yaml = """
            server:
              listen: 127.0.0.1:\(DaemonProcessTests.freePort())
              allowed_sources: any
            admin:
              listen: 127.0.0.1:\(DaemonProcessTests.freePort())
            storage:
              path: \(setup.logPath)
            payop:
              api_base_url: \(setup.apiBase)

            """
        if let jwt = setup.jwtFile { yaml += "  jwt_file: \(jwt)\n" }
        yaml += """
            hooks:
              - name: fulfil
                command: [\(setup.command)]
                events: ["*"]

            """
        if let url = setup.url { yaml += "  - name: crm\n    url: \(url)\n    events: [\"*\"]\n" }
        yaml += setup.extra
        return try dir.write("payop-ipnd.yaml", yaml)
    }

    func failures(_ checks: [DoctorCheck]) -> [String: String] {
        Dictionary(
            checks.filter { $0.verdict == .fail }.map { ($0.name, $0.fix ?? "") }, uniquingKeysWith: { $0 + "; " + $1 })
    }

    @Test func goodSetupPassesEveryCheck() async throws {
        try await PayopHarness.with { h, port in
            let dir = try TemporaryDirectory()
            let jwt = try dir.write("jwt", h.jwt)
            let path = try config(
                dir,
                Setup(
                    logPath: dir.file("events.sqlite3"), apiBase: "http://127.0.0.1:\(port)", jwtFile: jwt,
                    url: "http://127.0.0.1:\(port)/hook"))
            let checks = await Doctor(configPath: path).run()
            #expect(failures(checks).isEmpty, "\(checks.map(\.line))")
            let names = Set(checks.map(\.name))
            #expect(
                names.isSuperset(of: [
                    "config", "secrets", "event log", "IPN listener", "admin listener", "Payop API", "clock",
                    "hook fulfil", "hook crm",
                ]))
        }
    }

    @Test func eachBrokenPartFailsWithItsFix() async throws {
        try await PayopHarness.with { h, port in
            let dir = try TemporaryDirectory()
            let notExecutable = try dir.write("hook.sh", "#!/bin/sh\n", mode: 0o644)
            let nothing = DaemonProcessTests.freePort()
            let path = try config(
                dir,
                Setup(
                    logPath: "/nonexistent-payop-ipnd/events.sqlite3", apiBase: "http://127.0.0.1:\(port)",
                    jwtFile: nil, url: "http://127.0.0.1:\(nothing)/hook"))
            let failed = failures(await Doctor(configPath: path).run())
            #expect(failed["secrets"]?.contains("payop.jwt_file") == true)
            #expect(failed["event log"]?.contains("StateDirectory") == true)
            #expect(failed["hook crm"]?.contains("start the shop's endpoint") == true)
            #expect(!FileManager.default.fileExists(atPath: "/nonexistent-payop-ipnd"))  // doctor only looks
            // A command hook that cannot run is already a configuration error, named with its fix.
            let broken = try config(
                dir, Setup(logPath: dir.file("events.sqlite3"), apiBase: "http://127.0.0.1:\(port)", command: notExecutable))
            let checks = await Doctor(configPath: broken).run()
            #expect(checks.contains { $0.verdict == .fail && $0.name == "config" && $0.detail.contains("hook.sh") })
            _ = h
        }
    }

    @Test func refusedJWTUnreachablePayopSkewedClockAndTakenPortsFail() async throws {
        try await PayopHarness.with { h, port in
            let dir = try TemporaryDirectory()
            let jwt = try dir.write("jwt", "not-the-jwt")
            let path = try config(
                dir, Setup(logPath: dir.file("events.sqlite3"), apiBase: "http://127.0.0.1:\(port)", jwtFile: jwt))
            var doctor = Doctor(configPath: path)
            let clock = TestClock(Int64(Date().timeIntervalSince1970 * 1000) + 3_600_000)
            doctor.clock = clock
            doctor.minimumFreeBytes = .max
            let failed = failures(await doctor.run())
            #expect(failed["Payop API"]?.contains("new JWT") == true)
            #expect(failed["clock"]?.contains("time synchronisation") == true)
            #expect(failed["event log"]?.contains("free space") == true)
            _ = h
        }
        let dir = try TemporaryDirectory()
        let jwt = try dir.write("jwt", "some-jwt")
        let path = try config(dir, Setup(logPath: dir.file("events.sqlite3"), apiBase: "http://127.0.0.1:1", jwtFile: jwt))
        #expect(failures(await Doctor(configPath: path).run())["Payop API"]?.contains("firewall") == true)
        // A port another program holds.
        let taken = try await ServerSocket.listening()
        defer { taken.close() }
        let busy = await Doctor.listenerCheck("IPN listener", ListenAddress(host: "127.0.0.1", port: taken.port), running: nil)
        #expect(busy.verdict == .fail && busy.fix?.contains("ss -ltnp") == true)
        let ours = await Doctor.listenerCheck("IPN listener", ListenAddress(host: "127.0.0.1", port: taken.port), running: "pid 42")
        #expect(ours.verdict == .ok && ours.detail.contains("pid 42"))
    }

    @Test func brokenConfigIsOneFailurePerProblem() async throws {
        let dir = try TemporaryDirectory()
        let path = try dir.write("payop-ipnd.yaml", "storage:\n  path: /tmp/x.sqlite3\n  colour: blue\n")
        let checks = await Doctor(configPath: path).run()
        #expect(checks.map(\.verdict) == [.fail])
        #expect(checks.first?.detail.contains("colour") == true)
    }
}

/// A listening TCP socket on a free loopback port, held by the test.
struct ServerSocket {
    let fd: Int32
    let port: Int

    static func listening() async throws -> ServerSocket {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        listen(fd, 16)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return ServerSocket(fd: fd, port: Int(UInt16(bigEndian: address.sin_port)))
    }

    func close() { _ = Glibc.close(fd) }
}
