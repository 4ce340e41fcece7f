import Foundation
import HTTPTypes
import Synchronization

/// Who may use the console and which POSTs are the merchant's own: the token (bearer or a login
/// session), the CSRF token bound to a browser cookie, and the Host and Origin checks.
final class ConsoleGuard: Sendable {
    /// The `admin.token_file` secret; nil: no token asked, which only a loopback listener allows.
    private let token: SecretBox
    /// Whether the listener is loopback: then only loopback Host names are served (DNS rebinding).
    /// Fixed at start, as the bound address is: a reload cannot move the listener.
    let loopbackOnly: Bool
    private let csrfKey: [UInt8]
    /// Login sessions: id -> expiry (ms). In memory: a restart asks for the token again.
    private let sessions = Mutex<[String: Int64]>([:])
    private let clock: any WallClock

    static let sessionCookie = "payop_ipnd_session"
    static let csrfCookie = "payop_ipnd_csrf"
    static let sessionLifetimeMilliseconds: Int64 = 12 * 3_600_000
    static let maxSessions = 1000

    init(token: SecretBox, loopbackOnly: Bool, clock: any WallClock) {
        self.token = token
        self.loopbackOnly = loopbackOnly
        self.clock = clock
        self.csrfKey = Self.randomBytes(32)
    }

    var hasToken: Bool { token.get() != nil }

    /// A reload's token. Sessions signed in with the old one end: rotating a leaked token must lock
    /// its holder out.
    func replaceToken(_ newToken: String?) {
        sessions.withLock { table in
            if token.get() != newToken { table.removeAll() }
            token.set(newToken)
        }
    }

    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
    }

    static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    // MARK: - Who is asking

    /// A request for a host name this console does not answer to: a loopback console serves only
    /// loopback names, so a page on another site cannot reach it through DNS rebinding.
    func hostRefused(_ host: String?) -> Bool {
        guard loopbackOnly else { return false }
        guard let host, let name = Self.hostName(host) else { return true }
        return !ListenAddress.isLoopback(name)
    }

    /// `127.0.0.1:9181` -> `127.0.0.1`, `[::1]:9181` -> `::1`.
    static func hostName(_ host: String) -> String? {
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            return String(host[host.index(after: host.startIndex)..<close])
        }
        return String(host.split(separator: ":", maxSplits: 1).first ?? "").lowercased()
    }

    enum Access: Equatable {
        case open
        case bearer
        case session(String)
        case refused
    }

    func access(authorization: String?, sessionCookie: String?) -> Access {
        guard let expected = token.get() else {
            // Fail closed: a listener bound beyond loopback is never open, even when a reload took the
            // token away (the listener keeps its address until a restart).
            return loopbackOnly ? .open : .refused
        }
        if let authorization, authorization.lowercased().hasPrefix("bearer ") {
            let given = authorization.dropFirst("bearer ".count).trimmingCharacters(in: .whitespaces)
            return Self.sameToken(given, expected) ? .bearer : .refused
        }
        if let sessionCookie {
            let now = clock.nowMilliseconds()
            let valid = sessions.withLock { table -> Bool in
                guard let expiry = table[sessionCookie] else { return false }
                if expiry <= now { table[sessionCookie] = nil }
                return expiry > now
            }
            if valid { return .session(sessionCookie) }
        }
        return .refused
    }

    /// Wrong tokens since the last log line about them: logged at most every 10 s, never the token.
    private let wrongTokens = Mutex<(count: Int, loggedAt: Int64)>((0, 0))

    /// Counts a wrong token; returns how many to log now, or nil while the last line is recent.
    func countWrongToken() -> Int? {
        let now = clock.nowMilliseconds()
        return wrongTokens.withLock { state -> Int? in
            state.count += 1
            guard now - state.loggedAt >= 10_000 else { return nil }
            defer { state = (0, now) }
            return state.count
        }
    }

    /// A new session when `given` is the token; nil when it is not.
    func login(given: String) -> String? {
        guard let expected = token.get(), Self.sameToken(given.trimmingCharacters(in: .whitespacesAndNewlines), expected)
        else { return nil }
        let id = Self.hex(Self.randomBytes(32))
        let now = clock.nowMilliseconds()
        sessions.withLock { table in
            table = table.filter { $0.value > now }
            if table.count >= Self.maxSessions, let oldest = table.min(by: { $0.value < $1.value }) {
                table[oldest.key] = nil
            }
            table[id] = now + Self.sessionLifetimeMilliseconds
        }
        return id
    }

    func logout(session: String) {
        _ = sessions.withLock { $0.removeValue(forKey: session) }
    }

    /// Compares digests, not the tokens: equal lengths always, so the time taken tells nothing, not
    /// even the token's length.
    static func sameToken(_ given: String, _ expected: String) -> Bool {
        OpenSSL.constantTimeEquals(OpenSSL.sha256(Array(given.utf8)), OpenSSL.sha256(Array(expected.utf8)))
    }

    /// A request relayed by a proxy to a console without a token: the loopback address it arrives
    /// from proves nothing about who sent it, so it is refused (set admin.token_file behind a proxy).
    func forwardedWithoutToken(_ fields: HTTPFields) -> Bool {
        guard token.get() == nil else { return false }
        return [HTTPField.Name("Forwarded"), HTTPField.Name("X-Forwarded-For"), HTTPField.Name("X-Real-IP"),
                HTTPField.Name("X-Forwarded-Host")].contains { name in name.map { fields[$0] != nil } ?? false }
    }

    // MARK: - CSRF

    /// A new browser id for the CSRF cookie.
    static func newBrowserID() -> String { hex(randomBytes(16)) }

    /// The form token for a browser: an HMAC of its cookie under this process's key, so a page on
    /// another origin can neither read nor forge it.
    func csrfToken(browser: String) -> String {
        Self.hex(OpenSSL.hmacSHA256(key: csrfKey, message: Array(("csrf:" + browser).utf8)))
    }

    func csrfValid(browser: String?, token given: String?) -> Bool {
        guard let browser, !browser.isEmpty, let given else { return false }
        return OpenSSL.constantTimeEquals(Array(given.utf8), Array(csrfToken(browser: browser).utf8))
    }

    /// A POST from a page of another origin. Browsers send `Origin` with every form POST; a request
    /// without it (curl, scripts) still needs the CSRF token or a bearer token.
    static func foreignOrigin(_ origin: String?, host: String?) -> Bool {
        guard let origin, origin != "null" else { return origin == "null" }
        guard let host else { return true }
        return origin.lowercased() != "http://\(host.lowercased())" && origin.lowercased() != "https://\(host.lowercased())"
    }
}
