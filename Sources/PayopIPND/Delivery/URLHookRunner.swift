import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// Runs `url` hooks: POSTs the event object to a loopback or unix-socket endpoint, signed the Standard
/// Webhooks way. 2xx is delivered; 410 Gone is dead at once; redirects are not followed; `Retry-After`
/// on 429/503 is honoured.
public struct URLHookRunner: HookRunner {
    public var http: HTTPClient
    /// Signing secrets by hook name, read from `signing_secret_file` (replaced on reload).
    public var secrets: @Sendable (String) -> String?
    public var clock: any WallClock

    public init(http: HTTPClient, secrets: @escaping @Sendable (String) -> String?, clock: any WallClock = SystemWallClock()) {
        self.http = http
        self.secrets = secrets
        self.clock = clock
    }

    public func run(_ invocation: HookInvocation) async -> HookResult {
        guard case .url(let url) = invocation.hook.target else {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "not a url hook")
        }
        let now = clock.nowMilliseconds()
        let timestamp = String(now / 1000)
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "User-Agent", value: "payop-ipnd")
        request.headers.add(name: "webhook-id", value: invocation.event.id)
        request.headers.add(name: "webhook-timestamp", value: timestamp)
        if let secret = secrets(invocation.hook.name) {
            request.headers.add(
                name: "webhook-signature",
                value: StandardWebhooks.signature(
                    secret: secret, id: invocation.event.id, timestamp: timestamp, body: invocation.body))
        }
        request.body = .bytes(ByteBuffer(bytes: invocation.body))
        do {
            let response = try await http.execute(
                request, timeout: .milliseconds(Int64(invocation.hook.timeoutSeconds * 1000)))
            var capture = BoundedCapture()
            for try await chunk in response.body { capture.append(chunk.readableBytesView) }
            let status = Int(response.status.code)
            switch status {
            case 200..<300:
                return HookResult(outcome: .delivered, httpStatus: status, output: capture.text)
            case 410:
                return HookResult(outcome: .gone, httpStatus: status, error: "410 Gone: the endpoint wants no more", output: capture.text)
            default:
                var retryAfter: Int64?
                if status == 429 || status == 503, let header = response.headers.first(name: "Retry-After") {
                    retryAfter = Self.retryAfterMilliseconds(header, now: now)
                }
                let hint = (300..<400).contains(status) ? " (redirects are not followed)" : ""
                return HookResult(
                    outcome: .failed(retryAfterMilliseconds: retryAfter), httpStatus: status,
                    error: "answered HTTP \(status)\(hint)", output: capture.text)
            }
        } catch {
            return HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "POST \(url) failed: \(error)")
        }
    }

    /// `Retry-After`: delay-seconds or an HTTP date.
    static func retryAfterMilliseconds(_ value: String, now: Int64) -> Int64? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let seconds = Int64(trimmed), seconds >= 0 { return seconds * 1000 }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: trimmed) else { return nil }
        return max(0, Timestamp.milliseconds(date) - now)
    }
}

/// The Standard Webhooks signature scheme (as Svix and others use it).
public enum StandardWebhooks {
    /// `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`. A `whsec_` secret keys the HMAC with its
    /// base64-decoded bytes; any other secret with its raw bytes.
    public static func signature(secret: String, id: String, timestamp: String, body: [UInt8]) -> String {
        let key: [UInt8]
        if secret.hasPrefix("whsec_"), let decoded = Data(base64Encoded: String(secret.dropFirst(6))) {
            key = Array(decoded)
        } else {
            key = Array(secret.utf8)
        }
        let message = Array("\(id).\(timestamp).".utf8) + body
        return "v1," + Data(OpenSSL.hmacSHA256(key: key, message: message)).base64EncodedString()
    }
}
