import CSQLiteConfig
import Foundation
import GRDB
import GRDBSQLite
import Testing

@testable import PayopIPND

/// The real event log, on a real SQLite file.
@Suite struct SQLiteEventLogTests {
    func ipn(_ body: [UInt8], at ms: Int64 = 1_795_000_000_000, source: String = "3.125.109.58") throws -> IncomingIPN {
        let notification = try NotificationParser.parse(body).get()
        return IncomingIPN(
            receivedAt: ms, sourceIP: source, path: "/payop/ipn", body: body, notification: notification,
            verifiedBySignature: notification.legacy != nil)
    }

    @Test func commitsAreDurableWithSynchronousFull() throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        #expect(try log.synchronousLevel() == 2)
        let mode = try log.database.read { try String.fetchOne($0, sql: "PRAGMA journal_mode") }
        #expect(mode == "wal")
    }

    @Test func stagesReadWhileEveryPooledReaderIsTaken() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        _ = try await log.ingest(try ipn(try Samples.data("checkout-accepted")))
        // Operations' reads hold every reader of the pool (the console under load, say), until released
        // here or, should the stages' reads wait for them, by a watchdog after 3 s.
        let release = DispatchSemaphore(value: 0)
        let entered = DispatchSemaphore(value: 0)
        let readers = log.database.configuration.maximumReaderCount
        let held = (0..<readers).map { _ in
            Task { try await log.read { _ in entered.signal(); release.wait() } }
        }
        for _ in 0..<readers { entered.wait() }
        let releaseAll: @Sendable () -> Void = { for _ in 0..<readers { release.signal() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 3, execute: releaseAll)
        // The stages' reads do not queue behind them.
        let started = ContinuousClock.now
        let due = try await log.dueChecks(now: .max, limit: 64)
        let next = try await log.nextCheckDue()
        let elapsed = ContinuousClock.now - started
        releaseAll()
        for task in held { try await task.value }
        #expect(due.count == 1)
        #expect(next != nil)
        #expect(elapsed < .seconds(2))
    }

    @Test func duplicateIPNAddsNoSecondEventButCountsIt() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let body = try Samples.data("checkout-accepted")
        let first = try await log.ingest(try ipn(body))
        let second = try await log.ingest(try ipn(body, at: 1_795_000_001_000))
        #expect(!first.duplicate && second.duplicate)
        #expect(first.eventID == second.eventID)
        let events = try await log.events(.init())
        #expect(events.count == 1)
        #expect(events.first?.duplicates == 1)
        #expect(events.first?.state == "received")
        let detail = try #require(try await log.event(id: first.eventID))
        #expect(detail.receipts.count == 2)
    }

    @Test func newStatusOfTheSameTransactionIsASecondEvent() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let pending = try await log.ingest(try ipn(checkoutBody(transaction: "tx-1", state: 4)))
        let accepted = try await log.ingest(try ipn(checkoutBody(transaction: "tx-1", state: 2)))
        #expect(pending.eventID != accepted.eventID)
        let types = try await log.events(.init()).map(\.type).sorted()
        #expect(types == ["checkout.accepted", "checkout.pending"])
    }

    @Test func sixteenConcurrentPostsOfOneIPNMakeExactlyOneEvent() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let incoming = try ipn(try Samples.data("withdrawal-rejected"))
        let outcomes = try await withThrowingTaskGroup(of: IngestOutcome.self) { group in
            for _ in 0..<16 { group.addTask { try await log.ingest(incoming) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(outcomes.map(\.eventID)).count == 1)
        #expect(outcomes.filter { !$0.duplicate }.count == 1)
        let counts = try await log.counts()
        #expect(counts.events == 1 && counts.receipts == 16)
        #expect(try await log.events(.init()).first?.duplicates == 15)
    }

    @Test func eventsSurviveARestart() async throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("events.sqlite3")
        let first = try SQLiteEventLog.open(path: path, mode: .daemon)
        let outcome = try await first.ingest(try ipn(try Samples.data("legacy-v1-success")))
        first.close()
        let reopened = try SQLiteEventLog.open(path: path, mode: .tool, create: false)
        defer { reopened.close() }
        let event = try #require(try await reopened.event(id: outcome.eventID)?.event)
        #expect(event.type == "checkout.accepted")
        #expect(event.state == "verified")
        #expect(event.verification == "signature")
        #expect(event.legacy)
        #expect(event.amount == "100.0000")
        #expect(event.ipn == (try Samples.data("legacy-v1-success")))
    }

    @Test func refusedRequestsAreReceiptsWithoutEvents() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        try await log.recordRefused(
            RefusedIPN(
                receivedAt: 1_795_000_000_000, sourceIP: "3.125.109.58", path: "/payop/ipn", reason: .invalidJSON,
                body: Array("nope".utf8), notification: nil))
        _ = try await log.ingest(try ipn(try Samples.data("checkout-accepted")))
        let refused = try await log.receipts(refusedOnly: true, since: nil, limit: 50)
        #expect(refused.count == 1)
        #expect(refused.first?.answer == 400 && refused.first?.reason == "invalid_json" && refused.first?.eventID == nil)
        #expect(try await log.receipts(refusedOnly: false, since: nil, limit: 50).count == 2)
        #expect(try await log.counts().events == 1)
    }

    /// A log in `dir` whose checkpoints catch up past 16 WAL frames, holding 30 checkouts.
    func logPastItsWALLimit(in dir: TemporaryDirectory) async throws -> SQLiteEventLog {
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, walRestartFrames: 16)
        for n in 0..<30 { _ = try await log.ingest(try ipn(checkoutBody(transaction: "tx-\(n)", state: 2))) }
        return log
    }

    /// Commits one more checkout; true when it was written over the WAL's old frames (the file did not grow).
    func nextCommitReusesTheWAL(_ log: SQLiteEventLog, in dir: TemporaryDirectory) async throws -> Bool {
        let walSize = { try FileManager.default.attributesOfItem(atPath: dir.file("events.sqlite3-wal"))[.size] as? Int }
        let before = try walSize()
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "after", state: 2)))
        return try walSize() == before
    }

    @Test func aCheckpointPastTheLimitSaysSoAndTheNextCommitStartsTheWALOver() async throws {
        let dir = try TemporaryDirectory()
        let log = try await logPastItsWALLimit(in: dir)
        defer { log.close() }
        // Past the limit (the service looks again sooner), copied up to the last commit: the next commit
        // starts the WAL over.
        #expect(try log.checkpoint() > 16)
        #expect(try await nextCommitReusesTheWAL(log, in: dir))  // over the old frames: the file did not grow
        let frames = try log.checkpoint()
        #expect(frames > 0 && frames <= 16)  // one commit's frames, written from the top
        #expect(try await log.counts().events == 31)
    }

    /// A checkpoint past the limit syncs the database file; the daemon keeps its locks on the file
    /// while it does. Without them, a tool's connection closing in another process (`events list`)
    /// would find itself the last one, checkpoint and delete the WAL, and the daemon's next commits
    /// would go to a deleted file: answered, and gone.
    @Test func aCheckpointThatSyncsLeavesNoOtherProcessTheWALToDelete() async throws {
        let dir = try TemporaryDirectory()
        let log = try await logPastItsWALLimit(in: dir)
        defer { log.close() }
        #expect(try log.checkpoint() > 16)
        let path = dir.file("events.sqlite3")
        let script = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute('SELECT count(*) FROM events').fetchone()[0]); c.close()"
        func countFromAnotherProcess() throws -> String {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["python3", "-c", script, path]
            let output = Pipe()
            process.standardOutput = output
            try process.run()
            let printed = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return printed.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try countFromAnotherProcess() == "30")
        #expect(FileManager.default.fileExists(atPath: dir.file("events.sqlite3-wal")))
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "after", state: 2)))
        #expect(try countFromAnotherProcess() == "31")
    }

    @Test func pastTheLimitTheWriterCopiesWhatTheOtherConnectionCouldNot() async throws {
        let dir = try TemporaryDirectory()
        let log = try await logPastItsWALLimit(in: dir)
        defer { log.close() }
        // A reader's snapshot stops the other connection's passes short of the WAL's end.
        let reader = try lockingConnection(dir.file("events.sqlite3"))
        try await reader.writeWithoutTransaction { db in
            try db.execute(sql: "BEGIN")
            _ = try Int.fetchOne(db, sql: "SELECT count(*) FROM events")
        }
        for n in 0..<5 { _ = try await log.ingest(try ipn(checkoutBody(transaction: "late-\(n)", state: 2))) }
        #expect(try log.checkpoint() > 16)
        try await log.checkWritable()  // the writer has taken its turn
        #expect(log.writerCheckpoints == 1)  // asked for: past the limit, a few frames left
        try await reader.writeWithoutTransaction { db in try db.execute(sql: "COMMIT") }
        // The writer's checkpoint, between two batches, catches up; its next commit starts the WAL over.
        log.checkpointFromWriter()
        try await log.checkWritable()
        #expect(try await nextCommitReusesTheWAL(log, in: dir))
        #expect(try await log.counts().events == 36)
    }

    @Test func fullDiskFailsTheWriteAndLosesNothingAlreadyCommitted() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "before", state: 2)))
        // Cap the file at its current size: the next page SQLite needs fails with SQLITE_FULL.
        try await log.write { db in
            let pages = try Int.fetchOne(db, sql: "PRAGMA page_count") ?? 0
            _ = try Int.fetchOne(db, sql: "PRAGMA max_page_count = \(pages)")
        }
        let big = Array(String(repeating: "x", count: 60_000).utf8)
        var body = checkoutBody(transaction: "after", state: 2)
        body.removeLast()
        body += Array(#","padding":""#.utf8) + big + Array(#""}"#.utf8)
        await #expect(throws: EventLogError.self) { try await log.ingest(try ipn(body)) }
        try await log.write { db in _ = try Int.fetchOne(db, sql: "PRAGMA max_page_count = 1073741823") }
        let types = try await log.events(.init()).map(\.transactionID)
        #expect(types == ["before"])
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "after-space", state: 2)))
        #expect(try await log.counts().events == 2)
    }

    @Test func eventFiltersNarrowTheList() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "a", state: 4), at: 1_000))
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "a", state: 2), at: 2_000))
        _ = try await log.ingest(try ipn(try Samples.data("refund-accepted"), at: 3_000))
        #expect(try await log.events(.init()).map(\.type) == ["refund.accepted", "checkout.accepted", "checkout.pending"])
        #expect(try await log.events(.init(type: "checkout.accepted")).count == 1)
        #expect(try await log.events(.init(status: "accepted")).count == 2)
        #expect(try await log.events(.init(since: 2_000)).count == 2)
        #expect(try await log.events(.init(limit: 1)).count == 1)
        #expect(try await log.events(.init(state: "verified")).isEmpty)
    }

    @Test func pruneDeletesOldReceiptsButKeepsEventsAndTheirFirstIPN() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let old = try await log.ingest(try ipn(checkoutBody(transaction: "old", state: 2), at: 1_000))
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "old", state: 2), at: 2_000))
        try await log.recordRefused(
            RefusedIPN(
                receivedAt: 3_000, sourceIP: "3.125.109.58", path: "/payop/ipn", reason: .invalidJSON, body: [],
                notification: nil))
        _ = try await log.ingest(try ipn(checkoutBody(transaction: "new", state: 2), at: 9_000))
        #expect(try await log.prune(before: 5_000) == .init(receipts: 2, deliveries: 0))
        let counts = try await log.counts()
        #expect(counts.events == 2 && counts.receipts == 2)
        let event = try #require(try await log.event(id: old.eventID))
        #expect(event.event.ipn == checkoutBody(transaction: "old", state: 2))
        #expect(event.event.duplicates == 1)
    }

    /// Receipts stamped up to the slack out of order (two event loops), in seeded random runs: the time
    /// ranges read through the ids' order find exactly what the stamps say, and pruning deletes exactly
    /// what was received before its cutoff. With stamps further out of order (a clock stepped back by
    /// more), pruning still never deletes a receipt received at or after its cutoff.
    @Test(arguments: [(UInt64(1), false), (2, false), (3, false), (4, true), (5, true)])
    func timeRangesOverReceiptsFollowTheirStamps(seed: UInt64, wild: Bool) async throws {
        var random = SeededRandom(seed: seed)
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let slack = SQLiteEventLog.receiptOrderSlack
        let start: Int64 = 1_795_000_000_000
        var clock = start
        let stamps = (0..<Int.random(in: 1...400, using: &random)).map { _ in
            clock += Int64.random(in: 0...3_000, using: &random)
            return clock + Int64.random(in: 0..<(wild ? 20 * slack : slack), using: &random)
        }
        try await log.write { db in
            for (n, at) in stamps.enumerated() {
                try db.execute(
                    sql: """
                        INSERT INTO receipts (received_at, source_ip, path, answer, size, body)
                        VALUES (?, '3.125.109.58', '/payop/ipn', ?, 0, x'')
                        """, arguments: [at, n % 3 == 0 ? 401 : 200])
            }
        }
        let ids: @Sendable (String, Int64) async throws -> [Int64] = { condition, time in
            try await log.read { try Int64.fetchAll($0, sql: "SELECT id FROM receipts WHERE \(condition) ORDER BY id DESC", arguments: [time]) }
        }
        let lowest = stamps.min()!, highest = stamps.max()!
        for _ in 0..<40 {
            let time = Int64.random(in: (lowest - 2 * slack)...(highest + 2 * slack), using: &random)
            let found = try await log.receipts(refusedOnly: false, since: time, limit: 10_000).map(\.id)
            if !wild { #expect(found == (try await ids("received_at >= ?", time)), "since \(time)") }
            let overview = try await log.overview(now: time + 86_400_000)
            let day = try await ids("received_at >= ? AND answer = 200", time)
            if !wild { #expect(overview.ipnsLastDay == day.count && overview.ipnsPerMinute.reduce(0, +) <= day.count) }
        }
        let cutoff = Int64.random(in: lowest...(highest + 1), using: &random)
        let old = try await ids("received_at < ?", cutoff)
        let pruned = try await log.prune(before: cutoff).receipts
        let kept = Set(try await ids("received_at >= ?", Int64.min))
        #expect(kept.isSuperset(of: try await ids("received_at >= ?", cutoff)))
        #expect(wild ? pruned <= old.count : pruned == old.count)
        #expect(kept.isDisjoint(with: wild ? [] : old) && kept.count + pruned == stamps.count)
        // The ids pruning left, with gaps, still bisect.
        for _ in 0..<20 where !wild {
            let time = Int64.random(in: (lowest - 2 * slack)...(highest + 2 * slack), using: &random)
            let found = try await log.receipts(refusedOnly: false, since: time, limit: 10_000).map(\.id)
            #expect(found == (try await ids("received_at >= ?", time)), "since \(time), after pruning")
        }
    }

    /// The ends of time, on an empty log and on one with receipts: nothing traps, and the bounds hold.
    @Test func timeRangesAtTheEndsOfTimeHoldTheirBounds() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        #expect(try await log.receipts(refusedOnly: false, since: 0, limit: 10).isEmpty)
        #expect(try await log.receipts(refusedOnly: false, since: .min, limit: 10).isEmpty)
        #expect(try await log.prune(before: .max) == .init(receipts: 0, deliveries: 0))
        #expect(try await log.overview(now: 1_795_000_000_000).ipnsLastDay == 0)
        for n in 0..<3 {
            _ = try await log.ingest(try ipn(checkoutBody(transaction: "ends-\(n)", state: 2), at: 1_795_000_000_000 + Int64(n)))
            _ = try await log.ingest(try ipn(checkoutBody(transaction: "ends-\(n)", state: 2), at: 1_795_000_000_100 + Int64(n)))
        }
        #expect(try await log.receipts(refusedOnly: false, since: .min, limit: 10).count == 6)
        #expect(try await log.receipts(refusedOnly: false, since: .max, limit: 10).isEmpty)
        #expect(try await log.prune(before: .min) == .init(receipts: 0, deliveries: 0))
        // Every receipt but the three each event's `ipn` comes from.
        #expect(try await log.prune(before: .max) == .init(receipts: 3, deliveries: 0))
    }

    /// Events' ids are made for their receipt's time and never before it, so a time range is an id range
    /// plus the exact test: with the clock stepped back between IPNs, `since` still finds exactly the
    /// events stamped at or after it, and the newest-first list pages through every event once.
    @Test func eventTimeRangesFindWhatTheStampsSayWithTheClockSteppedBack() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let stamps: [Int64] = [now, now + 5, now - 120_000, now - 119_990, now + 10, now - 300_000, now + 10]
        for (n, at) in stamps.enumerated() {
            _ = try await log.ingest(try ipn(checkoutBody(transaction: "stepped-\(n)", state: 2), at: at))
        }
        for since in Set(stamps.flatMap { [$0 - 1, $0, $0 + 1] }) {
            let found = try await log.events(.init(since: since, limit: 100)).map(\.id)
            let stamped = try await log.read {
                try String.fetchAll($0, sql: "SELECT id FROM events WHERE received_at >= ?", arguments: [since])
            }
            #expect(Set(found) == Set(stamped) && found.count == stamped.count, "since \(since)")
        }
        var pages: [[String]] = []
        var cursor: EventCursor?
        repeat {
            let page = try await log.events(.init(before: cursor, limit: 2))
            pages.append(page.map(\.id))
            cursor = page.last.map { EventCursor(receivedAt: $0.receivedAt, id: $0.id) }
        } while !(pages.last?.isEmpty ?? true) && pages.count <= stamps.count
        #expect(Set(pages.joined()).count == stamps.count && pages.joined().count == stamps.count)
        // The bound itself: the time's digits, then the smallest of the rest; later times sort later.
        for at: Int64 in [0, 1_000, now] {
            let first = SortableID.first(prefix: "evt_", millisecondsSince1970: at)
            #expect(first.count == 30 && first.hasSuffix("0000000000000000"))
            #expect(first < SortableID.first(prefix: "evt_", millisecondsSince1970: at + 1))
            #expect(SortableID.make(prefix: "evt_", millisecondsSince1970: at) >= first)
        }
    }

    /// Every index is a page more in most commits: what each table carries is decided here, not by accident.
    @Test func theIngestTablesCarryOnlyTheIndexesTheHotPathAndTheVerifierNeed() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let indexes = try await log.read { db in
            try String.fetchAll(
                db, sql: "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('events', 'receipts') ORDER BY name")
        }
        // The id and the dedupe key; the verifier's schedule; each event's copies (and the foreign key's check).
        #expect(indexes == ["events_due_for_check", "receipts_by_event", "sqlite_autoindex_events_1", "sqlite_autoindex_events_2"])
    }

    /// A first run that delivered leaves no history row, and a delivered delivery no entry in
    /// `deliveries_by_state`: the reads by state still walk that index, as they name its condition.
    @Test func aDeliveredFirstRunWritesNoHistoryRowAndReadsByStateKeepTheirIndex() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock(storeStart)
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        log.setHooks([storeHook("fulfil")])
        _ = try await log.ingest(try signedIPN(order: "5"))
        let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
        let claim = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
        _ = try await log.finishDelivery(
            id: delivery.id, attempt: claim.attempt, result: HookResult(outcome: .delivered, exitCode: 0), maxAttempts: 30,
            backoff: deliveryBackoff, now: storeStart + 1)
        let (history, indexed) = try await log.read { db in
            (
                try Int.fetchOne(db, sql: "SELECT count(*) FROM delivery_attempts"),
                try Int.fetchOne(db, sql: "SELECT count(*) FROM deliveries INDEXED BY deliveries_by_state WHERE \(Delivery.byState)")
            )
        }
        #expect(history == 0 && indexed == 0)

        var queries = [
            SQLiteEventLog.runningDeliveries, SQLiteEventLog.deliveryCountsQuery, SQLiteEventLog.deadByHookQuery,
            SQLiteEventLog.deadOfHookQuery,
        ]
        for state in ["pending", "running", "dead"] {
            for deadFirst in [false, true] {
                queries.append(
                    SQLiteEventLog.deliveriesQuery(state: state, hook: nil, eventID: nil, deadFirst: deadFirst).sql)
            }
        }
        for query in queries {
            let plan = try await log.read { db in
                let unbound = [(any DatabaseValueConvertible)?](repeating: nil, count: query.filter { $0 == "?" }.count)
                return try Row.fetchAll(db, sql: "EXPLAIN QUERY PLAN \(query)", arguments: StatementArguments(unbound))
                    .map { $0["detail"] as String }.joined(separator: "; ")
            }
            #expect(plan.contains("deliveries_by_state"), "\(query): \(plan)")
        }
    }

    /// A daemon of the previous version sharing the log while they are upgraded still writes every run
    /// to the history: its copy of a first run that delivered is shown once, and a replay does not add
    /// a second.
    @Test func aFirstRunAnEarlierVersionAlsoRecordedIsShownOnceAndNotRecordedAgainByAReplay() async throws {
        let dir = try TemporaryDirectory()
        let clock = TestClock(storeStart)
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon, clock: clock)
        defer { log.close() }
        let hooks = [storeHook("fulfil")]
        log.setHooks(hooks)
        let eventID = try await log.ingest(try signedIPN(order: "6")).eventID
        let delivery = try #require(try await log.runnableDeliveries(now: storeStart, hooks: ["fulfil"], limit: 1).first)
        _ = try #require(try await log.claimDelivery(id: delivery.id, now: storeStart))
        _ = try await log.finishDelivery(
            id: delivery.id, attempt: 1, result: HookResult(outcome: .delivered, exitCode: 0, output: "ok\n"),
            maxAttempts: 30, backoff: deliveryBackoff, now: storeStart + 1)
        try await log.write { db in
            try db.execute(
                sql: """
                    INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, output)
                    VALUES (?, 1, ?, 'delivered', 0, 'ok\n')
                    """, arguments: [delivery.id, storeStart + 1])
        }
        #expect(try await log.event(id: eventID)?.deliveryAttempts.count == 1)
        #expect(try await log.replay(eventID: eventID, hook: nil, hooks: hooks, now: storeStart + 2) == 1)
        #expect(try await log.event(id: eventID)?.deliveryAttempts.map(\.output) == ["ok\n"])
        let rows = try await log.read { db in try Int.fetchOne(db, sql: "SELECT count(*) FROM delivery_attempts") }
        #expect(rows == 1)
    }

    /// A log at `dir`'s `events.sqlite3` as a version whose last migration was `migration` left it,
    /// holding the rows `rows` inserts; returns its path.
    func logOfAnEarlierVersion(in dir: TemporaryDirectory, upTo migration: String, rows: String) async throws -> String {
        let path = dir.file("events.sqlite3")
        let queue = try DatabaseQueue(path: path)
        try Schema.migrator.migrate(queue, upTo: migration)
        try await queue.write { db in try db.execute(sql: rows) }
        try queue.close()
        return path
    }

    /// An event `id` (of a checkout also named `id`), received and not yet verified.
    static func insertEvent(_ db: Database, _ id: String = "evt_1") throws {
        try db.execute(
            sql: """
                INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at)
                VALUES (?, 'checkout', ?, 'accepted', 'accepted', 'received', 'ipn', 1000)
                """, arguments: [id, id])
    }

    /// A copy of the IPN of `event` answered `answer`, with its claims: `orderSQL` is an SQL expression
    /// (another program's values can only be written so), the others are bound.
    static func insertCopy(
        _ db: Database, of event: String = "evt_1", answer: Int = 200, orderSQL: String = "?", _ claims: [String?]
    ) throws {
        try db.execute(
            sql: """
                INSERT INTO receipts (received_at, source_ip, path, answer, event_id, size, body, claim_order_id,
                                      claim_amount, claim_currency, claim_invoice_id, claim_transaction_id)
                VALUES (1000, '127.0.0.1', '/payop/ipn', ?, ?, 2, X'7B7D', \(orderSQL), ?, ?, ?, ?)
                """, arguments: StatementArguments([answer, event] as [(any DatabaseValueConvertible)?] + claims))
    }

    /// The log of an earlier version: migration 0007 takes out the history row a first run that delivered
    /// had beside its delivery's row, and the history read back is the same.
    @Test func theLeanDeliveriesMigrationKeepsEveryRunOfTheHistory() async throws {
        let dir = try TemporaryDirectory()
        let path = try await logOfAnEarlierVersion(
            in: dir, upTo: "0006-time-ordered-ids",
            rows: """
                INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at, verified_at)
                VALUES ('evt_1', 'checkout', 'tx-1', 'accepted', 'accepted', 'verified', 'ipn', 1000, 1001);
                INSERT INTO deliveries (id, event_id, hook, kind, entity_id, state, attempts, next_attempt_at,
                                        last_exit_code, output, created_at, finished_at, delivered_at)
                VALUES (1, 'evt_1', 'a', 'checkout', 'tx-1', 'delivered', 1, 1010, 0, 'a1', 1001, 1010, 1010),
                       (2, 'evt_1', 'b', 'checkout', 'tx-1', 'delivered', 2, 1030, 0, 'b2', 1001, 1030, 1030),
                       (3, 'evt_1', 'c', 'checkout', 'tx-1', 'delivered', 1, 1060, 0, 'c1b', 1001, 1060, 1060),
                       (4, 'evt_1', 'd', 'checkout', 'tx-1', 'dead', 1, 1070, 1, 'd1', 1001, 1070, NULL);
                INSERT INTO delivery_attempts (delivery_id, attempt, finished_at, outcome, exit_code, output)
                VALUES (1, 1, 1010, 'delivered', 0, 'a1'),
                       (2, 1, 1020, 'failed', 1, 'b1'), (2, 2, 1030, 'delivered', 0, 'b2'),
                       (3, 1, 1040, 'delivered', 0, 'c1a'), (3, 1, 1060, 'delivered', 0, 'c1b'),
                       (4, 1, 1070, 'failed', 1, 'd1');
                """)
        let log = try SQLiteEventLog.open(path: path, mode: .daemon)
        defer { log.close() }
        #expect(try FirstRunsMigrationFixture.runs(try await log.event(id: "evt_1")) == FirstRunsMigrationFixture.expectedRuns)
        let kept = try await log.read { db in
            try String.fetchAll(db, sql: "SELECT output FROM delivery_attempts ORDER BY id")
        }
        #expect(kept == FirstRunsMigrationFixture.keptOutputs)
    }

    /// The writer reads an event's claims for every answer by walking its copies, not with SQLite's
    /// grouped query: the two give the same list for any set of copies (seeded, with repeats, NULLs,
    /// refused copies, two byte spellings of one character, and more copies than the walk takes, where
    /// the grouped query answers and the count of distinct claims is what is checked), and the walk
    /// needs no sort.
    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8])
    func theWalkedClaimsAreTheGroupedQuerysForAnySetOfCopies(seed: UInt64) async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        var random = SeededRandom(seed: seed)
        // "é" precomposed and decomposed: one string to Swift's ==, two to SQLite's GROUP BY.
        let orders: [String?] = [nil, "o-1", "o-2", "caf\u{E9}", "cafe\u{301}"]
        let amounts: [String?] = [nil, "10.00", "10.0", "99.99"]
        let currencies: [String?] = [nil, "EUR", "USD"]
        for event in 0..<6 {
            let copies = [1, 2, 5, SQLiteEventLog.claimsWalked, SQLiteEventLog.claimsWalked + 1, 150][event]
            let rows = (0..<copies).map { _ in
                (
                    Int.random(in: 0..<8, using: &random) == 0 ? 400 : 200,
                    [
                        orders.randomElement(using: &random)!, amounts.randomElement(using: &random)!,
                        currencies.randomElement(using: &random)!, Bool.random(using: &random) ? "inv-1" : nil,
                        Bool.random(using: &random) ? "tx-1" : "tx-2",
                    ]
                )
            }
            let eventID = "evt_\(seed)_\(event)"
            let (walked, grouped, distinct) = try await log.write { db in
                try Self.insertEvent(db, eventID)
                for (answer, claims) in rows { try Self.insertCopy(db, of: eventID, answer: answer, claims) }
                return (
                    try SQLiteEventLog.claims(db, eventID), try SQLiteEventLog.groupedClaims(db, eventID),
                    try Int.fetchOne(
                        db,
                        sql: """
                            SELECT count(*) FROM (SELECT DISTINCT claim_order_id, claim_amount, claim_currency,
                            claim_invoice_id, claim_transaction_id FROM receipts WHERE event_id = ? AND answer = 200)
                            """, arguments: [eventID]) ?? 0
                )
            }
            #expect(walked == grouped, "seed \(seed), \(copies) copies")
            #expect(walked.count == min(distinct, 100), "seed \(seed), \(copies) copies")
        }
        let plan = try await log.read { db in
            try Row.fetchAll(db, sql: "EXPLAIN QUERY PLAN \(SQLiteEventLog.claimsQuery)", arguments: ["evt_1"])
                .map { $0["detail"] as String }.joined(separator: "; ")
        }
        #expect(plan.contains("receipts_by_event") && !plan.contains("TEMP B-TREE"), "\(plan)")
    }

    /// Two copies whose order ids are two byte spellings of "café" claim two things, as SQLite's GROUP
    /// BY has it: the walk does not merge them the way Swift's `==` would, so neither hides the other.
    @Test func twoSpellingsOfOneCharacterAreTwoClaims() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let claims = try await log.write { db in
            try Self.insertEvent(db)
            for order in ["caf\u{E9}", "cafe\u{301}", "caf\u{E9}"] { try Self.insertCopy(db, [order, "10.00", "EUR", nil, nil]) }
            return try SQLiteEventLog.claims(db, "evt_1")
        }
        #expect(claims.map(\.receiptID) == [2, 1])
        #expect(claims.map { Array($0.orderID?.utf8 ?? "".utf8) } == [Array("cafe\u{301}".utf8), Array("caf\u{E9}".utf8)])
    }

    /// Claims another program stored (a blob, text with a NUL inside, bytes that are not UTF-8) could
    /// read as the same string though SQLite groups them apart: the walk hands such an event to the
    /// grouped query, so no copy hides another's claim.
    @Test func claimsThatDoNotReadAsStoredAreGroupedBySQLite() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let (walked, grouped) = try await log.write { db in
            try Self.insertEvent(db)
            for order in ["'o-1'", "X'6F2D31'", "'o-1' || char(0) || 'x'", "CAST(X'F09F98' AS TEXT)", "CAST(X'E282' AS TEXT)"] {
                try Self.insertCopy(db, orderSQL: order, ["10.00", "EUR", nil, nil])
            }
            return (try SQLiteEventLog.claims(db, "evt_1"), try SQLiteEventLog.groupedClaims(db, "evt_1"))
        }
        #expect(walked.map(\.receiptID) == [5, 4, 3, 2, 1])
        #expect(walked == grouped)
    }

    /// The state checks of events and deliveries, as migration 0008 leaves a log of the previous version:
    /// writing a state builds no temporary b-tree (`OpenEphemeral`, which a CHECK with a list of three
    /// values or more costs every statement that runs it), an unknown state is still refused, and the
    /// rows and the file are intact.
    @Test func stateChecksBuildNoTemporaryTableAndStillRefuseAnUnknownState() async throws {
        let dir = try TemporaryDirectory()
        let path = try await logOfAnEarlierVersion(
            in: dir, upTo: "0007-lean-deliveries",
            rows: """
                INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at)
                VALUES ('evt_1', 'checkout', 'tx-1', 'accepted', 'accepted', 'verified', 'ipn', 1000);
                INSERT INTO deliveries (event_id, hook, kind, entity_id, state, next_attempt_at, created_at)
                VALUES ('evt_1', 'fulfil', 'checkout', 'tx-1', 'pending', 1000, 1000);
                """)
        let log = try SQLiteEventLog.open(path: path, mode: .daemon)
        defer { log.close() }
        let writes = [
            "INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at) VALUES (?, 'checkout', ?, 'accepted', 'accepted', ?, 'ipn', 1)",
            "UPDATE events SET state = ?, next_check_at = NULL WHERE id = ?",
            "INSERT INTO deliveries (event_id, hook, kind, entity_id, state, next_attempt_at, created_at) VALUES (?, 'fulfil', 'checkout', ?, ?, 1, 1)",
            "UPDATE deliveries SET state = ?, attempts = attempts + 1 WHERE id = ?",
        ]
        let (programs, rows, integrity) = try await log.write { db in
            (
                try writes.map { sql in
                    try Row.fetchAll(db, sql: "EXPLAIN \(sql)", arguments: StatementArguments([String?](repeating: nil, count: sql.filter { $0 == "?" }.count)))
                        .map { $0["opcode"] as String }
                },
                try Int.fetchOne(db, sql: "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM deliveries)"),
                try String.fetchOne(db, sql: "PRAGMA integrity_check")
            )
        }
        for (sql, program) in zip(writes, programs) {
            #expect(!program.contains("OpenEphemeral"), "\(sql)")
        }
        #expect(rows == 2 && integrity == "ok")
        for refused in [
            "UPDATE events SET state = 'delivered' WHERE id = 'evt_1'", "UPDATE deliveries SET state = 'verified' WHERE id = 1",
        ] {
            do {
                try await log.write { db in try db.execute(sql: refused) }
                Issue.record("\(refused) was accepted")
            } catch {
                #expect("\(error)".contains("CHECK constraint failed"), "\(refused): \(error)")
            }
        }
        for state in ["received", "verified", "rejected"] {
            try await log.write { db in try db.execute(sql: "UPDATE events SET state = ? WHERE id = 'evt_1'", arguments: [state]) }
        }
        for state in ["pending", "running", "delivered", "dead"] {
            try await log.write { db in try db.execute(sql: "UPDATE deliveries SET state = ? WHERE id = 1", arguments: [state]) }
        }
    }

    /// A library in defensive mode (macOS's turns it on for every connection) refuses edits of the schema:
    /// migration 0008 then leaves the checks as they were, and the log opens and works.
    @Test func theChecksMigrationLeavesALibraryInDefensiveModeItsListsAndTheLogWorks() async throws {
        let dir = try TemporaryDirectory()
        var configuration = Configuration()
        configuration.prepareDatabase { db in
            #expect(payop_sqlite3_db_config_defensive(db.sqliteConnection, 1) == 0)
        }
        let queue = try DatabaseQueue(path: dir.file("events.sqlite3"), configuration: configuration)
        try Schema.migrator.migrate(queue)
        let (schema, applied) = try await queue.write { db in
            try db.execute(
                sql: """
                    INSERT INTO events (id, kind, entity_id, status, status_key, state, source, received_at)
                    VALUES ('evt_1', 'checkout', 'tx-1', 'accepted', 'accepted', 'received', 'ipn', 1000)
                    """)
            return (
                try String.fetchAll(db, sql: "SELECT sql FROM sqlite_schema WHERE name IN ('events', 'deliveries')"),
                try Schema.migrator.appliedIdentifiers(db)
            )
        }
        #expect(schema.count == 2 && schema.allSatisfy { $0.contains("CHECK (state IN (") })
        #expect(applied.contains("0008-checks-without-lists"))
    }

    /// What `top -H`, `perf` and a stack dump show: the thread that fsyncs is named, not one of the pool's.
    @Test func theWriterThreadCarriesItsNameWhereOperatorsLook() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        // Read on the writer thread itself: another test's writer carries the same name.
        let name = try await log.write { _ in try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8) }
        #expect(name == "ipnd-log-writer\n")
    }

    /// `serve` sets glibc's allocator to keep what the writer frees (`MemoryTuning`): `mallopt` is found
    /// and takes both thresholds (it refuses an `mmap` threshold above 32 MB, for one). What it bought
    /// is measured, not tested here: a test process's heaps are too busy to show a thread's trims.
    @Test func theAllocatorTakesTheDaemonsThresholds() {
        #expect(MemoryTuning.keepFreedMemory())
    }

    /// The ingest's statements bound through SQLite's C API store what GRDB stores for the same values
    /// (a NUL inside text, non-ASCII, NULLs, bytes that are not UTF-8), so a row written one way is found
    /// the other; they fail with GRDB's error and result code, and run again after failing.
    @Test func rawStatementsStoreWhatGRDBWouldAndFailTheSameWay() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        try await log.write { db in
            try db.execute(sql: "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT, n INTEGER, b BLOB NOT NULL)")
            let insert = try db.cachedStatement(sql: "INSERT INTO t (id, s, n, b) VALUES (?, ?, ?, ?)")
            let texts: [String?] = ["é\u{0}x", "", nil, "o-1\u{1F600}", "\u{0}"]
            for (index, text) in texts.enumerated() {
                let bytes: [UInt8] = [0xFF, 0x00, UInt8(index)]
                try insert.run { $0.add(Int64(2 * index)); $0.add(text); $0.add(index == 2 ? nil : index); $0.add(blob: bytes) }
                try db.execute(
                    sql: "INSERT INTO t (id, s, n, b) VALUES (?, ?, ?, ?)",
                    arguments: [2 * index + 1, text, index == 2 ? nil : index, Data(bytes)])
            }
            let differing = try Int.fetchOne(
                db, sql: "SELECT count(*) FROM t AS raw JOIN t AS grdb ON grdb.id = raw.id + 1 WHERE raw.id % 2 = 0 AND NOT (raw.s IS grdb.s AND raw.n IS grdb.n AND raw.b = grdb.b)")
            #expect(differing == 0)
            #expect(try Int.fetchOne(db, sql: "SELECT count(*) FROM t") == 2 * texts.count)
            let failure = #expect(throws: DatabaseError.self) {
                try insert.run { $0.add(0 as Int64?); $0.add("again"); $0.add(0 as Int?); $0.add(blob: [1]) }
            }
            #expect(failure?.resultCode == .SQLITE_CONSTRAINT)
            try insert.run { $0.add(100 as Int64?); $0.add("after"); $0.add(7 as Int?); $0.add(blob: []) }
            try insert.run { $0.add(101 as Int64?); $0.add("yes"); $0.add(true); $0.add(blob: [3]) }
            #expect(try Int.fetchOne(db, sql: "SELECT n FROM t WHERE id = 101") == 1)
            // A value missing, or one too many, fails the statement (as GRDB refuses it): nothing is stored.
            let missing = #expect(throws: DatabaseError.self) {
                try insert.run { $0.add(102 as Int64?); $0.add("short"); $0.add(1 as Int?) }
            }
            #expect(missing?.resultCode == .SQLITE_MISUSE)
            let extra = #expect(throws: DatabaseError.self) {
                try insert.run { $0.add(103 as Int64?); $0.add("long"); $0.add(1 as Int?); $0.add(blob: [4]); $0.add("x") }
            }
            #expect(extra?.resultCode == .SQLITE_RANGE)
            #expect(try Int.fetchOne(db, sql: "SELECT count(*) FROM t WHERE id IN (102, 103)") == 0)
            let read = try db.cachedStatement(sql: "SELECT s, length(b) FROM t WHERE id = ?")
            #expect(try read.firstRow { $0.add(100 as Int64?) } read: { $0.text(0) } == "after")
            #expect(try Int.fetchOne(db, sql: "SELECT length(b) FROM t WHERE id = 100") == 0)
            #expect(try read.firstRow { $0.add(99 as Int64?) } read: { $0.text(0) } == nil)
        }
    }

    @Test func openingAMissingLogForAToolIsAClearError() throws {
        let dir = try TemporaryDirectory()
        #expect(throws: EventLogError.self) {
            try SQLiteEventLog.open(path: dir.file("absent.sqlite3"), mode: .tool, create: false)
        }
    }

    @Test func eventJSONHasEveryKeyAndEchoesTheIPN() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let outcome = try await log.ingest(try ipn(try Samples.data("refund-accepted")))
        let event = try #require(try await log.event(id: outcome.eventID)?.event)
        let json = try #require(
            try JSONSerialization.jsonObject(with: JSONEncoder().encode(event)) as? [String: Any])
        let keys = [
            "id", "type", "kind", "status", "state", "rejection_reason", "source", "transaction_id", "invoice_id",
            "order_id", "refund_id", "withdrawal_id", "amount", "currency", "payop_state", "error_message", "legacy",
            "verification", "received_at", "verified_at", "duplicates", "ipn",
        ]
        #expect(Set(json.keys) == Set(keys))
        #expect(json["rejection_reason"] is NSNull)
        #expect(json["amount"] as? String == "100")
        #expect(json["source"] as? String == "ipn")
        #expect((json["ipn"] as? [String: Any])?["sourceTransaction"] != nil)
        #expect((json["id"] as? String)?.hasPrefix("evt_") == true)
    }

    @Test func hookBodyIsTheSameObjectAsTheEncodableEventWithTheIPNAsReceived() throws {
        let samples = try ["checkout-accepted", "refund-accepted", "legacy-v1-success", "withdrawal-rejected"].map {
            Array(try Samples.data($0))
        }
        let awkward = ["", "plain", "quote \" and \\ backslash", "tab\tnew\nline\rcr", "\u{01}\u{1f}\u{7f}", "ünïcødé €", "a/b", "🙂"]
        func object(_ bytes: some Sequence<UInt8>) throws -> NSDictionary {
            try #require(try JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed]) as? NSDictionary)
        }
        for seed in scenarioSeeds(count: 200, base: 9_100) {
            var random = SeededRandom(seed: seed)
            func text() -> String? { random.chance(0.3) ? nil : random.pick(awkward) + random.pick(awkward) }
            let event = Event(
                id: "evt_\(seed)", kind: random.pick(["checkout", "refund", "withdrawal"]), status: text() ?? "accepted",
                state: random.pick(["received", "verified", "rejected"]), rejectionReason: text(),
                source: random.pick(["ipn", "reconcile"]), transactionID: text(), invoiceID: text(), orderID: text(),
                refundID: text(), withdrawalID: text(), amount: text(), currency: text(),
                payopState: random.chance(0.5) ? Int.random(in: -1...9, using: &random) : nil, errorMessage: text(),
                legacy: random.chance(0.5), verification: text(), receivedAt: Int64.random(in: 0...4_000_000_000_000, using: &random),
                verifiedAt: random.chance(0.5) ? Int64.random(in: 0...4_000_000_000_000, using: &random) : nil,
                duplicates: Int.random(in: 0...1000, using: &random), ipn: random.chance(0.2) ? nil : random.pick(samples))
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            #expect(try object(event.hookBody) == (try object(encoder.encode(event))), "seed \(seed)")
        }
        // The IPN arrives byte for byte as received, not re-encoded (amounts keep their trailing zeros).
        let raw = Array(#"{"amount": 10.50, "b": [1,2], "a": "x"}"#.utf8)
        let event = Event(
            id: "evt_raw", kind: "checkout", status: "accepted", state: "verified", source: "ipn", legacy: false,
            receivedAt: 0, duplicates: 0, ipn: raw)
        #expect(String(decoding: event.hookBody, as: UTF8.self).contains(#""ipn":{"amount": 10.50, "b": [1,2], "a": "x"}"#))
        // A stored body that is not one JSON value (an older log's) is null, never spliced in.
        for broken in ["", "{", "{} {}", "not json", "{\"a\":1,\"a\":2}"] {
            var old = event
            old.ipn = Array(broken.utf8)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(old.hookBody)) as? [String: Any])
            #expect(object["ipn"] is NSNull, "\(broken)")
        }
    }
}

/// The hot path's reads through SQLite's C API (`RawColumns`) against GRDB's, on a real file.
@Suite struct RawReadTests {
    @Test func eventReadRawIsTheEventGRDBReads() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        // A signed legacy IPN (verified, legacy true, its body kept) and a V2 one (received, most facts
        // NULL).
        let legacy = try Samples.data("legacy-v1-success")
        for body in [legacy, try Samples.data("checkout-accepted")] {
            _ = try await log.ingest(try SQLiteEventLogTests().ipn(body))
        }
        let pairs = try await log.read { db in
            try String.fetchAll(db, sql: "SELECT id FROM events ORDER BY id").map { id in
                let grdb = try #require(
                    try Row.fetchOne(db, sql: "\(Event.select) WHERE events.id = ?", arguments: [id])
                        .map(Event.init(row:)))
                let raw = try #require(
                    try db.makeStatement(sql: "\(Event.select) WHERE events.id = ?").firstRow { $0.add(id) } read: {
                        Event(row: $0)
                    })
                return (grdb, raw)
            }
        }
        #expect(pairs.count == 2)
        for (grdb, raw) in pairs { #expect(raw == grdb) }
        #expect(pairs.contains { $0.1.legacy && $0.1.ipn == legacy })
        #expect(pairs.contains { !$0.1.legacy && $0.1.verifiedAt == nil && $0.1.payopState != nil })
    }

    @Test func everyColumnOfAnEventAndADeliveryReadsAsGRDBReadsItByName() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let body = try Samples.data("checkout-accepted")
        let outcome = try await log.ingest(try SQLiteEventLogTests().ipn(body))
        // Every nullable column filled, each with a value of its own, so a column read at another's
        // position shows.
        try await log.write { db in
            try db.execute(
                sql: """
                    UPDATE events SET rejection_reason = 'r', transaction_id = 't', invoice_id = 'i', order_id = 'o',
                        refund_id = 'rf', withdrawal_id = 'w', amount = '10.50', currency = 'EUR', payop_state = 7,
                        error_message = 'e', legacy = 1, verification = 'payop_api', verified_at = 1795000000123,
                        duplicates = 3
                    WHERE id = ?
                    """, arguments: [outcome.eventID])
            try db.execute(
                sql: """
                    INSERT INTO deliveries (event_id, hook, kind, entity_id, state, attempts, next_attempt_at,
                        last_exit_code, last_http_status, last_error, output, created_at, delivered_at)
                    VALUES (?, 'h', 'checkout', 'x', 'pending', 4, 1795000000456, 9, 502, 'err', 'out', 1,
                            1795000000789)
                    """, arguments: [outcome.eventID])
        }
        try await log.read { db in
            let select = "\(Event.select) WHERE events.id = ?"
            let event = try #require(
                try db.makeStatement(sql: select).firstRow { $0.add(outcome.eventID) } read: { Event(row: $0) })
            let row = try #require(try Row.fetchOne(db, sql: select, arguments: [outcome.eventID]))
            let sql = "SELECT \(Delivery.columns) FROM deliveries WHERE event_id = ?"
            let delivery = try #require(
                try db.makeStatement(sql: sql).firstRow { $0.add(outcome.eventID) } read: { Delivery(row: $0) })
            let deliveryRow = try #require(try Row.fetchOne(db, sql: sql, arguments: [outcome.eventID]))
            #expect(event.id == row["id"] && event.kind == row["kind"] && event.status == row["status"])
            #expect(event.state == row["state"] && event.rejectionReason == row["rejection_reason"])
            #expect(event.source == row["source"] && event.transactionID == row["transaction_id"])
            #expect(event.invoiceID == row["invoice_id"] && event.orderID == row["order_id"])
            #expect(event.refundID == row["refund_id"] && event.withdrawalID == row["withdrawal_id"])
            #expect(event.amount == row["amount"] && event.currency == row["currency"])
            #expect(event.payopState == row["payop_state"] && event.errorMessage == row["error_message"])
            #expect(event.legacy == row["legacy"] && event.verification == row["verification"])
            #expect(event.receivedAt == row["received_at"] && event.verifiedAt == row["verified_at"])
            #expect(event.duplicates == row["duplicates"] && event.ipn == body)
            #expect(event.amount == "10.50" && event.payopState == 7 && event.duplicates == 3 && event.legacy)
            #expect(delivery.id == deliveryRow["id"] && delivery.eventID == deliveryRow["event_id"])
            #expect(delivery.hook == deliveryRow["hook"] && delivery.state.rawValue == deliveryRow["state"])
            #expect(delivery.attempts == deliveryRow["attempts"])
            #expect(delivery.nextAttemptAt == deliveryRow["next_attempt_at"])
            #expect(delivery.lastExitCode == deliveryRow["last_exit_code"])
            #expect(delivery.lastHTTPStatus == deliveryRow["last_http_status"])
            #expect(delivery.lastError == deliveryRow["last_error"] && delivery.output == deliveryRow["output"])
            #expect(delivery.deliveredAt == deliveryRow["delivered_at"])
            // Pending: a delivery in another state has no next attempt (`Delivery.init`).
            #expect(delivery.state == .pending && delivery.nextAttemptAt == 1_795_000_000_456 && delivery.attempts == 4)
        }
    }

    @Test func rawColumnsReadNullEmptyAndMultibyteValuesAsGRDBDoes() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        // Each column read as its type (GRDB stops on a text read as a number): texts, blobs, integers.
        let sql = """
            SELECT NULL, '', 'Zahlung über 10 €', x'', x'00FF', 0, -9223372036854775808, 1, 'a' || char(0) || 'b'
            """
        let (grdb, raw) = try await log.read { db in
            let row = try #require(try Row.fetchOne(db, sql: sql))
            let raw = try #require(try db.makeStatement(sql: sql).firstRow { _ in } read: { Value.all(in: $0) })
            return (Value.all(in: row), raw)
        }
        #expect(raw == grdb)
        #expect(raw[0] == Value())
        #expect(raw[1].text == "" && raw[3].blob == [] && raw[4].blob == [0x00, 0xFF])
        #expect(raw[2].text == "Zahlung über 10 €")
        #expect(raw[6].integer == Int64.min && raw[7].integer == 1)
        // A NUL ends a text as GRDB reads it, and as `add` binds it: a value read and bound again finds
        // the same rows.
        #expect(raw[8].text == "a")
    }

    struct Value: Equatable {
        var text: String?
        var integer: Int64?
        var blob: [UInt8]?

        static func all(in row: some PositionalRow) -> [Value] {
            [Value(text: row.text(0), integer: row.integer(0), blob: row.blob(0))]
                + (1...2).map { Value(text: row.text($0)) } + (3...4).map { Value(blob: row.blob($0)) }
                + (5...7).map { Value(integer: row.integer($0)) } + [Value(text: row.text(8))]
        }
    }

    @Test func aWalkStoppedEarlyStepsNoFurtherAndTheStatementRunsAgain() async throws {
        let dir = try TemporaryDirectory()
        let log = try SQLiteEventLog.open(path: dir.file("events.sqlite3"), mode: .daemon)
        defer { log.close() }
        let (walked, again, all) = try await log.read { db in
            let statement = try db.cachedStatement(
                sql: "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) SELECT i FROM n")
            var walked: [Int64] = []
            try statement.forEachRow { $0.add(100) } _: { row in
                walked.append(row.integer(0) ?? -1)
                return walked.count < 3
            }
            // Left reset, not stepping: a statement still stepping would keep its read snapshot.
            #expect(sqlite3_stmt_busy(statement.sqliteStatement) == 0)
            struct Stop: Error {}
            #expect(throws: Stop.self) {
                try statement.forEachRow { $0.add(100) } _: { _ in throw Stop() }
            }
            #expect(sqlite3_stmt_busy(statement.sqliteStatement) == 0)
            // Reset and bound anew: the walk left nothing behind.
            let again = try statement.firstRow { $0.add(5) } read: { $0.integer(0) }
            let all = try statement.allRows { $0.add(4) } read: { $0.integer(0) ?? -1 }
            return (walked, again, all)
        }
        #expect(walked == [1, 2, 3])
        #expect(again == 1)
        #expect(all == [1, 2, 3, 4])
    }
}
