import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// The merchant's console on the admin listener: read-only pages, and replays as POSTs with a CSRF
/// token. Every page is rendered on the server (no JavaScript needed) from the event log.
struct Console: Sendable {
    let log: any EventLog
    let access: PayopAccess
    let security: ConsoleGuard
    let hooks: @Sendable () -> [HookConfig]
    /// A replay is picked up at once rather than at the dispatcher's next recheck.
    let wakeDispatcher: @Sendable () -> Void
    let clock: any WallClock
    let logger: Logger

    init(
        log: any EventLog, access: PayopAccess, security: ConsoleGuard, hooks: @escaping @Sendable () -> [HookConfig],
        wakeDispatcher: @escaping @Sendable () -> Void, clock: any WallClock, logger: Logger
    ) {
        self.log = log
        self.access = access
        self.security = security
        self.hooks = hooks
        self.wakeDispatcher = wakeDispatcher
        self.clock = clock
        self.logger = logger
    }

    static let pageSize = 50
    static let maxFormBytes = 16 * 1024
    /// An event's page shows this many copies of its IPN, each body cut here: a flood of copies must
    /// not make a page (and the admin listener) heavy.
    static let receiptsShown = 100
    static let bodyBytesShown = 16 * 1024
    static let eventTypes: [String] =
        ["new", "accepted", "failed", "pending", "timeout", "rejected", "pre_approved"].map { "checkout.\($0)" }
        + ["new", "accepted", "rejected"].map { "refund.\($0)" }
        + ["pending", "accepted", "rejected"].map { "withdrawal.\($0)" }

    func register(on router: Router<BasicRequestContext>) {
        router.get("/") { request, _ in try await page(request) { visit in try await overview(visit) } }
        router.get("/events") { request, _ in try await page(request) { visit in try await events(request, visit) } }
        router.get("/events/:id") { request, context in
            let id = try context.parameters.require("id")
            return try await page(request) { visit in try await event(id: id, visit) }
        }
        router.post("/events/:id/replay") { request, context in
            let id = try context.parameters.require("id")
            return try await post(request) { visit, form in try await replay(eventID: id, hook: form.hook, visit) }
        }
        router.get("/deliveries") { request, _ in
            try await page(request) { visit in try await deliveries(request, visit) }
        }
        router.post("/deliveries/replay-dead") { request, _ in
            try await post(request) { visit, form in try await replayDead(hook: form.hook, visit) }
        }
        router.get("/receipts") { request, _ in try await page(request) { visit in try await receipts(request, visit) } }
        router.get("/login") { request, _ in try await loginPage(request) }
        router.post("/login") { request, _ in try await login(request) }
        router.post("/logout") { request, _ in
            try await post(request) { visit, _ in
                if case .session(let id) = visit.access { security.logout(session: id) }
                var response = Self.redirect(to: security.hasToken ? "/login" : "/")
                response.setCookie(.init(name: ConsoleGuard.sessionCookie, value: "", maxAge: 0, path: "/", sameSite: .strict))
                return response
            }
        }
    }

    // MARK: - Who is asking

    /// One request's standing: its browser id (for the CSRF token), how it authenticated.
    struct Visit {
        var browser: String
        var newBrowser: Bool
        var access: ConsoleGuard.Access
        var csrf: String
        var notice: String?

        /// What every page's layout needs.
        func base(title: String) -> [String: Any] {
            // Absent keys, never nil optionals: Mustache would print an Optional's "nil".
            var values: [String: Any] = ["title": title, "csrf": csrf]
            if let notice { values["notice"] = notice }
            if case .session = access { values["session"] = true }
            return values
        }
    }

    struct Refusal: Error {
        var response: Response
        /// A wrong token: slowed down and counted.
        var wrongToken = false
    }

    private func visit(_ request: Request) throws(Refusal) -> Visit {
        let host = request.head.authority
        if security.hostRefused(host) {
            throw Refusal(
                response: Self.message(
                    status: .misdirectedRequest, heading: "Wrong host name",
                    text: "This console answers to loopback names only (127.0.0.1, localhost, [::1]).", visit: nil))
        }
        if security.forwardedWithoutToken(request.headers) {
            throw Refusal(
                response: Self.message(
                    status: .forbidden, heading: "Set a token first",
                    text: "This request came through a proxy, and the console has no token: anyone the proxy serves "
                        + "would be let in. Set admin.token_file (a secret file) and reload.", visit: nil))
        }
        let cookies = request.cookies
        let access = security.access(
            authorization: request.headers[.authorization], sessionCookie: cookies[ConsoleGuard.sessionCookie]?.value)
        let known = cookies[ConsoleGuard.csrfCookie]?.value.filter(\.isHexDigit)
        let browser = known.flatMap { $0.count == 32 ? $0 : nil } ?? ConsoleGuard.newBrowserID()
        let visit = Visit(
            browser: browser, newBrowser: browser != known, access: access,
            csrf: security.csrfToken(browser: browser),
            notice: request.uri.queryParameters.get("replayed").flatMap(Int.init).map {
                $0 == 0
                    ? "Nothing was queued: no matching delivery could run again (a running one finishes first)."
                    : "Replay queued: \($0) deliver\($0 == 1 ? "y" : "ies"); the daemon runs \($0 == 1 ? "it" : "them") now."
            })
        if access == .refused {
            guard security.hasToken else {
                throw Refusal(
                    response: Self.message(
                        status: .unauthorized, heading: "No token set",
                        text: "The console listens beyond this machine but has no token: set admin.token_file "
                            + "(a secret file) and reload.", visit: nil))
            }
            let failedBearer = request.headers[.authorization] != nil
            throw Refusal(
                response: finish(
                    Self.render(status: .unauthorized, "login", ["title": "Sign in", "failed": failedBearer]), visit, request),
                wrongToken: failedBearer)
        }
        return visit
    }

    /// A GET page: refused (wrong host, no token) or rendered, with the console's headers.
    private func page(_ request: Request, _ body: (Visit) async throws -> Response) async throws -> Response {
        do {
            let visit = try visit(request)
            return finish(try await body(visit), visit, request)
        } catch let refusal as Refusal {
            return await refused(refusal)
        }
    }

    /// A refusal; a wrong token is counted, logged at most every 10 s, and answered after a pause
    /// that makes guessing slow.
    private func refused(_ refusal: Refusal) async -> Response {
        if refusal.wrongToken {
            if let toLog = security.countWrongToken() {
                logger.warning("console refused a wrong token", metadata: ["count": "\(toLog)"])
            }
            try? await Task.sleep(for: .milliseconds(250))
        }
        return Self.secured(refusal.response)
    }

    struct Form: Decodable {
        var csrf: String?
        var hook: String?
        var token: String?
    }

    /// A state change: authenticated, from this console's own pages (Origin), with the CSRF token
    /// bound to the browser's cookie; a bearer client is no browser and needs no token.
    private func post(_ request: Request, _ body: (Visit, Form) async throws -> Response) async throws -> Response {
        do {
            let visit = try visit(request)
            let form = try await Self.form(request)
            if visit.access != .bearer {
                let host = request.head.authority
                if ConsoleGuard.foreignOrigin(request.headers[.origin], host: host) {
                    return finish(
                        Self.message(
                            status: .forbidden, heading: "Refused",
                            text: "This request came from another site's page (Origin \(request.headers[.origin] ?? "")): "
                                + "nothing was changed.", visit: visit), visit, request)
                }
                guard !visit.newBrowser, security.csrfValid(browser: visit.browser, token: form.csrf) else {
                    return finish(
                        Self.message(
                            status: .forbidden, heading: "Refused",
                            text: "The CSRF token is missing or wrong: nothing was changed. Reload the page and try again.",
                            visit: visit), visit, request)
                }
            }
            return finish(try await body(visit, form), visit, request)
        } catch let refusal as Refusal {
            return await refused(refusal)
        }
    }

    static func form(_ request: Request) async throws(Refusal) -> Form {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: maxFormBytes)
        } catch {
            throw Refusal(response: message(status: .contentTooLarge, heading: "Too large", text: "The form is too large.", visit: nil))
        }
        guard buffer.readableBytes > 0 else { return Form() }
        do {
            return try URLEncodedFormDecoder().decode(Form.self, from: String(buffer: buffer))
        } catch {
            throw Refusal(response: message(status: .badRequest, heading: "Bad form", text: "The form could not be read.", visit: nil))
        }
    }

    /// Headers every console answer carries, and the CSRF cookie for a browser seen the first time.
    private func finish(_ response: Response, _ visit: Visit, _ request: Request) -> Response {
        var response = Self.secured(response)
        if visit.newBrowser {
            response.setCookie(
                .init(
                    name: ConsoleGuard.csrfCookie, value: visit.browser, path: "/", secure: Self.overTLS(request),
                    sameSite: .strict))
        }
        return response
    }

    /// Behind a TLS-terminating proxy (which needs a token anyway), cookies are sent over TLS only.
    static func overTLS(_ request: Request) -> Bool {
        HTTPField.Name("X-Forwarded-Proto").flatMap { request.headers[$0] }?.lowercased() == "https"
    }

    static func secured(_ response: Response) -> Response {
        var response = response
        response.headers[.contentSecurityPolicy] =
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
            + "frame-ancestors 'none'; base-uri 'none'"
        response.headers[.xContentTypeOptions] = "nosniff"
        response.headers[.cacheControl] = "no-store"
        response.headers[HTTPField.Name("Referrer-Policy")!] = "same-origin"
        return response
    }

    static func render(status: HTTPResponse.Status = .ok, _ template: String, _ values: [String: Any]) -> Response {
        Response(
            status: status, headers: [.contentType: "text/html; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(string: ConsoleTemplates.render(template, values))))
    }

    static func message(status: HTTPResponse.Status, heading: String, text: String, visit: Visit?) -> Response {
        var values = visit?.base(title: heading) ?? ["title": heading]
        values["heading"] = heading
        values["text"] = text
        return render(status: status, "message", values)
    }

    static func redirect(to location: String) -> Response {
        Response(status: .seeOther, headers: [.location: location])
    }

    // MARK: - Pages

    private func overview(_ visit: Visit) async throws -> Response {
        let now = clock.nowMilliseconds()
        let o = try await log.overview(now: now)
        var values = visit.base(title: "Overview")
        values["refresh"] = 30  // the overview keeps itself current without JavaScript
        values["ipnsHour"] = o.ipnsLastHour
        values["ipnsDay"] = o.ipnsLastDay
        values["refusedDay"] = o.refusedLastDay
        values["eventsHour"] = o.eventsLastHour
        values["eventsDay"] = o.eventsLastDay
        values["awaitingVerification"] = o.awaitingVerification
        values["deliveryBacklog"] = o.deliveries.pending + o.deliveries.running
        values["dead"] = o.deliveries.dead
        values["lastIPN"] = o.lastIPNAt.map { Self.time($0) + " (" + Self.ago(now - $0) + ")" } ?? "none yet"
        values["payopAPI"] = payopState(o, now: now)
        let peak = max(o.ipnsPerMinute.max() ?? 0, 1)
        values["chartPeak"] = o.ipnsPerMinute.max() ?? 0
        values["chartPoints"] = o.ipnsPerMinute.enumerated().map { minute, count in
            "\(minute),\(118 - (count * 112) / peak)"
        }.joined(separator: " ")
        return Self.render("overview", values)
    }

    private func payopState(_ o: EventLogOverview, now: Int64) -> String {
        if let problem = access.currentProblem { return "JWT refused: \(problem)" }
        guard let outcome = o.lastVerificationOutcome, let at = o.lastVerificationAt else {
            return "not asked yet (no IPN has needed it)"
        }
        let when = Self.ago(now - at)
        switch outcome {
        case "unavailable": return "unreachable at the last question (\(when)): verification retries with backoff"
        case "unauthorized": return "JWT refused at the last question (\(when))"
        case "bad_response": return "answered something unreadable at the last question (\(when))"
        default: return "reachable, JWT accepted (last answer \(when): \(outcome))"
        }
    }

    private func events(_ request: Request, _ visit: Visit) async throws -> Response {
        let query = request.uri.queryParameters
        func given(_ name: String) -> String? {
            query.get(name).map { $0.trimmingCharacters(in: .whitespaces) }.flatMap { $0.isEmpty ? nil : $0 }
        }
        var filter = EventFilter(
            type: given("type"), status: given("status"), state: given("state"), query: given("q"),
            before: given("before").flatMap(EventCursor.init), limit: Self.pageSize + 1)
        if let state = filter.state, !["received", "verified", "rejected"].contains(state) { filter.state = nil }
        var found = try await log.events(filter)
        let more = found.count > Self.pageSize
        found = Array(found.prefix(Self.pageSize))
        var values = visit.base(title: "Events")
        values["q"] = filter.query ?? ""
        values["status"] = filter.status ?? ""
        values["filtered"] = filter.query != nil || filter.type != nil || filter.status != nil || filter.state != nil
        values["types"] = Self.eventTypes.map { ["name": $0, "selected": $0 == filter.type] }
        values["states"] = ["received", "verified", "rejected"].map { ["name": $0, "selected": $0 == filter.state] }
        values["events"] = found.map { event -> [String: Any] in
            [
                "id": event.id, "receivedAt": Self.time(event.receivedAt), "type": event.type, "state": event.state,
                "reason": event.rejectionReason ?? "", "order": event.orderID ?? "", "entity": event.entityID ?? "",
                "amount": [event.amount, event.currency].compactMap { $0 }.joined(separator: " "),
                "copies": event.duplicates + 1,
            ]
        }
        if more, let last = found.last {
            var components = URLComponents()
            components.path = "/events"
            components.queryItems =
                [("q", filter.query), ("type", filter.type), ("status", filter.status), ("state", filter.state)]
                .compactMap { name, value in value.map { URLQueryItem(name: name, value: $0) } }
                + [URLQueryItem(name: "before", value: EventCursor(receivedAt: last.receivedAt, id: last.id).text)]
            values["next"] = components.string ?? ""
        }
        return Self.render("events", values)
    }

    private func event(id: String, _ visit: Visit) async throws -> Response {
        guard let detail = try await log.event(id: id, receiptBodies: Self.bodyBytesShown, receiptLimit: Self.receiptsShown)
        else {
            return Self.message(status: .notFound, heading: "No such event", text: "There is no event \(id).", visit: visit)
        }
        let e = detail.event
        var values = visit.base(title: "Event \(e.id)")
        values["id"] = e.id
        values["type"] = e.type
        values["state"] = e.state
        if let reason = e.rejectionReason { values["reason"] = reason }
        values["signed"] = e.verification == "signature"
        let verified = e.state == VerificationState.verified.name
        values["replayable"] = verified
        let fields: [(String, String?, String?)] = [
            ("Order", e.orderID, "event-order"), ("Transaction", e.transactionID, nil), ("Invoice", e.invoiceID, nil),
            ("Refund", e.refundID, nil), ("Withdrawal", e.withdrawalID, nil),
            ("Amount", [e.amount, e.currency].compactMap { $0 }.joined(separator: " "), nil),
            ("Payop state", e.payopState.map(String.init), nil), ("Error", e.errorMessage, nil),
            ("Verified by", e.verification, nil), ("Received", Self.time(e.receivedAt), nil),
            ("Verified", e.verifiedAt.map(Self.time), nil), ("Copies received", String(e.duplicates + 1), nil),
        ]
        values["fields"] = fields.compactMap { name, value, elementID -> [String: Any]? in
            let shown = value.flatMap { $0.isEmpty ? nil : $0 }
            // Fields the page's tests and readers look for by id are shown even when empty.
            guard let elementID else { return shown.map { ["name": name, "value": $0] } }
            return ["name": name, "value": shown ?? "-", "elementID": elementID]
        }
        values["receipts"] = detail.receipts.map { r -> [String: Any] in
            [
                "receivedAt": Self.time(r.receivedAt), "source": r.nodeID.map { "\(r.sourceIP), to \($0)" } ?? r.sourceIP,
                "answer": r.answer, "size": r.size,
                "body": r.body.map { String(decoding: $0, as: UTF8.self) } ?? "",
            ]
        }
        let hidden = e.duplicates + 1 - detail.receipts.count
        if hidden > 0 { values["receiptsHidden"] = hidden }
        values["attempts"] = detail.verificationAttempts.map { a -> [String: Any] in
            [
                "at": Self.time(a.at), "outcome": a.outcome, "payopState": a.payopState.map(String.init) ?? "",
                "detail": a.detail ?? "",
            ]
        }
        values["deliveries"] = detail.deliveries.map { d -> [String: Any] in
            var row = Self.deliveryRow(d)
            row["replayable"] = verified && d.state != .running
            row["csrf"] = visit.csrf
            row["runs"] = detail.deliveryAttempts.filter { $0.deliveryID == d.id }.map { a -> [String: Any] in
                [
                    "attempt": a.attempt, "finishedAt": Self.time(a.finishedAt), "outcome": a.outcome,
                    "exitCode": a.exitCode.map(String.init) ?? "", "httpStatus": a.httpStatus.map(String.init) ?? "",
                    "error": a.error ?? "", "output": a.output ?? "",
                ]
            }
            return row
        }
        return Self.render("event", values)
    }

    static func deliveryRow(_ d: Delivery) -> [String: Any] {
        var row: [String: Any] = [
            "id": d.id, "eventID": d.eventID, "hook": d.hook, "state": d.state.rawValue, "attempts": d.attempts,
            "nextAttempt": d.nextAttemptAt.map(time) ?? "", "deliveredAt": d.deliveredAt.map(time) ?? "",
            "lastError": d.lastError ?? "", "dead": d.state == .dead,
        ]
        // A shared log names the daemon that claimed it last.
        if let node = d.nodeID { row["node"] = node }
        return row
    }

    private func deliveries(_ request: Request, _ visit: Visit) async throws -> Response {
        let query = request.uri.queryParameters
        let states = ["pending", "running", "delivered", "dead"]
        let state = query.get("state").flatMap { states.contains($0) ? $0 : nil }
        let hook = query.get("hook").flatMap { $0.isEmpty ? nil : $0 }
        let configured = hooks().map(\.name)
        let found = try await log.deliveries(state: state, hook: hook, eventID: nil, deadFirst: true, limit: 200)
        let dead = try await log.deadDeliveriesByHook()
        let orphans = try await log.orphanedDeliveries(configured: configured)
        var values = visit.base(title: "Deliveries")
        values["states"] = states.map { ["name": $0, "selected": $0 == state] }
        values["hooks"] = (configured + dead.keys.filter { !configured.contains($0) }.sorted()).map {
            ["name": $0, "selected": $0 == hook]
        }
        values["deadHooks"] = dead.sorted { $0.key < $1.key }.filter { configured.contains($0.key) }.map {
            ["hook": $0.key, "count": $0.value, "csrf": visit.csrf] as [String: Any]
        }
        values["orphans"] = orphans.sorted { $0.key < $1.key }.map { ["hook": $0.key, "count": $0.value] as [String: Any] }
        values["deliveries"] = found.map { d -> [String: Any] in
            var row = Self.deliveryRow(d)
            row["csrf"] = visit.csrf
            return row
        }
        return Self.render("deliveries", values)
    }

    private func receipts(_ request: Request, _ visit: Visit) async throws -> Response {
        let refusedOnly = request.uri.queryParameters.get("refused") == "1"
        let found = try await log.receipts(refusedOnly: refusedOnly, since: nil, limit: 200)
        var values = visit.base(title: refusedOnly ? "Refused IPNs" : "Every IPN")
        values["refusedOnly"] = refusedOnly
        values["receipts"] = found.map { r -> [String: Any] in
            [
                "receivedAt": Self.time(r.receivedAt), "source": r.sourceIP, "answer": r.answer, "reason": r.reason ?? "",
                "kind": r.kind ?? "", "entity": r.entityID ?? "", "eventID": r.eventID ?? "", "hasEvent": r.eventID != nil,
            ]
        }
        return Self.render("receipts", values)
    }

    // MARK: - Actions

    private func replay(eventID: String, hook: String?, _ visit: Visit) async throws -> Response {
        let hooks = hooks()
        let hook = hook.flatMap { $0.isEmpty ? nil : $0 }
        if let hook, !hooks.contains(where: { $0.name == hook }) {
            return Self.message(
                status: .badRequest, heading: "No such hook",
                text: "No hook named \(hook) is configured: add it back to hooks and reload first.", visit: visit)
        }
        let queued: Int
        do {
            queued = try await log.replay(eventID: eventID, hook: hook, hooks: hooks, now: clock.nowMilliseconds())
        } catch {
            // Typed: `error` is an EventLogError. A missing or unverified event is the person's mistake.
            guard error.code == .noSuchRecord else { throw error }
            return Self.message(status: .notFound, heading: "Not replayed", text: error.message, visit: visit)
        }
        wakeDispatcher()
        return Self.redirect(to: "/events/\(Self.pathSegment(eventID))?replayed=\(queued)")
    }

    private func replayDead(hook: String?, _ visit: Visit) async throws -> Response {
        guard let hook, hooks().contains(where: { $0.name == hook }) else {
            return Self.message(
                status: .badRequest, heading: "No such hook",
                text: "Name a configured hook whose dead deliveries should run again.", visit: visit)
        }
        let queued = try await log.replayDead(hook: hook, now: clock.nowMilliseconds())
        wakeDispatcher()
        return Self.redirect(to: "/deliveries?hook=\(Self.pathSegment(hook))&replayed=\(queued)")
    }

    private func loginPage(_ request: Request) async throws -> Response {
        guard security.hasToken else { return Self.redirect(to: "/") }
        return Self.secured(Self.render("login", ["title": "Sign in"]))
    }

    private func login(_ request: Request) async throws -> Response {
        let host = request.head.authority
        if security.hostRefused(host) || ConsoleGuard.foreignOrigin(request.headers[.origin], host: host) {
            return Self.secured(
                Self.message(status: .forbidden, heading: "Refused", text: "Sign in from the console's own page.", visit: nil))
        }
        let form: Form
        do {
            form = try await Self.form(request)
        } catch {
            return Self.secured(error.response)
        }
        guard let session = security.login(given: form.token ?? "") else {
            return await refused(
                Refusal(response: Self.render(status: .unauthorized, "login", ["title": "Sign in", "failed": true]), wrongToken: true))
        }
        var response = Self.redirect(to: "/")
        response.setCookie(
            .init(
                name: ConsoleGuard.sessionCookie, value: session,
                maxAge: Int(ConsoleGuard.sessionLifetimeMilliseconds / 1000), path: "/", secure: Self.overTLS(request),
                sameSite: .strict))
        return Self.secured(response)
    }

    // MARK: - Formatting

    static func time(_ milliseconds: Int64) -> String { Timestamp.format(milliseconds: milliseconds) }

    static func ago(_ milliseconds: Int64) -> String {
        let seconds = max(milliseconds / 1000, 0)
        switch seconds {
        case ..<60: return "\(seconds) s ago"
        case ..<3600: return "\(seconds / 60) min ago"
        case ..<86400: return "\(seconds / 3600) h ago"
        default: return "\(seconds / 86400) days ago"
        }
    }

    static func pathSegment(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? ""
    }
}
