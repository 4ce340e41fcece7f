import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// How deliveries are retried and stopped (config `delivery.*`).
public struct DeliveryPolicy: Sendable {
    public var backoff: Backoff
    public var killGraceSeconds: Double
    public var shutdownGraceSeconds: Double
    /// Runs of one hook at once.
    public var perHookConcurrency: Int

    public init(backoff: Backoff, killGraceSeconds: Double, shutdownGraceSeconds: Double, perHookConcurrency: Int = 16) {
        self.backoff = backoff
        self.killGraceSeconds = killGraceSeconds
        self.shutdownGraceSeconds = shutdownGraceSeconds
        self.perHookConcurrency = perHookConcurrency
    }

    public init(_ config: DaemonConfig, jitter: @escaping @Sendable () -> Double = Backoff.randomJitter) {
        self.init(
            backoff: Backoff(
                initialSeconds: config.delivery.retryInitialSeconds, maxSeconds: config.delivery.retryMaxSeconds,
                jitter: jitter),
            killGraceSeconds: config.delivery.killGraceSeconds, shutdownGraceSeconds: config.delivery.shutdownGraceSeconds)
    }
}

/// Runs due deliveries: at least once, in order per (hook, kind, entity), a bounded number per hook at
/// a time, retried with capped exponential backoff until `max_attempts`, then dead until replayed.
/// Wakes on new work (a verified event, a finished run) and on the next due time.
public final class Dispatcher: Sendable {
    private let log: SQLiteEventLog
    private let runner: any HookRunner
    private let policy: Mutex<DeliveryPolicy>
    private let clock: any WallClock
    private let logger: Logger
    public let signal = WorkSignal()
    private let inFlight = Mutex<[Int64: String]>([:])
    /// Deliveries handed over right after their event was verified, with the event: started without
    /// looking either up again.
    private let inbox = Mutex<[(Delivery, Event)]>([])
    /// How often the log is looked at even without a signal: `replay` from another process lands in the
    /// log without waking us.
    static let idleRecheck: Duration = .seconds(1)
    private let metrics: DaemonMetrics?

    public init(
        log: SQLiteEventLog, runner: any HookRunner, policy: DeliveryPolicy, clock: any WallClock = SystemWallClock(),
        logger: Logger, metrics: DaemonMetrics? = nil
    ) {
        self.metrics = metrics
        self.log = log
        self.runner = runner
        self.policy = Mutex(policy)
        self.clock = clock
        self.logger = logger
    }

    public func reload(_ newPolicy: DeliveryPolicy) { policy.withLock { $0 = newPolicy } }

    public var running: Int { inFlight.withLock { $0.count } }

    /// Hands over freshly verified events' deliveries (already durable, pending in the log).
    public func submit(_ verified: [VerifiedEvent]) {
        let ready = verified.flatMap { item in item.readyDeliveries.map { ($0, item.event) } }
        // Past the limit they are left to the log, where they are pending anyway: memory stays bounded.
        if !ready.isEmpty {
            inbox.withLock { inbox in
                inbox.append(contentsOf: ready.prefix(max(0, Self.inboxLimit - inbox.count)))
            }
        }
        signal.signal()
    }

    static let inboxLimit = 1024

    /// Starts what was handed over, else what is due now in the log, through `spawn`; returns how many
    /// were started. A handed-over delivery the per-hook limit turns away is not lost: it is pending in
    /// the log and a later pass finds it.
    func startDue(spawn: (Delivery, Int, Event?) -> Void) async throws(EventLogError) -> Int {
        let hooks = Dictionary(log.hooks.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let limit = policy.withLock { $0.perHookConcurrency }
        let handedOver = inbox.withLock { inbox in
            let taken = Array(inbox.prefix(64))
            inbox.removeFirst(taken.count)
            return taken
        }
        let due: [(Delivery, Event?)] =
            handedOver.isEmpty
            ? try await log.dueDeliveries(now: clock.nowMilliseconds(), limit: 64).map { ($0, nil) }
            : handedOver.map { ($0.0, $0.1) }
        var started = 0
        for (delivery, event) in due {
            guard hooks[delivery.hook] != nil else { continue }  // hook removed from the config: it waits
            let admitted = inFlight.withLock { running -> Bool in
                guard running[delivery.id] == nil, running.values.filter({ $0 == delivery.hook }).count < limit else {
                    return false
                }
                running[delivery.id] = delivery.hook
                return true
            }
            guard admitted else { continue }
            spawn(delivery, delivery.attempts + 1, event)
            started += 1
        }
        return started
    }

    /// Runs one delivery's attempt and records how it ended.
    func execute(_ delivery: Delivery, attempt: Int, event known: Event? = nil) async {
        defer {
            inFlight.withLock { _ = $0.removeValue(forKey: delivery.id) }
            signal.signal()
        }
        guard let hook = log.hooks.first(where: { $0.name == delivery.hook }) else { return }
        let policy = policy.withLock { $0 }
        let started = clock.nowMilliseconds()
        // "running" is written beside the run, not before it: a crash before it lands leaves the
        // delivery pending, which runs again just the same. The writer commits in order, so it always
        // lands before the result below.
        async let marked = log.startDelivery(id: delivery.id, attempt: attempt)
        let result: HookResult
        do {
            var event = known
            if event == nil { event = try await log.eventObject(id: delivery.eventID) }
            guard let event else { return }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let body = Array(try encoder.encode(event))
            result = await runner.run(
                HookInvocation(
                    deliveryID: delivery.id, hook: hook, event: event, body: body, attempt: attempt,
                    killGraceSeconds: policy.killGraceSeconds))
        } catch {
            result = HookResult(outcome: .failed(retryAfterMilliseconds: nil), error: "could not prepare the event: \(error)")
        }
        guard (try? await marked) == true else {
            // Replayed or changed by another process while it ran: its new state stands.
            return
        }
        let now = clock.nowMilliseconds()
        let end = Self.end(of: result, attempt: attempt, maxAttempts: hook.maxAttempts, now: now, backoff: policy.backoff)
        let outcome =
            switch end {
            case .delivered: "delivered"
            case .retry: "failed"
            case .dead: "dead"
            }
        metrics?.delivery(hook: hook.name, outcome: outcome, milliseconds: now - started)
        do {
            try await log.finishDelivery(id: delivery.id, attempt: attempt, end, result: result, now: now)
        } catch {
            // Still `running` in the log: it runs again after a restart, as at-least-once requires.
            logger.error("delivery result not recorded", metadata: ["delivery.id": "\(delivery.id)", "error": "\(error)"])
        }
        let metadata: Logger.Metadata = [
            "delivery.id": "\(delivery.id)", "event.id": "\(delivery.eventID)", "hook": "\(delivery.hook)",
            "attempt": "\(attempt)",
        ]
        switch end {
        case .delivered: logger.info("delivered", metadata: metadata)
        case .retry(let at):
            logger.warning(
                "delivery failed; will retry",
                metadata: metadata.merging(
                    ["error": "\(result.error ?? "-")", "retry_at": "\(Timestamp.format(milliseconds: at))"]) { $1 })
        case .dead:
            logger.error(
                "delivery dead: replay it when the hook is fixed",
                metadata: metadata.merging(["error": "\(result.error ?? "-")"]) { $1 })
        }
    }

    static func end(of result: HookResult, attempt: Int, maxAttempts: Int, now: Int64, backoff: Backoff)
        -> SQLiteEventLog.DeliveryEnd
    {
        switch result.outcome {
        case .delivered: return .delivered
        case .gone: return .dead
        case .failed(let retryAfter):
            guard attempt < maxAttempts else { return .dead }
            var delay = backoff.delayMilliseconds(afterAttempt: attempt)
            if let retryAfter, retryAfter > delay {
                delay = min(retryAfter, Int64(backoff.maxSeconds * 1000))
            }
            return .retry(at: now + delay)
        }
    }

    /// Runs everything due now to completion (tests, and a daemon with nothing else to do).
    @discardableResult
    public func dispatchDue() async throws(EventLogError) -> Int {
        var total = 0
        while true {
            var spawned: [(Delivery, Int, Event?)] = []
            let started = try await startDue { spawned.append(($0, $1, $2)) }
            await withDiscardingTaskGroup { group in
                for (delivery, attempt, event) in spawned {
                    group.addTask { await self.execute(delivery, attempt: attempt, event: event) }
                }
            }
            total += started
            if started == 0 { return total }
        }
    }

    public func nextDue() async -> Int64? {
        if inbox.withLock({ !$0.isEmpty }) { return clock.nowMilliseconds() }
        return try? await log.nextDeliveryDue()
    }
}

/// The dispatcher as a long-running service: hook runs are child tasks of this service; on shutdown no
/// new run starts, running hooks get `shutdown_grace_seconds`, then they are stopped (their process
/// groups terminated) and run again at the next start.
struct DispatcherService: Service {
    let dispatcher: Dispatcher
    let clock: any WallClock
    let logger: Logger
    let shutdownGrace: Duration

    func run() async throws {
        await withDiscardingTaskGroup { group in
            await withGracefulShutdownHandler {
                var failing = false
                while !Task.isCancelled && !Task.isShuttingDownGracefully {
                    var timeout = Dispatcher.idleRecheck
                    do {
                        _ = try await dispatcher.startDue { delivery, attempt, event in
                            group.addTask { await dispatcher.execute(delivery, attempt: attempt, event: event) }
                        }
                        if let next = await dispatcher.nextDue() {
                            timeout = min(timeout, .milliseconds(max(0, next - clock.nowMilliseconds())))
                        }
                        failing = false
                    } catch {
                        if Task.isCancelled { break }
                        if !failing { logger.error("dispatcher pass failed; retrying", metadata: ["error": "\(error)"]) }
                        failing = true
                    }
                    await dispatcher.signal.wait(timeout: timeout)
                }
            } onGracefulShutdown: {
                dispatcher.signal.signal()
            }
            // Shutting down: give running hooks their grace, then stop them.
            let deadline = ContinuousClock.now + shutdownGrace
            while dispatcher.running > 0, ContinuousClock.now < deadline {
                await dispatcher.signal.wait(timeout: deadline - ContinuousClock.now)
            }
            if dispatcher.running > 0 {
                logger.warning("stopping hooks still running after the shutdown grace", metadata: ["count": "\(dispatcher.running)"])
                group.cancelAll()
            }
        }
    }
}
