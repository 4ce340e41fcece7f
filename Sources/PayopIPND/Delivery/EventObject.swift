import Foundation

/// One (kind, entity, status) with what is known of it: the contract's event object.
public struct Event: Sendable, Equatable {
    /// What every event id starts with (`SortableID`); the log's time ranges bound ids with it too.
    static let idPrefix = "evt_"

    public var id: String
    public var kind: String
    public var status: String
    public var state: String
    public var rejectionReason: String?
    public var source: String
    public var transactionID: String?
    public var invoiceID: String?
    public var orderID: String?
    public var refundID: String?
    public var withdrawalID: String?
    public var amount: String?
    public var currency: String?
    public var payopState: Int?
    public var errorMessage: String?
    public var legacy: Bool
    public var verification: String?
    public var receivedAt: Int64
    public var verifiedAt: Int64?
    public var duplicates: Int
    /// The body of the first IPN that brought this status, as received.
    public var ipn: [UInt8]?

    public var type: String { "\(kind).\(status)" }

    /// What the event is about: the transaction, refund or withdrawal id (the order id for legacy V1).
    public var entityID: String? {
        switch kind {
        case "refund": refundID
        case "withdrawal": withdrawalID
        default: legacy ? orderID : transactionID
        }
    }
}

extension Event: Encodable {
    enum CodingKeys: String, CodingKey {
        case id, type, kind, status, state, rejectionReason = "rejection_reason", source
        case transactionID = "transaction_id", invoiceID = "invoice_id", orderID = "order_id"
        case refundID = "refund_id", withdrawalID = "withdrawal_id", amount, currency
        case payopState = "payop_state", errorMessage = "error_message", legacy, verification
        case receivedAt = "received_at", verifiedAt = "verified_at", duplicates, ipn
    }

    /// Every key is always written, null when unknown: hooks can rely on the shape.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(type, forKey: .type)
        try c.encode(kind, forKey: .kind)
        try c.encode(status, forKey: .status)
        try c.encode(state, forKey: .state)
        try c.encode(rejectionReason, forKey: .rejectionReason)
        try c.encode(source, forKey: .source)
        try c.encode(transactionID, forKey: .transactionID)
        try c.encode(invoiceID, forKey: .invoiceID)
        try c.encode(orderID, forKey: .orderID)
        try c.encode(refundID, forKey: .refundID)
        try c.encode(withdrawalID, forKey: .withdrawalID)
        try c.encode(amount, forKey: .amount)
        try c.encode(currency, forKey: .currency)
        try c.encode(payopState, forKey: .payopState)
        try c.encode(errorMessage, forKey: .errorMessage)
        try c.encode(legacy, forKey: .legacy)
        try c.encode(verification, forKey: .verification)
        try c.encode(Timestamp.format(milliseconds: receivedAt), forKey: .receivedAt)
        try c.encode(verifiedAt.map { Timestamp.format(milliseconds: $0) }, forKey: .verifiedAt)
        try c.encode(duplicates, forKey: .duplicates)
        try c.encode(wellFormedIPN.flatMap { try? sharedJSONDecoder.decode(JSONValue.self, from: Data($0)) }, forKey: .ipn)
    }
}

extension Event {
    /// The stored IPN body when it is one JSON value by the strict parser's rules, as at the door (a log
    /// written before that check might hold one that is not): what both forms of the event object show.
    var wellFormedIPN: [UInt8]? { ipn.flatMap { StrictJSON.isValid($0) ? $0 : nil } }

    /// The event object as hooks get it (a command's stdin, a url hook's body): the keys of `encode(to:)`
    /// in sorted order, and `ipn` the stored body spliced in as received, not decoded and encoded again
    /// (null when it is not well formed). Written by hand because this is on every delivery's path,
    /// where JSONEncoder with sorted keys and the IPN's round trip were a tenth of the daemon's CPU; a
    /// test holds it to the same object as the `Encodable` form.
    public var hookBody: [UInt8] {
        var out = JSONWriter()
        out.object { o in
            o.member("amount") { $0.string(amount) }
            o.member("currency") { $0.string(currency) }
            o.member("duplicates") { $0.number(Int64(duplicates)) }
            o.member("error_message") { $0.string(errorMessage) }
            o.member("id") { $0.string(id) }
            o.member("invoice_id") { $0.string(invoiceID) }
            o.member("ipn") { $0.raw(wellFormedIPN) }
            o.member("kind") { $0.string(kind) }
            o.member("legacy") { $0.bool(legacy) }
            o.member("order_id") { $0.string(orderID) }
            o.member("payop_state") { $0.number(payopState.map(Int64.init)) }
            o.member("received_at") { $0.string(Timestamp.format(milliseconds: receivedAt)) }
            o.member("refund_id") { $0.string(refundID) }
            o.member("rejection_reason") { $0.string(rejectionReason) }
            o.member("source") { $0.string(source) }
            o.member("state") { $0.string(state) }
            o.member("status") { $0.string(status) }
            o.member("transaction_id") { $0.string(transactionID) }
            o.member("type") { $0.string(type) }
            o.member("verification") { $0.string(verification) }
            o.member("verified_at") { $0.string(verifiedAt.map { Timestamp.format(milliseconds: $0) }) }
            o.member("withdrawal_id") { $0.string(withdrawalID) }
        }
        return out.bytes
    }
}

/// Writes compact JSON into bytes: strings escaped as RFC 8259 requires, nil as null.
struct JSONWriter {
    private(set) var bytes: [UInt8] = []
    private var first = true

    init() { bytes.reserveCapacity(1024) }

    mutating func object(_ members: (inout JSONWriter) -> Void) {
        bytes.append(UInt8(ascii: "{"))
        first = true
        members(&self)
        bytes.append(UInt8(ascii: "}"))
    }

    mutating func member(_ key: StaticString, _ value: (inout JSONWriter) -> Void) {
        if !first { bytes.append(UInt8(ascii: ",")) }
        first = false
        bytes.append(UInt8(ascii: "\""))
        key.withUTF8Buffer { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: "\":".utf8)
        value(&self)
    }

    mutating func null() { bytes.append(contentsOf: "null".utf8) }

    mutating func bool(_ value: Bool) { bytes.append(contentsOf: (value ? "true" : "false").utf8) }

    mutating func number(_ value: Int64?) {
        guard let value else { return null() }
        bytes.append(contentsOf: String(value).utf8)
    }

    /// Bytes already known to be one JSON value; nil or empty as null.
    mutating func raw(_ value: [UInt8]?) {
        guard let value, !value.isEmpty else { return null() }
        bytes.append(contentsOf: value)
    }

    mutating func string(_ value: String?) {
        guard let value else { return null() }
        bytes.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes.append(contentsOf: "\\\"".utf8)
            case UInt8(ascii: "\\"): bytes.append(contentsOf: "\\\\".utf8)
            case 0x0A: bytes.append(contentsOf: "\\n".utf8)
            case 0x0D: bytes.append(contentsOf: "\\r".utf8)
            case 0x09: bytes.append(contentsOf: "\\t".utf8)
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: "\\u00".utf8)
                bytes.append(hex[Int(byte >> 4)])
                bytes.append(hex[Int(byte & 0xf)])
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

/// Any JSON value, numbers kept as exact decimals, so a stored IPN is echoed without float rounding.
public enum JSONValue: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Decimal)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let value = try? c.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? c.decode(Int64.self) {
            self = .integer(value)
        } else if let value = try? c.decode(Decimal.self) {
            self = .number(value)
        } else if let value = try? c.decode(String.self) {
            self = .string(value)
        } else if let value = try? c.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let value): try c.encode(value)
        case .integer(let value): try c.encode(value)
        case .number(let value): try c.encode(value)
        case .string(let value): try c.encode(value)
        case .array(let value): try c.encode(value)
        case .object(let value): try c.encode(value)
        }
    }
}
