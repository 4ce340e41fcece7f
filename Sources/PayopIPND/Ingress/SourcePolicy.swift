#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address as bytes; IPv4-mapped IPv6 addresses are folded to IPv4 so one rule
/// matches both spellings.
public struct IPAddress: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(_ text: some StringProtocol) {
        var text = String(text).trimmingSpaces
        if text.hasPrefix("["), text.hasSuffix("]") { text = String(text.dropFirst().dropLast()) }
        if let zone = text.firstIndex(of: "%") { text = String(text[..<zone]) }
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            let raw = withUnsafeBytes(of: &v6) { Array($0) }
            let mappedPrefix: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
            bytes = Array(raw.prefix(12)) == mappedPrefix ? Array(raw.suffix(4)) : raw
        } else {
            return nil
        }
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family = bytes.count == 4 ? AF_INET : AF_INET6
        let ok = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &buffer, socklen_t(buffer.count)) }
        guard ok != nil else { return "?" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// `203.0.113.0/24`, `2001:db8::/32`, or a bare address (a single host).
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public let network: IPAddress
    public let prefixLength: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let address = IPAddress(parts[0]) else { return nil }
        let bits = address.bytes.count * 8
        if parts.count == 2 {
            guard let length = Int(parts[1]), (0...bits).contains(length), parts[1].allSatisfy(\.isNumber) else {
                return nil
            }
            prefixLength = length
        } else {
            prefixLength = bits
        }
        network = address
    }

    public func contains(_ address: IPAddress) -> Bool {
        guard address.bytes.count == network.bytes.count else { return false }
        var remaining = prefixLength
        for (a, b) in zip(address.bytes, network.bytes) {
            guard remaining > 0 else { return true }
            let take = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xff << (8 - take))
            if a & mask != b & mask { return false }
            remaining -= take
        }
        return true
    }

    public var description: String { "\(network)/\(prefixLength)" }
}

/// Who may post IPNs (`server.allowed_sources`) and whose `X-Forwarded-For` is believed.
public struct SourcePolicy: Sendable, Equatable {
    public enum Allowed: Sendable, Equatable {
        case any
        case only([CIDR])
    }

    /// The union of Payop's two current IPN pages.
    public static let payopAddresses = [
        "18.199.249.46", "35.158.36.143", "3.125.109.58", "3.127.103.117", "18.143.40.196", "54.179.10.165",
    ]

    public var allowed: Allowed
    public var trustedProxies: [CIDR]

    public init(allowed: Allowed, trustedProxies: [CIDR] = []) {
        self.allowed = allowed
        self.trustedProxies = trustedProxies
    }

    /// The client: the peer, or, when the peer is a trusted proxy, the rightmost `X-Forwarded-For`
    /// address that is not itself a trusted proxy. Nil when a forwarded address cannot be read.
    public func clientAddress(peer: IPAddress, forwardedFor: [String]) -> IPAddress? {
        guard isTrustedProxy(peer) else { return peer }
        let hops = forwardedFor.flatMap { $0.split(separator: ",") }
        var client = peer
        for hop in hops.reversed() {
            guard let address = IPAddress(hop) else { return nil }
            client = address
            if !isTrustedProxy(address) { return address }
        }
        return client
    }

    public func allows(_ client: IPAddress) -> Bool {
        switch allowed {
        case .any: true
        case .only(let ranges): ranges.contains { $0.contains(client) }
        }
    }

    public func isTrustedProxy(_ address: IPAddress) -> Bool {
        trustedProxies.contains { $0.contains(address) }
    }

    /// True when the configured list names `address` (not merely `any`).
    public func listsExplicitly(_ address: IPAddress) -> Bool {
        if case .only(let ranges) = allowed { return ranges.contains { $0.contains(address) } }
        return false
    }
}

extension String {
    var trimmingSpaces: String {
        String(drop(while: { $0 == " " || $0 == "\t" }).reversed().drop(while: { $0 == " " || $0 == "\t" }).reversed())
    }
}
