import Foundation

/// The four kinds of IPN Payop sends, told apart by the shape of their body.
public enum IPNKind: String, Sendable, Codable, CaseIterable {
    case checkout
    case refund
    case withdrawal
}

/// A payment status as the daemon names it (`checkout.accepted`). `unknown` keeps Payop's number so
/// that two different unknown states never count as the same status.
public struct PaymentStatus: Sendable, Hashable {
    public let name: String
    /// Payop's state number; nil for legacy V1, which reports words.
    public let payopState: Int?

    public static let unknownName = "unknown"

    public init(name: String, payopState: Int?) {
        self.name = name
        self.payopState = payopState
    }

    /// What makes two statuses of one entity "the same" for deduplication.
    public var dedupeKey: String {
        guard name == Self.unknownName else { return name }
        return payopState.map { "unknown:\($0)" } ?? "unknown"
    }

    public static let securityRejectionMessage = "We are unable to process your payment due to security reasons."

    /// Checkout `transaction.state` (README, Payop's side): state 5 means three different things by its message.
    public static func checkout(state: Int, errorMessage: String?) -> PaymentStatus {
        let name: String
        switch state {
        case 1: name = "new"
        case 2: name = "accepted"
        case 3: name = "failed"
        case 4: name = "pending"
        case 5:
            switch errorMessage {
            case "timeout": name = "timeout"
            case securityRejectionMessage: name = "rejected"
            default: name = "failed"
            }
        case 9: name = "pre_approved"
        case 15: name = "timeout"
        default: name = unknownName
        }
        return PaymentStatus(name: name, payopState: state)
    }

    public static func refund(state: Int) -> PaymentStatus {
        let name: String
        switch state {
        case 1: name = "new"
        case 2: name = "accepted"
        case 3, 4: name = "rejected"
        default: name = unknownName
        }
        return PaymentStatus(name: name, payopState: state)
    }

    public static func withdrawal(state: Int) -> PaymentStatus {
        let name: String
        switch state {
        case 1, 4: name = "pending"
        case 2: name = "accepted"
        case 3: name = "rejected"
        default: name = unknownName
        }
        return PaymentStatus(name: name, payopState: state)
    }

    public static func status(kind: IPNKind, state: Int, errorMessage: String?) -> PaymentStatus {
        switch kind {
        case .checkout: checkout(state: state, errorMessage: errorMessage)
        case .refund: refund(state: state)
        case .withdrawal: withdrawal(state: state)
        }
    }

    /// Legacy V1 words.
    public static func legacy(_ word: String) -> PaymentStatus {
        switch word {
        case "success": PaymentStatus(name: "accepted", payopState: nil)
        case "error": PaymentStatus(name: "failed", payopState: nil)
        case "wait": PaymentStatus(name: "pending", payopState: nil)
        default: PaymentStatus(name: unknownName, payopState: nil)
        }
    }

    /// Statuses that can still change, and so are asked about again by the reconciler.
    public var isFinal: Bool {
        !["new", "pending", "pre_approved"].contains(name)
    }
}

/// An IPN body understood: what it is about and what it claims.
public struct Notification: Sendable, Equatable {
    public var kind: IPNKind
    public var status: PaymentStatus
    /// Transaction id (checkout), refund id, withdrawal id, or order id (legacy V1).
    public var entityID: String
    public var transactionID: String?
    public var invoiceID: String?
    public var orderID: String?
    public var refundID: String?
    public var withdrawalID: String?
    /// Decimal string as Payop wrote it; nil when the IPN carries none (checkout).
    public var amount: String?
    public var currency: String?
    public var errorMessage: String?
    public var legacy: Legacy?

    public var type: String { "\(kind.rawValue).\(status.name)" }

    /// What a V1 IPN carries for its signature check.
    public struct Legacy: Sendable, Equatable {
        public var statusWord: String
        public var signature: String
    }
}
