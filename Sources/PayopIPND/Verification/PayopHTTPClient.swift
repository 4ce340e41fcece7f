import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization

/// A secret held in memory, replaceable on reload, never printed.
public final class SecretBox: Sendable, CustomStringConvertible {
    private let value: Mutex<String?>

    public init(_ value: String?) { self.value = Mutex(value) }
    public func get() -> String? { value.withLock { $0 } }
    public func set(_ newValue: String?) { value.withLock { $0 = newValue } }
    public var description: String { "<secret>" }
}

/// Payop's API over HTTPS with the merchant's JWT (README, Payop's side). TLS verification is always on; only
/// a loopback `http://` base URL (a simulator) goes without TLS.
public final class PayopHTTPClient: PayopAPI {
    private let http: HTTPClient
    private let baseURL: String
    private let timeout: TimeAmount
    private let jwt: SecretBox
    /// Largest answer read from Payop; a bigger one is an error, not a memory spike.
    private static let maxAnswerBytes = 4 << 20

    public init(http: HTTPClient, baseURL: String, timeoutSeconds: Double, jwt: SecretBox) {
        self.http = http
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.timeout = .milliseconds(Int64(timeoutSeconds * 1000))
        self.jwt = jwt
    }

    /// The process's one HTTP client for Payop and url hooks: a connect timeout, no redirects. Every
    /// request carries its own deadline (Payop's timeout, or the hook's).
    public static func makeHTTPClient(timeoutSeconds: Double) -> HTTPClient {
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .milliseconds(Int64(timeoutSeconds * 1000))))
        configuration.httpVersion = .automatic
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    public var unusableReason: String? {
        guard let token = jwt.get(), !token.isEmpty else {
            return "no JWT: set payop.jwt_file to a file holding Payop's JWT, then reload"
        }
        return nil
    }

    public func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
        let encoded = Self.encode(id)
        switch kind {
        case .checkout:
            // A path segment of `.` or `..` would name another resource once the URL is normalized: no
            // transaction has such an id (nor an empty one).
            if ["", ".", ".."].contains(id) { return nil }
            let (status, body) = try await get("/v2/transactions/\(encoded)")
            if status == 404 || status == 422 { return nil }
            try Self.check(status, body)
            return try PayopAnswers.single(body, kind: .checkout, id: id)
        case .refund:
            let (status, body) = try await get("/v1/refunds/user-refunds?query%5Bidentifier%5D=\(encoded)")
            return try Self.find(id, in: status, body, kind: .refund)
        case .withdrawal:
            let (status, body) = try await get("/v1/withdrawals/user-withdrawals?query%5Bidentifier%5D=\(encoded)")
            return try Self.find(id, in: status, body, kind: .withdrawal)
        }
    }

    public func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] {
        guard !ids.isEmpty else { return [] }
        let list = ids.map(Self.encode).joined(separator: ",")
        let (status, body) = try await get("/v1/transactions/filter?query%5Bidentifiers%5D=\(list)")
        if status == 404 || status == 422 { return [] }
        try Self.check(status, body)
        return try PayopAnswers.list(body, kind: .checkout).filter { ids.contains($0.id) }
    }

    private static func find(_ id: String, in status: Int, _ body: Data, kind: IPNKind) throws(PayopError)
        -> PayopRecord?
    {
        if status == 404 || status == 422 { return nil }
        try check(status, body)
        return try PayopAnswers.list(body, kind: kind).first { $0.id == id }
    }

    private static func check(_ status: Int, _ body: Data) throws(PayopError) {
        guard !(200..<300).contains(status) else { return }
        let message = PayopAnswers.message(body).map { "Payop answered: \($0)" } ?? "Payop answered HTTP \(status)"
        switch status {
        case 401, 403: throw PayopError(.unauthorized, message + "; check payop.jwt_file", httpStatus: status)
        case 429, 500...: throw PayopError(.unavailable, message, httpStatus: status)
        default: throw PayopError(.badResponse, message, httpStatus: status)
        }
    }

    /// `id` as one URL path segment or query value: every byte but RFC 3986's unreserved ASCII
    /// (letters, digits, `-._~`) as `%XX`. Foundation's `CharacterSet.alphanumerics` let non-ASCII
    /// letters through unencoded, and building it for every question was about 6 % of the Swift tasks'
    /// samples while a backlog drained.
    static func encode(_ id: String) -> String {
        var encoded: [UInt8] = []
        encoded.reserveCapacity(id.utf8.count)
        for byte in id.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                encoded.append(byte)
            default:
                encoded.append(UInt8(ascii: "%"))
                encoded.append(hexDigits[Int(byte >> 4)])
                encoded.append(hexDigits[Int(byte & 0x0F)])
            }
        }
        return String(decoding: encoded, as: UTF8.self)
    }

    private static let hexDigits = Array("0123456789ABCDEF".utf8)

    private func get(_ pathAndQuery: String) async throws(PayopError) -> (Int, Data) {
        guard let token = jwt.get(), !token.isEmpty else {
            throw PayopError(.unauthorized, "no JWT: set payop.jwt_file to a file holding Payop's JWT")
        }
        var request = HTTPClientRequest(url: baseURL + pathAndQuery)
        request.method = .GET
        request.headers.add(name: "Authorization", value: "Bearer \(token)")
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Accept", value: "application/json")
        do {
            let response = try await http.execute(request, timeout: timeout)
            let body = try await response.body.collect(upTo: Self.maxAnswerBytes)
            return (Int(response.status.code), Data(body.readableBytesView))
        } catch {
            throw PayopError(.unavailable, "Payop's API did not answer: \(Self.describe(error))")
        }
    }

    private static func describe(_ error: any Error) -> String {
        if let error = error as? HTTPClientError { return "\(error)" }
        return String(describing: type(of: error)) + ": \(error)"
    }
}
