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
}

/// What the dispatcher reports; the daemon's Prometheus metrics in production.
public protocol DeliveryMetrics: Sendable {
    func delivery(hook: String, outcome: String, milliseconds: Int64)
    func orphanedDeliveries(_ count: Int)
}

/// Runs due deliveries: at least once, in order per (hook, kind, entity), a bounded number per hook at
/// a time, retried with capped exponential backoff until `max_attempts`, then dead until replayed.
///
/// A run starts only after the log has recorded it as running (`claimDelivery`); when the log cannot
/// be written nothing starts and the caller backs off. How a run ended is written until the log takes
/// it, never dropped. What is asked of the log is only work that can run now: deliveries of configured
/// hooks that are not at their limit, first in line for their entity.
public final class Dispatcher: Sendable {
    private let store: any DeliveryStore
    private let runner: any HookRunner
    private let hooks: @Sendable () -> [HookConfig]
    private let policy: Mutex<DeliveryPolicy>
    private let clock: any WallClock
    private let logger: Logger
    private let metrics: (any DeliveryMetrics)?
    /// Waits between tries to record an outcome while the log cannot be written; injected in tests.
    private let pause: @Sendable (Duration) async -> Void
    /// Wakes the dispatcher: new work in the log, or a run ended.
    public let signal: WorkSignal
    /// Runs of this dispatcher, from their claim until their outcome is written: delivery id -> the
    /// run. A run whose hook has exited keeps its entry until the outcome is written, so that it is never
    /// claimed again meanwhile (a shared log's lease may lapse while the log is unreachable).
    private let inFlight = Mutex<[Int64: Run]>([:])
    private struct Run {
        var hook: String
        /// It counts against the hook's limit: from its claim until its hook exits, or, when the log
        /// hands slots over, until the outcome's transaction gives the slot on (`handOver`).
        var slot = true
        /// Its process runs, or is about to (what shutdown waits for): until its hook exits.
        var process = true
    }
    private let orphans = Mutex<[String: Int]>([:])
    /// Runs the log claims itself (`EarlyStarts`): admitted only while the dispatcher runs, and started
    /// once their claims are on disk: on a hook reaper by its launcher (`RunLauncher`, while the service
    /// runs), else by the dispatcher's next pass; or, when a run that ended handed them its slot, by that
    /// run's task.
    private let early = Mutex(EarlyRuns())
    private struct EarlyRuns {
        var open = false
        /// Hooks whose last pass took every run that was due: only these admit a run claimed early, so
        /// that a fresh event never takes a slot a due retry (or any older run) is waiting for.
        var caughtUp: Set<String> = []
        /// Per hook, how often an admission was refused at the limit (a run now waits for a slot): a
        /// pass that started before a refusal cannot declare the hook caught up.
        var refusals: [String: Int] = [:]
        /// Admitted, claim not yet committed: delivery id -> its hook.
        var admitted: [Int64: String] = [:]
        /// Committed, waiting for the dispatcher's pass to start them (no launchers: tests' passes).
        var claimed: [DeliveryClaim] = []
        /// One per hook reaper while the service runs: they start what is committed.
        var launchers: [RunLauncher] = []
        /// Handed a slot by a run that ended (`handOver`), claim not yet committed: its id -> that run's.
        var successors: [Int64: Int64] = [:]
        /// Committed, waiting for the task of the run that handed them its slot: that run's id -> claim.
        var handedOn: [Int64: DeliveryClaim] = [:]
    }
    /// Deliveries looked at per pass.
    static let batch = 64

    public init(
        store: any DeliveryStore, runner: any HookRunner, hooks: @escaping @Sendable () -> [HookConfig],
        policy: DeliveryPolicy, clock: any WallClock = SystemWallClock(), logger: Logger,
        metrics: (any DeliveryMetrics)? = nil, signal: WorkSignal = WorkSignal(),
        pause: @escaping @Sendable (Duration) async -> Void = { try? await Task.sleep(for: $0) }
    ) {
        self.signal = signal
        self.store = store
        self.runner = runner
        self.hooks = hooks
        self.policy = Mutex(policy)
        self.clock = clock
        self.logger = logger
        self.metrics = metrics
        self.pause = pause
    }

    public func reload(_ newPolicy: DeliveryPolicy) { policy.withLock { $0 = newPolicy } }

    /// Runs in progress: hooks running, and outcomes being written.
    public var running: Int { inFlight.withLock { $0.count } }
    /// Hook processes running now (what shutdown waits for, then stops).
    public var runningHooks: Int { inFlight.withLock { $0.values.count(where: \.process) } }

    /// Runs of `hook` that hold one of its slots.
    private static func busy(_ runs: [Int64: Run], _ hook: String) -> Int {
        runs.values.count { $0.hook == hook && $0.slot }
    }

    /// Whether `hook` may start another run now.
    func hasFreeSlot(_ hook: String) -> Bool {
        let limit = policy.withLock { $0.perHookConcurrency }
        return inFlight.withLock { Self.busy($0, hook) < limit }
    }

    /// Configured hooks that may start another run now, and how many runs they may start together.
    private func openHooks() -> (hooks: [String: HookConfig], free: Int) {
        let limit = policy.withLock { $0.perHookConcurrency }
        let busy = inFlight.withLock { runs in
            Dictionary(runs.values.filter(\.slot).map { ($0.hook, 1) }, uniquingKeysWith: +)
        }
        var open: [String: HookConfig] = [:]
        var free = 0
        for hook in hooks() where open[hook.name] == nil && busy[hook.name, default: 0] < limit {
            open[hook.name] = hook
            free += limit - busy[hook.name, default: 0]
        }
        return (open, free)
    }

    /// Claims what can run now and hands each claimed run to `spawn`; returns how many were started.
    /// The claims are written together (one group commit on SQLite, not one fsync after another), and
    /// runs are handed to `spawn` in the log's order. Throws when the log cannot record a start: what
    /// was claimed still runs, nothing else is started in this pass.
    func startDue(spawn: (DeliveryClaim, HookConfig) -> Void) async throws(EventLogError) -> Int {
        let startedEarly = await startClaimedEarly(spawn: spawn)
        let (open, free) = openHooks()
        let configuredNames = Set(hooks().map(\.name))
        early.withLock { $0.caughtUp.formIntersection(configuredNames) }
        guard !open.isEmpty else { return startedEarly }
        let limit = policy.withLock { $0.perHookConcurrency }
        let now = clock.nowMilliseconds()
        var admitted: [(id: Int64, hook: HookConfig)] = []
        // No more than can start: on a backlog a run ends, one slot frees, and the pass reads one row
        // instead of a batch it would mostly leave.
        let wanted = min(Self.batch, free)
        let refusalsBefore = early.withLock { $0.refusals }
        let runnable = try await store.runnableDeliveries(now: now, hooks: Array(open.keys), limit: wanted)
        var leftBehind = Set<String>()
        for delivery in runnable {
            guard let hook = open[delivery.hook] else { continue }
            if take(delivery.id, hook: hook.name, limit: limit) {
                admitted.append((delivery.id, hook))
            } else {
                leftBehind.insert(hook.name)
            }
        }
        // A hook is caught up when this pass saw all of its due runs (fewer rows than asked for), took
        // every one, and no run was refused a slot meanwhile. Hooks no longer configured are forgotten
        // (added back, their waiting runs come first).
        early.withLock { runs in
            for name in open.keys {
                if runnable.count < wanted, !leftBehind.contains(name), runs.refusals[name] == refusalsBefore[name] {
                    runs.caughtUp.insert(name)
                } else {
                    runs.caughtUp.remove(name)
                }
            }
        }
        let claims = await withTaskGroup(of: (Int, Result<DeliveryClaim?, EventLogError>).self) { group in
            for (index, candidate) in admitted.enumerated() {
                group.addTask { [store, clock] () async -> (Int, Result<DeliveryClaim?, EventLogError>) in
                    do throws(EventLogError) {
                        return (index, .success(try await store.claimDelivery(id: candidate.id, now: clock.nowMilliseconds())))
                    } catch {
                        return (index, .failure(error))
                    }
                }
            }
            var results = [Result<DeliveryClaim?, EventLogError>?](repeating: nil, count: admitted.count)
            for await (index, result) in group { results[index] = result }
            return results
        }
        var started = startedEarly
        var failure: EventLogError?
        for (candidate, result) in zip(admitted, claims) {
            switch result {
            case .success(let claim?):
                spawn(claim, candidate.hook)
                started += 1
            case .success(nil), nil:
                release(candidate.id)
            case .failure(let error):
                release(candidate.id)
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
        return started
    }

    private func release(_ id: Int64) {
        inFlight.withLock { _ = $0.removeValue(forKey: id) }
    }

    /// Takes a run slot of `hook` for delivery `id`, unless the hook is at `limit` or the delivery is
    /// in flight already.
    private func take(_ id: Int64, hook: String, limit: Int) -> Bool {
        inFlight.withLock { Self.take(id, hook: hook, limit: limit, in: &$0) }
    }

    /// `take`'s rule, inside the caller's hold of `inFlight`.
    private static func take(_ id: Int64, hook: String, limit: Int, in runs: inout [Int64: Run]) -> Bool {
        guard runs[id] == nil, busy(runs, hook) < limit else { return false }
        runs[id] = Run(hook: hook)
        return true
    }

    /// Starts the runs the log claimed for us (`EarlyStarts`) with their hooks as configured now; a run
    /// whose hook a reload removed meanwhile is recorded interrupted instead (it waits for its hook).
    private func startClaimedEarly(spawn: (DeliveryClaim, HookConfig) -> Void) async -> Int {
        let claimed = early.withLock { runs in
            defer { runs.claimed.removeAll() }
            return runs.claimed
        }
        guard !claimed.isEmpty else { return 0 }
        let (startable, removed) = withTheirHooks(claimed)
        for (claim, hook) in startable { spawn(claim, hook) }
        await interruptUnstarted(removed)
        return startable.count
    }

    /// `claims` with their hooks as configured now, and those whose hook a reload removed meanwhile.
    private func withTheirHooks(_ claims: [DeliveryClaim]) -> ([(DeliveryClaim, HookConfig)], removed: [DeliveryClaim]) {
        let configured = Dictionary(hooks().map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var startable: [(DeliveryClaim, HookConfig)] = []
        var removed: [DeliveryClaim] = []
        for claim in claims {
            if let hook = configured[claim.delivery.hook] { startable.append((claim, hook)) } else { removed.append(claim) }
        }
        return (startable, removed)
    }

    /// Starts, on `launcher`'s reaper, the runs committed claims hand it, until it is closed (the
    /// dispatcher stops starting runs) or this task is cancelled; returns once those runs have ended.
    func launchRuns(from launcher: RunLauncher) async {
        await withDiscardingTaskGroup { group in
            while let claims = await launcher.next() {
                // Taken once the dispatcher stopped starting runs, or its task cancelled: none starts (as in
                // `successor`). A stop right after this check is as for a pass's runs: they get the grace.
                let go = !Task.isCancelled && early.withLock { $0.open }
                let (startable, removed) = go ? withTheirHooks(claims) : ([], claims)
                for (claim, hook) in startable { addRun(claim, hook, on: launcher.reaper, to: &group) }
                launcher.reaper.runEnded(removed.count)
                if !removed.isEmpty { group.addTask { await self.interruptUnstarted(removed) } }
            }
        }
    }

    /// Lets the log claim runs itself from now on (`EarlyStarts`), started by `launchers` (one per hook
    /// reaper, each with a task in `launchRuns`) or else by the dispatcher's passes; or no longer.
    /// Closing closes the launchers, and returns what was claimed but not started yet: the caller records
    /// it as interrupted.
    func acceptEarlyStarts(_ accept: Bool, launchers: [RunLauncher] = []) -> [DeliveryClaim] {
        // Launchers are closed under `early`'s lock, which `start` holds while it hands them claims: a claim
        // committed while runs are being started is either handed back here or taken by a launcher's task.
        let (unstarted, wakes) = early.withLock { runs -> ([DeliveryClaim], [RunLauncher.Wake]) in
            precondition(!accept || runs.launchers.isEmpty, "launchers replaced without being closed")
            runs.open = accept
            guard !accept else {
                runs.launchers = launchers
                return ([], [])
            }
            defer {
                runs.claimed.removeAll()
                runs.handedOn.removeAll()
                runs.launchers.removeAll()
            }
            var unstarted = runs.claimed + runs.handedOn.sorted { $0.key < $1.key }.map(\.value)
            var wakes: [RunLauncher.Wake] = []
            for launcher in runs.launchers {
                let (left, wake) = launcher.close()
                launcher.reaper.runEnded(left.count)
                unstarted += left
                wakes.append(wake)
            }
            return (unstarted, wakes)
        }
        for wake in wakes { wake.resume() }
        return unstarted
    }

    /// Claims that were never started (the daemon's own shutdown, a hook removed meanwhile): pending
    /// again, the attempt not spent, as for a run the shutdown stopped; written together. A claim not
    /// recorded so stays running and runs again at the next start.
    func interruptUnstarted(_ claims: [DeliveryClaim]) async {
        guard !claims.isEmpty else { return }
        // No process runs for them: shutdown's grace does not wait for these.
        inFlight.withLock { runs in
            for claim in claims {
                runs[claim.delivery.id]?.slot = false
                runs[claim.delivery.id]?.process = false
            }
        }
        await withDiscardingTaskGroup { group in
            for claim in claims {
                group.addTask { [self] in
                    let metadata: Logger.Metadata = ["delivery.id": "\(claim.delivery.id)", "attempt": "\(claim.attempt)"]
                    _ = await persist("interrupted run", metadata) { [store, clock] () async throws(EventLogError) in
                        try await store.interruptDelivery(
                            id: claim.delivery.id, attempt: claim.attempt, now: clock.nowMilliseconds())
                    }
                    release(claim.delivery.id)
                }
            }
        }
        signal.signal()
    }

    /// Runs `claim` (and the runs its outcome hands its slot to) in a task of `group` that executes on
    /// a thread that learns of hooks' exits (`ProcessReaper`): the task waiting for its hook goes on at
    /// once, on that thread, and no pool thread is woken per delivery.
    /// `chained` gets how many runs it started after the first.
    func addRun(
        _ claim: DeliveryClaim, _ hook: HookConfig, on reaper: ProcessReaper = .forNextRun(),
        to group: inout DiscardingTaskGroup, chained: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        group.addTask(executorPreference: reaper) {
            defer { reaper.runEnded() }
            chained(await self.run(claim, hook: hook))
        }
    }

    /// Runs a claimed attempt, then each run the outcome's commit handed its slot to (`handOver`), in
    /// this same task: a backlog drains without a pass of the dispatcher between two runs of a slot.
    /// Returns how many runs it started after the first.
    @discardableResult
    func run(_ claim: DeliveryClaim, hook: HookConfig) async -> Int {
        var next: (DeliveryClaim, HookConfig)? = (claim, hook)
        var chained = -1
        while let (claim, hook) = next {
            chained += 1
            await execute(claim, hook: hook)
            next = await successor(of: claim.delivery.id)
        }
        return chained
    }

    /// The run that the outcome of run `finished` handed its slot to, committed, with its hook as
    /// configured now. One whose hook a reload removed meanwhile, or that would start while the
    /// dispatcher stops, is recorded interrupted instead (pending again, its attempt not spent).
    func successor(of finished: Int64) async -> (DeliveryClaim, HookConfig)? {
        let (handed, open) = early.withLock { runs in (runs.handedOn.removeValue(forKey: finished), runs.open) }
        guard let claim = handed else { return nil }
        guard open, !Task.isCancelled, let hook = hooks().first(where: { $0.name == claim.delivery.hook }) else {
            await interruptUnstarted([claim])
            return nil
        }
        return (claim, hook)
    }

    /// Runs one claimed attempt and records how it ended. Through `run` only (tests aside): a run this
    /// one's outcome hands its slot to waits for `successor(of:)`.
    func execute(_ claim: DeliveryClaim, hook: HookConfig) async {
        let policy = policy.withLock { $0 }
        let started = clock.nowMilliseconds()
        let invocation = HookInvocation(
            deliveryID: claim.delivery.id, hook: hook, event: claim.event, body: claim.event.hookBody,
            attempt: claim.attempt, killGraceSeconds: policy.killGraceSeconds)
        // On a shared log the claim is a lease, renewed until the outcome is written (not only while the
        // hook runs): an outcome that takes a while to write must not let another daemon run it again.
        let renewals = store.leaseRenewal.map { every in Task { await self.renewWhileRunning(claim, every: every) } }
        defer { renewals?.cancel() }
        let result = await runner.run(invocation)
        let stopping = Task.isCancelled && result.outcome != .delivered
        // The hook has exited. A log that hands slots over gives this one, in the outcome's transaction,
        // to the hook's next due run, claimed in the same commit. Otherwise (stopping, or runs are not
        // being started) the slot is free now for the next run while the outcome is written: the delivery
        // stays `running` in the log until then, so nothing later of its entity overtakes it, and the next
        // claim shares the outcome's group commit instead of waiting for it.
        let freeSlot = { [self] in
            inFlight.withLock { $0[claim.delivery.id]?.slot = false }
            signal.signal()
        }
        // The process is gone before `open` is read: shutdown closes `open` first, then waits for
        // processes, so either it sees this one gone or this run sees it closed and signals it.
        inFlight.withLock { $0[claim.delivery.id]?.process = false }
        let handsOver = !stopping && store.handsOverRunSlots(to: self) && early.withLock { $0.open }
        if !handsOver { freeSlot() }
        defer {
            // Written (or given up at shutdown): a later run of its entity may start now, when a slot of
            // its hook is free. With every slot taken (a backlog, each slot handed on) a pass could start
            // nothing: the next slot to come free wakes it.
            release(claim.delivery.id)
            if hasFreeSlot(hook.name) { signal.signal() }
        }
        var metadata: Logger.Metadata = [
            "delivery.id": "\(claim.delivery.id)", "event.id": "\(claim.delivery.eventID)", "hook": "\(hook.name)",
            "attempt": "\(claim.attempt)",
        ]
        if stopping {
            // Stopped by our own shutdown: the attempt is not spent, and it runs again at the next start.
            await persist("interrupted run", metadata) { [store, clock] () async throws(EventLogError) in
                try await store.interruptDelivery(
                    id: claim.delivery.id, attempt: claim.attempt, now: clock.nowMilliseconds())
            }
            logger.notice("hook stopped by shutdown; it runs again at the next start", metadata: metadata)
            return
        }
        let now = clock.nowMilliseconds()
        let end = await persist("delivery result", metadata) { [store] () async throws(EventLogError) in
            do throws(EventLogError) {
                return try await store.finishDelivery(
                    id: claim.delivery.id, attempt: claim.attempt, result: result, maxAttempts: hook.maxAttempts,
                    backoff: policy.backoff, now: now)
            } catch {
                // Not written (a locked log may take a while): the slot does not wait for it, and the
                // outcome is tried again on its own (`handOver` needs the slot still held).
                freeSlot()
                throw error
            }
        }
        guard let end = end ?? nil else { return }
        if let error = result.error { metadata["error"] = "\(error)" }
        switch end {
        case .delivered:
            metrics?.delivery(hook: hook.name, outcome: "delivered", milliseconds: now - started)
            logger.info("delivered", metadata: metadata)
        case .retry(let at):
            metrics?.delivery(hook: hook.name, outcome: "failed", milliseconds: now - started)
            metadata["retry_at"] = "\(Timestamp.format(milliseconds: at))"
            logger.warning("delivery failed; will retry", metadata: metadata)
        case .dead:
            metrics?.delivery(hook: hook.name, outcome: "dead", milliseconds: now - started)
            logger.error("delivery dead: replay it when the hook is fixed", metadata: metadata)
        }
    }

    /// While a hook runs on a shared log, and until its outcome is written: renews the claim so no other
    /// daemon takes the delivery over as abandoned. A lost claim is logged; the run goes on (at least
    /// once), and its outcome is recorded only if the attempt is still ours.
    private func renewWhileRunning(_ claim: DeliveryClaim, every interval: Duration) async {
        var lost = false
        while !Task.isCancelled {
            await pause(interval)
            if Task.isCancelled { return }
            do {
                let kept = try await store.renewLease(
                    id: claim.delivery.id, attempt: claim.attempt, now: clock.nowMilliseconds())
                if !kept, !lost {
                    lost = true
                    logger.warning(
                        "delivery claim lost while its hook runs: another daemon may run it too",
                        metadata: ["delivery.id": "\(claim.delivery.id)", "attempt": "\(claim.attempt)"])
                }
            } catch {
                logger.warning(
                    "cannot renew the delivery's claim; retrying", metadata: ["delivery.id": "\(claim.delivery.id)", "error": "\(error)"])
            }
        }
    }

    /// Writes until the log takes it: an outcome is never dropped. Gives up only when the log is
    /// closed (the daemon stopping); the delivery is then still `running`, and runs again at the next
    /// start, as at-least-once requires.
    private func persist<T: Sendable>(
        _ what: String, _ metadata: Logger.Metadata, _ write: () async throws(EventLogError) -> T
    ) async -> T? {
        var delay: Duration = .milliseconds(100)
        var logged = false
        while true {
            do {
                let value = try await write()
                if logged { logger.notice("\(what) recorded after all", metadata: metadata) }
                return value
            } catch where error.code == .closed || Task.isCancelled {
                // Closed, or stopping: the delivery is still `running` in the log and runs again at the
                // next start (a pause cannot wait once cancelled, so retrying here would spin).
                logger.error("\(what) not recorded: the daemon is stopping", metadata: metadata)
                return nil
            } catch {
                if !logged {
                    logger.error(
                        "\(what) not recorded yet; retrying until the event log takes it",
                        metadata: metadata.merging(["error": "\(error)"]) { $1 })
                    logged = true
                }
                await pause(delay)
                delay = min(delay * 2, .seconds(30))
            }
        }
    }

    /// Runs everything due now to completion (tests, and a daemon with nothing else to do).
    @discardableResult
    public func dispatchDue() async throws(EventLogError) -> Int {
        var total = 0
        while true {
            var spawned: [(DeliveryClaim, HookConfig)] = []
            let pass: Result<Int, EventLogError>
            do throws(EventLogError) {
                pass = .success(try await startDue { spawned.append(($0, $1)) })
            } catch {
                pass = .failure(error)
            }
            // What was claimed runs, even when a later claim of the pass failed: it is recorded running.
            let chained = Mutex(0)
            await withDiscardingTaskGroup { group in
                for (claim, hook) in spawned {
                    addRun(claim, hook, to: &group) { count in chained.withLock { $0 += count } }
                }
            }
            let started = try pass.get()
            total += started + chained.withLock { $0 }
            if started == 0 { return total }
        }
    }

    /// When the next run could start, if ever: only hooks that may start another run count.
    public func nextDue() async throws(EventLogError) -> Int64? {
        return try await store.nextRunnableDelivery(hooks: Array(openHooks().hooks.keys))
    }

    /// Reports pending deliveries of hooks that are no longer configured (once per change): they wait,
    /// without holding up any other hook, until the hook is configured again.
    public func checkOrphans() async {
        guard let found = try? await store.orphanedDeliveries(configured: hooks().map(\.name)) else { return }
        let changed = orphans.withLock { known in
            defer { known = found }
            return known != found
        }
        metrics?.orphanedDeliveries(found.values.reduce(0, +))
        guard changed else { return }
        for (hook, count) in found.sorted(by: { $0.key < $1.key }) {
            logger.warning(
                "deliveries wait for a hook that is not configured: add it back to hooks, or rename it",
                metadata: ["hook": "\(hook)", "pending": "\(count)"])
        }
    }
}

extension Dispatcher: EarlyStarts {
    public func admit(id: Int64, hook name: String) -> Bool {
        guard early.withLock({ $0.open && $0.caughtUp.contains(name) }), hooks().contains(where: { $0.name == name })
        else { return false }
        guard take(id, hook: name, limit: policy.withLock { $0.perHookConcurrency }) else {
            // At its limit with this run waiting: the next pass takes runs in order, not the next admission.
            early.withLock { runs in
                runs.caughtUp.remove(name)
                runs.refusals[name, default: 0] &+= 1
            }
            return false
        }
        early.withLock { $0.admitted[id] = name }
        return true
    }

    public func withdraw(_ ids: [Int64]) {
        early.withLock { runs in
            for id in ids {
                runs.admitted.removeValue(forKey: id)
                runs.successors.removeValue(forKey: id)
            }
        }
        for id in ids { release(id) }
        signal.signal()
    }

    public func handOver(from finished: Int64, to next: Int64?, hook name: String) -> Bool {
        let open = early.withLock { $0.open } && hooks().contains { $0.name == name }
        let limit = policy.withLock { $0.perHookConcurrency }
        let taken = inFlight.withLock { runs -> Bool in
            // Only a slot still held is given on: not one freed when the hook exited, or by an earlier
            // try of this outcome that failed (the outcome is then written alone).
            guard runs[finished]?.slot == true else { return false }
            runs[finished]?.slot = false
            guard let next, open else { return false }
            return Self.take(next, hook: name, limit: limit, in: &runs)
        }
        guard taken, let next else { return false }
        early.withLock { runs in
            runs.admitted[next] = name
            runs.successors[next] = finished
        }
        return true
    }

    public func holdsSlot(of finished: Int64) -> Bool {
        early.withLock { $0.open } && inFlight.withLock { $0[finished]?.slot == true }
    }

    public func start(_ claims: [DeliveryClaim]) {
        let (late, forThePass, wakes) = early.withLock { runs -> ([DeliveryClaim], Bool, [RunLauncher.Wake]) in
            var late: [DeliveryClaim] = []
            var committed: [DeliveryClaim] = []
            for claim in claims {
                let id = claim.delivery.id
                let admitted = runs.admitted.removeValue(forKey: id) != nil
                assert(admitted, "a run claimed early that was never admitted")
                let finished = runs.successors.removeValue(forKey: id)
                if admitted, let finished {
                    // The task of the run that handed it the slot starts it once that outcome is written,
                    // or, the dispatcher stopping meanwhile, records it interrupted (`successor`): inside
                    // the service's task group, which shutdown waits for.
                    runs.handedOn[finished] = claim
                } else if !runs.open || !admitted {
                    late.append(claim)
                } else {
                    committed.append(claim)
                }
            }
            guard !runs.launchers.isEmpty else {
                runs.claimed += committed
                return (late, !committed.isEmpty, [])
            }
            // Each run to the launcher whose reaper has fewer runs' tasks, all of a launcher's at once (one
            // wake-up, after this lock), queued under this lock: closing (`acceptEarlyStarts`) takes it too.
            // Only a launcher whose task was cancelled refuses them: they wait for the pass instead, and
            // closing hands them back.
            var queued = [[DeliveryClaim]](repeating: [], count: runs.launchers.count)
            let reapers = runs.launchers.map(\.reaper)
            for claim in committed {
                let reaper = ProcessReaper.forNextRun(among: reapers)
                queued[reapers.firstIndex { $0 === reaper }!].append(claim)
            }
            var wakes: [RunLauncher.Wake] = []
            var refused = false
            for (launcher, claims) in zip(runs.launchers, queued) where !claims.isEmpty {
                if let wake = launcher.push(claims) {
                    wakes.append(wake)
                } else {
                    launcher.reaper.runEnded(claims.count)
                    runs.claimed += claims
                    refused = true
                }
            }
            return (late, refused, wakes)
        }
        for wake in wakes { wake.resume() }
        if !late.isEmpty {
            // Committed after the dispatcher stopped starting runs: recorded as interrupted, as at shutdown.
            Task { await interruptUnstarted(late) }
        }
        if forThePass { signal.signal() }
    }
}

/// The dispatcher as a long-running service: hook runs are child tasks of this service; on shutdown no
/// new run starts, running hooks get `shutdown_grace_seconds`, then they are stopped (their process
/// groups terminated) and recorded as interrupted, to run again at the next start.
struct DispatcherService: Service {
    let dispatcher: Dispatcher
    let clock: any WallClock
    let logger: Logger
    let shutdownGrace: Duration
    /// How often the log is looked at even without a signal: `replay` from another process lands in the
    /// log without waking us.
    var recheck: Duration = .seconds(1)

    func run() async throws {
        await dispatcher.checkOrphans()
        await withDiscardingTaskGroup { group in
            // Runs the log claims early start on a hook reaper as soon as their claims are on disk.
            let launchers = ProcessReaper.all.map(RunLauncher.init)
            for launcher in launchers {
                group.addTask(executorPreference: launcher.reaper) { await dispatcher.launchRuns(from: launcher) }
            }
            _ = dispatcher.acceptEarlyStarts(true, launchers: launchers)
            let loop = DueWorkLoop(
                name: "dispatcher", signal: dispatcher.signal, clock: clock, logger: logger, recheck: recheck)
            await withGracefulShutdownHandler {
                await loop.run(while: { !Task.isCancelled && !Task.isShuttingDownGracefully }) {
                    let started = try await dispatcher.startDue { claim, hook in
                        dispatcher.addRun(claim, hook, to: &group)
                    }
                    return (started, try await dispatcher.nextDue())
                }
            } onGracefulShutdown: {
                dispatcher.signal.signal()
            }
            // Shutting down: give running hooks their grace, then stop them. Outcomes of hooks that have
            // exited are being written meanwhile and are not cut off: the group waits for them.
            let deadline = ContinuousClock.now + shutdownGrace
            // No run starts from now on: what the log claimed for us and we did not start yet runs
            // again at the next start, its attempt not spent (written while the grace runs).
            let unstarted = dispatcher.acceptEarlyStarts(false)
            group.addTask { await dispatcher.interruptUnstarted(unstarted) }
            while dispatcher.runningHooks > 0, ContinuousClock.now < deadline, !Task.isCancelled {
                await dispatcher.signal.wait(timeout: deadline - ContinuousClock.now)
            }
            if dispatcher.runningHooks > 0 {
                logger.warning(
                    "stopping hooks still running after the shutdown grace", metadata: ["count": "\(dispatcher.runningHooks)"])
                group.cancelAll()
            }
        }
    }
}
