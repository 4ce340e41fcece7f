import Testing

@testable import PayopIPND

@Suite struct StrictJSONTests {
    /// Why `bytes` are refused, or nil when they parse. Checking them only, and building just a
    /// selection of them, must refuse the same bytes for the same reason at the same place.
    func refusal(_ bytes: [UInt8]) -> StrictJSON.Reason? {
        let whole = Self.failure { () throws(StrictJSON.Failure) in _ = try StrictJSON.parse(bytes) }
        #expect(Self.failure { () throws(StrictJSON.Failure) in try StrictJSON.check(bytes) } == whole)
        #expect(Self.failure { () throws(StrictJSON.Failure) in _ = try StrictJSON.parse(bytes, keeping: Self.partly) } == whole)
        #expect(Self.failure { () throws(StrictJSON.Failure) in _ = try StrictJSON.parse(bytes, keeping: .members([:])) } == whole)
        return whole?.reason
    }

    /// A selection that keeps some of the test bodies' members and leaves others out.
    static let partly = StrictJSON.Selection.members(["a": .members(["b": .all]), "x": .all, "transaction": .members(["id": .all])])

    static func failure(_ body: () throws(StrictJSON.Failure) -> Void) -> StrictJSON.Failure? {
        do throws(StrictJSON.Failure) {
            try body()
            return nil
        } catch {
            return error
        }
    }

    func refusal(_ text: String) -> StrictJSON.Reason? { refusal(Array(text.utf8)) }

    func parse(_ text: String) throws -> StrictJSON.Value {
        try StrictJSON.parse(Array(text.utf8))
    }

    /// `{"a":"` + bytes + `"}`.
    func stringMember(_ bytes: [UInt8]) -> [UInt8] {
        [0x7B, 0x22, 0x61, 0x22, 0x3A, 0x22] + bytes + [0x22, 0x7D]
    }

    // MARK: UTF-8

    @Test func anOverlongSlashInAStringIsInvalidUTF8() {
        #expect(refusal([0x7B, 0x22, 0x61, 0x22, 0x3A, 0x22, 0xC0, 0xAF, 0x22, 0x7D]) == .invalidUTF8)
    }

    @Test(arguments: [
        [0xC0, 0xAF],  // overlong '/', two bytes
        [0xC1, 0xBF],  // overlong, two bytes
        [0xE0, 0x80, 0xAF],  // overlong '/', three bytes
        [0xE0, 0x9F, 0xBF],  // overlong U+07FF
        [0xF0, 0x80, 0x80, 0xAF],  // overlong '/', four bytes
        [0xF0, 0x8F, 0xBF, 0xBF],  // overlong U+FFFF
        [0xED, 0xA0, 0x80],  // U+D800, a UTF-16 surrogate
        [0xED, 0xBF, 0xBF],  // U+DFFF
        [0xF4, 0x90, 0x80, 0x80],  // U+110000
        [0xF5, 0x80, 0x80, 0x80],  // lead byte past U+10FFFF
        [0xFF], [0xFE],
        [0xE2, 0x82],  // truncated euro sign, then the closing quote
        [0xF0, 0x9F, 0x98],  // truncated emoji
        [0xC3],  // truncated e-acute
        [0x80],  // stray continuation byte
        [0x61, 0xBF, 0x62],
        [0xC3, 0xA9, 0xA9],  // e-acute, then a continuation byte too many
    ] as [[UInt8]])
    func malformedUTF8InAStringIsRefused(bytes: [UInt8]) {
        #expect(refusal(stringMember(bytes)) == .invalidUTF8)
    }

    @Test func malformedUTF8IsRefusedInKeysAndAfterEscapes() {
        // In a key.
        #expect(refusal([0x7B, 0x22, 0xC0, 0xAF, 0x22, 0x3A, 0x31, 0x7D]) == .invalidUTF8)
        // After an escape (strings with escapes take another path).
        #expect(refusal(stringMember([0x5C, 0x6E, 0xED, 0xA0, 0x80])) == .invalidUTF8)
        // Truncated by the end of the body.
        #expect(refusal([0x22, 0xE2, 0x82]) == .invalidUTF8)
    }

    @Test func nonASCIIBytesOutsideStringsAreRefused() {
        #expect(refusal([0x7B, 0xFF, 0x7D]) == .unexpectedByte)
        #expect(refusal([0x5B, 0xC2, 0xA0, 0x31, 0x5D]) == .unexpectedByte)  // a no-break space is not whitespace
    }

    @Test func wellFormedUTF8AtEveryBoundaryIsKept() throws {
        let bytes: [UInt8] = [
            0xC2, 0x80, 0xDF, 0xBF,  // U+0080, U+07FF
            0xE0, 0xA0, 0x80, 0xED, 0x9F, 0xBF,  // U+0800, U+D7FF
            0xEE, 0x80, 0x80, 0xEF, 0xBF, 0xBF,  // U+E000, U+FFFF
            0xF0, 0x90, 0x80, 0x80, 0xF4, 0x8F, 0xBF, 0xBF,  // U+10000, U+10FFFF
            0x7F,  // DEL is not a control character for JSON
        ]
        let value = try StrictJSON.parse(stringMember(bytes))
        let expected = "\u{80}\u{7FF}\u{800}\u{D7FF}\u{E000}\u{FFFF}\u{10000}\u{10FFFF}\u{7F}"
        #expect(value == .object(["a": .string(expected)]))
    }

    // MARK: Strings

    @Test(arguments: [0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1F] as [UInt8])
    func rawControlCharactersInStringsAreRefused(byte: UInt8) {
        #expect(refusal(stringMember([0x61, byte, 0x62])) == .controlCharacter)
        #expect(refusal(stringMember([0x5C, 0x74, byte])) == .controlCharacter)  // after an escape
    }

    @Test(arguments: [#""\q""#, #""\x41""#, #""\U0041""#, #""\'""#, #""\0""#, #""\u12""#, #""\u12G4""#, #""\u""#])
    func unknownOrShortEscapesAreRefused(text: String) {
        #expect(refusal(text) == .badEscape)
    }

    @Test(arguments: [
        #""\ud800""#, #""\uD800x""#, #""\ud800\u0041""#, #""\ud800\n""#, #""\udc00""#, #""\ude00\ud83d""#,
        #""\ud800\ud800""#, #""a\uDBFF""#,
    ])
    func loneSurrogateEscapesAreRefused(text: String) {
        #expect(refusal(text) == .loneSurrogate)
    }

    /// Valid JSON, but never in a Payop IPN, and text a PostgreSQL log could not store: refused at the door
    /// (400), not answered 503 for ever.
    @Test(arguments: [#"{"a":"\u0000"}"#, #"{"a\u0000":1}"#, #"{"a":"x\u0000y"}"#])
    func escapedNULIsRefused(text: String) {
        #expect(refusal(text) == .nulCharacter)
    }

    @Test func escapesAndSurrogatePairsDecode() throws {
        let value = try parse(#""\"\\\/\b\f\n\r\t\u0041\u00e9\u20AC\ud83d\ude00\uDBFF\uDFFF\u0001""#)
        #expect(value == .string("\"\\/\u{8}\u{C}\n\r\tAé€😀\u{10FFFF}\u{1}"))
    }

    @Test func escapesInKeysDecodeAndMixWithRawUTF8() throws {
        let value = try parse(#"{"k\u00e9y": "caf\u00e9 – ü", "plain é": "x\ty"}"#)
        #expect(value == .object(["kéy": .string("café – ü"), "plain é": .string("x\ty")]))
    }

    @Test func anUnterminatedStringEndsUnexpectedly() {
        #expect(refusal(#""abc"#) == .unexpectedEnd)
        #expect(refusal(#""a\n"#) == .unexpectedEnd)
        #expect(refusal(#""a\"#) == .unexpectedEnd)
    }

    // MARK: Numbers

    @Test(arguments: [
        "01", "-01", "00", "+1", ".5", "1.", "-", "-.5", "1e", "1e+", "1E-", "NaN", "Infinity", "-Infinity", "0x10",
        "1.e3", "--1", "1_000", "１",
    ])
    func whatIsNotAJSONNumberIsRefused(text: String) {
        #expect(refusal(text) != nil)
        #expect(refusal("[\(text)]") != nil)
        #expect(refusal(#"{"n": \#(text)}"#) != nil)
    }

    @Test func aLeadingZeroIsABadNumber() {
        #expect(refusal("01") == .badNumber)
        #expect(refusal("[-01]") == .badNumber)
        #expect(refusal("1.") == .badNumber)
        #expect(refusal("+1") == .unexpectedByte)
    }

    @Test(arguments: ["0", "-0", "1", "100.10", "0.5", "1e3", "1E+3", "-1.5e-10", "12345678901234567890123456789"])
    func numbersAreKeptAsTheirLexeme(text: String) throws {
        #expect(try parse(text) == .number(text))
        #expect(try parse(" [\(text)] ") == .array([.number(text)]))
    }

    // MARK: Structure

    @Test func trailingGarbageIsRefused() {
        #expect(refusal("{} x") == .trailingGarbage)
        #expect(refusal("{}{}") == .trailingGarbage)
        #expect(refusal("1 2") == .trailingGarbage)
        #expect(refusal(#""a" "b""#) == .trailingGarbage)
        #expect(refusal("[1],") == .trailingGarbage)
        #expect(refusal([0x7B, 0x7D, 0x00]) == .trailingGarbage)
    }

    @Test func jsonWhitespaceAroundTheValueIsFine() throws {
        #expect(try StrictJSON.parse([0x20, 0x09, 0x0D, 0x0A, 0x7B, 0x7D, 0x0A, 0x20]) == .object([:]))
        #expect(refusal([0x0C, 0x7B, 0x7D]) == .unexpectedByte)  // form feed is not JSON whitespace
    }

    @Test func anEmptyBodyIsRefused() {
        #expect(refusal([]) == .empty)
        #expect(refusal(" \n\t") == .empty)
    }

    @Test func aByteOrderMarkIsRefused() {
        #expect(refusal([0xEF, 0xBB, 0xBF, 0x7B, 0x7D]) == .byteOrderMark)
    }

    @Test func nestingIsLimitedToSixtyFourLevels() throws {
        let deepest = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        #expect(refusal(deepest) == nil)
        #expect(refusal("[" + deepest + "]") == .tooDeep)
        let objects = String(repeating: #"{"a":"#, count: 64) + "1" + String(repeating: "}", count: 64)
        #expect(refusal(objects) == nil)
        #expect(refusal(#"{"b":"# + objects + "}") == .tooDeep)
        // Far deeper than the stack would take without the limit.
        #expect(refusal(String(repeating: "[", count: 100_000)) == .tooDeep)
    }

    @Test func aDuplicateKeyIsRefused() {
        #expect(refusal(#"{"a": 1, "a": 2}"#) == .duplicateKey)
        #expect(refusal(#"{"x": {"a": 1, "b": 2, "a": 1}}"#) == .duplicateKey)
        #expect(refusal(#"{"a": 1, "\u0061": 2}"#) == .duplicateKey)
        #expect(refusal(#"{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}"#) == nil)
    }

    @Test(arguments: [
        #"{"a" 1}"#, #"{"a":}"#, "{,}", "[1,]", "[,1]", #"{"a":1,}"#, "{'a':1}", "{a:1}", "[1 2]", #"{"a":1 "b":2}"#,
        "[", #"{"a":1"#, "{", "]", "}", ":", "tru", "nul", "True", "nulls", "falsey", "[true false]", "undefined",
    ])
    func malformedStructureIsRefused(text: String) {
        #expect(refusal(text) != nil)
    }

    @Test func truncatedBodiesEndUnexpectedly() {
        #expect(refusal(#"{"transaction": "#) == .unexpectedEnd)
        #expect(refusal("[1, ") == .unexpectedEnd)
        #expect(refusal("tr") == .unexpectedEnd)
    }

    @Test func nestedValuesParseWhole() throws {
        let value = try parse(#" {"a": [1, -2.5e3, true, false, null, "s", {}, []], "b": {"c": {"d": "e"}}, "": 0} "#)
        #expect(
            value
                == .object([
                    "a": .array([.number("1"), .number("-2.5e3"), .bool(true), .bool(false), .null, .string("s"), .object([:]), .array([])]),
                    "b": .object(["c": .object(["d": .string("e")])]),
                    "": .number("0"),
                ]))
        #expect(value["b"]?["c"]?["d"]?.stringValue == "e")
        #expect(value["a"]?.objectValue == nil)
        #expect(value["missing"] == nil)
    }

    @Test func anyCollectionOfBytesParsesAlike() throws {
        let text = #"{"a": ["é", 1]}"#
        let expected = try parse(text)
        #expect(try StrictJSON.parse(Array(text.utf8)[...]) == expected)
        #expect(try StrictJSON.parse(text.utf8) == expected)
        #expect(try StrictJSON.parse(text.utf8.lazy.map { $0 }) == expected)  // no contiguous storage
        #expect(StrictJSON.value(Array(text.utf8).dropLast()) == nil)
    }

    // MARK: Amounts

    @Test(arguments: ["0", "100", "100.5", "0100.00", "00.10", "12345678901234567890.123456789"])
    func plainDecimalsAreAmounts(text: String) throws {
        let amount = try #require(Amount.parse(text))
        #expect(amount.text == text)
        #expect(amount.description == text)
    }

    @Test(arguments: [
        "1.00abc", "1,000.00", "1e3", "1E3", "NaN", "Infinity", "", "-1", "+1", "1.", ".5", ".", " 1", "1 ", "1..0",
        "1.0.0", "0x10", "١٢", "１", "1_000", "abc",
    ])
    func anythingElseIsNotAnAmount(text: String) {
        #expect(Amount.parse(text) == nil)
    }

    @Test func amountsAreEqualAsWholeDecimals() {
        #expect(Amount.parse("100") == Amount.parse("100.0"))
        #expect(Amount.parse("100.0") == Amount.parse("100.00"))
        #expect(Amount.parse("100.00") == Amount.parse("0100.00"))
        #expect(Amount.parse("0") == Amount.parse("000.000"))
        #expect(Amount.parse("10") != Amount.parse("100"))
        #expect(Amount.parse("1.5") != Amount.parse("1.05"))
        #expect(Amount.parse("0100.50")?.canonical == "100.5")
        #expect(Amount.parse("0.00")?.canonical == "0")
        #expect(Set(["100", "100.0", "0100.000"].compactMap(Amount.parse)).count == 1)
    }

    @Test func sameIsFalseUnlessBothAreAmounts() {
        #expect(Amount.same("100", "100.00"))
        #expect(Amount.same("25.50", "25.5"))
        #expect(!Amount.same("25.50", "25.05"))
        #expect(!Amount.same("1e3", "1000"))
        #expect(!Amount.same("NaN", "NaN"))
        #expect(!Amount.same("", ""))
        #expect(!Amount.same("1,000.00", "1,000.00"))
    }
}
