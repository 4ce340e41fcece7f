import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// One go-live check: what was looked at, whether it passed, and what to do when it did not.
public struct DoctorCheck: Sendable, Equatable {
    public enum Verdict: String, Sendable { case ok, warn, fail }
    public var name: String
    public var verdict: Verdict
    public var detail: String
    /// What fixes it, for `warn` and `fail`.
    public var fix: String?

    public var line: String {
        let head = "\(verdict.rawValue.uppercased().padding(toLength: 5, withPad: " ", startingAt: 0)) \(name): \(detail)"
        return fix.map { head + "\n      fix: " + $0 } ?? head
    }
}

/// `payop-ipnd doctor`: every check a merchant needs before go-live and after a change, a line each.
public struct Doctor: Sendable {
    public var configPath: String
    public var clock: any WallClock = SystemWallClock()
    /// Free space below this on the log's file system fails the check.
    public var minimumFreeBytes: UInt64 = 100 * 1024 * 1024
    /// Clock skew against Payop's `Date` header beyond this fails the check.
    public var maximumSkewSeconds: Double = 60

    public init(configPath: String) {
        self.configPath = configPath
    }

    public func run() async -> [DoctorCheck] {
        var checks: [DoctorCheck] = []
        let config: DaemonConfig
        do {
            let (loaded, warnings) = try ConfigLoader.load(path: configPath)
            config = loaded
            checks.append(.init(name: "config", verdict: .ok, detail: configPath))
            for warning in warnings {
                checks.append(
                    .init(name: "config", verdict: .warn, detail: warning.description, fix: "see the message; `check-config` lists the same"))
            }
        } catch {
            for problem in error.problems where problem.severity == .error {
                checks.append(
                    .init(name: "config", verdict: .fail, detail: problem.description, fix: "edit \(error.path) as the message says"))
            }
            return checks
        }
        checks.append(secrets(config))
        switch config.storage.backend {
        case .sqlite:
            checks.append(eventLog(config))
            checks += await listeners(config, running: EventLogLock.holder(logPath: config.storage.path).map { "pid \($0)" })
        case .postgresql:
            // One connection answers both: how the shared log is, and whether this node's daemon runs.
            let shared = await sharedEventLog(config)
            checks.append(shared.check)
            checks += await listeners(config, running: shared.running)
        }
        checks += await payop(config)
        checks += await hooks(config)
        return checks
    }

    func secrets(_ config: DaemonConfig) -> DoctorCheck {
        do {
            let secrets = try Secrets.load(config)
            guard secrets.jwt.get()?.isEmpty == false else {
                return .init(
                    name: "secrets", verdict: .fail, detail: "no Payop JWT: V2 IPNs would wait unverified",
                    fix: "create a JWT in Payop's dashboard, write it to a file only the service user can read, set payop.jwt_file")
            }
            return .init(name: "secrets", verdict: .ok, detail: "readable")
        } catch {
            return .init(
                name: "secrets", verdict: .fail, detail: "\(error)",
                fix: "make the file readable by the service user (chmod 600, owned by it)")
        }
    }

    func eventLog(_ config: DaemonConfig) -> DoctorCheck {
        let path = config.storage.path
        var directory = (path as NSString).deletingLastPathComponent
        if directory.isEmpty { directory = "." }
        let fileManager = FileManager.default
        if fileManager.fileExists(atPath: path) {
            guard access(path, R_OK | W_OK) == 0 else {
                return .init(
                    name: "event log", verdict: .fail, detail: "\(path) is not writable",
                    fix: "chown it to the service user, or check storage.path")
            }
        }
        guard fileManager.fileExists(atPath: directory), access(directory, W_OK | X_OK) == 0 else {
            return .init(
                name: "event log", verdict: .fail, detail: "cannot write in \(directory)",
                fix: "create \(directory) owned by the service user (the unit's StateDirectory does it)")
        }
        var stats = statvfs()
        guard statvfs(directory, &stats) == 0 else {
            return .init(name: "event log", verdict: .warn, detail: "cannot read the free space of \(directory)", fix: nil)
        }
        let free = UInt64(stats.f_bavail) * UInt64(stats.f_frsize)
        guard free >= minimumFreeBytes else {
            return .init(
                name: "event log", verdict: .fail, detail: "only \(free / 1_048_576) MB free in \(directory)",
                fix: "free space there (or run `payop-ipnd prune`): a full disk answers Payop 503")
        }
        return .init(name: "event log", verdict: .ok, detail: "\(path), \(free / 1_048_576) MB free")
    }

    /// The PostgreSQL log: reachable, durable, writable by this user, a schema this build knows, the
    /// same hooks as the other daemons; and this node's daemon, when its session lock is held.
    func sharedEventLog(_ config: DaemonConfig) async -> (check: DoctorCheck, running: String?) {
        do {
            let configuration = try Secrets.postgres(config)
            let report = try await PostgresEventLog.probe(configuration, hooks: config.hooks)
            let running = report.nodeInUse ? "node \(configuration.nodeID)" : nil
            if !report.otherHooks.isEmpty {
                let check = DoctorCheck(
                    name: "event log", verdict: .warn,
                    detail: "\(configuration.displayName): daemon(s) \(report.otherHooks.keys.sorted().joined(separator: ", ")) "
                        + "run other hooks than this configuration's",
                    fix: "give every machine the same hooks: any daemon may verify an event and create its deliveries")
                return (check, running)
            }
            return (.init(name: "event log", verdict: .ok, detail: "\(configuration.displayName): \(report.summary)"), running)
        } catch let error as EventLogError {
            let check = DoctorCheck(
                name: "event log", verdict: .fail, detail: error.message,
                fix: "see the message; `check-config` connects the same way")
            return (check, nil)
        } catch {
            return (.init(name: "event log", verdict: .fail, detail: "\(error)", fix: "check storage.password_file"), nil)
        }
    }

    /// `running`: this configuration's daemon, when one runs (its pid, or its node id on a shared log).
    func listeners(_ config: DaemonConfig, running: String?) async -> [DoctorCheck] {
        var checks: [DoctorCheck] = []
        for (name, address) in [("IPN listener", config.server.listen), ("admin listener", config.admin.listen)] {
            checks.append(await Self.listenerCheck(name, address, running: running))
        }
        return checks
    }

    /// `running`: the daemon of this configuration, when one runs (`pid N`, `node N`).
    static func listenerCheck(_ name: String, _ address: ListenAddress, running: String?) async -> DoctorCheck {
            switch await Self.canBind(address) {
            case nil:
                return .init(name: name, verdict: .ok, detail: "\(address) is free to bind")
            case EADDRINUSE? where running != nil:
                return .init(name: name, verdict: .ok, detail: "\(address) is served by the running daemon (\(running!))")
            case EADDRINUSE?:
                return .init(
                    name: name, verdict: .fail, detail: "\(address) is used by another program",
                    fix: "stop it (`ss -ltnp` names it), or choose another port in the config")
            case let code?:
                return .init(
                    name: name, verdict: .fail, detail: "cannot bind \(address): \(String(cString: strerror(code)))",
                    fix: code == EACCES ? "use a port above 1023, or give the unit CAP_NET_BIND_SERVICE" : "check the address")
            }
    }

    /// nil when `address` can be bound now, else errno.
    static func canBind(_ address: ListenAddress) async -> Int32? {
        do {
            let socket = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: address.host, port: address.port).get()
            try await socket.close().get()
            return nil
        } catch let error as IOError {
            return error.errnoCode
        } catch {
            return EINVAL
        }
    }

    func payop(_ config: DaemonConfig) async -> [DoctorCheck] {
        let jwt = (try? Secrets.load(config))?.jwt.get()
        guard let jwt, !jwt.isEmpty else { return [] }
        let http = PayopHTTPClient.makeHTTPClient(timeoutSeconds: config.payop.timeoutSeconds)
        // A read-only question about a transaction that does not exist: 404 means Payop took the JWT.
        var request = HTTPClientRequest(url: config.payop.apiBaseURL + "/v2/transactions/payop-ipnd-doctor-check")
        request.headers.add(name: "Authorization", value: "Bearer \(jwt)")
        request.headers.add(name: "Accept", value: "application/json")
        let answer: Result<HTTPClientResponse, any Error>
        do {
            let response = try await http.execute(
                request, timeout: .milliseconds(Int64(max(1, config.payop.timeoutSeconds) * 1000)))
            _ = try? await response.body.collect(upTo: 65536)
            answer = .success(response)
        } catch {
            answer = .failure(error)
        }
        try? await http.shutdown()
        let response: HTTPClientResponse
        switch answer {
        case .success(let value): response = value
        case .failure(let error):
            return [
                .init(
                    name: "Payop API", verdict: .fail, detail: "\(config.payop.apiBaseURL) did not answer: \(error)",
                    fix: "check DNS, the firewall's outbound HTTPS, and payop.api_base_url")
            ]
        }
        var checks: [DoctorCheck] = []
        switch response.status.code {
        case 401, 403:
            checks.append(
                .init(
                    name: "Payop API", verdict: .fail, detail: "Payop refuses the JWT (HTTP \(response.status.code))",
                    fix: "create a new JWT in Payop's dashboard, write it to payop.jwt_file, then `systemctl reload payop-ipnd`"))
        case 200..<300, 404, 422:
            checks.append(.init(name: "Payop API", verdict: .ok, detail: "reachable, JWT accepted"))
        default:
            checks.append(
                .init(
                    name: "Payop API", verdict: .fail, detail: "Payop answered HTTP \(response.status.code)",
                    fix: "try again later; if it persists, ask Payop's support"))
        }
        if let date = response.headers.first(name: "Date"), let remote = Self.httpDate(date) {
            let skew = Double(clock.nowMilliseconds()) / 1000 - remote.timeIntervalSince1970
            if abs(skew) > maximumSkewSeconds {
                checks.append(
                    .init(
                        name: "clock", verdict: .fail, detail: "this machine is \(Int(skew.rounded())) s off Payop's clock",
                        fix: "enable time synchronisation (systemd-timesyncd or chrony)"))
            } else {
                checks.append(.init(name: "clock", verdict: .ok, detail: "within \(Int(abs(skew).rounded())) s of Payop's"))
            }
        }
        return checks
    }

    static func httpDate(_ text: String) -> Date? {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        return formatter.date(from: text)
    }

    func hooks(_ config: DaemonConfig) async -> [DoctorCheck] {
        var checks: [DoctorCheck] = []
        for hook in config.hooks { checks.append(await Self.hookCheck(hook)) }
        return checks
    }

    static func hookCheck(_ hook: HookConfig) async -> DoctorCheck {
            switch hook.target {
            case .command(let argv):
                let program = argv.first ?? ""
                guard access(program, X_OK) == 0 else {
                    return .init(
                        name: "hook \(hook.name)", verdict: .fail, detail: "\(program) is not executable",
                        fix: "install it, or `chmod 755 \(program)`; the service user must be able to run it")
                }
                return .init(name: "hook \(hook.name)", verdict: .ok, detail: "\(program) is executable")
            case .url(let url):
                if await Self.reachable(url) {
                    return .init(name: "hook \(hook.name)", verdict: .ok, detail: "\(url) accepts connections")
                }
                return .init(
                    name: "hook \(hook.name)", verdict: .fail, detail: "nothing accepts connections at \(url)",
                    fix: "start the shop's endpoint, or correct the url")
            }
    }

    /// Whether something accepts a TCP (or unix socket) connection where the url points.
    static func reachable(_ url: String) async -> Bool {
        let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connectTimeout(.seconds(2))
        let connection: EventLoopFuture<any Channel>
        if url.hasPrefix("http+unix://") {
            let encoded = url.dropFirst("http+unix://".count).prefix { $0 != "/" }
            guard let path = String(encoded).removingPercentEncoding else { return false }
            connection = bootstrap.connect(unixDomainSocketPath: path)
        } else {
            guard let components = URLComponents(string: url), let host = components.host else { return false }
            connection = bootstrap.connect(
                host: host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: components.port ?? 80)
        }
        return (try? await connection.flatMap { $0.close() }.get()) != nil
    }
}

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Every go-live check (config, secrets, event log, ports, Payop's API and JWT, hooks, clock).")

    @OptionGroup var config: ConfigOption

    func run() async throws {
        let checks = await Doctor(configPath: config.path).run()
        for check in checks { print(check.line) }
        let failed = checks.filter { $0.verdict == .fail }.count
        if failed > 0 {
            print("\(failed) check(s) failed")
            throw ExitCode(1)
        }
        print("all checks passed")
    }
}
