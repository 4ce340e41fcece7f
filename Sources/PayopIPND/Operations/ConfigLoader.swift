import Foundation
import Logging
import Yams

/// One thing wrong (or doubtful) in a configuration, named so the merchant can fix it.
public struct ConfigProblem: Sendable, Equatable, CustomStringConvertible {
    public enum Severity: String, Sendable { case error, warning }

    public var severity: Severity
    public var key: String
    public var line: Int?
    public var message: String

    public var description: String {
        let place = line.map { "line \($0): " } ?? ""
        return "\(severity.rawValue): \(place)\(key): \(message)"
    }
}

/// The configuration could not be used; every problem is listed.
public struct ConfigError: Error, CustomStringConvertible, Sendable {
    public var path: String
    public var problems: [ConfigProblem]

    public var description: String {
        (["invalid configuration \(path):"] + problems.map { "  " + $0.description }).joined(separator: "\n")
    }
}

/// Reads the configuration YAML (README, Configuration) with Yams into `DaemonConfig`, collecting every problem (unknown keys,
/// wrong types, bad addresses, missing or exposed secret files) instead of stopping at the first.
public enum ConfigLoader {
    /// Where `serve` and the tools look when `--config` is not given.
    public static func defaultPath(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        environment["PAYOP_IPND_CONFIG"] ?? "/etc/payop-ipnd/payop-ipnd.yaml"
    }

    /// The configuration and its warnings, or every error found.
    public static func load(
        path: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigError) -> (config: DaemonConfig, warnings: [ConfigProblem]) {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigError(
                path: path,
                problems: [
                    .init(
                        severity: .error, key: "(file)", line: nil,
                        message: "cannot read \(path): \(Self.reason(error)); pass --config PATH or set PAYOP_IPND_CONFIG")
                ])
        }
        return try parse(text, path: path, environment: environment)
    }

    /// The folder of the configuration file: where bare secret names are looked up outside systemd.
    static func directory(of path: String) -> String? {
        let directory = (path as NSString).deletingLastPathComponent
        return directory.isEmpty ? nil : directory
    }

    public static func parse(
        _ text: String, path: String = "(config)",
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigError) -> (config: DaemonConfig, warnings: [ConfigProblem]) {
        let reader = Reader(environment: environment, configDirectory: directory(of: path))
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw ConfigError(
                path: path, problems: [.init(severity: .error, key: "(yaml)", line: nil, message: "\(error)")])
        }
        var config = DaemonConfig()
        if let root {
            reader.read(root, into: &config)
        }
        let errors = reader.problems.filter { $0.severity == .error }
        guard errors.isEmpty else { throw ConfigError(path: path, problems: reader.problems) }
        return (config, reader.problems)
    }

    /// A secret path as configured: a path, or a bare name looked up in `$CREDENTIALS_DIRECTORY`
    /// (systemd's `LoadCredential=`), else next to the configuration file (so `check-config` run by hand
    /// finds what the unit loads from there).
    public static func resolveSecretPath(_ value: String, environment: [String: String], configDirectory: String? = nil)
        -> String
    {
        if value.contains("/") { return value }
        if let directory = environment["CREDENTIALS_DIRECTORY"], !directory.isEmpty { return directory + "/" + value }
        if let configDirectory { return configDirectory + "/" + value }
        return value
    }

    static func reason(_ error: any Error) -> String {
        let nsError = error as NSError
        if let underlying = nsError.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(underlying.code)))
        }
        if nsError.domain == NSCocoaErrorDomain, nsError.code == NSFileReadNoSuchFileError { return "no such file" }
        if nsError.domain == NSCocoaErrorDomain, nsError.code == NSFileReadNoPermissionError { return "permission denied" }
        return nsError.localizedDescription
    }
}

/// Walks the YAML tree; every `mapping` call checks its keys against the ones the caller reads.
private final class Reader {
    var problems: [ConfigProblem] = []
    let environment: [String: String]
    let configDirectory: String?

    init(environment: [String: String], configDirectory: String?) {
        self.environment = environment
        self.configDirectory = configDirectory
    }

    func error(_ key: String, _ node: Node?, _ message: String) {
        problems.append(.init(severity: .error, key: key, line: node?.line, message: message))
    }

    func warning(_ key: String, _ node: Node?, _ message: String) {
        problems.append(.init(severity: .warning, key: key, line: node?.line, message: message))
    }

    /// The mapping at `node`, with unknown keys reported against `known`.
    func mapping(_ node: Node, _ path: String, known: [String]) -> [String: Node]? {
        guard case .mapping(let mapping) = node else {
            error(path.isEmpty ? "(top level)" : path, node, "must be a mapping of keys to values")
            return nil
        }
        var values: [String: Node] = [:]
        for (keyNode, value) in mapping {
            let key = keyNode.string ?? "?"
            let dotted = path.isEmpty ? key : "\(path).\(key)"
            if known.contains(key) {
                values[key] = value
            } else {
                let hint = Self.closest(to: key, in: known).map { " (did you mean \($0)?)" } ?? ""
                error(dotted, keyNode, "unknown key\(hint); known keys here: \(known.joined(separator: ", "))")
            }
        }
        return values
    }

    static func closest(to key: String, in known: [String]) -> String? {
        known.map { ($0, editDistance(key, $0)) }.filter { $0.1 <= 2 }.min { $0.1 < $1.1 }?.0
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a)
        let b = Array(b)
        var previous = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(b.count, 1) where !b.isEmpty {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return previous[b.count]
    }

    func string(_ node: Node?, _ key: String) -> String? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, node.null == nil else {
            error(key, node, "must be a text value")
            return nil
        }
        return scalar.string
    }

    /// Every number in the config is seconds (or a size) that must fit a 64-bit count of milliseconds;
    /// no setting means more than a year.
    static let largestNumber: Double = 31_536_000

    /// `atLeast` is a floor for intervals that set how often the daemon works (asks Payop, retries):
    /// below it the daemon would all but spin.
    func number(_ node: Node?, _ key: String, minimum: Double, allowZero: Bool = false, atLeast floor: Double? = nil)
        -> Double?
    {
        guard let node else { return nil }
        guard case .scalar = node, let value = node.float, value.isFinite else {
            error(key, node, "must be a number")
            return nil
        }
        guard value > minimum || (allowZero && value == 0) else {
            error(key, node, allowZero ? "must be 0 or more" : "must be greater than \(Self.show(minimum))")
            return nil
        }
        if let floor, value < floor {
            error(key, node, "must be at least \(Self.show(floor))")
            return nil
        }
        guard value <= Self.largestNumber else {
            error(key, node, "must be at most \(Self.show(Self.largestNumber)) (a year)")
            return nil
        }
        return value
    }

    func integer(_ node: Node?, _ key: String, minimum: Int) -> Int? {
        guard let node else { return nil }
        guard case .scalar = node, let value = node.int else {
            error(key, node, "must be a whole number")
            return nil
        }
        guard value >= minimum else {
            error(key, node, "must be at least \(minimum)")
            return nil
        }
        return value
    }

    func strings(_ node: Node?, _ key: String) -> [String]? {
        guard let node else { return nil }
        guard case .sequence(let sequence) = node else {
            error(key, node, "must be a list, like [a, b]")
            return nil
        }
        var out: [String] = []
        for (index, item) in sequence.enumerated() {
            guard let value = string(item, "\(key)[\(index)]") else { continue }
            out.append(value)
        }
        return out
    }

    static func show(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }

    // MARK: - The document

    func read(_ root: Node, into config: inout DaemonConfig) {
        guard
            let top = mapping(
                root, "",
                known: ["log_level", "server", "admin", "storage", "payop", "reconcile", "delivery", "hooks"])
        else { return }
        if let text = string(top["log_level"], "log_level") {
            if let level = Logger.Level(rawValue: text) {
                config.logLevel = level
            } else {
                error("log_level", top["log_level"], "must be one of trace, debug, info, notice, warning, error")
            }
        }
        if let node = top["server"] { readServer(node, into: &config.server) }
        if let node = top["admin"], let admin = mapping(node, "admin", known: ["listen", "token_file"]) {
            if let listen = listenAddress(admin["listen"], "admin.listen") { config.admin.listen = listen }
            if let file = secretFile(admin["token_file"], "admin.token_file") { config.admin.tokenFile = file }
            if !config.admin.listen.isLoopback, config.admin.tokenFile == nil {
                error(
                    "admin.listen", admin["listen"],
                    "\(config.admin.listen) is reachable from other machines: set admin.token_file (a secret file "
                        + "holding the console's token), or listen on 127.0.0.1")
            }
        }
        if let node = top["storage"] { readStorage(node, into: &config.storage) }
        if let node = top["payop"] { readPayop(node, into: &config.payop) }
        if let node = top["reconcile"], let reconcile = mapping(node, "reconcile", known: ["interval_seconds"]) {
            if let value = number(reconcile["interval_seconds"], "reconcile.interval_seconds", minimum: 0, atLeast: 1) {
                config.reconcile.intervalSeconds = value
            }
        }
        if let node = top["delivery"] { readDelivery(node, into: &config.delivery) }
        if let node = top["hooks"] { config.hooks = readHooks(node) }
        if config.payop.jwtFile == nil {
            warning(
                "payop.jwt_file", nil,
                "not set: V2 IPNs are recorded but cannot be verified against Payop's API, so none is delivered")
        }
    }

    func readStorage(_ node: Node, into storage: inout DaemonConfig.Storage) {
        guard
            let map = mapping(
                node, "storage",
                known: [
                    "backend", "path", "retention_days", "url", "password_file", "node_id", "pool_size", "lease_seconds",
                ])
        else { return }
        if let text = string(map["backend"], "storage.backend") {
            if let backend = DaemonConfig.Storage.Backend(rawValue: text) {
                storage.backend = backend
            } else {
                error("storage.backend", map["backend"], "must be sqlite or postgresql, not '\(text)'")
            }
        }
        if let path = string(map["path"], "storage.path") {
            if path.isEmpty { error("storage.path", map["path"], "must not be empty") } else { storage.path = path }
        }
        if let days = integer(map["retention_days"], "storage.retention_days", minimum: 1) {
            storage.retentionDays = days
        }
        guard storage.backend == .postgresql else {
            for key in ["url", "password_file", "node_id", "pool_size", "lease_seconds"] where map[key] != nil {
                warning("storage.\(key)", map[key], "is read only with storage.backend: postgresql; ignored")
            }
            return
        }
        if map["path"] != nil {
            warning("storage.path", map["path"], "is not used with storage.backend: postgresql (storage copy reads the SQLite log from --config)")
        }
        if let url = string(map["url"], "storage.url") {
            do throws(EventLogError) {
                let parsed = try PostgresEventLogConfiguration(url: url, password: nil, nodeID: storage.nodeID)
                storage.url = url
                if parsed.tls == .require || parsed.tls == .disable, !ListenAddress.isLoopback(parsed.host) {
                    warning(
                        "storage.url", map["url"],
                        "sslmode=\(parsed.tls.rawValue) to \(parsed.host) does not check the server's certificate: "
                            + "anyone on the path can read the password and write the log. Use sslmode=verify-full "
                            + "(with sslrootcert=/path/ca.pem for a private CA)")
                }
                if let file = parsed.rootCertificateFile, !FileManager.default.isReadableFile(atPath: file) {
                    self.error("storage.url", map["url"], "sslrootcert \(file) cannot be read")
                }
            } catch {
                self.error("storage.url", map["url"], error.message)
            }
        } else {
            error("storage.url", node, "is required with storage.backend: postgresql, like "
                + "postgres://payop@db.internal:5432/payop?sslmode=verify-full")
        }
        if let file = secretFile(map["password_file"], "storage.password_file") { storage.passwordFile = file }
        if map["node_id"] == nil, ["localhost", "localhost.localdomain", "payop-ipnd"].contains(storage.nodeID) {
            warning(
                "storage.node_id", node,
                "not set, and this host's name (\(storage.nodeID)) is not one of its own: set a node_id unique "
                    + "to this daemon, like shop-1")
        }
        if let node = string(map["node_id"], "storage.node_id") {
            if node.isEmpty || node.count > 63
                || !node.unicodeScalars.allSatisfy({ CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0) })
                || !node.allSatisfy(\.isASCII)
            {
                error("storage.node_id", map["node_id"], "must be 1 to 63 letters, digits, '.', '_' or '-', like shop-1")
            } else {
                storage.nodeID = node
            }
        }
        if let seconds = integer(map["lease_seconds"], "storage.lease_seconds", minimum: 10) {
            if seconds > 3600 {
                error("storage.lease_seconds", map["lease_seconds"], "must be at most 3600")
            } else {
                storage.leaseSeconds = seconds
            }
        }
        if let size = integer(map["pool_size"], "storage.pool_size", minimum: 2) {
            if size > 100 { error("storage.pool_size", map["pool_size"], "must be at most 100") } else { storage.poolSize = size }
        }
    }

    func listenAddress(_ node: Node?, _ key: String) -> ListenAddress? {
        guard let text = string(node, key) else { return nil }
        guard let address = ListenAddress(text) else {
            error(key, node, "'\(text)' is not an address and port, like 127.0.0.1:9181 or [::1]:9181")
            return nil
        }
        return address
    }

    func cidrs(_ node: Node?, _ key: String) -> [CIDR]? {
        guard let texts = strings(node, key) else { return nil }
        var out: [CIDR] = []
        for (index, text) in texts.enumerated() {
            if let cidr = CIDR(text) {
                out.append(cidr)
            } else {
                let item: Node? = if case .sequence(let s) = node, index < s.count { s[index] } else { node }
                error("\(key)[\(index)]", item, "'\(text)' is not an address or CIDR, like 203.0.113.0/24 or 2001:db8::/32")
            }
        }
        return out
    }

    func readServer(_ node: Node, into server: inout DaemonConfig.Server) {
        guard
            let map = mapping(
                node, "server",
                known: ["listen", "ipn_paths", "max_body_bytes", "allowed_sources", "trusted_proxies", "read_timeout_seconds"])
        else { return }
        if let listen = listenAddress(map["listen"], "server.listen") { server.listen = listen }
        if let paths = strings(map["ipn_paths"], "server.ipn_paths") {
            let bad = paths.filter { !$0.hasPrefix("/") || $0.contains("?") || $0.contains(" ") }
            if paths.isEmpty {
                error("server.ipn_paths", map["ipn_paths"], "must name at least one path, like [/payop/ipn]")
            } else if !bad.isEmpty {
                error("server.ipn_paths", map["ipn_paths"], "paths must start with / and hold no query: \(bad)")
            } else {
                server.ipnPaths = paths
            }
        }
        if let bytes = integer(map["max_body_bytes"], "server.max_body_bytes", minimum: 256) {
            server.maxBodyBytes = bytes
        }
        if let node = map["allowed_sources"] {
            if case .scalar = node, let word = node.string {
                switch word {
                case "payop": server.allowedSources = .only(SourcePolicy.payopAddresses.compactMap { CIDR($0) })
                case "any": server.allowedSources = .any
                default:
                    error("server.allowed_sources", node, "must be payop, any, or a list of CIDRs; '\(word)' is none of them")
                }
            } else if let list = cidrs(node, "server.allowed_sources") {
                server.allowedSources = .only(list)
            }
        }
        if let proxies = cidrs(map["trusted_proxies"], "server.trusted_proxies") { server.trustedProxies = proxies }
        if let seconds = number(map["read_timeout_seconds"], "server.read_timeout_seconds", minimum: 0, atLeast: 0.1) {
            server.readTimeoutSeconds = seconds
        }
    }

    func readPayop(_ node: Node, into payop: inout DaemonConfig.Payop) {
        guard
            let map = mapping(
                node, "payop",
                known: [
                    "api_base_url", "jwt_file", "secret_key_file", "timeout_seconds", "retry_initial_seconds",
                    "retry_max_seconds", "not_found_retry_minutes",
                ])
        else { return }
        if let url = string(map["api_base_url"], "payop.api_base_url") {
            if let parsed = URL(string: url), ["https", "http"].contains(parsed.scheme ?? ""), parsed.host != nil {
                if parsed.scheme == "http", !["127.0.0.1", "localhost", "::1", "[::1]"].contains(parsed.host ?? "") {
                    error("payop.api_base_url", map["api_base_url"], "must be https (plain http only to loopback, for a simulator)")
                } else {
                    payop.apiBaseURL = url.hasSuffix("/") ? String(url.dropLast()) : url
                }
            } else {
                error("payop.api_base_url", map["api_base_url"], "'\(url)' is not a URL like https://api.payop.com")
            }
        }
        if let file = secretFile(map["jwt_file"], "payop.jwt_file") { payop.jwtFile = file }
        if let file = secretFile(map["secret_key_file"], "payop.secret_key_file") { payop.secretKeyFile = file }
        if let value = number(map["timeout_seconds"], "payop.timeout_seconds", minimum: 0) { payop.timeoutSeconds = value }
        if let value = number(map["retry_initial_seconds"], "payop.retry_initial_seconds", minimum: 0, atLeast: 0.1) {
            payop.retryInitialSeconds = value
        }
        if let value = number(map["retry_max_seconds"], "payop.retry_max_seconds", minimum: 0, atLeast: 0.1) {
            payop.retryMaxSeconds = value
        }
        if let value = number(
            map["not_found_retry_minutes"], "payop.not_found_retry_minutes", minimum: 0, allowZero: true)
        {
            payop.notFoundRetryMinutes = value
        }
    }

    func readDelivery(_ node: Node, into delivery: inout DaemonConfig.Delivery) {
        guard
            let map = mapping(
                node, "delivery",
                known: ["retry_initial_seconds", "retry_max_seconds", "kill_grace_seconds", "shutdown_grace_seconds"])
        else { return }
        if let value = number(map["retry_initial_seconds"], "delivery.retry_initial_seconds", minimum: 0, atLeast: 0.1) {
            delivery.retryInitialSeconds = value
        }
        if let value = number(map["retry_max_seconds"], "delivery.retry_max_seconds", minimum: 0, atLeast: 0.1) {
            delivery.retryMaxSeconds = value
        }
        if let value = number(map["kill_grace_seconds"], "delivery.kill_grace_seconds", minimum: 0, allowZero: true) {
            delivery.killGraceSeconds = value
        }
        if let value = number(
            map["shutdown_grace_seconds"], "delivery.shutdown_grace_seconds", minimum: 0, allowZero: true)
        {
            delivery.shutdownGraceSeconds = value
        }
    }

    /// A secret file must exist and be readable by us; others must not read it.
    func secretFile(_ node: Node?, _ key: String) -> String? {
        guard let value = string(node, key) else { return nil }
        let path = ConfigLoader.resolveSecretPath(value, environment: environment, configDirectory: configDirectory)
        guard !path.isEmpty else {
            error(key, node, "must name a file")
            return nil
        }
        switch SecretFile.check(path) {
        case .ok:
            break
        case .missing:
            error(key, node, "\(path) does not exist: create it with the secret on one line (chmod 600)")
        case .unreadable(let why):
            error(key, node, "\(path) cannot be read (\(why)): make it readable by the daemon's user")
        case .worldReadable:
            error(key, node, "\(path) can be read by anyone: run chmod 600 \(path)")
        case .groupExposed(let what):
            warning(key, node, "\(path) \(what): consider chmod 600 \(path)")
        }
        return path
    }

    func readHooks(_ node: Node) -> [HookConfig] {
        guard case .sequence(let sequence) = node else {
            error("hooks", node, "must be a list of hooks, each with a name")
            return []
        }
        var hooks: [HookConfig] = []
        var names: Set<String> = []
        for (index, item) in sequence.enumerated() {
            let key = "hooks[\(index)]"
            guard
                let map = mapping(
                    item, key,
                    known: ["name", "command", "url", "signing_secret_file", "events", "timeout_seconds", "max_attempts"])
            else { continue }
            guard let name = string(map["name"], "\(key).name"), !name.isEmpty else {
                error("\(key).name", item, "every hook needs a name")
                continue
            }
            let named = "hooks[\(name)]"
            if !name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) {
                error("\(named).name", map["name"], "use letters, digits, - _ and . only")
            }
            if !names.insert(name).inserted { error("\(named).name", map["name"], "two hooks are named \(name)") }
            var target: HookConfig.Target?
            switch (map["command"], map["url"]) {
            case (.some(let commandNode), nil):
                if let argv = strings(commandNode, "\(named).command") { target = commandTarget(argv, commandNode, named) }
            case (nil, .some(let urlNode)):
                if let url = string(urlNode, "\(named).url") { target = urlTarget(url, urlNode, named) }
            case (.some, .some):
                error(named, item, "has both command and url: a hook is one or the other")
            case (nil, nil):
                error(named, item, "needs a command (a script to run) or a url (a loopback endpoint)")
            }
            var signing: String?
            if let secretNode = map["signing_secret_file"] {
                if case .command = target {
                    error("\(named).signing_secret_file", secretNode, "only url hooks are signed")
                }
                signing = secretFile(secretNode, "\(named).signing_secret_file")
            }
            guard let events = strings(map["events"], "\(named).events") else {
                error("\(named).events", item, "missing: list the event types it takes, like [checkout.accepted] or [\"*\"]")
                continue
            }
            if events.isEmpty || events.contains(where: \.isEmpty) {
                error("\(named).events", map["events"], "must list at least one event type or glob")
            }
            let isURL = if case .url = target { true } else { false }
            let timeout = number(map["timeout_seconds"], "\(named).timeout_seconds", minimum: 0) ?? (isURL ? 10 : 30)
            let attempts = integer(map["max_attempts"], "\(named).max_attempts", minimum: 1) ?? 30
            if let target {
                hooks.append(
                    HookConfig(
                        name: name, target: target, events: events, timeoutSeconds: timeout, maxAttempts: attempts,
                        signingSecretFile: signing))
            }
        }
        return hooks
    }

    func commandTarget(_ argv: [String], _ node: Node, _ named: String) -> HookConfig.Target? {
        guard let program = argv.first else {
            error("\(named).command", node, "must name a program, like [/usr/local/lib/shop/fulfil]")
            return nil
        }
        guard program.hasPrefix("/") else {
            error("\(named).command", node, "'\(program)' must be an absolute path: hooks run without a shell or PATH search")
            return nil
        }
        var isDirectory: ObjCBool = false
        if !FileManager.default.fileExists(atPath: program, isDirectory: &isDirectory) {
            error("\(named).command", node, "\(program) does not exist")
        } else if isDirectory.boolValue || access(program, X_OK) != 0 {
            error("\(named).command", node, "\(program) is not executable: chmod +x \(program)")
        }
        return .command(argv)
    }

    func urlTarget(_ url: String, _ node: Node, _ named: String) -> HookConfig.Target? {
        switch HookURL.parse(url) {
        case .failure(let why):
            error("\(named).url", node, why.message)
            return nil
        case .success(.unixSocket(let socketPath, _)):
            if !FileManager.default.fileExists(atPath: socketPath) {
                warning("\(named).url", node, "the socket \(socketPath) does not exist yet; deliveries wait until it does")
            }
            return .url(url)
        case .success:
            return .url(url)
        }
    }
}

extension Node {
    fileprivate var line: Int? { mark.map { $0.line } }
}

/// Where a `url` hook points: loopback TCP or a unix socket, nothing else.
public enum HookURL: Sendable, Equatable {
    case loopback(host: String, port: Int, path: String)
    case unixSocket(path: String, requestPath: String)

    public struct Invalid: Error, Equatable {
        public var message: String
    }

    public static func parse(_ text: String) -> Result<HookURL, Invalid> {
        let unixPrefix = "http+unix://"
        if text.hasPrefix(unixPrefix) {
            let rest = text.dropFirst(unixPrefix.count)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            guard let socket = String(rest[..<slash]).removingPercentEncoding, socket.hasPrefix("/") else {
                return .failure(Invalid(message: "'\(text)': the socket path must be absolute and percent-encoded, like http+unix://%2Frun%2Fshop.sock/payop"))
            }
            let path = slash == rest.endIndex ? "/" : String(rest[slash...])
            return .success(.unixSocket(path: socket, requestPath: path))
        }
        guard let components = URLComponents(string: text), components.scheme == "http", let host = components.host,
            let port = components.port, components.user == nil
        else {
            return .failure(Invalid(message: "'\(text)' must look like http://127.0.0.1:PORT/path (loopback only, with a port)"))
        }
        let bare = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        guard bare == "127.0.0.1" || bare == "::1" || bare == "localhost" else {
            return .failure(Invalid(message: "'\(text)': hooks may only point at 127.0.0.1, [::1], localhost or a unix socket"))
        }
        let path = components.percentEncodedPath.isEmpty ? "/" : components.percentEncodedPath
        let query = components.percentEncodedQuery.map { "?\($0)" } ?? ""
        return .success(.loopback(host: bare, port: port, path: path + query))
    }
}
