import Testing

@testable import PayopIPND

@Suite struct NotificationParserTests {
    func parse(_ bytes: [UInt8]) throws -> Notification {
        try classify(bytes).get()
    }

    /// What the parser makes of `bytes`; building only `fieldsRead` of them must make the same of every
    /// body in this suite as building the whole tree (a field read but not selected would read as absent).
    func classify(_ bytes: [UInt8]) -> Result<Notification, RefusalReason> {
        let result = NotificationParser.parse(bytes)
        #expect(result == NotificationParser.parse(bytes, reading: .all))
        return result
    }

    @Test func checkoutAcceptedSampleIsACheckoutAcceptedOfItsTransaction() throws {
        let n = try parse(try Samples.data("checkout-accepted"))
        #expect(n.type == "checkout.accepted")
        #expect(n.entityID == "dca59ca5-be19-470d-9494-9b76944e0241")
        #expect(n.transactionID == n.entityID)
        #expect(n.invoiceID == "d024f697-ba2d-456f-910e-4d7fdfd338dd")
        #expect(n.orderID == "ANY_ORDER_ID")
        #expect(n.status.payopState == 2)
        #expect(n.amount == nil)
        #expect(n.errorMessage == nil)
    }

    @Test func anArrayWhereAnObjectIsReadIsReadAsAbsent() {
        // `fieldsRead` builds an array's elements as it would the object; the parser still reads none of them.
        #expect(classify(Array(#"{"invoice": {"id": "i-1"}, "transaction": [{"id": "t-1", "state": 2}]}"#.utf8)) == classify(Array(#"{"invoice": {"id": "i-1"}}"#.utf8)))
        #expect(classify(Array(#"{"transaction": {"id": "t-1", "state": 2, "error": [{"message": "x"}], "order": [{"id": "o"}]}}"#.utf8)) == classify(Array(#"{"transaction": {"id": "t-1", "state": 2}}"#.utf8)))
    }

    @Test func checkoutTimeoutSampleIsStateFiveWithTimeoutMessage() throws {
        let n = try parse(try Samples.data("checkout-timeout"))
        #expect(n.type == "checkout.timeout")
        #expect(n.entityID == "7c2f0a51-3b8e-4b6e-a1de-2f4c9d7e8a10")
        #expect(n.status.payopState == 5)
        #expect(n.orderID == "1043")
    }

    @Test func refundSampleIsARefundOfItsRefundIDWithItsSourceTransaction() throws {
        let n = try parse(try Samples.data("refund-accepted"))
        #expect(n.type == "refund.accepted")
        #expect(n.entityID == "8888888-ba2d-456f-910e-4d7fdfd338dd")
        #expect(n.refundID == n.entityID)
        #expect(n.transactionID == "999999-ba2d-456f-910e-4d7fdfd338dd")
        #expect(n.amount == "100")
        #expect(n.currency == "USD")
    }

    @Test func withdrawalSampleIsARejectedWithdrawal() throws {
        let n = try parse(try Samples.data("withdrawal-rejected"))
        #expect(n.type == "withdrawal.rejected")
        #expect(n.entityID == "d024f697-ba2d-456f-910e-4d7fdfd338dd")
        #expect(n.withdrawalID == n.entityID)
        #expect(n.transactionID == nil)
        #expect(n.errorMessage == "Rejected by manager")
    }

    @Test func legacySampleIsACheckoutAcceptedOfItsOrder() throws {
        let n = try parse(try Samples.data("legacy-v1-success"))
        #expect(n.type == "checkout.accepted")
        #expect(n.entityID == "1042")
        #expect(n.orderID == "1042")
        #expect(n.transactionID == nil)
        #expect(n.amount == "100.0000")
        #expect(n.legacy?.statusWord == "success")
        #expect(n.status.payopState == nil)
    }

    @Test(arguments: [
        ("timeout", "checkout.timeout"),
        (PaymentStatus.securityRejectionMessage, "checkout.rejected"),
        ("Card declined", "checkout.failed"),
        ("", "checkout.failed"),
    ])
    func stateFiveMeansWhatItsMessageSays(message: String, type: String) throws {
        let n = try parse(checkoutBody(transaction: "t5", state: 5, message: message))
        #expect(n.type == type)
    }

    @Test(arguments: [
        (1, "new"), (2, "accepted"), (3, "failed"), (4, "pending"), (9, "pre_approved"), (15, "timeout"),
        (7, "unknown"),
    ])
    func checkoutStatesMapToStatuses(state: Int, status: String) throws {
        #expect(try parse(checkoutBody(transaction: "t", state: state)).status.name == status)
    }

    @Test func refundAndWithdrawalStatesFollowTheirOwnTables() {
        #expect(PaymentStatus.refund(state: 4).name == "rejected")
        #expect(PaymentStatus.refund(state: 9).name == "unknown")
        #expect(PaymentStatus.withdrawal(state: 4).name == "pending")
        #expect(PaymentStatus.withdrawal(state: 1).name == "pending")
        #expect(PaymentStatus.legacy("wait").name == "pending")
        #expect(PaymentStatus.legacy("error").name == "failed")
    }

    @Test func twoDifferentUnknownStatesAreTwoStatuses() {
        let a = PaymentStatus.checkout(state: 7, errorMessage: nil)
        let b = PaymentStatus.checkout(state: 8, errorMessage: nil)
        #expect(a.name == b.name)
        #expect(a.dedupeKey != b.dedupeKey)
    }

    @Test(arguments: [
        ("", RefusalReason.invalidJSON),
        ("   ", .invalidJSON),
        ("not json", .invalidJSON),
        ("{\"transaction\": ", .invalidJSON),
        ("[1, 2]", .notAnObject),
        ("\"text\"", .notAnObject),
        ("42", .notAnObject),
        ("{}", .unknownShape),
        ("{\"hello\": \"world\"}", .unknownShape),
        ("{\"invoice\": {\"id\": \"i\"}, \"transaction\": {\"id\": \"\", \"state\": 2}}", .missingID),
        ("{\"transaction\": {\"refundId\": \"\", \"state\": 2}}", .missingID),
        ("{\"transaction\": {\"withdrawalId\": null, \"state\": 2}}", .missingID),
        ("{\"signature\": \"ab\", \"status\": \"success\"}", .missingID),
        ("{\"transaction\": {\"refundId\": \"r1\"}}", .unknownShape),
    ])
    func badBodiesAreRefusedWithTheirReason(body: String, reason: RefusalReason) {
        #expect(classify(Array(body.utf8)) == .failure(reason))
    }

    @Test func numericIDsAndAmountsAreKeptAsExactDecimalText() throws {
        let body = #"{"transaction": {"withdrawalId": 12345, "state": 2, "amount": 100.10, "currency": "EUR"}}"#
        let n = try parse(Array(body.utf8))
        #expect(n.entityID == "12345")
        #expect(n.amount == "100.1")
    }

    /// A checkout IPN whose transaction id holds `bytes` between "t" and the closing quote.
    func checkoutWithID(containing bytes: [UInt8]) -> [UInt8] {
        Array(#"{"transaction": {"id": "t"#.utf8) + bytes + Array(#"", "state": 2}}"#.utf8)
    }

    @Test(arguments: [
        [0xFF],  // not UTF-8 at all
        [0xC0, 0xAF],  // overlong '/'
        [0xE0, 0x80, 0xAF],  // overlong '/', three bytes
        [0xED, 0xA0, 0x80],  // a UTF-16 surrogate encoded in UTF-8
        [0x00],  // raw NUL inside a string
        [0x0A],  // raw newline inside a string
    ] as [[UInt8]])
    func hostileBytesInAStringAreInvalidJSON(bytes: [UInt8]) {
        #expect(classify(checkoutWithID(containing: bytes)) == .failure(.invalidJSON))
    }

    @Test func theSameBodyWithWellFormedUTF8IsACheckout() throws {
        #expect(try parse(checkoutWithID(containing: [0xE2, 0x82, 0xAC])).entityID == "t€")
    }

    @Test(arguments: [
        #"{"transaction": {"id": "t", "state": 2},}"#,  // trailing comma
        #"{"transaction": {"id": "t", "state": 2}, "transaction": {"id": "u", "state": 3}}"#,  // duplicate key
        #"{"transaction": {"id": "t\ud800", "state": 2}}"#,  // lone surrogate escape
        #"{"transaction": {"id": "t", "state": 02}}"#,  // leading zero
        "\u{FEFF}{\"transaction\": {\"id\": \"t\", \"state\": 2}}",  // byte order mark
    ])
    func whatStrictJSONRefusesIsInvalidJSON(body: String) {
        #expect(classify(Array(body.utf8)) == .failure(.invalidJSON))
    }

    @Test(arguments: [
        #"{"transaction": {"state": 2, "amount": 100, "currency": "USD"}, "sourceTransaction": {"id": "s", "state": 2}}"#,
        #"{"sourceTransaction": {"id": "s", "state": 2}}"#,
    ])
    func aRefundWithoutItsRefundIDIsMissingItsID(body: String) {
        #expect(classify(Array(body.utf8)) == .failure(.missingID))
    }

    @Test func aWithdrawalWithoutItsWithdrawalIDIsMissingItsID() {
        let body = #"{"transaction": {"state": 3, "amount": 100, "currency": "USD", "comment": "c"}}"#
        #expect(classify(Array(body.utf8)) == .failure(.missingID))
    }

    @Test func aTransactionWithoutAStateOrIDIsOfNoKnownShape() {
        #expect(classify(Array(#"{"transaction": {"amount": 1}}"#.utf8)) == .failure(.unknownShape))
        #expect(classify(Array(#"{"sourceTransaction": "s"}"#.utf8)) == .failure(.unknownShape))
    }

    @Test(arguments: [#""1,000.00""#, #""1.00abc""#, "1e3", #""NaN""#, #""-1""#, "-1", #"" 1""#, #""1.""#, #"".5""#])
    func anAmountThatIsNotADecimalIsRefused(amount: String) {
        let withdrawal = #"{"transaction": {"withdrawalId": "w", "state": 2, "amount": \#(amount)}}"#
        let refund = #"{"transaction": {"refundId": "r", "state": 2, "amount": \#(amount)}}"#
        let checkout = #"{"transaction": {"id": "t", "state": 2, "amount": \#(amount)}}"#
        let legacy = #"{"orderId": "1", "status": "success", "signature": "s", "amount": \#(amount)}"#
        for body in [withdrawal, refund, checkout, legacy] {
            #expect(classify(Array(body.utf8)) == .failure(.invalidAmount))
        }
        #expect(RefusalReason.invalidAmount.httpStatus == 400)
        #expect(RefusalReason.invalidAmount.rawValue == "invalid_amount")
    }

    @Test(arguments: [("100", "100"), ("100.5", "100.5"), ("100.50", "100.5"), (#""0100.50""#, "0100.50"), (#""""#, nil)])
    func amountsThatAreDecimalsAreKept(amount: String, text: String?) throws {
        let n = try parse(Array(#"{"transaction": {"refundId": "r", "state": 2, "amount": \#(amount)}}"#.utf8))
        #expect(n.amount == text)
    }

    @Test func fieldsOfTheWrongTypeCountAsAbsent() throws {
        let body = #"""
            {"invoice": {"id": 7, "txid": ["x"]}, "transaction": {"id": 1.50, "state": "4", "order": "o",
             "amount": true, "currency": {}, "error": 5}}
            """#
        let n = try parse(Array(body.utf8))
        #expect(n.type == "checkout.pending")
        #expect(n.entityID == "1.50")
        #expect(n.invoiceID == "7")
        #expect(n.orderID == nil)
        #expect(n.amount == nil)
        #expect(n.currency == nil)
        #expect(n.errorMessage == nil)
    }

    @Test func anErrorMayBeAnObjectOrAString() throws {
        let object = #"{"transaction": {"id": "t", "state": 5, "error": {"message": "timeout", "code": 1}}}"#
        let string = #"{"transaction": {"id": "t", "state": 5, "error": "timeout"}}"#
        #expect(try parse(Array(object.utf8)).type == "checkout.timeout")
        #expect(try parse(Array(string.utf8)).type == "checkout.timeout")
    }
}
