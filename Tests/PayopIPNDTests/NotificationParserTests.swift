import Testing

@testable import PayopIPND

@Suite struct NotificationParserTests {
    func parse(_ bytes: [UInt8]) throws -> Notification {
        try NotificationParser.parse(bytes).get()
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
        #expect(NotificationParser.parse(Array(body.utf8)) == .failure(reason))
    }

    @Test func numericIDsAndAmountsAreKeptAsExactDecimalText() throws {
        let body = #"{"transaction": {"withdrawalId": 12345, "state": 2, "amount": 100.10, "currency": "EUR"}}"#
        let n = try parse(Array(body.utf8))
        #expect(n.entityID == "12345")
        #expect(n.amount == "100.1")
    }
}
