import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Synchronization
import Testing

@testable import PayopIPND

/// The merchant's console through Hummingbird's router, against a real event log file.
@Suite struct ConsoleTests {
    /// A log with two signed events (orders 1042 and 2077) and one dead delivery of 1042's to `fulfil`.
    struct Setup {
        let dir: TemporaryDirectory
        let clock: TestClock
        let log: SQLiteEventLog
        let deadEvent: String
        let otherEvent: String
        let woken = WakeCounter()

        func console(token: String? = nil, loopback: Bool = true) -> Console {
            let woken = self.woken
            return Console(
                log: log, access: PayopAccess(),
                security: ConsoleGuard(token: SecretBox(token), loopbackOnly: loopback, clock: clock),
                hooks: { [log] in log.hooks }, wakeDispatcher: { woken.wake() }, clock: clock, logger: quietLogger)
        }

        func app(token: String? = nil, loopback: Bool = true) -> some ApplicationProtocol {
            let router = Router()
            console(token: token, loopback: loopback).register(on: router)
            return Application(router: router)
        }
    }

    final class WakeCounter: Sendable {
        private let count = Mutex(0)
        func wake() { count.withLock { $0 += 1 } }
        var value: Int { count.withLock { $0 } }
    }

    static func setup(order: String = "1042") async throws -> Setup {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        log.setHooks([commandHook("fulfil", "/bin/false", attempts: 1)])
        let dead = try await ingestSigned(log, clock: clock, order: order)
        clock.advance(milliseconds: 1000)
        let other = try await ingestSigned(log, clock: clock, order: "2077")
        try await runOnce(
            log, clock: clock, eventID: dead.eventID,
            result: HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 3, output: "no stock <b>left</b>"),
            maxAttempts: 1)
        return Setup(dir: dir, clock: clock, log: log, deadEvent: dead.eventID, otherEvent: other.eventID)
    }

    /// Claims the event's pending delivery and records `result` as its run.
    static func runOnce(
        _ log: SQLiteEventLog, clock: TestClock, eventID: String, result: HookResult, maxAttempts: Int = 5
    ) async throws {
        let delivery = try #require(try await log.deliveries(state: "pending", hook: nil, eventID: eventID, limit: 1).first)
        let claim = try #require(try await log.claimDelivery(id: delivery.id, now: clock.nowMilliseconds()))
        _ = try await log.finishDelivery(
            id: delivery.id, attempt: claim.attempt, result: result, maxAttempts: maxAttempts,
            backoff: Backoff(initialSeconds: 1, maxSeconds: 1, jitter: Backoff.noJitter), now: clock.nowMilliseconds())
    }

    static func text(_ response: TestResponse) -> String { String(buffer: response.body) }

    /// The browser's cookie and the form token a page handed it.
    static func browser(_ client: some TestClientProtocol, page: String = "/deliveries") async throws -> (cookie: String, csrf: String) {
        let response = try await client.execute(uri: page, method: .get)
        let setCookie = try #require(response.headers[.setCookie])
        let cookie = String(try #require(setCookie.split(separator: ";").first))
        let html = text(response)
        let marker = "name=\"csrf\" value=\""
        let start = try #require(html.range(of: marker)).upperBound
        let csrf = String(html[start...].prefix { $0 != "\"" })
        return (cookie, csrf)
    }

    static func form(_ fields: [String: String]) -> ByteBuffer {
        ByteBuffer(
            string: fields.map { "\($0.key)=\($0.value.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? "")" }
                .joined(separator: "&"))
    }

    @Test func searchByOrderIDFindsOnlyThatEvent() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            let response = try await client.execute(uri: "/events?q=2077", method: .get)
            #expect(response.status == .ok)
            let html = Self.text(response)
            #expect(html.contains(setup.otherEvent))
            #expect(!html.contains(setup.deadEvent))
            let all = Self.text(try await client.execute(uri: "/events", method: .get))
            #expect(all.contains(setup.otherEvent) && all.contains(setup.deadEvent))
        }
    }

    @Test func eventsPageIntoOlderPagesWithoutRepeatsOrGaps() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        var inserted: Set<String> = []
        for order in 0..<(Console.pageSize + 7) {
            inserted.insert(try await ingestSigned(log, clock: clock, order: "o\(order)").eventID)
            if order % 3 == 0 { clock.advance(milliseconds: 1) }  // ties in received_at too
        }
        let ids = inserted
        let router = Router()
        Console(
            log: log, access: PayopAccess(), security: ConsoleGuard(token: SecretBox(nil), loopbackOnly: true, clock: clock),
            hooks: { [] }, wakeDispatcher: {}, clock: clock, logger: quietLogger
        ).register(on: router)
        try await Application(router: router).test(.router) { client in
            var seen: [String] = []
            var uri = "/events"
            for _ in 0..<3 {
                let html = Self.text(try await client.execute(uri: uri, method: .get))
                seen += html.components(separatedBy: "class=\"event-link\" href=\"/events/").dropFirst().map {
                    String($0.prefix { $0 != "\"" })
                }
                guard let link = html.range(of: "id=\"next-page\" href=\"") else { break }
                uri = String(html[link.upperBound...].prefix { $0 != "\"" }).replacingOccurrences(of: "&amp;", with: "&")
            }
            #expect(seen.count == ids.count)
            #expect(Set(seen) == ids)
        }
    }

    @Test func scriptInAnOrderIDShowsAsText() async throws {
        let setup = try await Self.setup(order: "<script>alert(1)</script>")
        try await setup.app().test(.router) { client in
            for page in ["/events", "/events/\(setup.deadEvent)", "/deliveries"] {
                let html = Self.text(try await client.execute(uri: page, method: .get))
                #expect(!html.contains("<script>alert(1)</script>"), "\(page) carries the script as markup")
                #expect(!html.contains("<b>left</b>"))
            }
            for page in ["/", "/events", "/events/\(setup.deadEvent)", "/deliveries", "/receipts", "/receipts?refused=1"] {
                let html = Self.text(try await client.execute(uri: page, method: .get))
                // An absent value is left out, never printed as Swift's "nil".
                #expect(!html.contains(">nil<") && !html.contains("(nil)") && !html.contains("\"nil\"") && !html.contains("/nil"), "\(page)")
            }
            let event = Self.text(
                try await client.execute(uri: "/events/\(setup.deadEvent)", method: .get))
            #expect(event.contains("&lt;script&gt;alert(1)&lt;/script&gt;"))
            #expect(event.contains("no stock &lt;b&gt;left&lt;/b&gt;"))
        }
    }

    @Test func eventPageShowsReceiptsVerificationAndEachDeliveryAttempt() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            let response = try await client.execute(
                uri: "/events/\(setup.deadEvent)", method: .get)
            let html = Self.text(response)
            #expect(response.headers[.contentSecurityPolicy]?.contains("default-src 'none'") == true)
            #expect(html.contains("class=\"receipt\""))
            #expect(html.contains("&quot;orderId&quot;:&quot;1042&quot;"))  // the IPN body, escaped
            #expect(html.contains("a legacy IPN, proven by its signature"))
            #expect(html.contains("data-hook=\"fulfil\""))
            #expect(html.contains("delivery-state state-dead\">dead"))
            #expect(html.contains("<tr class=\"delivery-attempt\"><td>1</td>"))
            #expect(html.contains("<td>3</td>"))  // the exit code
            let missing = try await client.execute(uri: "/events/evt_nope", method: .get)
            #expect(missing.status == .notFound)
        }
    }

    @Test func postWithoutTheCSRFTokenChangesNothing() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            let (cookie, _) = try await Self.browser(client)
            for headers: HTTPFields in [
                [.contentType: "application/x-www-form-urlencoded"],
                [.contentType: "application/x-www-form-urlencoded", .cookie: cookie],
            ] {
                let response = try await client.execute(
                    uri: "/events/\(setup.deadEvent)/replay", method: .post, headers: headers,
                    body: Self.form(["csrf": "0123", "hook": "fulfil"]))
                #expect(response.status == .forbidden)
                #expect(Self.text(response).contains("CSRF token is missing or wrong"))
            }
            let dead = try await setup.log.deliveries(state: "dead", hook: nil, limit: 10)
            #expect(dead.count == 1)
            #expect(setup.woken.value == 0)
        }
    }

    @Test func postFromAnotherSitesPageIsRefusedEvenWithTheToken() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            let (cookie, csrf) = try await Self.browser(client)
            let response = try await client.execute(
                uri: "/events/\(setup.deadEvent)/replay", method: .post,
                headers: [
                    .origin: "http://shop.example", .cookie: cookie,
                    .contentType: "application/x-www-form-urlencoded",
                ],
                body: Self.form(["csrf": csrf]))
            #expect(response.status == .forbidden)
            #expect(try await setup.log.deliveries(state: "dead", hook: nil, limit: 10).count == 1)
        }
    }

    @Test func replayButtonQueuesTheDeadDeliveryAndWakesTheDispatcher() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            let (cookie, csrf) = try await Self.browser(client, page: "/deliveries?state=dead")
            let response = try await client.execute(
                uri: "/events/\(setup.deadEvent)/replay", method: .post,
                headers: [
                    .origin: "http://localhost", .cookie: cookie,
                    .contentType: "application/x-www-form-urlencoded",
                ],
                body: Self.form(["csrf": csrf, "hook": "fulfil"]))
            #expect(response.status == .seeOther)
            #expect(response.headers[.location] == "/events/\(setup.deadEvent)?replayed=1")
            let pending = try await setup.log.deliveries(state: "pending", hook: "fulfil", eventID: setup.deadEvent, limit: 1)
            #expect(pending.count == 1)
            #expect(setup.woken.value == 1)
        }
    }

    @Test func replayAllDeadOfAHookQueuesEveryDeadOne() async throws {
        let setup = try await Self.setup()
        // The second event's delivery dies too (410 Gone).
        try await Self.runOnce(
            setup.log, clock: setup.clock, eventID: setup.otherEvent, result: HookResult(outcome: .gone, httpStatus: 410))
        try await setup.app().test(.router) { client in
            let (cookie, csrf) = try await Self.browser(client, page: "/deliveries")
            let page = Self.text(try await client.execute(uri: "/deliveries", method: .get, headers: [.cookie: cookie]))
            #expect(page.contains("Replay all 2 dead deliveries of fulfil"))
            let response = try await client.execute(
                uri: "/deliveries/replay-dead", method: .post,
                headers: [.cookie: cookie, .contentType: "application/x-www-form-urlencoded"],
                body: Self.form(["csrf": csrf, "hook": "fulfil"]))
            #expect(response.status == .seeOther)
            #expect(try await setup.log.deliveries(state: "pending", hook: "fulfil", limit: 10).count == 2)
            #expect(try await setup.log.deliveries(state: "dead", hook: nil, limit: 10).isEmpty)
            let unknown = try await client.execute(
                uri: "/deliveries/replay-dead", method: .post,
                headers: [.cookie: cookie, .contentType: "application/x-www-form-urlencoded"],
                body: Self.form(["csrf": csrf, "hook": "nope"]))
            #expect(unknown.status == .badRequest)
        }
    }

    @Test func aConsoleWithATokenAsksForItAndKeepsASession() async throws {
        let setup = try await Self.setup()
        let token = "t0ken-that-is-long-enough"
        try await setup.app(token: token, loopback: false).test(.router) { client in
            let anonymous = try await client.execute(uri: "/events", method: .get)
            #expect(anonymous.status == .unauthorized)
            #expect(Self.text(anonymous).contains("id=\"login\""))
            #expect(!Self.text(anonymous).contains(setup.deadEvent))
            let wrongBearer = try await client.execute(
                uri: "/events", method: .get, headers: [.authorization: "Bearer nope"])
            #expect(wrongBearer.status == .unauthorized)
            let bearer = try await client.execute(
                uri: "/events", method: .get, headers: [.authorization: "Bearer \(token)"])
            #expect(bearer.status == .ok)
            #expect(Self.text(bearer).contains(setup.deadEvent))
            // A bearer client is no browser: its POST needs no CSRF token.
            let replay = try await client.execute(
                uri: "/events/\(setup.deadEvent)/replay", method: .post,
                headers: [.authorization: "Bearer \(token)"])
            #expect(replay.status == .seeOther)
            let wrongLogin = try await client.execute(
                uri: "/login", method: .post,
                headers: [.contentType: "application/x-www-form-urlencoded"],
                body: Self.form(["token": "guess"]))
            #expect(wrongLogin.status == .unauthorized)
            let login = try await client.execute(
                uri: "/login", method: .post,
                headers: [.contentType: "application/x-www-form-urlencoded"],
                body: Self.form(["token": token]))
            #expect(login.status == .seeOther)
            let session = String(try #require(login.headers[.setCookie]?.split(separator: ";").first))
            #expect(session.hasPrefix("payop_ipnd_session="))
            let inside = try await client.execute(uri: "/", method: .get, headers: [.cookie: session])
            #expect(inside.status == .ok)
            #expect(Self.text(inside).contains("id=\"ipns-day\""))
            let forged = try await client.execute(
                uri: "/", method: .get, headers: [.cookie: "payop_ipnd_session=00ff"])
            #expect(forged.status == .unauthorized)
        }
    }

    @Test func aLoopbackConsoleAnswersOnlyToLoopbackHostNames() {
        let security = ConsoleGuard(token: SecretBox(nil), loopbackOnly: true, clock: TestClock())
        // What a page on another site reaches through DNS rebinding: the browser sends that site's name.
        for host in ["attacker.example:9181", "127.0.0.1.attacker.example", "localhost.attacker.example:9181", ""] {
            #expect(security.hostRefused(host), "\(host)")
        }
        #expect(security.hostRefused(nil))
        for host in ["127.0.0.1:9181", "localhost:9181", "LOCALHOST", "[::1]:9181", "127.0.0.2"] {
            #expect(!security.hostRefused(host), "\(host)")
        }
        let open = ConsoleGuard(token: SecretBox("x"), loopbackOnly: false, clock: TestClock())
        #expect(!open.hostRefused("shop.example:9181"))
    }

    @Test func originFromAnotherSiteIsForeignAndNoOriginIsNot() {
        #expect(ConsoleGuard.foreignOrigin("http://shop.example", host: "127.0.0.1:9181"))
        #expect(ConsoleGuard.foreignOrigin("null", host: "127.0.0.1:9181"))
        #expect(ConsoleGuard.foreignOrigin("http://127.0.0.1:9182", host: "127.0.0.1:9181"))
        #expect(!ConsoleGuard.foreignOrigin("http://127.0.0.1:9181", host: "127.0.0.1:9181"))
        #expect(!ConsoleGuard.foreignOrigin(nil, host: "127.0.0.1:9181"))
    }

    @Test func sessionsExpireAfterTwelveHours() {
        let clock = TestClock()
        let security = ConsoleGuard(token: SecretBox("a-token-long-enough-to-resist"), loopbackOnly: false, clock: clock)
        #expect(security.login(given: "wrong") == nil)
        let session = security.login(given: "a-token-long-enough-to-resist\n")
        #expect(session != nil)
        #expect(security.access(authorization: nil, sessionCookie: session) == .session(session!))
        clock.advance(milliseconds: ConsoleGuard.sessionLifetimeMilliseconds)
        #expect(security.access(authorization: nil, sessionCookie: session) == .refused)
    }

    @Test func overviewCountsTheLastHourAndDay() async throws {
        let setup = try await Self.setup()
        setup.clock.advance(milliseconds: 2 * 3_600_000)
        _ = try await ingestSigned(setup.log, clock: setup.clock, order: "3000")
        let overview = try await setup.log.overview(now: setup.clock.nowMilliseconds())
        #expect(overview.ipnsLastHour == 1)
        #expect(overview.ipnsLastDay == 3)
        #expect(overview.eventsLastDay == 3)
        #expect(overview.deliveries.dead == 1)
        #expect(overview.ipnsPerMinute.count == 1440)
        #expect(overview.ipnsPerMinute.reduce(0, +) == 3)
        #expect(overview.ipnsPerMinute.last == 1)  // the IPN of this very moment counts
        try await setup.app().test(.router) { client in
            let html = Self.text(try await client.execute(uri: "/", method: .get))
            #expect(html.contains("<b id=\"ipns-day\">3</b>"))
            #expect(html.contains("<svg id=\"ipn-chart\""))
        }
    }

    @Test func pruneTakesTheAttemptsOfPrunedDeliveriesWithIt() async throws {
        let setup = try await Self.setup()
        setup.log.setHooks([commandHook("fulfil", "/bin/true")])
        // A run that failed, then one that delivered: the first is a row of the runs' history.
        try await Self.runOnce(
            setup.log, clock: setup.clock, eventID: setup.otherEvent,
            result: HookResult(outcome: .failed(retryAfterMilliseconds: nil), exitCode: 1))
        setup.clock.advance(milliseconds: 1_000)
        try await Self.runOnce(
            setup.log, clock: setup.clock, eventID: setup.otherEvent, result: HookResult(outcome: .delivered, exitCode: 0))
        #expect(try await setup.log.event(id: setup.otherEvent)?.deliveryAttempts.map(\.outcome) == ["failed", "delivered"])
        let result = try await setup.log.prune(before: setup.clock.nowMilliseconds() + 1)
        #expect(result.deliveries == 1)
        #expect(try await setup.log.event(id: setup.otherEvent)?.deliveryAttempts.isEmpty == true)
        // The dead one is kept for replay, with its history.
        #expect(try await setup.log.event(id: setup.deadEvent)?.deliveryAttempts.count == 1)
    }

    @Test func aTokenTakenAwayByAReloadLeavesANonLoopbackConsoleClosed() async throws {
        let setup = try await Self.setup()
        let console = setup.console(token: "a-token-long-enough-to-resist", loopback: false)
        let session = try #require(console.security.login(given: "a-token-long-enough-to-resist"))
        // The listener keeps its 0.0.0.0 address until a restart; the reload's config has no token.
        console.security.replaceToken(nil)
        #expect(console.security.access(authorization: nil, sessionCookie: session) == .refused)
        #expect(console.security.access(authorization: nil, sessionCookie: nil) == .refused)
        let router = Router()
        console.register(on: router)
        try await Application(router: router).test(.router) { client in
            let page = try await client.execute(uri: "/events", method: .get)
            #expect(page.status == .unauthorized)
            #expect(Self.text(page).contains("set admin.token_file"))
            #expect(!Self.text(page).contains(setup.deadEvent))
        }
    }

    @Test func rotatingTheTokenEndsEverySession() {
        let security = ConsoleGuard(token: SecretBox("the-first-token-long-enough"), loopbackOnly: false, clock: TestClock())
        let session = try? #require(security.login(given: "the-first-token-long-enough"))
        security.replaceToken("the-second-token-long-enough")
        #expect(security.access(authorization: nil, sessionCookie: session) == .refused)
        #expect(security.access(authorization: "Bearer the-first-token-long-enough", sessionCookie: nil) == .refused)
        #expect(security.access(authorization: "Bearer the-second-token-long-enough", sessionCookie: nil) == .bearer)
    }

    @Test func aProxiedRequestToATokenlessConsoleIsRefused() async throws {
        let setup = try await Self.setup()
        try await setup.app().test(.router) { client in
            for header in ["X-Forwarded-For", "Forwarded", "X-Real-IP"] {
                let response = try await client.execute(
                    uri: "/events", method: .get, headers: [HTTPField.Name(header)!: "203.0.113.9"])
                #expect(response.status == .forbidden, "\(header)")
                #expect(!Self.text(response).contains(setup.deadEvent))
            }
        }
        // With a token, a proxy in front is fine: the token decides.
        try await setup.app(token: "a-token-long-enough-to-resist").test(.router) { client in
            let response = try await client.execute(
                uri: "/events", method: .get,
                headers: [HTTPField.Name("X-Forwarded-For")!: "203.0.113.9", .authorization: "Bearer a-token-long-enough-to-resist"])
            #expect(response.status == .ok)
        }
    }

    @Test func aFloodOfCopiesKeepsTheEventPageSmall() async throws {
        let setup = try await Self.setup()
        for _ in 0..<(Console.receiptsShown + 20) {
            _ = try await ingestSigned(setup.log, clock: setup.clock, order: "1042")
        }
        try await setup.app().test(.router) { client in
            let html = Self.text(try await client.execute(uri: "/events/\(setup.deadEvent)", method: .get))
            #expect(html.components(separatedBy: "<tr class=\"receipt\">").count - 1 == Console.receiptsShown)
            #expect(html.contains("21 later copies are not shown here"))
        }
    }

    @Test func replayingAnEventLeavesDeliveriesOfRemovedHooksAlone() async throws {
        let setup = try await Self.setup()
        // fulfil is removed from the configuration; crm is added.
        let hooks = [commandHook("crm", "/bin/true")]
        let queued = try await setup.log.replay(
            eventID: setup.deadEvent, hook: nil, hooks: hooks, now: setup.clock.nowMilliseconds())
        #expect(queued == 1)
        #expect(try await setup.log.deliveries(state: "dead", hook: "fulfil", limit: 5).count == 1)
        #expect(try await setup.log.deliveries(state: "pending", hook: "crm", limit: 5).count == 1)
    }
}
