import Foundation

/// One (kind, entity, status) with what is known of it: the contract's event object.
public struct Event: Sendable, Equatable {
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
        try c.encode(ipn.flatMap { try? sharedJSONDecoder.decode(JSONValue.self, from: Data($0)) }, forKey: .ipn)
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
