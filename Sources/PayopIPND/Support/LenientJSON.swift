import Foundation

// Payop's bodies are not strictly typed (ids may be numbers, `error` is an object in IPNs and a string
// in the API), and a field of the wrong type must make a body "unknown", never crash the decoder.
// Every field is therefore read leniently, through these.
extension KeyedDecodingContainer {
    /// The value, or nil when it is absent, null or of another type.
    func lenientDecode<T: Decodable>(_ type: T.Type, _ key: Key) -> T? {
        (try? decodeIfPresent(type, forKey: key)) ?? nil
    }

    /// A string, or a number kept exactly as its decimal value (never through a float).
    func looseText(_ key: Key) -> String? {
        if let text = lenientDecode(String.self, key) { return text }
        if let integer = lenientDecode(Int64.self, key) { return String(integer) }
        if let decimal = lenientDecode(Decimal.self, key) { return decimal.description }
        return nil
    }

    /// A whole number, written as a number or a string of digits.
    func looseInteger(_ key: Key) -> Int? {
        if let integer = lenientDecode(Int.self, key) { return integer }
        if let text = lenientDecode(String.self, key) { return Int(text) }
        return nil
    }
}

/// Payop's `error`: `{"message": …, "code": …}` in IPNs, a plain string in API answers.
struct PayopErrorMessage: Decodable {
    var message: String?

    enum CodingKeys: String, CodingKey { case message }

    init(from decoder: any Decoder) throws {
        // The IPN's object shape is the common one: try it first, since a failed try costs an error.
        if let keyed = try? decoder.container(keyedBy: CodingKeys.self) {
            message = keyed.looseText(.message)
        } else {
            message = try decoder.singleValueContainer().decode(String.self)
        }
    }
}

/// One decoder for the process: it holds no per-call state, and making one per IPN shows in profiles.
let sharedJSONDecoder = JSONDecoder()
