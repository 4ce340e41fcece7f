import Foundation

/// One run of one hook for one event.
public struct HookInvocation: Sendable {
    public var deliveryID: Int64
    public var hook: HookConfig
    public var event: Event
    /// The event object as JSON: the command's stdin, the url hook's body.
    public var body: [UInt8]
    /// 1 for the first run, 2 for the first retry, ...
    public var attempt: Int
    /// SIGTERM to SIGKILL, for a command past its timeout or stopped by shutdown.
    public var killGraceSeconds: Double

    /// The command's whole environment: `PATH` and the documented `PAYOP_*` variables, every one set
    /// (empty when unknown), and nothing else of the daemon's.
    public func environment(path: String) -> [String: String] {
        [
            "PATH": path,
            "PAYOP_EVENT_ID": event.id,
            "PAYOP_EVENT_TYPE": event.type,
            "PAYOP_KIND": event.kind,
            "PAYOP_STATUS": event.status,
            "PAYOP_TRANSACTION_ID": event.transactionID ?? "",
            "PAYOP_INVOICE_ID": event.invoiceID ?? "",
            "PAYOP_ORDER_ID": event.orderID ?? "",
            "PAYOP_AMOUNT": event.amount ?? "",
            "PAYOP_CURRENCY": event.currency ?? "",
            "PAYOP_ATTEMPT": String(attempt),
            "PAYOP_HOOK_NAME": hook.name,
        ]
    }
}

/// How one run ended.
public struct HookResult: Sendable, Equatable {
    public enum Outcome: Sendable, Equatable {
        case delivered
        /// Try again later; `retryAfterMilliseconds` when the endpoint asked for a delay (429/503).
        case failed(retryAfterMilliseconds: Int64?)
        /// The endpoint said 410 Gone: no more tries, the delivery is dead until replayed.
        case gone
    }

    public var outcome: Outcome
    public var exitCode: Int?
    public var httpStatus: Int?
    public var error: String?
    /// Captured output (stdout and stderr, or the response body), bounded by `HookResult.maxOutputBytes`.
    public var output: String

    public static let maxOutputBytes = 16 * 1024

    public init(outcome: Outcome, exitCode: Int? = nil, httpStatus: Int? = nil, error: String? = nil, output: String = "")
    {
        self.outcome = outcome
        self.exitCode = exitCode
        self.httpStatus = httpStatus
        self.error = error
        self.output = output
    }
}

/// The hook boundary: real processes and loopback HTTP in production, a fake in unit tests.
public protocol HookRunner: Sendable {
    func run(_ invocation: HookInvocation) async -> HookResult
}

/// Runs each hook the way its configuration says: a command, or a url.
public struct LocalHookRunner: HookRunner {
    public var commands: CommandHookRunner
    public var urls: URLHookRunner

    public init(commands: CommandHookRunner, urls: URLHookRunner) {
        self.commands = commands
        self.urls = urls
    }

    public func run(_ invocation: HookInvocation) async -> HookResult {
        switch invocation.hook.target {
        case .command: await commands.run(invocation)
        case .url: await urls.run(invocation)
        }
    }
}

/// Keeps the first `limit` bytes of a stream and counts the rest.
struct BoundedCapture {
    let limit: Int
    private(set) var bytes: [UInt8] = []
    private(set) var dropped = 0

    init(limit: Int = HookResult.maxOutputBytes) { self.limit = limit }

    mutating func append(_ chunk: some Collection<UInt8>) {
        let room = max(0, limit - bytes.count)
        bytes.append(contentsOf: chunk.prefix(room))
        dropped += max(0, chunk.count - room)
    }

    var text: String {
        let kept = String(decoding: bytes, as: UTF8.self)
        return dropped > 0 ? kept + "\n[... \(dropped) more bytes not kept]" : kept
    }
}
