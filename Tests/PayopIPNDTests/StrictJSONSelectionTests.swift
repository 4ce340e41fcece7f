import Testing

@testable import PayopIPND

/// A selection only changes what is built: the same bytes are refused for the same reason at the same
/// place, and what is built is the whole parse reduced to the selection. Seeded random documents,
/// with keys drawn from a small set (so duplicates happen) and a byte changed in some of them.
@Suite struct StrictJSONSelectionTests {
    @Test(arguments: scenarioSeeds(count: 300, base: 0x5E1E_C700))
    func selectionBuildsTheWholeParseReducedAndRefusesAlike(seed: UInt64) throws {
        var random = SeededRandom(seed: seed)
        var bytes = Array(Self.document(&random, depth: 0).utf8)
        if random.chance(0.3), !bytes.isEmpty {
            let at = Int.random(in: 0..<bytes.count, using: &random)
            switch Int.random(in: 0..<3, using: &random) {
            case 0: bytes.remove(at: at)
            case 1: bytes.insert(random.pick(Self.noise), at: at)
            default: bytes[at] = random.pick(Self.noise)
            }
        }
        let selection = Self.selection(&random, depth: 0)
        let whole = Result { () throws(StrictJSON.Failure) in try StrictJSON.parse(bytes) }
        let selected = Result { () throws(StrictJSON.Failure) in try StrictJSON.parse(bytes, keeping: selection) }
        let checked = Result { () throws(StrictJSON.Failure) in try StrictJSON.check(bytes) }
        switch whole {
        case .success(let value):
            #expect(try selected.get() == Self.reduce(value, to: selection), "seed \(seed)")
            #expect(throws: Never.self) { try checked.get() }
        case .failure(let failure):
            #expect(Self.failure(of: selected) == failure, "seed \(seed)")
            #expect(Self.failure(of: checked) == failure, "seed \(seed)")
        }
    }

    @Test func anIPNIsReadFromItsSelectedFieldsAlone() throws {
        let body = #"""
            {"invoice": {"id": "inv-1", "txid": "tx-1", "metadata": {"deep": [1, 2, {"x": "y"}]}},
             "transaction": {"id": "tx-1", "state": 2, "order": {"id": "o-1", "items": [{"a": 1}]},
                             "amount": "10.00", "currency": "EUR", "error": {"message": "", "code": ""},
                             "customer": {"email": "a@example.com"}},
             "extra": [[[[1]]]]}
            """#
        let value = try StrictJSON.parse(Array(body.utf8), keeping: NotificationParser.fieldsRead)
        #expect(value["extra"] == nil)
        #expect(value["invoice"]?["metadata"] == nil)
        #expect(value["transaction"]?["customer"] == nil)
        #expect(value["transaction"]?["order"] == .object(["id": .string("o-1")]))
        #expect(value["transaction"]?["error"] == .object(["message": .string("")]))
        #expect(value["invoice"] == .object(["id": .string("inv-1"), "txid": .string("tx-1")]))
        // What is left out is still checked: a duplicate key deep inside it refuses the body.
        let duplicate = body.replacingOccurrences(of: #"{"x": "y"}"#, with: #"{"x": "y", "x": "z"}"#)
        #expect(throws: StrictJSON.Failure.self) { try StrictJSON.parse(Array(duplicate.utf8), keeping: NotificationParser.fieldsRead) }
        #expect(!StrictJSON.isValid(Array(duplicate.utf8)))
    }

    @Test func anArraysElementsAreEachBuiltAsTheSelectionSays() throws {
        let body = #"{"data": [{"id": 1, "big": {"a": [1, 2]}}, {"id": "2"}, 3, ["x", {"id": 4, "y": 5}]], "more": [1]}"#
        let value = try StrictJSON.parse(Array(body.utf8), keeping: .members(["data": .members(["id": .all])]))
        #expect(
            value == .object([
                "data": .array([
                    .object(["id": .number("1")]), .object(["id": .string("2")]), .number("3"),
                    .array([.string("x"), .object(["id": .number("4")])]),
                ])
            ]))
    }

    // MARK: Generation

    private static let keys = ["a", "b", "id", "x", "transaction", "\\u0061", "é", "e\\u0301", "k10", "k11", "k12", "k13"]
    private static let noise: [UInt8] = Array(#"{}[],:"\ 0-.etu"#.utf8) + [0x00, 0x1F, 0xC3, 0xFF]

    private static func document(_ random: inout SeededRandom, depth: Int) -> String {
        let choice = depth >= 4 ? Int.random(in: 2..<7, using: &random) : Int.random(in: 0..<7, using: &random)
        switch choice {
        case 0, 1:
            let count = Int.random(in: 0..<(random.chance(0.2) ? 12 : 4), using: &random)
            let members = (0..<count).map { _ in "\"\(random.pick(keys))\": \(document(&random, depth: depth + 1))" }
            return "{" + members.joined(separator: ", ") + "}"
        case 2:
            let count = Int.random(in: 0..<4, using: &random)
            return "[" + (0..<count).map { _ in document(&random, depth: depth + 1) }.joined(separator: ",") + "]"
        case 3: return random.pick([#""""#, #""text""#, #""esc\"aped\n\u00e9""#, #""\ud83d\ude00""#, "\"é\""])
        case 4: return random.pick(["0", "-1.5e3", "100.10", "12345678901234567890"])
        case 5: return random.pick(["true", "false"])
        default: return "null"
        }
    }

    private static func selection(_ random: inout SeededRandom, depth: Int) -> StrictJSON.Selection {
        if depth >= 3 || random.chance(0.25) { return .all }
        var members: [String: StrictJSON.Selection] = [:]
        for key in ["a", "b", "id", "x", "transaction", "é"] where random.chance(0.5) {
            members[key] = selection(&random, depth: depth + 1)
        }
        return .members(members)
    }

    /// The whole parse reduced to `selection`, as the parser is meant to build it.
    private static func reduce(_ value: StrictJSON.Value, to selection: StrictJSON.Selection) -> StrictJSON.Value {
        if !selection.isAll, case .array(let elements) = value { return .array(elements.map { reduce($0, to: selection) }) }
        guard !selection.isAll, case .object(let members) = value else { return value }
        var kept: [String: StrictJSON.Value] = [:]
        for (key, member) in members {
            if let inner = selection.member(key) { kept[key] = reduce(member, to: inner) }
        }
        return .object(kept)
    }

    private static func failure(of result: Result<some Any, StrictJSON.Failure>) -> StrictJSON.Failure? {
        if case .failure(let failure) = result { return failure }
        return nil
    }
}
