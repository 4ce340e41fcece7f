import Foundation
import Logging
import PayopSimulator
import PostgresNIO
import ServiceLifecycle
import Synchronization
import Testing

@testable import PayopIPND

#if canImport(Glibc)
import Glibc
#endif

/// Two real `payop-ipnd` processes (node ids `a` and `b`) on one PostgreSQL database of their own, Payop
/// played by the simulator on loopback, two command hooks appending a line per run to one file:
///
/// - IPNs posted from many clients alternately to each daemon, a fifth of them to both at once, and
///   `kill -9` of daemon a partway: every IPN answered 200 is one event, verified once, and reaches each
///   matching hook in order, exactly once unless a was running it at the kill (then at least once),
///   b taking a's running deliveries over when their lease ends;
/// - a restarted at once after a second `kill -9` runs its own cut-off deliveries again at once, well
///   before their lease would have let b take them;
/// - a second daemon with a running one's node id exits naming `storage.node_id`.
@Suite(.serialized, .enabled(if: PostgresTestServer.isConfigured, "set PAYOP_IPND_TEST_POSTGRES (scripts/pg-test.sh)"))
struct TwoDaemonTests {
    /// `storage.lease_seconds`: short, so a takeover is seconds away.
    static let leaseSeconds = 10
    /// A question to Payop a daemon claimed is its own this long (`DaemonConfig.Storage.postgres`:
    /// twice the lease, at least 30 s): an entity a killed daemon was asking about waits for it.
    static let checkLeaseSeconds = max(2 * leaseSeconds, 30)
    /// Hook runs of `slow-*` checkouts sleep this long on their first attempt (the second kill lands in them).
    static let slowHookSeconds = 4

    // MARK: - The scenario

    @Test func twoDaemonsOneKilledEveryAnsweredIPNIsOneEventVerifiedOnceAndDeliveredInOrder() async throws {
        try await ExclusiveTiming.shared.run {
            try await Self.withWorld { world in try await Self.scenario(world) }
        }
    }

    static func scenario(_ world: World) async throws {
        let started = ContinuousClock.now
        let a = DaemonNode(label: "a", nodeID: "a", world: world)
        let b = DaemonNode(label: "b", nodeID: "b", world: world)
        defer {
            a.stop()
            b.stop()
        }
        try await a.start()
        try await b.start()
        let db = world.observer
        let tally = Tally()

        // Phase 1: 150 entities (120 checkouts, 30 withdrawals), two statuses each (300 IPNs), from 16
        // clients; about a fifth of the entities have each IPN posted to both daemons at once; a killed at 40 %.
        let plans = (0..<150).map { n in
            let repeated = n % 5 == 1 || n % 20 == 9
            return n % 5 == 4
                ? Plan(kind: .withdrawal, id: "wd-\(n)", states: [1, 2], statuses: ["pending", "accepted"], repeated: repeated, index: n)
                : Plan(kind: .checkout, id: "co-\(n)", states: [4, 2], statuses: ["pending", "accepted"], repeated: repeated, index: n)
        }
        let total = plans.reduce(0) { $0 + $1.states.count }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<16 {
                group.addTask {
                    while let n = tally.take(below: plans.count) {
                        try await Self.play(plans[n], world: world, a: a, b: b, tally: tally)
                    }
                }
            }
            group.addTask {
                // Partway: once 40 % of the IPNs are answered, and while a runs hooks (bounded waits).
                let partway = try await eventually(seconds: 90, every: .milliseconds(10)) { tally.answeredIPNs >= total * 4 / 10 }
                #expect(partway, "only \(tally.answeredIPNs) of \(total) IPNs were answered in 90 s")
                let busy = try await eventually(seconds: 15, every: .milliseconds(2)) { !world.runningHooks(on: "a").isEmpty }
                #expect(busy, "daemon a ran no hook when it was killed")
                tally.killed.store(true, ordering: .sequentiallyConsistent)
                a.kill9()
                tally.killedAt.store(SystemWallClock().nowMilliseconds(), ordering: .sequentiallyConsistent)
                // At once (b takes a's running deliveries over when their lease ends).
                let cut = try await world.cutOff(node: "a")
                tally.firstKill.withLock { $0 = cut }
            }
            try await group.waitForAll()
        }
        let killTime = tally.killedAt.load(ordering: .sequentiallyConsistent)
        try #require(killTime > 0)
        let firstKill = tally.firstKill.withLock { $0 }
        #expect(!firstKill.isEmpty, "the first kill found no delivery running on a")
        let postedIn = ContinuousClock.now - started

        // Every IPN in, b alone: everything verified and delivered, a's cut-off runs taken over by b.
        let phase1Events = total
        let phase1Deliveries = total + plans.filter { $0.kind == .checkout }.count
        try await world.settle(
            events: phase1Events, deliveries: phase1Deliveries, seconds: Double(checkLeaseSeconds + 30), nodes: [a, b])
        let settledIn = ContinuousClock.now - started
        let takeovers = try await db.attempts().filter { firstKill.keys.contains($0.deliveryID) }
        for (id, lease) in firstKill {
            let last = takeovers.filter { $0.deliveryID == id }.max { $0.attempt < $1.attempt }
            #expect(last?.node == "b" && (last?.attempt ?? 0) >= 2, "delivery \(id) cut off on a: \(String(describing: last))")
            // b took it over only once a's lease had ended.
            #expect((last?.finishedAt ?? 0) >= lease, "delivery \(id) finished at \(last?.finishedAt ?? 0), lease until \(lease)")
        }
        let takeoverDelay = (takeovers.map(\.finishedAt).max() ?? killTime) - killTime

        // Phase 2: a restarted (same node id; nothing of its own to recover: b took it over), then killed
        // again in slow hook runs and restarted at once: its cut-off runs go again at once, not at lease end.
        try await a.start()
        #expect(!a.stderr.contains("deliveries interrupted by the last stop"), "\(a.stderr.suffix(2000))")
        tally.killed.store(false, ordering: .sequentiallyConsistent)
        // 24 slow checkouts: b runs at most 16 of one hook at once, so a gets some of each hook.
        let slow = (0..<24).map { n in
            Plan(kind: .checkout, id: "slow-\(n)", states: [2], statuses: ["accepted"], repeated: n % 4 == 0, index: n)
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for plan in slow { group.addTask { try await Self.play(plan, world: world, a: a, b: b, tally: tally) } }
            try await group.waitForAll()
        }
        // Kill a once every slow delivery exists and was claimed, a running some.
        let allRunning = try await eventually(seconds: 20, every: .milliseconds(20)) {
            try await db.count(
                "SELECT count(*) FROM deliveries WHERE state <> 'pending' AND event_id IN (SELECT id FROM events WHERE entity_id LIKE 'slow-%')"
            ) == 2 * Int64(slow.count) && !world.runningHooks(on: "a").isEmpty
        }
        #expect(allRunning, "the slow deliveries did not all start, a running some of them")
        a.kill9()
        let secondKill = try await world.cutOff(node: "a")
        #expect(!secondKill.isEmpty, "the second kill found no delivery running on a")
        let restart = ContinuousClock.now
        try await a.start()
        let restartTook = ContinuousClock.now - restart
        let recovered = a.stderr.split(separator: "\n").filter { $0.contains("deliveries interrupted by the last stop will run again") }
        #expect(recovered.count == 1 && recovered[0].contains("count=\(secondKill.count) "), "\(recovered) \(a.stderr.suffix(2000))")

        // Phase 3: the restarted a takes IPNs itself.
        let last = (0..<10).map { n in
            Plan(kind: .checkout, id: "late-\(n)", states: [2], statuses: ["accepted"], repeated: false, index: 0)
        }
        for plan in last {
            let entity = world.payop.create(plan.kind, id: plan.id, state: 2)
            let body = String(decoding: SimulatedPayop.ipnBody(for: entity), as: UTF8.self)
            #expect(await post(body, port: a.ipnPort) == 200, "the restarted daemon a did not answer 200")
            tally.answered(plan.key(0), by: "a")
        }
        let allEvents = phase1Events + slow.count + last.count
        let allDeliveries = phase1Deliveries + 2 * (slow.count + last.count)
        try await world.settle(events: allEvents, deliveries: allDeliveries, seconds: 40, nodes: [a, b])
        for (id, lease) in secondKill {
            let runs = try await db.attempts().filter { $0.deliveryID == id }
            #expect(runs.count == 1 && runs.first?.attempt == 2, "delivery \(id) cut off on a: \(runs)")
            // Run again at once by the restarted a's recovery (by either daemon), well before the lease end.
            #expect((runs.first?.finishedAt ?? .max) < lease, "delivery \(id) waited for its lease: \(runs)")
        }

        // Orphaned hook runs of the killed a (hooks have process groups of their own) end too.
        let quiet = try await eventually(seconds: Double(slowHookSeconds) + 10, every: .milliseconds(50)) {
            world.runningHooks(on: "a").isEmpty && world.runningHooks(on: "b").isEmpty
        }
        #expect(quiet, "hook runs still going: \(world.runningHooks(on: "a")) \(world.runningHooks(on: "b"))")

        // For the record: what the daemons complained about.
        for node in [a, b] {
            let notable = node.allStderr.split(separator: "\n").filter { line in
                let level = line.split(separator: " ", maxSplits: 2).dropFirst().first ?? ""
                return ["warning", "error", "critical"].contains(level) || line.contains("interrupted")
            }
            print("TwoDaemonTests: \(node.label) logged \(notable.count) warnings or errors\n" + notable.prefix(20).joined(separator: "\n"))
        }
        let report = try await check(
            world: world, tally: tally, planned: plans + slow + last, cutOff: firstKill.merging(secondKill) { $1 })
        print(
            """
            TwoDaemonTests: \(total) + \(slow.count) + \(last.count) IPNs; 200s from a \(tally.answers(by: "a")), \
            from b \(tally.answers(by: "b")); posting done \(postedIn), phase 1 settled \(settledIn); \
            cut off on a: \(firstKill.count) (taken over by b \(takeoverDelay) ms after the kill), then \
            \(secondKill.count) (a restarted in \(restartTook)); \(report); total \(ContinuousClock.now - started)
            """)
    }

    /// One entity's IPNs, as Payop sends them: each status posted once Payop's API says it (after the
    /// daemons verified the one before: a status Payop no longer reports would be contradicted), to a or
    /// b by turns, or to both at once; again until 200 (to b once a is dead).
    static func play(_ plan: Plan, world: World, a: DaemonNode, b: DaemonNode, tally: Tally) async throws {
        var entity = world.payop.create(plan.kind, id: plan.id, state: plan.states[0])
        for (step, state) in plan.states.enumerated() {
            if step > 0 {
                let previous = plan.statuses[step - 1]
                let verified = try await eventually(seconds: Double(checkLeaseSeconds + 15), every: .milliseconds(30)) {
                    try await world.observer.count(
                        """
                        SELECT count(*) FROM events WHERE kind = \(plan.kind.rawValue) AND entity_id = \(plan.id)
                        AND status = \(previous) AND state = 'verified'
                        """) == 1
                }
                #expect(verified, "\(plan.kind) \(plan.id) \(previous) was not verified in time")
                entity = try #require(world.payop.setState(plan.kind, id: plan.id, state: state))
            }
            let body = String(decoding: SimulatedPayop.ipnBody(for: entity), as: UTF8.self)
            let targets: [DaemonNode] = plan.repeated ? [a, b] : ((plan.index + step) % 2 == 0 ? [a] : [b])
            let key = plan.key(step)
            await withTaskGroup(of: Void.self) { group in
                for target in targets {
                    group.addTask {
                        var node = target
                        for _ in 0..<100 {
                            if node === a && tally.killed.load(ordering: .sequentiallyConsistent) { node = b }
                            if await post(body, port: node.ipnPort) == 200 {
                                tally.answered(key, by: node.label)
                                return
                            }
                            // Payop repeats an IPN until it gets a 200: a is dead (or dying), so b.
                            node = b
                            try? await Task.sleep(for: .milliseconds(100))
                        }
                    }
                }
            }
            #expect(tally.isAnswered(key), "\(key) was never answered 200")
        }
    }

    /// What the log and the hooks' lines say, checked against what was answered 200.
    static func check(world: World, tally: Tally, planned: [Plan], cutOff: [Int64: Int64]) async throws -> String {
        let db = world.observer
        let events = try await db.events()
        let verifiedCounts = try await db.verifiedOutcomes()
        let deliveries = try await db.deliveries()
        let attempts = try await db.attempts()
        let lines = try world.hookLines()

        // Every IPN answered 200 is one event, one per (kind, entity, status), and there is no other.
        let plannedKeys = Set(planned.flatMap { plan in plan.states.indices.map { plan.key($0) } })
        let answered = tally.answeredKeys
        #expect(answered == plannedKeys, "not answered 200: \(plannedKeys.subtracting(answered).sorted().prefix(10))")
        let eventKeys = events.map { "\($0.kind)/\($0.entity)/\($0.status)" }
        #expect(eventKeys.count == Set(eventKeys).count, "two events of one (kind, entity, status)")
        #expect(Set(eventKeys) == answered, "events without a 200, or 200s without an event")
        let receipts = try await db.count("SELECT count(*) FROM receipts WHERE answer = 200")
        #expect(receipts >= Int64(tally.answers(by: "a") + tally.answers(by: "b")), "fewer receipts than 200 answers")

        // Each verified once.
        for event in events {
            #expect(event.state == "verified", "\(event.id) \(event.kind)/\(event.entity)/\(event.status) is \(event.state)")
            #expect(verifiedCounts[event.id] == 1, "\(event.id) has \(verifiedCounts[event.id] ?? 0) 'verified' attempts")
        }

        // Each matching hook has one delivery of it, delivered; a delivery's hook ran at most once per
        // attempt and at least once; more than one attempt only where a was running it at a kill.
        let byEvent = Dictionary(grouping: deliveries, by: \.eventID)
        let eventByID = Dictionary(uniqueKeysWithValues: events.map { ($0.id, $0) })
        for event in events {
            let expected = event.kind == "checkout" && event.status == "accepted" ? ["all", "paid"] : ["all"]
            #expect(
                (byEvent[event.id] ?? []).map(\.hook).sorted() == expected,
                "\(event.id) \(event.kind).\(event.status): deliveries \(byEvent[event.id] ?? [])")
        }
        let linesByDelivery = Dictionary(grouping: lines, by: { "\($0.hook) \($0.eventID)" })
        let attemptsByDelivery = Dictionary(grouping: attempts, by: \.deliveryID)
        var duplicated = 0
        for delivery in deliveries {
            let ran = linesByDelivery["\(delivery.hook) \(delivery.eventID)"] ?? []
            let finished = attemptsByDelivery[delivery.id] ?? []
            #expect(delivery.state == "delivered", "delivery \(delivery.id) is \(delivery.state)")
            #expect(
                finished.count == 1 && finished.first?.attempt == delivery.attempts && finished.first?.outcome == "delivered",
                "delivery \(delivery.id) (\(delivery.attempts) attempts): finished runs \(finished)")
            #expect(!ran.isEmpty && ran.count <= delivery.attempts, "delivery \(delivery.id): \(delivery.attempts) attempts, \(ran.count) runs")
            if delivery.attempts == 1 {
                // Never cut off: exactly once, run by the node the log says.
                #expect(ran.count == 1, "delivery \(delivery.id) ran \(ran.count) times: \(ran)")
                #expect(ran.first?.node == finished.first?.node, "delivery \(delivery.id): ran on \(ran), finished \(finished)")
            } else {
                #expect(cutOff[delivery.id] != nil, "delivery \(delivery.id) has \(delivery.attempts) attempts but was not cut off")
                if cutOff[delivery.id] == nil {
                    let starts = ((try? String(contentsOfFile: world.linesFile + ".starts", encoding: .utf8)) ?? "")
                        .split(separator: "\n").filter { $0.contains(" \(delivery.hook) \(delivery.eventID) ") }
                    print("TwoDaemonTests: delivery \(delivery.id) \(delivery.hook) \(delivery.eventID): starts \(starts) runs \(ran) finished \(finished)")
                }
            }
            if ran.count > 1 { duplicated += 1 }
        }

        // Per hook and entity, runs in delivery-id order (a repeated run of one delivery may follow it).
        let deliveryID = Dictionary(uniqueKeysWithValues: deliveries.map { ("\($0.hook) \($0.eventID)", $0.id) })
        var lastSeen: [String: Int64] = [:]
        var outOfOrder: [String] = []
        for line in lines {
            guard let id = deliveryID["\(line.hook) \(line.eventID)"], let event = eventByID[line.eventID] else {
                Issue.record("a hook ran for an unknown delivery: \(line)")
                continue
            }
            let key = "\(line.hook) \(event.kind)/\(event.entity)"
            if let previous = lastSeen[key], previous > id { outOfOrder.append("\(key): \(previous) then \(id)") }
            lastSeen[key] = max(lastSeen[key] ?? id, id)
        }
        #expect(outOfOrder.isEmpty, "runs out of order: \(outOfOrder.prefix(10))")
        let lateOrphans = lines.enumerated().filter { index, line in
            line.attempt == 1 && lines[..<index].contains { $0.hook == line.hook && $0.eventID == line.eventID && $0.attempt > 1 }
        }.count
        return "\(events.count) events, \(deliveries.count) deliveries, \(lines.count) hook runs, \(duplicated) deliveries run twice "
            + "(\(lateOrphans) of them by a killed daemon's orphaned hook ending after the rerun)"
    }

    // MARK: - The same node id twice

    @Test func aSecondDaemonWithARunningOnesNodeIDExitsNamingStorageNodeID() async throws {
        try await Self.withWorld { world in
            let first = DaemonNode(label: "first", nodeID: "shop-1", world: world)
            defer { first.stop() }
            try await first.start()
            let second = DaemonNode(label: "second", nodeID: "shop-1", world: world)
            defer { second.stop() }
            try second.launch()
            #expect(try await DaemonProcessTests.waitForExit(second.process, seconds: 20), "the second daemon kept running")
            #expect(second.process.terminationStatus == 1)
            #expect(second.stderr.contains("storage.node_id"), "\(second.stderr)")
            #expect(second.stderr.contains("shop-1"), "\(second.stderr)")
            // The first goes on serving.
            #expect(first.process.isRunning)
            let entity = world.payop.create(.checkout, id: "tx-node", state: 2)
            #expect(await Self.post(String(decoding: SimulatedPayop.ipnBody(for: entity), as: UTF8.self), port: first.ipnPort) == 200)
        }
    }

    // MARK: - Helpers

    /// Posts one IPN; the status code, or nil when nothing answered.
    static func post(_ body: String, port: Int) async -> Int? {
        let request =
            "POST /payop/ipn HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        guard let answer = try? await rawExchange(port: port, send: request) else { return nil }
        let parts = answer.split(separator: " ", maxSplits: 2)
        return parts.count >= 2 && parts[0].hasPrefix("HTTP/") ? Int(parts[1]) : nil
    }

    /// A database of its own (a daemon's `storage.url` names a database, not a schema), the simulator,
    /// a folder with the JWT, the hook and its lines; dropped and stopped afterwards.
    static func withWorld(_ body: @Sendable (World) async throws -> Void) async throws {
        let database = "t_two_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").prefix(16).lowercased()
        try await PostgresTestServer.admin("CREATE DATABASE \(unescaped: database)")
        let payop = SimulatedPayop(jwt: "two-daemon-jwt-\(UUID().uuidString.lowercased())")
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = SimulatorServer.makeApplication(payop: payop, port: 0, logger: quietLogger) { continuation.yield($0) }
        let services = ServiceGroup(services: [app], logger: quietLogger)
        var failure: (any Error)?
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await services.run() }
                defer { group.cancelAll() }
                var iterator = ports.makeAsyncIterator()
                let port = try #require(await iterator.next())
                let configuration = try await PostgresTestServer.configuration(
                    schema: "public", nodeID: "observer", database: database)
                do {
                    try await PostgresEventLog.withLog(configuration: configuration) { observer in
                        let world = try await World(database: database, payop: payop, simulatorPort: port, observer: observer)
                        try await body(world)
                    }
                } catch {
                    failure = error
                }
                await services.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        } catch {
            failure = failure ?? error
        }
        try? await PostgresTestServer.admin("DROP DATABASE IF EXISTS \(unescaped: database) WITH (FORCE)")
        if let failure { throw failure }
    }

    /// Polls `check` every `every` until it holds or `seconds` pass; whether it held.
    static func eventually(seconds: Double, every: Duration, _ check: () async throws -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
        while ContinuousClock.now < deadline {
            if try await check() { return true }
            try await Task.sleep(for: every)
        }
        return try await check()
    }
}

// MARK: - The world the daemons share

extension TwoDaemonTests {
    /// One entity's IPNs: Payop's state numbers in order and the statuses they make.
    struct Plan: Sendable {
        let kind: SimulatedPayop.Kind
        let id: String
        let states: [Int]
        let statuses: [String]
        /// Each of its IPNs is posted to both daemons at once.
        let repeated: Bool
        let index: Int

        func key(_ step: Int) -> String { "\(kind.rawValue)/\(id)/\(statuses[step])" }
    }

    /// What the clients saw.
    final class Tally: Sendable {
        private let state = Mutex<(answered: [String: Int], byNode: [String: Int])>(([:], [:]))
        private let cursor = Mutex(0)
        /// Daemon a is dead: post to b.
        let killed = Atomic<Bool>(false)
        let killedAt = Atomic<Int64>(0)
        /// The deliveries a left running at the first kill, with their lease ends.
        let firstKill = Mutex<[Int64: Int64]>([:])

        /// The next plan a client plays.
        func take(below count: Int) -> Int? {
            cursor.withLock { next in
                guard next < count else { return nil }
                next += 1
                return next - 1
            }
        }

        func answered(_ key: String, by node: String) {
            state.withLock {
                $0.answered[key, default: 0] += 1
                $0.byNode[node, default: 0] += 1
            }
        }
        var answeredIPNs: Int { state.withLock { $0.answered.count } }
        var answeredKeys: Set<String> { state.withLock { Set($0.answered.keys) } }
        func isAnswered(_ key: String) -> Bool { state.withLock { $0.answered[key] != nil } }
        func answers(by node: String) -> Int { state.withLock { $0.byNode[node] ?? 0 } }
    }

    struct HookLine: Sendable, CustomStringConvertible {
        let hook: String
        let eventID: String
        let type: String
        let node: String
        let attempt: Int
        let pid: String
        var description: String { "\(hook) \(eventID) \(type) node=\(node) attempt=\(attempt) pid=\(pid)" }
    }

    final class World: Sendable {
        let directory: TemporaryDirectory
        let database: String
        let payop: SimulatedPayop
        let simulatorPort: Int
        let observer: PostgresEventLog
        let jwtFile: String
        let hook: String
        let linesFile: String
        let passwordFile: String?
        let url: String

        init(database: String, payop: SimulatedPayop, simulatorPort: Int, observer: PostgresEventLog) async throws {
            let directory = try TemporaryDirectory()
            self.directory = directory
            self.database = database
            self.payop = payop
            self.simulatorPort = simulatorPort
            self.observer = observer
            jwtFile = try directory.write("payop-jwt", payop.jwt + "\n")
            linesFile = directory.file("hook-runs.log")
            _ = FileManager.default.createFile(atPath: linesFile, contents: nil)
            for node in ["a", "b"] {
                try FileManager.default.createDirectory(atPath: directory.file("running-\(node)"), withIntermediateDirectories: true)
            }
            // $1 the node, $2 the lines file, $3 the node's folder of running hooks (a file per run, named by
            // its pid). One small O_APPEND write per run, after the work (a 50-200 ms sleep; `slow-*`
            // checkouts sleep longer on attempt 1); the starts, with a time, go to `$2.starts` (diagnostics).
            hook = try script(
                directory, "hook",
                """
                marker="$3/$$"
                : > "$marker"
                printf 'start %s %s %s %s %s %s\n' "$PAYOP_HOOK_NAME" "$PAYOP_EVENT_ID" "$1" "$PAYOP_ATTEMPT" "$$" "$(date +%s%3N)" >> "$2.starts"
                case "$PAYOP_TRANSACTION_ID" in
                slow-*) if [ "$PAYOP_ATTEMPT" = 1 ]; then sleep \(TwoDaemonTests.slowHookSeconds); fi ;;
                esac
                ms=$(( $$ % 151 + 50 ))
                sleep "0.$(printf '%03d' "$ms")"
                printf '%s %s %s %s %s %s\\n' "$PAYOP_HOOK_NAME" "$PAYOP_EVENT_ID" "$PAYOP_EVENT_TYPE" "$1" "$PAYOP_ATTEMPT" "$$" >> "$2"
                rm -f "$marker"
                exit 0
                """)
            let server = try await PostgresTestServer.shared()
            passwordFile = try server.password.map { try directory.write("db-password", $0 + "\n") }
            url = "postgres://\(server.username)@\(server.host):\(server.port)/\(database)?sslmode=\(server.tls.rawValue)"
        }

        func yaml(nodeID: String, hookNode: String, ipnPort: Int, adminPort: Int) -> String {
            let command = "[\(hook), \(hookNode), \(linesFile), \(directory.file("running-\(hookNode)"))]"
            return """
                log_level: info
                server:
                  listen: 127.0.0.1:\(ipnPort)
                  allowed_sources: any
                admin:
                  listen: 127.0.0.1:\(adminPort)
                storage:
                  backend: postgresql
                  url: \(url)
                \(passwordFile.map { "  password_file: \($0)\n" } ?? "")\
                  node_id: \(nodeID)
                  pool_size: 8
                  lease_seconds: \(TwoDaemonTests.leaseSeconds)
                payop:
                  api_base_url: http://127.0.0.1:\(simulatorPort)
                  jwt_file: \(jwtFile)
                  retry_initial_seconds: 1
                  retry_max_seconds: 2
                reconcile:
                  interval_seconds: 300
                delivery:
                  retry_initial_seconds: 1
                  shutdown_grace_seconds: 1
                  kill_grace_seconds: 1
                hooks:
                  - name: all
                    command: \(command)
                    events: ["*"]
                    timeout_seconds: 30
                  - name: paid
                    command: \(command)
                    events: ["checkout.accepted"]
                    timeout_seconds: 30
                """
        }

        /// The hook runs of `node` still going (their pids), whether or not their daemon still lives.
        func runningHooks(on node: String) -> [String] {
            (try? FileManager.default.contentsOfDirectory(atPath: directory.file("running-\(node)"))) ?? []
        }

        func hookLines() throws -> [HookLine] {
            try String(contentsOfFile: linesFile, encoding: .utf8).split(separator: "\n").map { line in
                let f = line.split(separator: " ").map(String.init)
                try #require(f.count == 6, "a torn hook line: \(line)")
                return HookLine(hook: f[0], eventID: f[1], type: f[2], node: f[3], attempt: Int(f[4]) ?? 0, pid: f[5])
            }
        }

        /// Once the killed `node`'s connections are gone (its last transactions committed or rolled back):
        /// the deliveries it left running, with their lease ends.
        func cutOff(node: String) async throws -> [Int64: Int64] {
            let waited = ContinuousClock.now
            let gone = try await TwoDaemonTests.eventually(seconds: 15, every: .milliseconds(20)) {
                try await observer.count(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = \("payop-ipnd \(node)")") == 0
            }
            #expect(gone, "the killed daemon's connections stayed open")
            let rows = try await observer.read("test") { connection, logger in
                try await connection.query(
                    "SELECT id, lease_until FROM deliveries WHERE state = 'running' AND node_id = \(node)", logger: logger
                ).collect().map { try $0.decode((Int64, Int64).self) }
            }
            let states = try await observer.read("test") { connection, logger in
                try await connection.query(
                    "SELECT state, coalesce(node_id, '-'), count(*) FROM deliveries GROUP BY 1, 2 ORDER BY 1, 2", logger: logger
                ).collect().map { try $0.decode((String, String, Int64).self) }
            }
            print(
                "TwoDaemonTests: \(node) killed; its connections gone after \(ContinuousClock.now - waited); hooks of \(node) "
                    + "still running: \(runningHooks(on: node).count); deliveries (state, node, count): \(states)")
            return Dictionary(uniqueKeysWithValues: rows)
        }

        /// Waits (bounded) until the log has `events` events, all verified, and `deliveries` deliveries,
        /// none pending or running.
        func settle(events: Int, deliveries: Int, seconds: Double, nodes: [DaemonNode]) async throws {
            var last = (Int64(0), Int64(0), Int64(0), Int64(0))
            let settled = try await TwoDaemonTests.eventually(seconds: seconds, every: .milliseconds(100)) {
                last = try await observer.read("test") { connection, logger in
                    try await connection.query(
                        """
                        SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM events WHERE state <> 'verified'),
                               (SELECT count(*) FROM deliveries),
                               (SELECT count(*) FROM deliveries WHERE state IN ('pending', 'running'))
                        """, logger: logger
                    ).collect().first!.decode((Int64, Int64, Int64, Int64).self)
                }
                return last == (Int64(events), 0, Int64(deliveries), 0)
            }
            guard settled else {
                for node in nodes { print("--- \(node.label) stderr (tail)\n\(node.stderr.suffix(4000))") }
                throw TestServerError(
                    "the log did not settle in \(seconds) s: \(last.0)/\(events) events, \(last.1) not verified, "
                        + "\(last.2)/\(deliveries) deliveries, \(last.3) pending or running")
            }
        }
    }

    /// One `payop-ipnd serve` process at a time for a node (it may be killed and started again).
    final class DaemonNode: @unchecked Sendable {
        let label: String
        let nodeID: String
        let world: World
        private let lock = NSLock()
        private var current: Process?
        private var port = 0
        private var stderrPath = ""
        private var runs = 0

        init(label: String, nodeID: String, world: World) {
            self.label = label
            self.nodeID = nodeID
            self.world = world
        }

        var process: Process { lock.withLock { current! } }
        var ipnPort: Int { lock.withLock { port } }
        /// What the current (or last) process wrote to stderr.
        var stderr: String {
            (try? String(contentsOfFile: lock.withLock { stderrPath }, encoding: .utf8)) ?? ""
        }

        /// What every process of this node wrote to stderr.
        var allStderr: String {
            (1...max(lock.withLock { runs }, 1)).map {
                (try? String(contentsOfFile: world.directory.file("\(label)-\($0).stderr"), encoding: .utf8)) ?? ""
            }.joined()
        }

        /// Starts the daemon without waiting for it.
        func launch() throws {
            let (ipn, admin) = (DaemonProcessTests.freePort(), DaemonProcessTests.freePort())
            let run = lock.withLock {
                runs += 1
                return runs
            }
            let config = try world.directory.write(
                "\(label)-\(run).yaml",
                world.yaml(nodeID: nodeID, hookNode: label == "b" ? "b" : "a", ipnPort: ipn, adminPort: admin))
            let errors = world.directory.file("\(label)-\(run).stderr")
            _ = FileManager.default.createFile(atPath: errors, contents: nil)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: DaemonProcessTests.binary)
            process.arguments = ["serve", "--config", config]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle(forWritingAtPath: errors)
            try process.run()
            lock.withLock {
                current = process
                port = ipn
                stderrPath = errors
            }
        }

        /// Starts the daemon and waits (bounded) until its IPN port answers; on other ports when it
        /// exits at start (a port taken meanwhile).
        func start() async throws {
            for _ in 0..<3 {
                try launch()
                let process = self.process
                let port = ipnPort
                for _ in 0..<400 where process.isRunning {
                    if let answer = try? await rawExchange(
                        port: port, send: "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), !answer.isEmpty
                    {
                        return
                    }
                    try await Task.sleep(for: .milliseconds(50))
                }
                stop()
            }
            throw TestServerError("daemon \(label) did not start: \(stderr.suffix(3000))")
        }

        /// `kill -9`, and reaped.
        func kill9() {
            let process = self.process
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }

        /// SIGTERM, then SIGKILL past 10 s.
        func stop() {
            guard let process = lock.withLock({ current }), process.isRunning else { return }
            process.terminate()
            for _ in 0..<200 where process.isRunning { usleep(50_000) }
            if process.isRunning { kill9() }
            process.waitUntilExit()
        }
    }
}

// MARK: - Reading the shared log directly

extension TwoDaemonTests {
    struct EventRow: Sendable {
        let id: String
        let kind: String
        let entity: String
        let status: String
        let state: String
    }

    struct DeliveryRow: Sendable, CustomStringConvertible {
        let id: Int64
        let eventID: String
        let hook: String
        let state: String
        let attempts: Int
        var description: String { "#\(id) \(hook) \(state) attempts=\(attempts)" }
    }

    struct AttemptRow: Sendable, CustomStringConvertible {
        let deliveryID: Int64
        let attempt: Int
        let outcome: String
        let node: String
        let finishedAt: Int64
        var description: String { "#\(deliveryID) attempt \(attempt) \(outcome) on \(node) at \(finishedAt)" }
    }
}

extension PostgresEventLog {
    fileprivate func count(_ query: PostgresQuery) async throws -> Int64 {
        try await read("test") { connection, logger in
            try await connection.query(query, logger: logger).collect().first?.decode(Int64.self) ?? 0
        }
    }

    fileprivate func events() async throws -> [TwoDaemonTests.EventRow] {
        try await read("test") { connection, logger in
            try await connection.query("SELECT id, kind, entity_id, status, state FROM events", logger: logger).collect()
                .map {
                    let (id, kind, entity, status, state) = try $0.decode((String, String, String, String, String).self)
                    return TwoDaemonTests.EventRow(id: id, kind: kind, entity: entity, status: status, state: state)
                }
        }
    }

    /// Per event, how many of its verification attempts verified it.
    fileprivate func verifiedOutcomes() async throws -> [String: Int] {
        try await read("test") { connection, logger in
            var counts: [String: Int] = [:]
            for row in try await connection.query(
                "SELECT event_id, count(*) FROM verification_attempts WHERE outcome = 'verified' GROUP BY event_id",
                logger: logger
            ).collect() {
                let (id, n) = try row.decode((String, Int64).self)
                counts[id] = Int(n)
            }
            return counts
        }
    }

    fileprivate func deliveries() async throws -> [TwoDaemonTests.DeliveryRow] {
        try await read("test") { connection, logger in
            try await connection.query("SELECT id, event_id, hook, state, attempts FROM deliveries ORDER BY id", logger: logger)
                .collect().map {
                    let (id, event, hook, state, attempts) = try $0.decode((Int64, String, String, String, Int64).self)
                    return TwoDaemonTests.DeliveryRow(id: id, eventID: event, hook: hook, state: state, attempts: Int(attempts))
                }
        }
    }

    fileprivate func attempts() async throws -> [TwoDaemonTests.AttemptRow] {
        try await read("test") { connection, logger in
            try await connection.query(
                // The runs' history, and the first runs that delivered, which their delivery's row alone records.
                """
                SELECT delivery_id, attempt, outcome, node_id, finished_at FROM delivery_attempts
                UNION ALL
                SELECT id, attempts, 'delivered', node_id, delivered_at FROM deliveries WHERE state = 'delivered' AND attempts = 1
                ORDER BY finished_at
                """, logger: logger
            ).collect().map {
                let (id, attempt, outcome, node, at) = try $0.decode((Int64, Int64, String, String, Int64).self)
                return TwoDaemonTests.AttemptRow(deliveryID: id, attempt: Int(attempt), outcome: outcome, node: node, finishedAt: at)
            }
        }
    }
}
