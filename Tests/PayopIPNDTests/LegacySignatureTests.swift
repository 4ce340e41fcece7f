import Testing

@testable import PayopIPND

@Suite struct LegacySignatureTests {
    @Test(arguments: [
        ("100.0000", "EUR", "1042", "success", "5b2ab6fbfee8d54980f25c0722a42389e1bb836a33aa0e7d56a2aed386a21e26"),
        ("100.0000", "EUR", "1042", "error", "511175be1166482972e6581ac9d4733c586d176043e5e12b3dd35c5881802d9f"),
        ("19.9900", "USD", "A-77", "wait", "ae0afeb77509578e7401cb3469e516d3fe904c5f6961a3ffa7ede8bf1b4e94d8"),
    ])
    func protocolVectorsMatch(amount: String, currency: String, order: String, status: String, signature: String) {
        #expect(
            LegacySignature.expected(amount: amount, currency: currency, orderID: order, status: status, secretKey: "s3cr3t")
                == signature)
    }

    @Test func amountIsWrittenWithFourDecimalsWhateverItsSpelling() {
        #expect(LegacySignature.fourDecimals("100") == "100.0000")
        #expect(LegacySignature.fourDecimals("1.2") == "1.2000")
        #expect(LegacySignature.fourDecimals("19.99") == "19.9900")
        #expect(LegacySignature.fourDecimals("0.00005") == "0.0001")
        #expect(LegacySignature.fourDecimals("abc") == nil)
        #expect(LegacySignature.fourDecimals("1.2.3") == nil)
        #expect(LegacySignature.fourDecimals("") == nil)
    }

    func legacy(signature: String, amount: String? = "100", currency: String? = "EUR") -> Notification {
        Notification(
            kind: .checkout, status: .legacy("success"), entityID: "1042", orderID: "1042", amount: amount,
            currency: currency, legacy: .init(statusWord: "success", signature: signature))
    }

    @Test func rightSignatureVerifies() {
        let good = "5b2ab6fbfee8d54980f25c0722a42389e1bb836a33aa0e7d56a2aed386a21e26"
        #expect(LegacySignature.verify(legacy(signature: good), secretKey: "s3cr3t") == nil)
        #expect(LegacySignature.verify(legacy(signature: good.uppercased()), secretKey: "s3cr3t") == nil)
    }

    @Test func wrongSignatureIsBad() {
        let wrong = "5b2ab6fbfee8d54980f25c0722a42389e1bb836a33aa0e7d56a2aed386a21e27"
        #expect(LegacySignature.verify(legacy(signature: wrong), secretKey: "s3cr3t") == .badSignature)
        #expect(LegacySignature.verify(legacy(signature: ""), secretKey: "s3cr3t") == .badSignature)
        let good = "5b2ab6fbfee8d54980f25c0722a42389e1bb836a33aa0e7d56a2aed386a21e26"
        #expect(LegacySignature.verify(legacy(signature: good), secretKey: "other") == .badSignature)
    }

    @Test func missingAmountCurrencyOrKeyIsUnverifiable() {
        let good = "5b2ab6fbfee8d54980f25c0722a42389e1bb836a33aa0e7d56a2aed386a21e26"
        #expect(LegacySignature.verify(legacy(signature: good, amount: nil), secretKey: "s3cr3t") == .unverifiableSignature)
        #expect(LegacySignature.verify(legacy(signature: good, currency: nil), secretKey: "s3cr3t") == .unverifiableSignature)
        #expect(LegacySignature.verify(legacy(signature: good), secretKey: nil) == .unverifiableSignature)
    }

    @Test func constantTimeCompareComparesWholeStrings() {
        #expect(OpenSSL.constantTimeEquals(Array("abc".utf8), Array("abc".utf8)))
        #expect(!OpenSSL.constantTimeEquals(Array("abc".utf8), Array("abd".utf8)))
        #expect(!OpenSSL.constantTimeEquals(Array("abc".utf8), Array("abcd".utf8)))
    }

    @Test func hmacMatchesRFC4231TestCase2() {
        let mac = OpenSSL.hmacSHA256(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))
        #expect(mac.hexString == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }
}

@Suite struct SortableIDTests {
    @Test func idsSortByTimeAndThenByCreationWithinAMillisecond() {
        let earlier = SortableID.make(prefix: "evt_", millisecondsSince1970: 1_000)
        let sameMillisecond = (0..<1000).map { _ in SortableID.make(prefix: "evt_", millisecondsSince1970: 2_000) }
        let later = SortableID.make(prefix: "evt_", millisecondsSince1970: 3_000)
        #expect(Set(sameMillisecond).count == 1000)
        #expect(sameMillisecond == sameMillisecond.sorted())
        #expect(earlier < sameMillisecond[0] && sameMillisecond[999] < later)
        #expect(later.count == 30 && later.hasPrefix("evt_"))
    }
}
