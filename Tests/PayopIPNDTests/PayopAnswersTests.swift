import Foundation
import Testing

@testable import PayopIPND

/// Payop's answers are read by the strict parser when it is sure of them and by `JSONDecoder` otherwise;
/// both must read every answer alike.
@Suite struct PayopAnswersTests {
    @Test func theStrictReaderReadsEverySeededAnswerAsJSONDecoderDoes() {
        var strictlyRead = 0
        let seeds = scenarioSeeds(count: 600, base: 9_100)
        for seed in seeds {
            var random = SeededRandom(seed: seed)
            let list = random.chance(0.5)
            let body = Data(Self.answer(&random, list: list).utf8)
            let reference = PayopAnswers.decodedEntries(body, list: list)
            if let strict = PayopAnswers.strictEntries(body, list: list) {
                strictlyRead += 1
                #expect(Self.bytes(strict) == Self.bytes(reference), "seed \(seed): \(String(decoding: body, as: UTF8.self))")
            }
            #expect(Self.bytes(PayopAnswers.entries(body, list: list)) == Self.bytes(reference), "seed \(seed)")
        }
        // Both readers are exercised: the strict one on the usual answers, JSONDecoder on the others.
        #expect(seeds.count == 1 || (strictlyRead > seeds.count / 5 && strictlyRead < seeds.count * 4 / 5), "\(strictlyRead) of \(seeds.count)")
    }

    @Test func answersOfPayopsUsualShapeAreReadByTheStrictReader() throws {
        let checkout = #"""
            {"data": {"identifier": "tx-1", "state": 2, "amount": 100, "currency": "EUR", "orderId": "o-1",
             "error": "", "payerInformation": {"email": "a@example.com"}, "resultUrl": "https://shop/ok"},
             "status": 1}
            """#
        let refunds = #"""
            {"data": [{"identifier": "rf-1", "status": 2, "state": 1, "amount": "10.00", "currency": "EUR",
             "error": {"message": "", "code": ""}, "sourceTransaction": {"identifier": "tx-1", "state": 2}},
             {"identifier": "rf-2", "status": "3", "amount": 5, "currency": "EUR", "error": null}]}
            """#
        let single = try #require(PayopAnswers.strictEntries(Data(checkout.utf8), list: false))
        #expect(single == PayopAnswers.decodedEntries(Data(checkout.utf8), list: false))
        #expect(single.first?.amount == "100" && single.first?.state == 2 && single.first?.error == "")
        let many = try #require(PayopAnswers.strictEntries(Data(refunds.utf8), list: true))
        #expect(many == PayopAnswers.decodedEntries(Data(refunds.utf8), list: true))
        #expect(many.map(\.sourceTransaction) == ["tx-1", nil] && many.map(\.status) == [2, 3])
    }

    @Test func answersOnlyJSONDecoderIsSureOfAreLeftToIt() throws {
        for body in [
            #"{"data": {"identifier": "tx-1", "state": 2, "amount": 10.50}}"#,  // a fraction
            #"{"data": {"identifier": "tx-1", "state": 2e0}}"#,  // an exponent
            #"{"data": {"identifier": 123456789012345678901234, "state": 2}}"#,  // past 64 bits
            #"{"data": {"identifier": "tx-1", "state": 2, "note": "a\u0000b"}}"#,  // a NUL, even unread
            #"{"data": {"identifier": "tx-1", "identifier": "tx-2", "state": 2}}"#,  // a repeated key
        ] {
            #expect(PayopAnswers.strictEntries(Data(body.utf8), list: false) == nil, "\(body)")
            #expect(PayopAnswers.entries(Data(body.utf8), list: false) == PayopAnswers.decodedEntries(Data(body.utf8), list: false))
        }
        // And they are still read: a NUL in a field nobody reads confirms the payment as before.
        let nul = #"{"data": {"identifier": "tx-1", "state": 2, "note": "a\u0000b"}}"#
        #expect(try PayopAnswers.single(Data(nul.utf8), kind: .checkout, id: "tx-1")?.status.name == "accepted")
    }

    /// Entries as bytes: Swift's `==` on strings is canonical equivalence, blind to a changed spelling.
    private static func bytes(_ entries: [PayopAnswers.Entry]?) -> [[[UInt8]?]]? {
        entries?.map { entry in
            [entry.identifier, entry.state.map { "\($0)" }, entry.status.map { "\($0)" }, entry.amount, entry.currency,
             entry.orderID, entry.invoiceID, entry.error, entry.sourceTransaction].map { $0.map { Array($0.utf8) } }
        }
    }

    // MARK: Generation

    private static func answer(_ random: inout SeededRandom, list: Bool) -> String {
        var members = ["\"data\": " + (list ? entries(&random) : entry(&random))]
        if random.chance(0.3) { members.append("\"status\": 1") }
        if random.chance(0.1) { members.append("\"data\": \(entry(&random))") }  // a repeated key
        if random.chance(0.05) { return random.pick(["[]", "null", "\"data\"", "{}", #"{"data": 3}"#]) }
        return "{" + members.shuffled(using: &random).joined(separator: ", ") + "}"
    }

    private static func entries(_ random: inout SeededRandom) -> String {
        let count = Int.random(in: 0...4, using: &random)
        return "[" + (0..<count).map { _ in random.chance(0.05) ? scalar(&random) : entry(&random) }.joined(separator: ", ") + "]"
    }

    private static func entry(_ random: inout SeededRandom) -> String {
        var members: [String] = []
        for key in ["identifier", "state", "status", "amount", "currency", "orderId", "invoiceIdentifier"] where random.chance(0.8) {
            // Now and then the key spelled with an escape (the same key to both readers) or with a
            // character that only looks alike (another key).
            let spelled = random.chance(0.9) ? key : random.pick(["\\u00" + String(key.utf8.first!, radix: 16) + key.dropFirst(), key + "\u{301}"])
            members.append("\"\(spelled)\": \(scalar(&random))")
        }
        if random.chance(0.6) {
            let error = random.pick([
                #"{"message": "declined", "code": "1"}"#, #"{"message": 5}"#, #"{"code": ""}"#, #""""#, #""card declined""#,
                "null", "7", "true", #"["x"]"#,
            ])
            members.append("\"error\": \(error)")
        }
        if random.chance(0.4) {
            let source = random.pick([
                #"{"identifier": "tx-9", "state": 2}"#, #"{"identifier": 42}"#, #"{}"#, #""tx-9""#, "null", "[1]",
            ])
            members.append("\"sourceTransaction\": \(source)")
        }
        if random.chance(0.5) { members.append(#""payerInformation": {"email": "a@example.com", "list": [1, {"a": null}]}"#) }
        if random.chance(0.05) { members.append("\"\(random.pick(["identifier", "state", "amount"]))\": \(scalar(&random))") }
        return "{" + members.shuffled(using: &random).joined(separator: ", ") + "}"
    }

    private static func scalar(_ random: inout SeededRandom) -> String {
        if random.chance(0.85) {
            return random.pick([
                #""tx-1""#, #""2""#, #""""#, #""10.00""#, #""EUR""#, #""caf\u00e9""#, "\"cafe\u{301}\"", #""cafe\u0301""#, "2",
                "0", "-0", "-3", "4", "null",
            ])
        }
        return random.pick([
            #""tx-1""#, #""2""#, #""""#, #""10.00""#, #""EUR""#, #""caf\u00e9""#, #""a\u0000b""#, #""\ud83d\ude00""#,
            "2", "0", "-0", "-3", "4", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
            "10.50", "1.0", "2.000", "1e2", "-1.5E-3", "0.1", "true", "false", "null", "{}", #"{"a": 1}"#, "[]", "[2]",
        ])
    }
}
