import Testing

@testable import PayopIPND

/// the README's status table (The IPN listener), row by row, against the fake event store.
@Suite struct IngressTests {
    let store = FakeEventStore()
    let clock = TestClock()

    func ingress(_ settings: IngressSettings = ingressSettings()) -> IPNIngress {
        IPNIngress(settings: settings, store: store, clock: clock, logger: quietLogger)
    }

    func post(
        _ body: [UInt8], to ingress: IPNIngress, path: String = "/payop/ipn", peer: String = "3.125.109.58",
        forwardedFor: [String] = []
    ) async -> IngressAnswer {
        switch ingress.preflight(
            method: "POST", path: path, peer: IPAddress(peer), forwardedFor: forwardedFor, contentLength: body.count)
        {
        case .answer(let answer): return answer
        case .readBody(let admitted): return await ingress.accept(body: body, from: admitted)
        }
    }

    @Test func knownIPNIsStoredAndAnswered200() async throws {
        let answer = await post(try Samples.data("checkout-accepted"), to: ingress())
        #expect(answer.status == 200)
        #expect(store.ingested.count == 1)
        #expect(store.ingested.first?.notification.type == "checkout.accepted")
        #expect(store.ingested.first?.verifiedBySignature == false)
        #expect(store.ingested.first?.receivedAt == clock.nowMilliseconds())
    }

    @Test func duplicateIsAlsoAnswered200() async throws {
        let ingress = ingress()
        let body = try Samples.data("refund-accepted")
        #expect(await post(body, to: ingress).status == 200)
        #expect(await post(body, to: ingress).status == 200)
        #expect(store.ingested.count == 2)
    }

    @Test func sourceNotAllowedIs403AndNothingIsStored() async throws {
        let ingress = ingress(ingressSettings(allowed: .only([CIDR("3.125.109.58")!])))
        let answer = await post(try Samples.data("checkout-accepted"), to: ingress, peer: "198.51.100.1")
        #expect(answer.status == 403)
        #expect(store.ingested.isEmpty && store.refused.isEmpty)
    }

    @Test func forwardedAddressFromATrustedProxyDecidesTheSource() async throws {
        let ingress = ingress(
            ingressSettings(allowed: .only([CIDR("3.125.109.58")!]), proxies: [CIDR("127.0.0.0/8")!]))
        let body = try Samples.data("checkout-accepted")
        #expect(await post(body, to: ingress, peer: "127.0.0.1", forwardedFor: ["3.125.109.58"]).status == 200)
        #expect(await post(body, to: ingress, peer: "127.0.0.1", forwardedFor: ["198.51.100.1"]).status == 403)
        #expect(store.ingested.first?.sourceIP == "3.125.109.58")
    }

    @Test func declaredBodyOverTheLimitIs413() {
        let ingress = ingress(ingressSettings(maxBodyBytes: 1000))
        let preflight = ingress.preflight(
            method: "POST", path: "/payop/ipn", peer: IPAddress("3.125.109.58"), forwardedFor: [], contentLength: 1001)
        guard case .answer(let answer) = preflight else {
            Issue.record("a body over the limit was admitted")
            return
        }
        #expect(answer.status == 413)
        #expect(answer.close)
    }

    @Test(arguments: ["", "{nope", "[]", "{}", #"{"transaction": {"refundId": ""}}"#])
    func unusableBodyIs400AndRecordedAsRefused(body: String) async {
        let answer = await post(Array(body.utf8), to: ingress())
        #expect(answer.status == 400)
        #expect(store.ingested.isEmpty)
        #expect(store.refused.count == 1)
        #expect(store.refused.first?.answer == 400)
    }

    @Test func wrongLegacySignatureIs401AndRecordedWithItsOrder() async throws {
        let ingress = ingress(ingressSettings(secret: "not-the-key"))
        let answer = await post(try Samples.data("legacy-v1-success"), to: ingress)
        #expect(answer.status == 401)
        #expect(store.refused.first?.reason == .badSignature)
        #expect(store.refused.first?.notification?.entityID == "1042")
        #expect(store.ingested.isEmpty)
    }

    @Test func legacyWithoutAmountIs401Unverifiable() async {
        let body = #"{"orderId": "1042", "status": "success", "signature": "5b2a"}"#
        let answer = await post(Array(body.utf8), to: ingress())
        #expect(answer.status == 401)
        #expect(store.refused.first?.reason == .unverifiableSignature)
    }

    @Test func rightLegacySignatureIsStoredAsVerifiedBySignature() async throws {
        let answer = await post(try Samples.data("legacy-v1-success"), to: ingress())
        #expect(answer.status == 200)
        #expect(store.ingested.first?.verifiedBySignature == true)
    }

    @Test func otherMethodIs405WithAllowPost() {
        guard
            case .answer(let answer) = ingress().preflight(
                method: "GET", path: "/payop/ipn", peer: IPAddress("3.125.109.58"), forwardedFor: [], contentLength: nil)
        else {
            Issue.record("GET was admitted")
            return
        }
        #expect(answer.status == 405)
        #expect(answer.allow == "POST")
    }

    @Test func otherPathIs404() async throws {
        #expect(await post(try Samples.data("checkout-accepted"), to: ingress(), path: "/metrics").status == 404)
        #expect(store.refused.isEmpty)
    }

    @Test func eventLogThatCannotCommitIs503() async throws {
        store.setFailing(true)
        #expect(await post(try Samples.data("checkout-accepted"), to: ingress()).status == 503)
    }

    @Test func refusedBodiesAreKeptSizeBounded() async {
        let garbage = [UInt8](repeating: UInt8(ascii: "x"), count: 20_000)
        _ = await post(garbage, to: ingress())
        #expect(store.refused.first?.bodyPrefix.count == RefusedIPN.keptBodyBytes)
        #expect(store.refused.first?.size == 20_000)
    }

    @Test func reloadReplacesTheSourcePolicy() async throws {
        let ingress = ingress(ingressSettings(allowed: .only([CIDR("3.125.109.58")!])))
        let body = try Samples.data("checkout-accepted")
        #expect(await post(body, to: ingress, peer: "198.51.100.1").status == 403)
        ingress.reload(ingressSettings(allowed: .any))
        #expect(await post(body, to: ingress, peer: "198.51.100.1").status == 200)
    }
}
