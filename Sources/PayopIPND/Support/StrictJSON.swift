/// A strict RFC 8259 JSON parser: one pass over the bytes, no Foundation.
///
/// It refuses whatever RFC 8259 does not allow, and a little more that it allows but no honest sender
/// writes: invalid UTF-8 anywhere (overlong forms, UTF-8-encoded surrogates, code points above U+10FFFF,
/// truncated sequences, stray continuation bytes), raw control characters in strings, unknown escapes,
/// `\u` escapes that leave a surrogate alone, numbers outside JSON's grammar (`01`, `+1`, `.5`, `1.`,
/// `NaN`, `Infinity`), anything after the value but whitespace, nesting deeper than `maxDepth`, a
/// byte order mark, and an object with a duplicate key (so that no reader of the same bytes can pick
/// another of the two values than we did).
enum StrictJSON {
    /// Arrays and objects nested deeper than this are refused (the parser recurses once per level).
    static let maxDepth = 64

    enum Value: Equatable, Sendable {
        case null
        case bool(Bool)
        /// The number exactly as written (its lexeme, e.g. `100.10` or `1e3`): never through a float.
        case number(String)
        case string(String)
        case array([Value])
        /// Keys are unique: an object with a duplicate key is refused (`Reason.duplicateKey`). Keys compare
        /// as Swift strings, so two canonically equivalent spellings (`é` and `e` + U+0301) are one key.
        case object([String: Value])
    }

    enum Reason: Sendable, Equatable {
        /// No value at all: an empty body, or whitespace only.
        case empty
        case byteOrderMark
        /// The bytes end inside a value.
        case unexpectedEnd
        /// A byte that cannot start or continue what is being read here.
        case unexpectedByte
        case invalidUTF8
        /// A raw U+0000-U+001F inside a string (they must be escaped).
        case controlCharacter
        case badEscape
        /// A `\u` escape of a surrogate that is not one half of a high-low pair.
        case loneSurrogate
        /// `\u0000`: valid JSON, but no Payop field holds one, and a PostgreSQL log's text cannot.
        case nulCharacter
        case badNumber
        case tooDeep
        case duplicateKey
        /// Something other than whitespace after the value.
        case trailingGarbage
    }

    struct Failure: Error, Equatable, Sendable {
        var reason: Reason
        /// Where in the bytes it was found.
        var offset: Int
    }

    /// What of a value to build. Whatever is not built is still checked as strictly, duplicate keys
    /// included: a selection changes what is kept, never what is refused.
    struct Selection: Sendable {
        /// nil: the whole value. Searched in order: a handful of keys compare faster than they hash.
        private let selected: [(key: String, selection: Selection)]?

        /// The whole value.
        static let all = Selection(selected: nil)

        /// An object's listed members, each built as its own selection says; the others are left out.
        /// An array here has each of its elements built as this selection says; any other value is
        /// built whole.
        static func members(_ members: [String: Selection]) -> Selection {
            Selection(selected: members.map { ($0.key, $0.value) })
        }

        var isAll: Bool { selected == nil }

        /// How to build the member `key` of an object selected here; nil: leave it out.
        func member(_ key: String) -> Selection? {
            guard let selected else { return self }
            return selected.first { $0.key == key }?.selection
        }
    }

    /// The one JSON value `bytes` hold, reduced to `selection`, or why they are not JSON.
    static func parse(_ bytes: some Collection<UInt8>, keeping selection: Selection = .all) throws(Failure) -> Value {
        try read(bytes, keeping: selection)
    }

    /// The value reduced to `selection`, or nil when `bytes` are not strict JSON.
    static func value(_ bytes: some Collection<UInt8>, keeping selection: Selection = .all) -> Value? {
        try? parse(bytes, keeping: selection)
    }

    /// Checks that `bytes` are strict JSON, exactly as `parse` would, and builds nothing.
    static func check(_ bytes: some Collection<UInt8>) throws(Failure) {
        _ = try read(bytes, keeping: nil)
    }

    static func isValid(_ bytes: some Collection<UInt8>) -> Bool {
        (try? check(bytes)) != nil
    }

    /// nil `selection`: check only (the result is a placeholder).
    private static func read(_ bytes: some Collection<UInt8>, keeping selection: Selection?) throws(Failure) -> Value {
        func document(_ buffer: UnsafeBufferPointer<UInt8>) -> Result<Value, Failure> {
            var parser = Parser(bytes: buffer)
            return Result { () throws(Failure) -> Value in try parser.document(keeping: selection) }
        }
        return try (bytes.withContiguousStorageIfAvailable(document) ?? Array(bytes).withUnsafeBufferPointer(document)).get()
    }
}

extension StrictJSON.Value {
    /// The member `key` of an object; nil when absent or when this is not an object.
    subscript(key: String) -> StrictJSON.Value? {
        guard case .object(let members) = self else { return nil }
        return members[key]
    }

    var objectValue: [String: StrictJSON.Value]? {
        guard case .object(let members) = self else { return nil }
        return members
    }

    var stringValue: String? {
        guard case .string(let text) = self else { return nil }
        return text
    }

    /// A number's lexeme.
    var numberText: String? {
        guard case .number(let lexeme) = self else { return nil }
        return lexeme
    }
}

// MARK: - The parser

private let quote = UInt8(ascii: "\""), backslash = UInt8(ascii: "\\")

private struct Parser {
    typealias Value = StrictJSON.Value
    typealias Failure = StrictJSON.Failure

    let bytes: UnsafeBufferPointer<UInt8>
    var index = 0
    /// Reused for strings with escapes, so that only the final `String` allocates.
    var scratch: [UInt8] = []
    /// The members of the objects being read, innermost last: each object's are gathered here and
    /// put in a dictionary of the right size when it closes, rather than growing one as they come.
    /// Members left out by a selection are here too (not `kept`): their keys must be unique as well.
    var members: [(key: String, value: Value, offset: Int, kept: Bool)] = []

    init(bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
        members.reserveCapacity(16)  // one allocation for an IPN's members, not one per doubling
    }

    /// nil `selection`: everything is checked, nothing built, and the result is a placeholder.
    mutating func document(keeping selection: StrictJSON.Selection?) throws(Failure) -> Value {
        if bytes.count >= 3, bytes[0] == 0xEF, bytes[1] == 0xBB, bytes[2] == 0xBF {
            throw Failure(reason: .byteOrderMark, offset: 0)
        }
        skipWhitespace()
        guard index < bytes.count else { throw Failure(reason: .empty, offset: index) }
        let result = try value(depth: 0, keeping: selection)
        skipWhitespace()
        guard index == bytes.count else { throw Failure(reason: .trailingGarbage, offset: index) }
        return result
    }

    /// The byte at `index`, or 0 past the end (0 is never valid where this is asked).
    private var current: UInt8 { index < bytes.count ? bytes[index] : 0 }

    /// `unexpectedEnd` past the end, else `unexpectedByte`.
    private func unexpected(at offset: Int) -> Failure {
        Failure(reason: offset < bytes.count ? .unexpectedByte : .unexpectedEnd, offset: offset)
    }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x0A, 0x0D, 0x09: index += 1
            default: return
            }
        }
    }

    /// nil `selection`: checked, not built (`.null` stands in for it).
    private mutating func value(depth: Int, keeping selection: StrictJSON.Selection?) throws(Failure) -> Value {
        switch current {
        case UInt8(ascii: "{"): return try object(depth: depth + 1, keeping: selection)
        case UInt8(ascii: "["): return try array(depth: depth + 1, keeping: selection)
        case quote:
            let text = try string(building: selection != nil)
            return selection == nil ? .null : .string(text)
        case UInt8(ascii: "t"):
            try literal("true")
            return .bool(true)
        case UInt8(ascii: "f"):
            try literal("false")
            return .bool(false)
        case UInt8(ascii: "n"):
            try literal("null")
            return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            let lexeme = try number(building: selection != nil)
            return selection == nil ? .null : .number(lexeme)
        default: throw unexpected(at: index)
        }
    }

    private mutating func literal(_ word: StaticString) throws(Failure) {
        for expected in UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount) {
            guard current == expected else { throw unexpected(at: index) }
            index += 1
        }
    }

    private mutating func object(depth: Int, keeping selection: StrictJSON.Selection?) throws(Failure) -> Value {
        guard depth <= StrictJSON.maxDepth else { throw Failure(reason: .tooDeep, offset: index) }
        index += 1  // {
        skipWhitespace()
        if current == UInt8(ascii: "}") {
            index += 1
            return .object([:])
        }
        let first = members.count
        while true {
            guard current == quote else { throw unexpected(at: index) }
            let keyOffset = index
            let key = try string(building: true)
            skipWhitespace()
            guard current == UInt8(ascii: ":") else { throw unexpected(at: index) }
            index += 1
            skipWhitespace()
            let memberSelection = selection?.member(key)
            let member = try value(depth: depth, keeping: memberSelection)
            members.append((key, member, keyOffset, memberSelection != nil))
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","):
                index += 1
                skipWhitespace()
            case UInt8(ascii: "}"):
                index += 1
                let object = try collectMembers(from: first)
                return selection == nil ? .null : .object(object)
            default:
                throw unexpected(at: index)
            }
        }
    }

    /// The kept members gathered since `first`, as a dictionary; a key seen twice, kept or not, is refused.
    private mutating func collectMembers(from first: Int) throws(Failure) -> [String: Value] {
        defer { members.removeSubrange(first...) }
        let gathered = members[first...]
        let kept = gathered.count(where: \.kept)
        var object = [String: Value](minimumCapacity: kept)
        if kept == gathered.count {
            for member in gathered where object.updateValue(member.value, forKey: member.key) != nil {
                throw Failure(reason: .duplicateKey, offset: member.offset)
            }
            return object
        }
        try checkUniqueKeys(gathered)
        for member in gathered where member.kept { object[member.key] = member.value }
        return object
    }

    /// Refuses a key seen before in `gathered`, at the later one; a handful of keys is compared pairwise.
    private func checkUniqueKeys(_ gathered: ArraySlice<(key: String, value: Value, offset: Int, kept: Bool)>) throws(Failure) {
        if gathered.count <= 8 {
            for i in gathered.indices {
                for j in gathered.startIndex..<i where gathered[j].key == gathered[i].key {
                    throw Failure(reason: .duplicateKey, offset: gathered[i].offset)
                }
            }
            return
        }
        var seen = Set<String>(minimumCapacity: gathered.count)
        for member in gathered where !seen.insert(member.key).inserted {
            throw Failure(reason: .duplicateKey, offset: member.offset)
        }
    }

    /// Each element built as `selection` says; nil: checked, and `.null` stands in for it.
    private mutating func array(depth: Int, keeping selection: StrictJSON.Selection?) throws(Failure) -> Value {
        let building = selection != nil
        guard depth <= StrictJSON.maxDepth else { throw Failure(reason: .tooDeep, offset: index) }
        index += 1  // [
        var elements: [Value] = []
        skipWhitespace()
        if current == UInt8(ascii: "]") {
            index += 1
            return building ? .array(elements) : .null
        }
        while true {
            let element = try value(depth: depth, keeping: selection)
            if building { elements.append(element) }
            skipWhitespace()
            switch current {
            case UInt8(ascii: ","):
                index += 1
                skipWhitespace()
            case UInt8(ascii: "]"):
                index += 1
                return building ? .array(elements) : .null
            default:
                throw unexpected(at: index)
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, kept as written (empty when not `building`).
    private mutating func number(building: Bool) throws(Failure) -> String {
        let start = index
        if current == UInt8(ascii: "-") { index += 1 }
        switch current {
        case UInt8(ascii: "0"):
            index += 1
            // A leading zero stands alone: `01` and `-00` are not numbers.
            if isDigit(current) { throw Failure(reason: .badNumber, offset: index) }
        case UInt8(ascii: "1")...UInt8(ascii: "9"):
            skipDigits()
        default:
            throw Failure(reason: .badNumber, offset: index)
        }
        if current == UInt8(ascii: ".") {
            index += 1
            guard isDigit(current) else { throw Failure(reason: .badNumber, offset: index) }
            skipDigits()
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            index += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { index += 1 }
            guard isDigit(current) else { throw Failure(reason: .badNumber, offset: index) }
            skipDigits()
        }
        guard building else { return "" }
        return String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
    }

    private func isDigit(_ byte: UInt8) -> Bool {
        byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
    }

    private mutating func skipDigits() {
        while index < bytes.count, isDigit(bytes[index]) { index += 1 }
    }

    /// A string from its opening quote to past its closing one (empty when not `building`). Most
    /// strings have no escapes: they are checked in place and copied once; the others are rebuilt in
    /// `scratch`.
    private mutating func string(building: Bool) throws(Failure) -> String {
        index += 1  // "
        let start = index
        var i = index
        while i < bytes.count {
            let byte = bytes[i]
            if byte == quote {
                index = i + 1
                return building ? String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self) : ""
            }
            if byte == backslash { break }
            if byte < 0x20 { throw Failure(reason: .controlCharacter, offset: i) }
            if byte < 0x80 {
                i += 1
            } else {
                i = try endOfUTF8Sequence(at: i)
            }
        }
        scratch.removeAll(keepingCapacity: true)
        scratch.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[start..<i]))
        while i < bytes.count {
            let byte = bytes[i]
            if byte == quote {
                index = i + 1
                return building ? String(decoding: scratch, as: UTF8.self) : ""
            }
            if byte == backslash {
                i = try escape(at: i)
            } else if byte < 0x20 {
                throw Failure(reason: .controlCharacter, offset: i)
            } else if byte < 0x80 {
                scratch.append(byte)
                i += 1
            } else {
                let end = try endOfUTF8Sequence(at: i)
                scratch.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[i..<end]))
                i = end
            }
        }
        throw Failure(reason: .unexpectedEnd, offset: i)
    }

    /// Past the well-formed UTF-8 sequence whose lead byte (not ASCII) is at `i` (Unicode table 3-7).
    private func endOfUTF8Sequence(at i: Int) throws(Failure) -> Int {
        var low: UInt8 = 0x80, high: UInt8 = 0xBF
        let length: Int
        switch bytes[i] {
        case 0xC2...0xDF: length = 2
        case 0xE0: (length, low) = (3, 0xA0)  // below: overlong
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: (length, high) = (3, 0x9F)  // above: UTF-16 surrogates
        case 0xF0: (length, low) = (4, 0x90)  // below: overlong
        case 0xF1...0xF3: length = 4
        case 0xF4: (length, high) = (4, 0x8F)  // above: past U+10FFFF
        default: throw Failure(reason: .invalidUTF8, offset: i)  // continuation byte, C0, C1, F5-FF
        }
        guard bytes.count - i >= length, (low...high).contains(bytes[i + 1]) else {
            throw Failure(reason: .invalidUTF8, offset: i)
        }
        for j in (i + 2)..<(i + length) where bytes[j] & 0xC0 != 0x80 {
            throw Failure(reason: .invalidUTF8, offset: i)
        }
        return i + length
    }

    /// Appends what the escape at `i` (a backslash) stands for to `scratch`; returns the index past it.
    private mutating func escape(at i: Int) throws(Failure) -> Int {
        guard i + 1 < bytes.count else { throw Failure(reason: .unexpectedEnd, offset: i) }
        let decoded: UInt8
        switch bytes[i + 1] {
        case quote: decoded = quote
        case backslash: decoded = backslash
        case UInt8(ascii: "/"): decoded = UInt8(ascii: "/")
        case UInt8(ascii: "b"): decoded = 0x08
        case UInt8(ascii: "f"): decoded = 0x0C
        case UInt8(ascii: "n"): decoded = 0x0A
        case UInt8(ascii: "r"): decoded = 0x0D
        case UInt8(ascii: "t"): decoded = 0x09
        case UInt8(ascii: "u"): return try unicodeEscape(at: i)
        default: throw Failure(reason: .badEscape, offset: i)
        }
        scratch.append(decoded)
        return i + 2
    }

    /// `\uXXXX`, or a `\uD8XX\uDCXX` pair, at `i`.
    private mutating func unicodeEscape(at i: Int) throws(Failure) -> Int {
        guard var scalar = hex4(at: i + 2) else { throw Failure(reason: .badEscape, offset: i) }
        var end = i + 6
        switch scalar {
        case 0xD800...0xDBFF:
            guard end + 1 < bytes.count, bytes[end] == backslash, bytes[end + 1] == UInt8(ascii: "u"),
                let low = hex4(at: end + 2), (0xDC00...0xDFFF).contains(low)
            else { throw Failure(reason: .loneSurrogate, offset: i) }
            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            end += 6
        case 0xDC00...0xDFFF:
            throw Failure(reason: .loneSurrogate, offset: i)
        case 0:
            throw Failure(reason: .nulCharacter, offset: i)
        default:
            break
        }
        appendUTF8(scalar)
        return end
    }

    /// The four hex digits at `i`, or nil.
    private func hex4(at i: Int) -> UInt32? {
        guard bytes.count - i >= 4 else { return nil }
        var value: UInt32 = 0
        for byte in UnsafeBufferPointer(rebasing: bytes[i..<(i + 4)]) {
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            value = value << 4 | UInt32(digit)
        }
        return value
    }

    private mutating func appendUTF8(_ scalar: UInt32) {
        switch scalar {
        case ..<0x80:
            scratch.append(UInt8(scalar))
        case ..<0x800:
            scratch.append(UInt8(0xC0 | scalar >> 6))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        case ..<0x10000:
            scratch.append(UInt8(0xE0 | scalar >> 12))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        default:
            scratch.append(UInt8(0xF0 | scalar >> 18))
            scratch.append(UInt8(0x80 | scalar >> 12 & 0x3F))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        }
    }
}

// MARK: - Amounts

/// A decimal amount as Payop writes it: `digits ('.' digits)?` in ASCII, and nothing else (no sign,
/// exponent, separators, spaces or trailing text). Two amounts are equal when they are the same decimal
/// number: `100`, `100.0`, `100.00` and `0100.00` are one amount.
struct Amount: Hashable, Sendable, CustomStringConvertible {
    /// As written, for display.
    let text: String
    /// The same number without leading zeros in the whole part or trailing zeros in the fraction
    /// (`0100.50` -> `100.5`, `0.00` -> `0`): equal amounts have equal canonical forms.
    let canonical: String

    var description: String { text }

    private init(text: String, canonical: String) {
        self.text = text
        self.canonical = canonical
    }

    static func parse(_ text: String) -> Amount? {
        let bytes = Array(text.utf8)
        let dot = bytes.firstIndex(of: UInt8(ascii: "."))
        let whole = bytes[..<(dot ?? bytes.count)]
        let fraction = bytes[(dot.map { $0 + 1 } ?? bytes.count)...]
        guard !whole.isEmpty, whole.allSatisfy(isDigit),
            dot == nil || (!fraction.isEmpty && fraction.allSatisfy(isDigit))
        else { return nil }
        let significantWhole = whole.drop(while: { $0 == UInt8(ascii: "0") })
        var fractionEnd = fraction.endIndex
        while fractionEnd > fraction.startIndex, bytes[fractionEnd - 1] == UInt8(ascii: "0") { fractionEnd -= 1 }
        let significantFraction = fraction[..<fractionEnd]
        var canonical = significantWhole.isEmpty ? "0" : String(decoding: significantWhole, as: UTF8.self)
        if !significantFraction.isEmpty {
            canonical += "." + String(decoding: significantFraction, as: UTF8.self)
        }
        return Amount(text: text, canonical: canonical)
    }

    /// Whether `a` and `b` are both amounts, and the same one.
    static func same(_ a: String, _ b: String) -> Bool {
        guard let x = parse(a), let y = parse(b) else { return false }
        return x == y
    }

    static func == (a: Amount, b: Amount) -> Bool { a.canonical == b.canonical }

    func hash(into hasher: inout Hasher) { hasher.combine(canonical) }

    private static func isDigit(_ byte: UInt8) -> Bool {
        byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
    }
}
