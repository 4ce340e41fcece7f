import Testing

@testable import PayopIPND

@Suite struct SourcePolicyTests {
    @Test func cidrsMatchIPv4AndIPv6Ranges() throws {
        let v4 = try #require(CIDR("203.0.113.0/24"))
        #expect(v4.contains(try #require(IPAddress("203.0.113.77"))))
        #expect(!v4.contains(try #require(IPAddress("203.0.114.1"))))
        let v6 = try #require(CIDR("2001:db8::/32"))
        #expect(v6.contains(try #require(IPAddress("2001:db8:1::5"))))
        #expect(!v6.contains(try #require(IPAddress("2001:db9::1"))))
        #expect(!v6.contains(try #require(IPAddress("203.0.113.77"))))
        #expect(CIDR("10.0.0.0/33") == nil)
        #expect(CIDR("nonsense") == nil)
        #expect(CIDR("10.0.0.0/") == nil)
    }

    @Test func ipv4MappedIPv6MatchesTheIPv4Rule() throws {
        let host = try #require(CIDR("3.125.109.58"))
        #expect(host.contains(try #require(IPAddress("::ffff:3.125.109.58"))))
    }

    @Test func payopPresetHoldsTheSixPublishedAddresses() throws {
        let policy = SourcePolicy(allowed: .only(SourcePolicy.payopAddresses.compactMap { CIDR($0) }))
        #expect(SourcePolicy.payopAddresses.count == 6)
        #expect(policy.allows(try #require(IPAddress("18.199.249.46"))))
        #expect(policy.allows(try #require(IPAddress("54.179.10.165"))))
        #expect(!policy.allows(try #require(IPAddress("52.49.204.201"))))
        #expect(!policy.allows(try #require(IPAddress("127.0.0.1"))))
    }

    @Test func forwardedForIsBelievedOnlyFromTrustedProxies() throws {
        let policy = SourcePolicy(allowed: .any, trustedProxies: [try #require(CIDR("10.0.0.0/8"))])
        let proxy = try #require(IPAddress("10.1.2.3"))
        let stranger = try #require(IPAddress("198.51.100.9"))
        #expect(policy.clientAddress(peer: proxy, forwardedFor: ["3.125.109.58"])?.description == "3.125.109.58")
        #expect(policy.clientAddress(peer: stranger, forwardedFor: ["3.125.109.58"]) == stranger)
    }

    @Test func rightmostUntrustedForwardedAddressIsTheClient() throws {
        let policy = SourcePolicy(allowed: .any, trustedProxies: [try #require(CIDR("10.0.0.0/8"))])
        let proxy = try #require(IPAddress("10.1.2.3"))
        // A client can prepend anything; only what our proxies appended counts.
        let client = policy.clientAddress(peer: proxy, forwardedFor: ["3.125.109.58, 198.51.100.7, 10.9.9.9"])
        #expect(client?.description == "198.51.100.7")
        #expect(policy.clientAddress(peer: proxy, forwardedFor: ["garbage"]) == nil)
    }
}
