import Foundation
import ServiceLifecycle
import Synchronization
import Testing

@testable import PayopIPND

/// The SQLite log's deliveries, whose dispatcher passes wait at their read of what is due, from the
/// second pass on, until `release`: a pass the dispatcher cannot finish.
final class PassHoldingStore: ForwardingDeliveryStore, @unchecked Sendable {
    private let state = Mutex<(passes: Int, held: Bool, waiters: [CheckedContinuation<Void, Never>])>((0, true, []))
    var passes: Int { state.withLock { $0.passes } }

    override func runnableDeliveries(now: Int64, hooks: [String], limit: Int) async throws(EventLogError) -> [Delivery] {
        await withCheckedContinuation { continuation in
            let wait = state.withLock { state in
                state.passes += 1
                guard state.passes > 1, state.held else { return false }
                state.waiters.append(continuation)
                return true
            }
            if !wait { continuation.resume() }
        }
        return try await base.runnableDeliveries(now: now, hooks: hooks, limit: limit)
    }

    func release() {
        let waiters = state.withLock { state in
            state.held = false
            defer { state.waiters.removeAll() }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

@Suite struct RunLauncherTests {
    /// Real claims (signed IPNs' runs, recorded running in a log of their own), by delivery id.
    private func claims(_ count: Int) async throws -> [Int64: DeliveryClaim] {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        log.setHooks([commandHook("fulfil", "/bin/true")])
        for order in 0..<count { try await ingestSigned(log, clock: clock, order: "\(order)") }
        var claims: [Int64: DeliveryClaim] = [:]
        for delivery in try await log.deliveries(state: nil, hook: nil, limit: count) {
            claims[delivery.id] = try #require(try await log.claimDelivery(id: delivery.id, now: clock.nowMilliseconds()))
        }
        return claims
    }

    @Test(.timeLimit(.minutes(1))) func claimsPushedReachTheWaitingTaskInOrder() async throws {
        let claim = try await claims(4)
        let ids = claim.keys.sorted()
        let launcher = RunLauncher(reaper: ProcessReaper.shared)
        let taken = Task { await launcher.next()?.map(\.delivery.id) }
        #expect(launcher.push([claim[ids[1]]!, claim[ids[0]]!]).map { $0.resume() } != nil)
        #expect(await taken.value == [ids[1], ids[0]])
        #expect(launcher.push([claim[ids[2]]!]).map { $0.resume() } != nil)
        #expect(launcher.push([claim[ids[3]]!]).map { $0.resume() } != nil)
        #expect(await launcher.next()?.map(\.delivery.id) == [ids[2], ids[3]])
    }

    @Test(.timeLimit(.minutes(1))) func closingHandsBackWhatWasNotTakenAndEndsTheTask() async throws {
        let claim = try await claims(2)
        let ids = claim.keys.sorted()
        let launcher = RunLauncher(reaper: ProcessReaper.shared)
        #expect(launcher.push([claim[ids[0]]!]).map { $0.resume() } != nil)
        #expect(launcher.close().0.map(\.delivery.id) == [ids[0]])
        #expect(await launcher.next() == nil)
        // Closed, it takes nothing more: the caller records such a claim interrupted.
        #expect(launcher.push([claim[ids[1]]!]) == nil)
        #expect(launcher.close().0.isEmpty)
        // A task waiting when it closes ends too.
        let other = RunLauncher(reaper: ProcessReaper.shared)
        let waiting = Task { await other.next() }
        try? await Task.sleep(for: .milliseconds(20))
        let (left, wake) = other.close()
        wake.resume()
        #expect(left.isEmpty)
        #expect(await waiting.value == nil)
    }

    @Test(.timeLimit(.minutes(1))) func claimsQueuedBeforeACancellationAreStillTakenThenNothingMore() async throws {
        let claim = try #require(try await claims(1).values.first)
        let launcher = RunLauncher(reaper: ProcessReaper.shared)
        launcher.push([claim])?.resume()
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return (await launcher.next()?.count, await launcher.next()?.count)
        }
        let (first, second) = await task.value
        #expect(first == 1 && second == nil)
    }

    @Test(.timeLimit(.minutes(1))) func aCancelledTaskStopsWaitingAndTakesNoMore() async throws {
        let claim = try #require(try await claims(1).values.first)
        let launcher = RunLauncher(reaper: ProcessReaper.shared)
        let waiting = Task { await launcher.next() }
        try? await Task.sleep(for: .milliseconds(20))
        waiting.cancel()
        #expect(await waiting.value == nil)
        #expect(launcher.push([claim]) == nil)
    }

    @Test(.timeLimit(.minutes(1))) func aRunClaimedEarlyStartsOnAHookReaperWhileTheDispatchersPassIsBusy() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        log.setHooks([commandHook("fulfil", "/bin/true")])
        let store = PassHoldingStore(log)
        let startedOn = Mutex<[String]>([])
        let runner = RecordingHookRunner { _ in
            startedOn.withLock { $0.append(threadName()) }
            return HookResult(outcome: .delivered)
        }
        let dispatcher = EarlyStartHarness.dispatcher(log, store: store, runner: runner, clock: clock, perHook: 16)
        log.startDeliveriesEarly(with: dispatcher)
        let service = DispatcherService(
            dispatcher: dispatcher, clock: clock, logger: quietLogger, shutdownGrace: .milliseconds(200),
            recheck: .seconds(3600))
        let group = ServiceGroup(services: [service], logger: quietLogger)
        defer { store.release() }
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            // The first pass finds nothing due (the hook is caught up); the second waits at its read.
            while store.passes < 1 { try await Task.sleep(for: .milliseconds(5)) }
            dispatcher.signal.signal()
            while store.passes < 2 { try await Task.sleep(for: .milliseconds(5)) }
            try await ingestCheckout(log, clock: clock, "tx-1")
            #expect(try await EarlyStartHarness.verifier(log, clock: clock).verifyDue() == 1)
            // Claimed in the verification's commit, it runs without the pass, which is still waiting.
            for _ in 0..<1000 where runner.all.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
            #expect(runner.all.map(\.attempt) == [1])
            #expect(startedOn.withLock { $0 }.allSatisfy { $0.hasPrefix("ipnd-hook-reap") })
            #expect(store.passes == 2)
            store.release()
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(try await log.deliveries(state: nil, hook: nil, limit: 10).map(\.state) == [.delivered])
        #expect(dispatcher.running == 0)
    }

    @Test func claimsQueuedForALauncherWhenTheDispatcherStopsRunAgainUnspent() async throws {
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        // Launchers whose tasks never take anything: the commit's claims wait in them.
        let launchers = ProcessReaper.all.map(RunLauncher.init)
        _ = h.dispatcher.acceptEarlyStarts(true, launchers: launchers)
        try await ingestSigned(h.log, clock: h.clock, order: "1")
        try await ingestSigned(h.log, clock: h.clock, order: "2")
        #expect(try await h.deliveries().map(\.state) == [.running, .running])
        // The launchers hold them: the dispatcher's pass has none to start.
        #expect(try await h.dispatcher.dispatchDue() == 0)
        let unstarted = h.dispatcher.acceptEarlyStarts(false)
        #expect(unstarted.count == 2)
        await h.dispatcher.interruptUnstarted(unstarted)
        #expect(try await h.deliveries().map { "\($0.state) \($0.attempts)" } == ["pending 0", "pending 0"])
        #expect(h.dispatcher.running == 0)
        #expect(h.runner.all.isEmpty)
        for launcher in launchers { #expect(await launcher.next() == nil) }
    }

    @Test(.timeLimit(.minutes(1))) func aClaimRefusedByALauncherWhoseTaskWasCancelledRunsAgainUnspent() async throws {
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        let launchers = ProcessReaper.all.map(RunLauncher.init)
        _ = h.dispatcher.acceptEarlyStarts(true, launchers: launchers)
        let tasks = launchers.map { launcher in
            Task(executorPreference: launcher.reaper) { await h.dispatcher.launchRuns(from: launcher) }
        }
        for task in tasks { task.cancel() }
        for task in tasks { await task.value }
        try await ingestSigned(h.log, clock: h.clock)
        #expect(try await h.deliveries().map(\.state) == [.running])
        // Refused, it waits for the dispatcher, which hands it back as it stops.
        let unstarted = h.dispatcher.acceptEarlyStarts(false)
        #expect(unstarted.count == 1)
        await h.dispatcher.interruptUnstarted(unstarted)
        let delivery = try await h.deliveries().first
        #expect(delivery?.state == .pending && delivery?.attempts == 0)
        #expect(h.dispatcher.running == 0)
        #expect(h.runner.all.isEmpty)
    }

    @Test(.timeLimit(.minutes(1))) func aClaimALauncherTakesAfterItsHookWasRemovedRunsAgainUnspent() async throws {
        let h = try await EarlyStartHarness()
        defer { h.log.close() }
        let launchers = ProcessReaper.all.map(RunLauncher.init)
        _ = h.dispatcher.acceptEarlyStarts(true, launchers: launchers)
        try await ingestSigned(h.log, clock: h.clock)
        #expect(try await h.deliveries().map(\.state) == [.running])
        h.log.setHooks([commandHook("other", "/bin/true")])
        // The launchers' tasks start only now, and find the claim's hook gone.
        let tasks = launchers.map { launcher in
            Task(executorPreference: launcher.reaper) { await h.dispatcher.launchRuns(from: launcher) }
        }
        var delivery = try await h.deliveries().first
        for _ in 0..<100 where delivery?.state != .pending {
            await h.dispatcher.signal.wait(timeout: .milliseconds(100))
            delivery = try await h.deliveries().first
        }
        #expect(delivery?.state == .pending && delivery?.attempts == 0)
        #expect(h.runner.all.isEmpty)
        #expect(h.dispatcher.acceptEarlyStarts(false).isEmpty)
        for task in tasks { await task.value }
        #expect(h.dispatcher.running == 0)
    }

    @Test(.timeLimit(.minutes(1))) func aLaunchedHookOutlivingTheShutdownGraceIsStoppedAndRunsAgainUnspent() async throws {
        let (dir, clock, log) = try logWithASlowHook()
        defer {
            log.close()
            withExtendedLifetime(dir) {}
        }
        let store = PassHoldingStore(log)
        store.release()
        let dispatcher = testDispatcher(log, store: store, runner: CommandHookRunner(), clock: clock)
        log.startDeliveriesEarly(with: dispatcher)
        let service = DispatcherService(
            dispatcher: dispatcher, clock: clock, logger: quietLogger, shutdownGrace: .milliseconds(200))
        let group = ServiceGroup(services: [service], logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            // Caught up once its first pass found nothing: the signed IPN's run is claimed in its commit.
            while store.passes < 1 { try await Task.sleep(for: .milliseconds(5)) }
            try await Task.sleep(for: .milliseconds(50))
            try await ingestSigned(log, clock: clock)
            #expect(try await log.deliveries(state: nil, hook: nil, limit: 1).map(\.state) == [.running])
            while dispatcher.runningHooks == 0 { try await Task.sleep(for: .milliseconds(5)) }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let delivery = try #require(try await log.deliveries(state: nil, hook: nil, limit: 1).first)
        // max_attempts 1: had the stopped run counted, its delivery would now be dead.
        #expect(delivery.state == .pending && delivery.attempts == 0)
        #expect(dispatcher.running == 0)
    }
}
