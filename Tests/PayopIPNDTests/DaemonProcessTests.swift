import Foundation
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// The real `payop-ipnd` binary (built beside the tests), run as a process.
@Suite(.serialized) struct DaemonProcessTests {
    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("payop-ipnd")
            .path
    }

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// User + system CPU time of `pid` so far, in seconds, from /proc.
    static func cpuSeconds(_ pid: Int32) throws -> Double {
        let fields = try #require(ProcessStat(pid)).fields
        let ticks = Double(fields[11])! + Double(fields[12])!  // utime, stime (fields 14 and 15)
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    struct Running {
        let process: Process
        let ipnPort: Int
        let dir: TemporaryDirectory
        let stderr: Pipe
    }

    static func start(
        hookScript: String, in dir: TemporaryDirectory, storage: String? = nil, arguments: [String] = []
    ) throws -> Running {
        let ipnPort = freePort()
        let hook = try script(dir, "hook", hookScript)
        let secret = try dir.write("secret", "k\n")
        let config = try dir.write(
            "payop-ipnd.yaml",
            """
            server:
              listen: 127.0.0.1:\(ipnPort)
              allowed_sources: any
            admin:
              listen: 127.0.0.1:\(freePort())
            storage:
              path: \(storage ?? dir.file("events.sqlite3"))
            payop:
              api_base_url: http://127.0.0.1:1
              secret_key_file: \(secret)
            hooks:
              - name: fulfil
                command: [\(hook)]
                events: ["*"]
                timeout_seconds: 60
            delivery:
              shutdown_grace_seconds: 1
              kill_grace_seconds: 1
            """)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["serve", "--config", config] + arguments
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return Running(process: process, ipnPort: ipnPort, dir: dir, stderr: stderr)
    }

    static func postLegacy(port: Int, order: String, status: String) async throws -> String {
        let signature = try #require(
            LegacySignature.expected(amount: "10.00", currency: "EUR", orderID: order, status: status, secretKey: "k"))
        let body =
            "{\"orderId\":\"\(order)\",\"amount\":\"10.00\",\"currency\":\"EUR\",\"status\":\"\(status)\",\"signature\":\"\(signature)\"}"
        let request =
            "POST /payop/ipn HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        for _ in 0..<100 {
            if let answer = try? await rawExchange(port: port, send: request), !answer.isEmpty { return answer }
            try await Task.sleep(for: .milliseconds(50))  // the daemon is still starting
        }
        return ""
    }

    /// A daemon answering on its IPN port. Ports are picked free but released before the daemon binds
    /// them, and tests in parallel may take one meanwhile: a daemon that exits at start (port taken)
    /// is started again on new ports.
    static func startServing(
        hookScript: String, in dir: TemporaryDirectory, arguments: [String] = []
    ) async throws -> Running {
        for _ in 0..<3 {
            let daemon = try start(hookScript: hookScript, in: dir, arguments: arguments)
            for _ in 0..<200 where daemon.process.isRunning {
                if let answer = try? await rawExchange(port: daemon.ipnPort, send: "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                    !answer.isEmpty
                {
                    return daemon
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            daemon.process.terminate()
            daemon.process.waitUntilExit()
        }
        throw DaemonDidNotStart()
    }

    struct DaemonDidNotStart: Error {}

    /// Waits for `process` to exit, at most `seconds`; kills it past that (a test never hangs on it).
    static func waitForExit(_ process: Process, seconds: Double) async throws -> Bool {
        for _ in 0..<Int(seconds * 20) where process.isRunning {
            try await Task.sleep(for: .milliseconds(50))
        }
        guard process.isRunning else { return true }
        process.terminate()
        process.waitUntilExit()
        return false
    }

    @Test func daemonIdlesWhileALaterStatusWaitsBehindASlowHook() async throws {
        try await ExclusiveTiming.shared.run { try await idleWhileWaiting() }
    }

    func idleWhileWaiting() async throws {
        let dir = try TemporaryDirectory()
        let started = dir.file("started")
        let daemon = try await Self.startServing(
            hookScript: "echo \"$PAYOP_STATUS\" >> '\(started)'; [ \"$PAYOP_STATUS\" = pending ] && sleep 8; exit 0",
            in: dir)
        defer {
            daemon.process.terminate()
            daemon.process.waitUntilExit()
        }
        #expect(try await Self.postLegacy(port: daemon.ipnPort, order: "o-1", status: "wait").hasPrefix("HTTP/1.1 200"))
        #expect(try await Self.postLegacy(port: daemon.ipnPort, order: "o-1", status: "success").hasPrefix("HTTP/1.1 200"))
        // The pending hook is running; accepted waits behind it. Measure the daemon meanwhile.
        try await Task.sleep(for: .seconds(1))
        let before = try Self.cpuSeconds(daemon.process.processIdentifier)
        try await Task.sleep(for: .seconds(3))
        let used = try Self.cpuSeconds(daemon.process.processIdentifier) - before
        #expect(try String(contentsOfFile: started, encoding: .utf8) == "pending\n")
        // An idle daemon spends a few milliseconds a second (the 1 s checkpoint and re-check); a spinning
        // one spends a whole core (3 s here).
        #expect(used < 0.3, "the daemon used \(used) s of CPU in 3 s while waiting")
    }

    @Test func hooksEndingDoNotWakeTheDaemonsMainThread() async throws {
        // Each hook's exit sends SIGCHLD. Blocked by the thread that started the hook, it was queued for
        // the main thread (libdispatch's, in sigsuspend) and woke it, and libdispatch's manager, per hook.
        let dir = try TemporaryDirectory()
        let ran = dir.file("ran")
        let daemon = try await Self.startServing(hookScript: "echo x >> '\(ran)'", in: dir)
        defer {
            daemon.process.terminate()
            daemon.process.waitUntilExit()
        }
        let pid = daemon.process.processIdentifier
        let before = try #require(ProcessStatus("\(pid)/task/\(pid)")?.switches)
        // Posted by 8 clients at once, so that hooks start while others exit (inside a start, the starting
        // thread blocks signals for a while).
        let hooks = 160
        let answered = try await withThrowingTaskGroup(of: Int.self) { group in
            for client in 0..<8 {
                group.addTask {
                    var ok = 0
                    for order in stride(from: client, to: hooks, by: 8) {
                        let answer = try await Self.postLegacy(port: daemon.ipnPort, order: "w-\(order)", status: "success")
                        if answer.hasPrefix("HTTP/1.1 200") { ok += 1 }
                    }
                    return ok
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(answered == hooks)
        func runs() -> Int {
            ((try? String(contentsOfFile: ran, encoding: .utf8)) ?? "").split(separator: "\n").count
        }
        for _ in 0..<400 where runs() < hooks { try await Task.sleep(for: .milliseconds(50)) }
        try #require(runs() == hooks)
        let woken = try #require(ProcessStatus("\(pid)/task/\(pid)")?.switches) - before
        #expect(woken < 4, "the main thread was woken \(woken) times while \(hooks) hooks ran")
    }

    @Test func secondServeOnTheSameLogExitsOneNamingTheFirst() async throws {
        let dir = try TemporaryDirectory()
        let first = try await Self.startServing(hookScript: "exit 0", in: dir)
        defer {
            first.process.terminate()
            first.process.waitUntilExit()
        }
        #expect(try await Self.postLegacy(port: first.ipnPort, order: "o-2", status: "success").hasPrefix("HTTP/1.1 200"))
        try #require(first.process.isRunning)
        let other = try TemporaryDirectory()
        let second = try Self.start(hookScript: "exit 0", in: other, storage: dir.file("events.sqlite3"))
        #expect(try await Self.waitForExit(second.process, seconds: 10), "the second daemon kept running")
        let message = String(decoding: second.stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(second.process.terminationStatus == 1)
        #expect(message.contains("pid \(first.process.processIdentifier)"), "\(message)")
        #expect(first.process.isRunning)
    }

    /// `serve` turns SQLite's allocation statistics off (`MemoryTuning`), which SQLite accepts only
    /// before its first connection opens: the daemon says at debug level that it took.
    @Test func serveTurnsSQLitesAllocationStatisticsOffBeforeOpeningItsLog() async throws {
        let dir = try TemporaryDirectory()
        let daemon = try await Self.startServing(hookScript: "exit 0", in: dir, arguments: ["--log-level", "debug"])
        daemon.process.terminate()
        #expect(try await Self.waitForExit(daemon.process, seconds: 10))
        let log = String(decoding: daemon.stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(log.contains("SQLite's allocation statistics are off"), "\(log)")
    }
}
