/// Why an IPN request from an allowed source was refused; the raw values are the contract's reasons.
public enum RefusalReason: String, Sendable, Error, Codable {
    case invalidJSON = "invalid_json"
    case notAnObject = "not_an_object"
    case unknownShape = "unknown_shape"
    case missingID = "missing_id"
    case badSignature = "bad_signature"
    case unverifiableSignature = "unverifiable_signature"
    /// An `amount` that is there but is not a plain decimal (`1,000.00`, `1.00abc`, `1e3`, `NaN`).
    case invalidAmount = "invalid_amount"

    /// 400 for a body we cannot use, 401 for a legacy signature we cannot trust.
    public var httpStatus: Int {
        switch self {
        case .badSignature, .unverifiableSignature: 401
        default: 400
        }
    }
}

/// Turns an IPN body into a typed `Notification` (README, Payop's side), or names why it cannot.
public enum NotificationParser {
    public static func parse(_ body: some Collection<UInt8>) -> Result<Notification, RefusalReason> {
        parse(body, reading: fieldsRead)
    }

    /// `parse`, building `selection` of the body (`.all` in the test that `fieldsRead` misses nothing).
    static func parse(_ body: some Collection<UInt8>, reading selection: StrictJSON.Selection) -> Result<Notification, RefusalReason> {
        guard let json = StrictJSON.value(body, keeping: selection) else { return .failure(.invalidJSON) }
        guard let members = json.objectValue else { return .failure(.notAnObject) }
        return classify(Envelope(members))
    }

    /// The fields the four shapes are told apart and read by (`Envelope` below): the body is checked
    /// whole, but only these are built, not a tree of everything Payop sends.
    static let fieldsRead: StrictJSON.Selection = {
        let transaction = StrictJSON.Selection.members([
            "id": .all, "refundId": .all, "withdrawalId": .all, "state": .all, "order": .members(["id": .all]),
            "amount": .all, "currency": .all, "error": .members(["message": .all]),
        ])
        return .members([
            "invoice": .members(["id": .all, "txid": .all]), "transaction": transaction,
            "sourceTransaction": transaction, "signature": .all, "orderId": .all, "status": .all, "amount": .all,
            "currency": .all,
        ])
    }()

    private static func classify(_ body: Envelope) -> Result<Notification, RefusalReason> {
        if body.signature != nil, body.invoice?.id == nil {
            return legacy(body)
        }
        if let transaction = body.transaction, transaction.hasRefundID {
            return refund(transaction, source: body.sourceTransaction)
        }
        if let transaction = body.transaction, transaction.hasWithdrawalID {
            return withdrawal(transaction)
        }
        if body.invoice != nil || body.transaction?.hasID == true {
            return checkout(invoice: body.invoice, transaction: body.transaction)
        }
        // Known kinds that lack their id: a refund (it names its source transaction) without
        // `refundId`, or a transaction with a state but no id of any kind.
        if body.sourceTransaction != nil || body.transaction?.state != nil {
            return .failure(.missingID)
        }
        return .failure(.unknownShape)
    }

    private static func checkout(invoice: Invoice?, transaction: Transaction?) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction?.id) ?? nonEmpty(invoice?.txid) else { return .failure(.missingID) }
        guard let state = transaction?.state else { return .failure(.unknownShape) }
        let amount = transaction?.amount ?? .absent
        guard amount.isValid else { return .failure(.invalidAmount) }
        let message = nonEmpty(transaction?.errorMessage)
        return .success(
            Notification(
                kind: .checkout, status: .checkout(state: state, errorMessage: message), entityID: id,
                transactionID: id, invoiceID: nonEmpty(invoice?.id), orderID: nonEmpty(transaction?.orderID),
                amount: amount.text, currency: nonEmpty(transaction?.currency),
                errorMessage: message))
    }

    private static func refund(_ transaction: Transaction, source: Transaction?) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction.refundID) else { return .failure(.missingID) }
        guard let state = transaction.state else { return .failure(.unknownShape) }
        guard transaction.amount.isValid else { return .failure(.invalidAmount) }
        return .success(
            Notification(
                kind: .refund, status: .refund(state: state), entityID: id,
                transactionID: nonEmpty(source?.id), refundID: id,
                amount: transaction.amount.text, currency: nonEmpty(transaction.currency),
                errorMessage: nonEmpty(transaction.errorMessage)))
    }

    private static func withdrawal(_ transaction: Transaction) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction.withdrawalID) else { return .failure(.missingID) }
        guard let state = transaction.state else { return .failure(.unknownShape) }
        guard transaction.amount.isValid else { return .failure(.invalidAmount) }
        return .success(
            Notification(
                kind: .withdrawal, status: .withdrawal(state: state), entityID: id, withdrawalID: id,
                amount: transaction.amount.text, currency: nonEmpty(transaction.currency),
                errorMessage: nonEmpty(transaction.errorMessage)))
    }

    private static func legacy(_ body: Envelope) -> Result<Notification, RefusalReason> {
        guard let orderID = nonEmpty(body.orderID) else { return .failure(.missingID) }
        guard let word = nonEmpty(body.status) else { return .failure(.unknownShape) }
        guard body.amount.isValid else { return .failure(.invalidAmount) }
        return .success(
            Notification(
                kind: .checkout, status: .legacy(word), entityID: orderID, orderID: orderID,
                amount: body.amount.text, currency: nonEmpty(body.currency),
                legacy: .init(statusWord: word, signature: body.signature ?? "")))
    }

    private static func nonEmpty(_ text: String?) -> String? {
        guard let text, !text.isEmpty else { return nil }
        return text
    }
}

// MARK: - Loose reading
//
// Payop's bodies are not strictly typed (ids may be numbers, `error` is an object in IPNs and a string
// in the API), and a field of the wrong type must make the body "unknown", not crash the parser.
// Every field is therefore optional and read leniently: a field of the wrong type counts as absent.

private typealias Members = [String: StrictJSON.Value]

private struct Envelope {
    var invoice: Invoice?
    var transaction: Transaction?
    var sourceTransaction: Transaction?
    var signature: String?
    var orderID: String?
    var status: String?
    var amount: AmountField
    var currency: String?

    init(_ members: Members) {
        invoice = members["invoice"]?.objectValue.map(Invoice.init)
        transaction = members["transaction"]?.objectValue.map(Transaction.init)
        sourceTransaction = members["sourceTransaction"]?.objectValue.map(Transaction.init)
        signature = members["signature"]?.looseText
        orderID = members["orderId"]?.looseText
        status = members["status"]?.looseText
        amount = AmountField(members["amount"])
        currency = members["currency"]?.looseText
    }
}

private struct Invoice {
    var id: String?
    var txid: String?

    init(_ members: Members) {
        id = members["id"]?.looseText
        txid = members["txid"]?.looseText
    }
}

private struct Transaction {
    var id: String?
    var hasID: Bool
    var refundID: String?
    var hasRefundID: Bool
    var withdrawalID: String?
    var hasWithdrawalID: Bool
    var state: Int?
    var orderID: String?
    var amount: AmountField
    var currency: String?
    var errorMessage: String?

    /// `has…` is true when the key is there at all, even null or empty: the kind is known, its id missing.
    init(_ members: Members) {
        id = members["id"]?.looseText
        hasID = members["id"] != nil
        refundID = members["refundId"]?.looseText
        hasRefundID = members["refundId"] != nil
        withdrawalID = members["withdrawalId"]?.looseText
        hasWithdrawalID = members["withdrawalId"] != nil
        state = members["state"]?.looseInteger
        orderID = members["order"]?["id"]?.looseText
        amount = AmountField(members["amount"])
        currency = members["currency"]?.looseText
        // `{"message": …, "code": …}` in IPNs, a plain string in API answers.
        switch members["error"] {
        case .object(let error): errorMessage = error["message"]?.looseText
        case .string(let message): errorMessage = message
        default: errorMessage = nil
        }
    }
}

/// An `amount` field: absent (or empty, or of another type than string and number), a valid amount,
/// or there but not an amount (which refuses the IPN).
private enum AmountField {
    case absent
    case valid(String)
    case invalid

    /// A string is kept as written; a JSON number as its decimal value without trailing zeros
    /// (`100.10` -> `100.1`, as Foundation's `Decimal` wrote it before).
    init(_ value: StrictJSON.Value?) {
        switch value {
        case .string(let text) where text.isEmpty: self = .absent
        case .string(let text): self = Amount.parse(text) == nil ? .invalid : .valid(text)
        case .number(let lexeme): self = Amount.parse(lexeme).map { .valid($0.canonical) } ?? .invalid
        default: self = .absent
        }
    }

    var isValid: Bool {
        if case .invalid = self { return false }
        return true
    }

    var text: String? {
        if case .valid(let text) = self { return text }
        return nil
    }
}

extension StrictJSON.Value {
    /// A string, or a number as its exact lexeme (never through a float).
    fileprivate var looseText: String? {
        switch self {
        case .string(let text): text
        case .number(let lexeme): lexeme
        default: nil
        }
    }

    /// A whole number, written as a number (`2`, or `2.0`) or as a string of digits (`"2"`).
    fileprivate var looseInteger: Int? {
        switch self {
        case .string(let text): Int(text)
        case .number(let lexeme): Int(lexeme) ?? Self.integralPart(lexeme)
        default: nil
        }
    }

    /// `2` of `2.0` or `-2.000`; nil when the fraction is not all zeros or there is an exponent.
    private static func integralPart(_ lexeme: String) -> Int? {
        let parts = lexeme.split(separator: ".", maxSplits: 1)
        guard parts.count == 2, parts[1].allSatisfy({ $0 == "0" }) else { return nil }
        return Int(parts[0])
    }
}
