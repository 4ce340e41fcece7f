import CoreMetrics
import Foundation
import Prometheus
import Synchronization

/// The daemon's metrics through swift-metrics, kept in one Prometheus registry per daemon (so tests
/// get their own). Every name starts with `payop_ipnd_`.
public final class DaemonMetrics: IngressMetrics, VerificationMetrics, DeliveryMetrics, StorageMetrics, Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    /// Every labelled metric made once and kept: making one asks the registry, which hashes its label
    /// and dimensions under a lock (about 2 % of the daemon's CPU while a backlog drained, when each
    /// delivery made its latency timer anew).
    let counters = MetricCache<CoreMetrics.Counter>()
    let timers = MetricCache<CoreMetrics.Timer>()
    private let gauges = MetricCache<CoreMetrics.Gauge>()
    private let lastIPN: CoreMetrics.Gauge
    private let backlog: CoreMetrics.Gauge
    private let dead: CoreMetrics.Gauge
    private let orphaned: CoreMetrics.Gauge
    private let verificationLatency: CoreMetrics.Timer
    private let startTime: CoreMetrics.Gauge
    /// IPNs answered 200, by kind: made up front, since one is counted per IPN on the log's writer
    /// thread, where the cache's lookup (its key built, hashed and found under a lock) showed at ingest.
    private let acceptedIPNs: [IPNKind: CoreMetrics.Counter]

    public init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
            .seconds(30), .seconds(60), .seconds(300),
        ]
        self.factory = factory
        lastIPN = Gauge(label: "payop_ipnd_last_ipn_timestamp_seconds", factory: factory)
        backlog = Gauge(label: "payop_ipnd_delivery_backlog", factory: factory)
        dead = Gauge(label: "payop_ipnd_dead_deliveries", factory: factory)
        orphaned = Gauge(label: "payop_ipnd_orphaned_deliveries", factory: factory)
        verificationLatency = Timer(label: "payop_ipnd_verification_latency_seconds", factory: factory)
        startTime = Gauge(label: "payop_ipnd_start_time_seconds", factory: factory)
        startTime.record(Date().timeIntervalSince1970)
        let counters = counters
        acceptedIPNs = Dictionary(uniqueKeysWithValues: IPNKind.allCases.map { kind in
            let dimensions = [("kind", kind.rawValue), ("answer", "200")]
            return (kind, counters.metric(Self.ipnRequests, dimensions) {
                Counter(label: Self.ipnRequests, dimensions: dimensions, factory: factory)
            })
        })
    }

    private static let ipnRequests = "payop_ipnd_ipn_requests_total"

    private func count(_ label: String, _ dimensions: [(String, String)], by amount: Int = 1) {
        counters.metric(label, dimensions) { Counter(label: label, dimensions: dimensions, factory: factory) }
            .increment(by: amount)
    }

    private func timer(_ label: String, _ dimensions: [(String, String)] = []) -> CoreMetrics.Timer {
        timers.metric(label, dimensions) { Timer(label: label, dimensions: dimensions, factory: factory) }
    }

    private func gauge(_ label: String) -> CoreMetrics.Gauge {
        gauges.metric(label, []) { Gauge(label: label, factory: factory) }
    }

    /// One IPN request answered; `kind` is nil when the body was not understood.
    public func ipn(kind: String?, answer: Int) {
        if answer == 200, let kind = kind.flatMap(IPNKind.init(rawValue:)), let accepted = acceptedIPNs[kind] {
            accepted.increment()
        } else {
            count(Self.ipnRequests, [("kind", kind ?? "unknown"), ("answer", String(answer))])
        }
        if answer == 200 { lastIPN.record(Date().timeIntervalSince1970) }
    }

    public func eventCreated(type: String) {
        count("payop_ipnd_events_total", [("type", type)])
    }

    public func verification(outcome: String, latencyMilliseconds: Int64?) {
        count("payop_ipnd_verifications_total", [("outcome", outcome)])
        if let latencyMilliseconds { verificationLatency.recordMilliseconds(latencyMilliseconds) }
    }

    public func payopError(code: String) {
        count("payop_ipnd_payop_api_errors_total", [("code", code)])
    }

    public func payopRequest(endpoint: String, early: Bool) {
        count("payop_ipnd_payop_requests_total", [("endpoint", endpoint), ("asked", early ? "on_arrival" : "when_due")])
    }

    public func delivery(hook: String, outcome: String, milliseconds: Int64) {
        count("payop_ipnd_deliveries_total", [("hook", hook), ("outcome", outcome)])
        timer("payop_ipnd_delivery_latency_seconds", [("hook", hook)]).recordMilliseconds(milliseconds)
    }

    /// Pending deliveries of hooks no longer configured.
    public func orphanedDeliveries(_ count: Int) {
        orphaned.record(count)
    }

    func deliveryBacklog(pending: Int, dead deadCount: Int) {
        backlog.record(pending)
        dead.record(deadCount)
    }

    // A shared (PostgreSQL) log's pool and claims.

    public func storageConnections(inUse: Int, poolSize: Int) {
        gauge("payop_ipnd_storage_connections_in_use").record(inUse)
        gauge("payop_ipnd_storage_pool_size").record(poolSize)
    }

    public func storageConnectionWait(milliseconds: Int64) {
        timer("payop_ipnd_storage_connection_wait_seconds").recordMilliseconds(milliseconds)
    }

    public func storageClaim(_ what: String, milliseconds: Int64) {
        timer("payop_ipnd_storage_claim_seconds", [("what", what)]).recordMilliseconds(milliseconds)
    }

    public func reconcileLeader(_ leader: Bool) {
        gauge("payop_ipnd_reconcile_leader").record(leader ? 1 : 0)
    }

    /// The Prometheus text exposition.
    public func render() -> String { registry.emitToString() }
}

/// Metrics of one kind by label and dimension values, each made on first use. A label's dimension
/// names never vary here, so its values alone tell its metrics apart.
final class MetricCache<Metric: AnyObject & Sendable>: Sendable {
    private struct Key: Hashable {
        let label: String
        let values: [String]
    }
    private let metrics = Mutex<[Key: Metric]>([:])

    func metric(_ label: String, _ dimensions: [(String, String)], make: () -> Metric) -> Metric {
        let key = Key(label: label, values: dimensions.map(\.1))
        return metrics.withLock { cache in
            if let metric = cache[key] { return metric }
            let metric = make()
            cache[key] = metric
            return metric
        }
    }

    var count: Int { metrics.withLock { $0.count } }
}
