import Foundation
import Logging
import Synchronization
import Testing

@testable import PayopIPND

/// A clock the test moves by hand.
final class TestClock: WallClock {
    private let now: Mutex<Int64>
    init(_ start: Int64 = 1_795_000_000_000) { now = Mutex(start) }
    func nowMilliseconds() -> Int64 { now.withLock { $0 } }
    func advance(milliseconds: Int64) { now.withLock { $0 += milliseconds } }
}

/// The event store boundary, in memory: counts what it was asked and can be told to fail.
final class FakeEventStore: EventStore {
    struct State {
        var ingested: [IncomingIPN] = []
        var refused: [RefusedIPN] = []
        var failing = false
    }

    let state = Mutex(State())

    func ingest(_ ipn: IncomingIPN, completion: @escaping @Sendable (Result<IngestOutcome, EventLogError>) -> Void) {
        let result = state.withLock { state -> Result<IngestOutcome, EventLogError> in
            if state.failing { return .failure(EventLogError(.unavailable, "disk full (fake)")) }
            let duplicate = state.ingested.contains {
                $0.notification.kind == ipn.notification.kind && $0.notification.entityID == ipn.notification.entityID
                    && $0.notification.status == ipn.notification.status
            }
            state.ingested.append(ipn)
            return .success(IngestOutcome(receiptID: Int64(state.ingested.count), eventID: "evt_fake", duplicate: duplicate))
        }
        completion(result)
    }

    func recordRefused(_ refused: RefusedIPN, completion: @escaping @Sendable (EventLogError?) -> Void) {
        state.withLock { $0.refused.append(refused) }
        completion(nil)
    }

    func setFailing(_ failing: Bool) { state.withLock { $0.failing = failing } }
    var ingested: [IncomingIPN] { state.withLock { $0.ingested } }
    var refused: [RefusedIPN] { state.withLock { $0.refused } }
}

enum Samples {
    static func data(_ name: String) throws -> [UInt8] {
        let url = try #require(Bundle.module.url(forResource: name, withExtension: "json", subdirectory: "Samples"))
        return Array(try Data(contentsOf: url))
    }
}

/// A fresh directory under the system's temporary folder, removed when the test ends.
final class TemporaryDirectory: Sendable {
    let path: String

    /// `preferMemory`: under /dev/shm where it exists, for tests that commit thousands of times (the
    /// file is still a real SQLite file; only the fsyncs are free).
    init(preferMemory: Bool = false) throws {
        let base =
            preferMemory && FileManager.default.fileExists(atPath: "/dev/shm")
            ? URL(fileURLWithPath: "/dev/shm") : FileManager.default.temporaryDirectory
        let url = base.appendingPathComponent("payop-ipnd-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        path = url.path
    }

    func file(_ name: String) -> String { path + "/" + name }

    func write(_ name: String, _ text: String, mode: Int = 0o600) throws -> String {
        let path = file(name)
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: path)
        return path
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

let quietLogger: Logger = {
    var logger = Logger(label: "payop-ipnd.tests", factory: { _ in SwiftLogNoOpLogHandler() })
    logger.logLevel = .critical
    return logger
}()

/// The legacy V1 secret of the signature test vectors (README, Payop's side).
let vectorSecret = "s3cr3t"

func ingressSettings(
    maxBodyBytes: Int = 65536, allowed: SourcePolicy.Allowed = .any, proxies: [CIDR] = [],
    secret: String? = vectorSecret
) -> IngressSettings {
    IngressSettings(
        paths: ["/payop/ipn"], maxBodyBytes: maxBodyBytes,
        sources: SourcePolicy(allowed: allowed, trustedProxies: proxies), legacySecretKey: secret)
}

func checkoutBody(transaction: String, state: Int, message: String = "") -> [UInt8] {
    Array(
        """
        {"invoice":{"id":"inv-\(transaction)","status":1,"txid":"\(transaction)"},
         "transaction":{"id":"\(transaction)","state":\(state),"order":{"id":"order-\(transaction)"},
                        "error":{"message":"\(message)","code":""}}}
        """.utf8)
}

/// The Payop API boundary, in memory: every checkout it is asked about is paid, and it counts questions.
final class FakePayop: PayopAPI {
    let asked = Mutex(0)

    func lookup(_ kind: IPNKind, id: String) async throws(PayopError) -> PayopRecord? {
        asked.withLock { $0 += 1 }
        return PayopRecord(kind: kind, id: id, status: .status(kind: kind, state: 2, errorMessage: nil))
    }

    func lookupTransactions(ids: [String]) async throws(PayopError) -> [PayopRecord] {
        var records: [PayopRecord] = []
        for id in ids { if let record = try await lookup(.checkout, id: id) { records.append(record) } }
        return records
    }
}

/// Tests that measure time on the real network stack take the machine for themselves; the heaviest
/// CPU users (the model-based scenarios) wait for them, so a timing is not a measure of the other tests.
actor ExclusiveTiming {
    static let shared = ExclusiveTiming()
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func run<T: Sendable>(_ body: @Sendable () async throws -> T) async rethrows -> T {
        while busy { await withCheckedContinuation { waiters.append($0) } }
        busy = true
        defer {
            busy = false
            if !waiters.isEmpty { waiters.removeFirst().resume() }
        }
        return try await body()
    }
}

/// A process's `/proc/PID/stat`: its name, and the fields after it (`fields[0]` is the state, `fields[1]`
/// the parent's id, `fields[11]` and `fields[12]` the user and system ticks). Nil when the process is
/// gone (reaped) or the file cannot be read.
struct ProcessStat {
    let name: Substring
    let fields: [Substring]

    init?(_ pid: some CustomStringConvertible) {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")")
        else { return nil }
        name = stat[stat.index(after: open)..<close]
        fields = stat[stat.index(after: close)...].split(separator: " ")
    }

    var isZombie: Bool { fields.first == "Z" }
    var parent: Int32? { fields.count > 1 ? Int32(fields[1]) : nil }
}

/// A `/proc/.../status` file's fields ("Name:<tab>value" lines): a process's or a thread's.
struct ProcessStatus {
    let fields: [Substring: Substring]

    init(text: String) {
        fields = Dictionary(
            text.split(separator: "\n").compactMap { line in
                guard let colon = line.firstIndex(of: ":") else { return nil }
                return (line[..<colon], line[line.index(after: colon)...].drop { $0 == "\t" || $0 == " " })
            }, uniquingKeysWith: { first, _ in first })
    }

    /// `/proc/<path>/status`, e.g. `self`, `123` or `123/task/124`; nil when it cannot be read.
    init?(_ path: some CustomStringConvertible) {
        guard let text = try? String(contentsOfFile: "/proc/\(path)/status", encoding: .utf8) else { return nil }
        self.init(text: text)
    }

    /// A signal mask field (`SigBlk`, `SigIgn`, ...).
    func mask(_ field: Substring) -> UInt64? { fields[field].flatMap { UInt64($0, radix: 16) } }
    /// Context switches so far, voluntary and not.
    var switches: Int? {
        guard let voluntary = fields["voluntary_ctxt_switches"].flatMap({ Int($0) }),
            let preempted = fields["nonvoluntary_ctxt_switches"].flatMap({ Int($0) })
        else { return nil }
        return voluntary + preempted
    }
}

/// The calling OS thread's name (or that of thread `task` of this process), as `/proc` has it.
func threadName(task: String? = nil) -> String {
    let path = task.map { "/proc/self/task/\($0)/comm" } ?? "/proc/thread-self/comm"
    return ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").trimmingCharacters(in: .newlines)
}
