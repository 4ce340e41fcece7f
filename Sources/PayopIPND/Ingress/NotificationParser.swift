import Foundation

/// Why an IPN request from an allowed source was refused; the raw values are the contract's reasons.
public enum RefusalReason: String, Sendable, Error, Codable {
    case invalidJSON = "invalid_json"
    case notAnObject = "not_an_object"
    case unknownShape = "unknown_shape"
    case missingID = "missing_id"
    case badSignature = "bad_signature"
    case unverifiableSignature = "unverifiable_signature"

    /// 400 for a body we cannot use, 401 for a legacy signature we cannot trust.
    public var httpStatus: Int {
        switch self {
        case .badSignature, .unverifiableSignature: 401
        default: 400
        }
    }
}

/// Turns an IPN body into a typed `Notification` (PROTOCOL.md), or names why it cannot.
public enum NotificationParser {
    public static func parse(_ body: some Collection<UInt8>) -> Result<Notification, RefusalReason> {
        let data = Data(body)
        guard let first = data.first(where: { !isJSONWhitespace($0) }) else { return .failure(.invalidJSON) }
        guard first == UInt8(ascii: "{") else {
            let isJSON = (try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])) != nil
            return .failure(isJSON ? .notAnObject : .invalidJSON)
        }
        let envelope: Envelope
        do {
            envelope = try sharedJSONDecoder.decode(Envelope.self, from: data)
        } catch {
            return .failure(.invalidJSON)
        }
        return classify(envelope)
    }

    private static func isJSONWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
    }

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
        return .failure(.unknownShape)
    }

    private static func checkout(invoice: Invoice?, transaction: Transaction?) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction?.id) ?? nonEmpty(invoice?.txid) else { return .failure(.missingID) }
        guard let state = transaction?.state else { return .failure(.unknownShape) }
        let message = nonEmpty(transaction?.errorMessage)
        return .success(
            Notification(
                kind: .checkout, status: .checkout(state: state, errorMessage: message), entityID: id,
                transactionID: id, invoiceID: nonEmpty(invoice?.id), orderID: nonEmpty(transaction?.orderID),
                amount: nonEmpty(transaction?.amount), currency: nonEmpty(transaction?.currency),
                errorMessage: message))
    }

    private static func refund(_ transaction: Transaction, source: Transaction?) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction.refundID) else { return .failure(.missingID) }
        guard let state = transaction.state else { return .failure(.unknownShape) }
        return .success(
            Notification(
                kind: .refund, status: .refund(state: state), entityID: id,
                transactionID: nonEmpty(source?.id), refundID: id,
                amount: nonEmpty(transaction.amount), currency: nonEmpty(transaction.currency),
                errorMessage: nonEmpty(transaction.errorMessage)))
    }

    private static func withdrawal(_ transaction: Transaction) -> Result<Notification, RefusalReason> {
        guard let id = nonEmpty(transaction.withdrawalID) else { return .failure(.missingID) }
        guard let state = transaction.state else { return .failure(.unknownShape) }
        return .success(
            Notification(
                kind: .withdrawal, status: .withdrawal(state: state), entityID: id, withdrawalID: id,
                amount: nonEmpty(transaction.amount), currency: nonEmpty(transaction.currency),
                errorMessage: nonEmpty(transaction.errorMessage)))
    }

    private static func legacy(_ body: Envelope) -> Result<Notification, RefusalReason> {
        guard let orderID = nonEmpty(body.orderID) else { return .failure(.missingID) }
        guard let word = nonEmpty(body.status) else { return .failure(.unknownShape) }
        return .success(
            Notification(
                kind: .checkout, status: .legacy(word), entityID: orderID, orderID: orderID,
                amount: nonEmpty(body.amount), currency: nonEmpty(body.currency),
                legacy: .init(statusWord: word, signature: body.signature ?? "")))
    }

    private static func nonEmpty(_ text: String?) -> String? {
        guard let text, !text.isEmpty else { return nil }
        return text
    }
}

// MARK: - Loose decoding
//
// Payop's bodies are not strictly typed (ids may be numbers, `error` is an object in IPNs and a string
// in the API), and a field of the wrong type must make the body "unknown", not crash the decoder.
// Every field is therefore optional and read leniently.

private struct Envelope: Decodable {
    var invoice: Invoice?
    var transaction: Transaction?
    var sourceTransaction: Transaction?
    var signature: String?
    var orderID: String?
    var status: String?
    var amount: String?
    var currency: String?

    enum CodingKeys: String, CodingKey {
        case invoice, transaction, sourceTransaction, signature, orderId, status, amount, currency
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        invoice = c.lenientDecode(Invoice.self, .invoice)
        transaction = c.lenientDecode(Transaction.self, .transaction)
        sourceTransaction = c.lenientDecode(Transaction.self, .sourceTransaction)
        signature = c.looseText(.signature)
        orderID = c.looseText(.orderId)
        status = c.looseText(.status)
        amount = c.looseText(.amount)
        currency = c.looseText(.currency)
    }
}

private struct Invoice: Decodable {
    var id: String?
    var txid: String?

    enum CodingKeys: String, CodingKey { case id, txid }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = c.looseText(.id)
        txid = c.looseText(.txid)
    }
}

private struct Transaction: Decodable {
    var id: String?
    var hasID: Bool
    var refundID: String?
    var hasRefundID: Bool
    var withdrawalID: String?
    var hasWithdrawalID: Bool
    var state: Int?
    var orderID: String?
    var amount: String?
    var currency: String?
    var errorMessage: String?

    enum CodingKeys: String, CodingKey {
        case id, refundId, withdrawalId, state, order, amount, currency, error
    }

    private struct Order: Decodable {
        var id: String?
        enum CodingKeys: String, CodingKey { case id }
        init(from decoder: any Decoder) throws {
            id = try decoder.container(keyedBy: CodingKeys.self).looseText(.id)
        }
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = c.looseText(.id)
        hasID = c.contains(.id)
        refundID = c.looseText(.refundId)
        hasRefundID = c.contains(.refundId)
        withdrawalID = c.looseText(.withdrawalId)
        hasWithdrawalID = c.contains(.withdrawalId)
        state = c.looseInteger(.state)
        orderID = c.lenientDecode(Order.self, .order)?.id
        amount = c.looseText(.amount)
        currency = c.looseText(.currency)
        errorMessage = c.lenientDecode(PayopErrorMessage.self, .error)?.message
    }
}

