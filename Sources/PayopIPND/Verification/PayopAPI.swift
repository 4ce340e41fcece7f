import Foundation

/// What Payop's API says about one entity: the truth a V2 IPN is checked against.
public struct PayopRecord: Sendable, Equatable {
    public var kind: IPNKind
    public var id: String
    public var status: PaymentStatus
    public var orderID: String?
    /// For refunds, the refunded checkout transaction.
    public var transactionID: String?
    /// When Payop's answer names the invoice (its checkout answer usually does not).
    public var invoiceID: String?
    public var amount: String?
    public var currency: String?
    public var errorMessage: String?

    public init(
        kind: IPNKind, id: String, status: PaymentStatus, orderID: String? = nil, transactionID: String? = nil,
        invoiceID: String? = nil, amount: String? = nil, currency: String? = nil, errorMessage: String? = nil
    ) {
        self.kind = kind
        self.id = id
        self.status = status
        self.orderID = orderID
        self.transactionID = transactionID
        self.invoiceID = invoiceID
        self.amount = amount
        self.currency = currency
        self.errorMessage = errorMessage
    }
}

/// Payop's API could not give an answer. None of these is ever taken as "verified".
public struct PayopError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// 401 or 403: the merchant's JWT is wrong, expired or lacks the right.
        case unauthorized
        /// Network error, timeout, 429 or 5xx: ask again later.
        case unavailable
        /// An answer we cannot read: ask again later, and say so.
        case badResponse = "bad_response"
    }

    public var code: Code
    public var message: String
    public var httpStatus: Int?

    public init(_ code: Code, _ message: String, httpStatus: Int? = nil) {
        self.code = code
        self.message = message
        self.httpStatus = httpStatus
    }

    public var description: String {
        httpStatus.map { "\(message) (HTTP \($0))" } ?? message
    }
}

/// The Payop API boundary: HTTP in production, a fake in unit tests, the simulator in integration tests.
public protocol PayopAPI: Sendable {
    /// Why no question can be asked at all (no JWT configured), or nil when Payop can be asked.
    var unusableReason: String? { get }
    /// The entity as Payop knows it; nil when Payop does not know it (404, 422, or not in the list).
    func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord?
    /// Many checkout transactions at once (`/v1/transactions/filter`); ids Payop does not know are absent.
    func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord]
}

extension PayopAPI {
    public var unusableReason: String? { nil }
}

/// Reads Payop's JSON answers (README, Payop's side) into records, leniently: numbers or strings alike.
///
/// Two readers, one meaning. The strict parser builds only the fields read (`fieldsRead`) and takes the
/// answers it is sure of: strict JSON whose fields read are strings, whole numbers, null or absent, in
/// the places Payop puts them. Any other answer goes to `JSONDecoder`, whose lenient reading is the
/// reference (a test holds the two to one another on seeded answers). While a backlog drained,
/// `JSONDecoder` was about 4 % of the daemon's CPU.
enum PayopAnswers {
    private struct Envelope<T: Decodable>: Decodable {
        var data: T
    }

    struct Entry: Decodable, Equatable {
        var identifier: String?
        var state: Int?
        var status: Int?
        var amount: String?
        var currency: String?
        var orderID: String?
        var invoiceID: String?
        var error: String?
        var sourceTransaction: String?

        enum CodingKeys: String, CodingKey {
            case identifier, state, status, amount, currency, orderId, invoiceIdentifier, error, sourceTransaction
        }

        private struct Source: Decodable {
            var identifier: String?
            enum CodingKeys: String, CodingKey { case identifier }
            init(from decoder: any Decoder) throws {
                identifier = try decoder.container(keyedBy: CodingKeys.self).looseText(.identifier)
            }
        }

        init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            identifier = c.looseText(.identifier)
            state = c.looseInteger(.state)
            status = c.looseInteger(.status)
            amount = c.looseText(.amount)
            currency = c.looseText(.currency)
            orderID = c.looseText(.orderId)
            invoiceID = c.looseText(.invoiceIdentifier)
            error = c.lenientDecode(PayopErrorMessage.self, .error)?.message
            sourceTransaction = c.lenientDecode(Source.self, .sourceTransaction)?.identifier
        }

        /// The entry from the strict parser's object; nil when a field read is of a kind only
        /// `JSONDecoder` is trusted with (a fraction, an exponent, a whole number past 64 bits).
        init?(_ fields: [String: StrictJSON.Value]) {
            guard let identifier = Self.text(fields["identifier"]), let state = Self.integer(fields["state"]),
                let status = Self.integer(fields["status"]), let amount = Self.text(fields["amount"]),
                let currency = Self.text(fields["currency"]), let orderID = Self.text(fields["orderId"]),
                let invoiceID = Self.text(fields["invoiceIdentifier"])
            else { return nil }
            // `{"message": …}` in IPNs, a plain string in API answers; anything else reads as no message.
            var error: String?? = .some(nil)
            switch fields["error"] {
            case .object(let members)?: error = Self.text(members["message"])
            case .string(let message)?: error = message
            default: break
            }
            var sourceTransaction: String?? = .some(nil)
            if case .object(let members)? = fields["sourceTransaction"] {
                sourceTransaction = Self.text(members["identifier"])
            }
            guard let error, let sourceTransaction else { return nil }
            (self.identifier, self.state, self.status, self.amount, self.currency) = (identifier, state, status, amount, currency)
            (self.orderID, self.invoiceID, self.error, self.sourceTransaction) = (orderID, invoiceID, error, sourceTransaction)
        }

        /// `looseText`'s reading (`.some(nil)`: no text), or nil when only `JSONDecoder` is sure of it.
        private static func text(_ value: StrictJSON.Value?) -> String?? {
            switch value {
            case .string(let text)?: return .some(text)
            case .number(let lexeme)?:
                guard let integer = Int64(lexeme) else { return nil }
                return .some(String(integer))
            default: return .some(nil)
            }
        }

        /// `looseInteger`'s reading, likewise.
        private static func integer(_ value: StrictJSON.Value?) -> Int?? {
            switch value {
            case .string(let text)?: .some(Int(text))
            case .number(let lexeme)?: Int(lexeme).map { .some($0) }
            default: .some(nil)
            }
        }

        func record(kind: IPNKind, id: String) throws(PayopError) -> PayopRecord {
            guard let number = (kind == .checkout ? state : status ?? state) else {
                throw PayopError(.badResponse, "Payop's answer for \(id) has no state")
            }
            let message = error.flatMap { $0.isEmpty ? nil : $0 }
            let amount = amount.flatMap { $0.isEmpty ? nil : $0 }
            // Payop's facts reach hooks as they are: an amount that is not a whole decimal is no answer.
            if let amount, Amount.parse(amount) == nil {
                throw PayopError(.badResponse, "Payop's answer for \(id) has an amount that is not a number: \(amount)")
            }
            return PayopRecord(
                kind: kind, id: id, status: .status(kind: kind, state: number, errorMessage: message),
                orderID: orderID.flatMap { $0.isEmpty ? nil : $0 },
                transactionID: sourceTransaction.flatMap { $0.isEmpty ? nil : $0 },
                invoiceID: invoiceID.flatMap { $0.isEmpty ? nil : $0 }, amount: amount,
                currency: currency.flatMap { $0.isEmpty ? nil : $0 }, errorMessage: message)
        }
    }

    /// Nil when Payop answers about another identifier than the one asked: an id spelled differently
    /// (case, hyphens) must not make a second event of one payment.
    static func single(_ body: Data, kind: IPNKind, id: String) throws(PayopError) -> PayopRecord? {
        guard let entry = entries(body, list: false)?.first else {
            throw PayopError(.badResponse, "Payop's answer for \(id) is not {\"data\": {...}}")
        }
        // Payop's answer names the transaction; one that does not is not known to be about it (another
        // resource's answer, say), so it confirms nothing.
        guard let identifier = entry.identifier else {
            throw PayopError(.badResponse, "Payop's answer for \(id) does not name the transaction")
        }
        if identifier != id { return nil }
        return try entry.record(kind: kind, id: id)
    }

    static func list(_ body: Data, kind: IPNKind) throws(PayopError) -> [PayopRecord] {
        guard let entries = entries(body, list: true) else {
            throw PayopError(.badResponse, "Payop's answer is not {\"data\": [...]}")
        }
        var records: [PayopRecord] = []
        for entry in entries {
            guard let id = entry.identifier else { continue }
            records.append(try entry.record(kind: kind, id: id))
        }
        return records
    }

    /// The members of an answer's entries that are read; the rest is checked, not built.
    static let fieldsRead: StrictJSON.Selection = .members([
        "data": .members([
            "identifier": .all, "state": .all, "status": .all, "amount": .all, "currency": .all, "orderId": .all,
            "invoiceIdentifier": .all, "error": .members(["message": .all]),
            "sourceTransaction": .members(["identifier": .all]),
        ])
    ])

    /// The entries of `{"data": {...}}`, or of `{"data": [{...}, ...]}` for a `list`; nil when the answer
    /// is not that.
    static func entries(_ body: Data, list: Bool) -> [Entry]? {
        strictEntries(body, list: list) ?? decodedEntries(body, list: list)
    }

    /// `entries` as `JSONDecoder` reads them: the reference.
    static func decodedEntries(_ body: Data, list: Bool) -> [Entry]? {
        list
            ? (try? sharedJSONDecoder.decode(Envelope<[Entry]>.self, from: body))?.data
            : (try? sharedJSONDecoder.decode(Envelope<Entry>.self, from: body)).map { [$0.data] }
    }

    /// `entries` read by the strict parser; nil when
    /// the answer is not one it is sure of (then `JSONDecoder` reads it).
    static func strictEntries(_ body: Data, list: Bool) -> [Entry]? {
        guard case .object(let members)? = StrictJSON.value(body, keeping: fieldsRead) else { return nil }
        switch (members["data"], list) {
        case (.object(let fields)?, false):
            return Entry(fields).map { [$0] }
        case (.array(let elements)?, true):
            var entries: [Entry] = []
            entries.reserveCapacity(elements.count)
            for element in elements {
                guard case .object(let fields) = element, let entry = Entry(fields) else { return nil }
                entries.append(entry)
            }
            return entries
        default:
            return nil
        }
    }

    static func message(_ body: Data) -> String? {
        struct Message: Decodable { var message: String? }
        return (try? sharedJSONDecoder.decode(Message.self, from: body))?.message
    }
}
