import Foundation

/// Payop's legacy V1 signature: lowercase hex SHA-256 of `amount:currency:orderId:status:secretKey`,
/// the amount written with exactly four decimals (README, Payop's side).
public enum LegacySignature {
    public static func expected(amount: String, currency: String, orderID: String, status: String, secretKey: String)
        -> String?
    {
        guard let amount = fourDecimals(amount) else { return nil }
        let message = "\(amount):\(currency):\(orderID):\(status):\(secretKey)"
        return OpenSSL.sha256(Array(message.utf8)).hexString
    }

    /// Checks a parsed legacy IPN. Without amount, currency or a configured key it cannot be checked,
    /// and is refused as unverifiable rather than trusted.
    public static func verify(_ notification: Notification, secretKey: String?) -> RefusalReason? {
        guard let legacy = notification.legacy else { return nil }
        guard let secretKey, !secretKey.isEmpty,
            let amount = notification.amount, let currency = notification.currency,
            let orderID = notification.orderID,
            let expected = expected(
                amount: amount, currency: currency, orderID: orderID, status: legacy.statusWord, secretKey: secretKey)
        else { return .unverifiableSignature }
        let given = legacy.signature.lowercased()
        return OpenSSL.constantTimeEquals(Array(expected.utf8), Array(given.utf8)) ? nil : .badSignature
    }

    /// `%.4f` of a decimal string, computed in decimal so that no float rounding creeps in.
    static func fourDecimals(_ amount: String) -> String? {
        let parts = amount.split(separator: ".", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let whole = parts.first,
            !whole.isEmpty, whole.drop(while: { $0 == "-" }).allSatisfy(\.isASCIIDigit),
            whole.filter({ $0 == "-" }).count <= 1, whole.last != "-",
            parts.count == 1 || (!parts[1].isEmpty && parts[1].allSatisfy(\.isASCIIDigit)),
            var value = Decimal(string: amount, locale: Locale(identifier: "en_US_POSIX"))
        else { return nil }
        var rounded = Decimal()
        NSDecimalRound(&rounded, &value, 4, .plain)
        let text = rounded.description
        let split = text.split(separator: ".", omittingEmptySubsequences: false)
        let fraction = split.count > 1 ? String(split[1]) : ""
        return "\(split[0]).\(fraction.padding(toLength: 4, withPad: "0", startingAt: 0))"
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
