import Foundation
import GRDB
import Synchronization

/// Owns the event log's only write connection on one dedicated OS thread and group-commits: every
/// write queued while the previous commit was running shares the next transaction and its one fsync.
///
/// The thread is deliberate: `synchronous=FULL` commits block in fsync, and blocking must never happen
/// on the Swift concurrency pool or a NIO event loop. Each queued write runs in its own savepoint, so
/// a write that fails on its own (a missing row) fails alone; a failure of the database itself (disk
/// full, I/O error, lock deadline) fails the whole batch, and nothing of it is acknowledged.
///
/// `@unchecked Sendable`: the queue and the stopping flag are only touched under `condition`; the
/// database connection only on the writer thread.
final class GroupCommitWriter: @unchecked Sendable {
    private struct Job {
        /// Runs inside the shared transaction; returns what to do once the commit is durable.
        let perform: (Database) throws -> () -> Void
        let fail: (EventLogError) -> Void
    }

    private let database: DatabasePool
    private let condition = NSCondition()
    private var queue: [Job] = []
    private var stopping = false
    private var finished = false
    /// A checkpoint to run on this connection before the next batch (`requestCheckpoint`).
    private var checkpointRequested = false
    /// How the last one failed, for the checkpoint service to report (`takeCheckpointFailure`).
    private var checkpointFailure: (any Error)?
    private let checkpointsRun = Atomic<Int>(0)
    /// Checkpoints this writer ran between batches (tests).
    var checkpointCount: Int { checkpointsRun.load(ordering: .relaxed) }
    private let onBatch: @Sendable (Int) -> Void
    private let commits = Atomic<Int>(0)
    var commitCount: Int { commits.load(ordering: .relaxed) }

    init(database: DatabasePool, onBatch: @escaping @Sendable (Int) -> Void = { _ in }) {
        self.database = database
        self.onBatch = onBatch
        let thread = Thread { [self] in
            nameCurrentThread("ipnd-log-writer")
            self.run()
        }
        thread.start()
    }

    /// Runs `operation` in the next group commit and returns its result once the commit is on disk.
    /// `settled` runs first, on the writer thread, with whether it committed: what must follow the
    /// commit at once (starting a claimed run) does not wait for the caller's task to be scheduled.
    func write<T: Sendable>(
        _ operation: @escaping @Sendable (Database) throws -> T, settled: @escaping @Sendable (Bool) -> Void = { _ in }
    ) async throws(EventLogError) -> T {
        do {
            return try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<T, any Error>) in
                submit(operation, settled: settled) { continuation.resume(with: $0.mapError { $0 as any Error }) }
            }
        } catch let error as EventLogError {
            throw error
        } catch {
            throw EventLogError(.unavailable, "the event log could not commit", cause: error)
        }
    }

    /// Runs `operation` in the next group commit; `completion` is called on the writer thread once the
    /// commit is on disk (or has failed), right after `settled` with whether it committed. The
    /// listener's path: no Swift task, one hop back to its event loop.
    func submit<T: Sendable>(
        _ operation: @escaping @Sendable (Database) throws -> T,
        settled: @escaping @Sendable (Bool) -> Void = { _ in },
        completion: @escaping @Sendable (Result<T, EventLogError>) -> Void
    ) {
        let job = Job(
            perform: { db in
                let value = try operation(db)
                return {
                    settled(true)
                    completion(.success(value))
                }
            },
            fail: {
                settled(false)
                completion(.failure($0))
            })
        condition.lock()
        if stopping {
            condition.unlock()
            job.fail(EventLogError(.closed, "the event log is shutting down"))
            return
        }
        queue.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Commits what is queued, then stops the thread. Writes queued afterwards fail as unavailable.
    func shutdown() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while !finished { condition.wait() }
        condition.unlock()
    }

    /// Asks the writer to checkpoint from its own connection between two batches: no commit can append
    /// frames meanwhile, so the checkpoint catches up with the WAL and the next commit starts it over
    /// (one from another connection never does while writes keep coming). Passive: it never waits for
    /// a reader, it skips the frames one still reads.
    func requestCheckpoint() {
        condition.lock()
        checkpointRequested = true
        condition.signal()
        condition.unlock()
    }

    /// The writer's last checkpoint failure, if it has not been reported yet.
    func takeCheckpointFailure() -> (any Error)? {
        condition.lock()
        defer {
            checkpointFailure = nil
            condition.unlock()
        }
        return checkpointFailure
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !stopping && !checkpointRequested { condition.wait() }
            if checkpointRequested {
                checkpointRequested = false
                condition.unlock()
                do {
                    _ = try database.writeWithoutTransaction { db in
                        try Row.fetchOne(db, sql: "PRAGMA wal_checkpoint(PASSIVE)")
                    }
                    checkpointsRun.add(1, ordering: .relaxed)
                } catch {
                    condition.lock()
                    checkpointFailure = error
                    condition.unlock()
                }
                continue
            }
            if queue.isEmpty {
                finished = true
                condition.broadcast()
                condition.unlock()
                return
            }
            let jobs = queue
            queue.removeAll(keepingCapacity: true)
            condition.unlock()
            commit(jobs)
        }
    }

    private func commit(_ jobs: [Job]) {
        var completions: [() -> Void] = []
        var refusals: [(Job, EventLogError)] = []
        completions.reserveCapacity(jobs.count)
        do {
            try database.writeWithoutTransaction { db in
                try db.cachedStatement(sql: "BEGIN IMMEDIATE").execute()
                do {
                    // Each job's savepoint runs through SQLite's C API (`RawStatement`), looked up once per
                    // batch: GRDB's own execution tracks savepoints for transaction observers, which this
                    // connection has none of, and was a few percent of the writer's samples at ingest.
                    // BEGIN and COMMIT stay GRDB's: its commit hook expects to see them. The write
                    // connection must stay free of observers (`ValueObservation`, `afterNextTransaction`):
                    // one would be told of a job's changes that `ROLLBACK TO job` then undid.
                    let savepoint = try db.cachedStatement(sql: "SAVEPOINT job")
                    let release = try db.cachedStatement(sql: "RELEASE job")
                    for job in jobs {
                        try savepoint.run { _ in }
                        do {
                            let complete = try job.perform(db)
                            try release.run { _ in }
                            // Only once its savepoint is kept: a write rolled back is refused, never also completed.
                            completions.append(complete)
                        } catch let error as DatabaseError where Self.failsTheBatch(error) {
                            throw error
                        } catch {
                            try db.cachedStatement(sql: "ROLLBACK TO job").run { _ in }
                            try release.run { _ in }
                            refusals.append((job, Self.wrap(error)))
                        }
                    }
                    try db.cachedStatement(sql: "COMMIT").execute()
                } catch {
                    if db.isInsideTransaction { try? db.execute(sql: "ROLLBACK") }
                    throw error
                }
            }
        } catch {
            let failure = EventLogError(.unavailable, "the event log could not commit", cause: error)
            for job in jobs { job.fail(failure) }
            return
        }
        commits.add(1, ordering: .relaxed)
        onBatch(jobs.count)
        for complete in completions { complete() }
        for (job, error) in refusals { job.fail(error) }
    }

    /// Errors of the database file itself, as opposed to errors of one write's own logic.
    static func failsTheBatch(_ error: DatabaseError) -> Bool {
        switch error.resultCode {
        case .SQLITE_FULL, .SQLITE_IOERR, .SQLITE_READONLY, .SQLITE_BUSY, .SQLITE_LOCKED, .SQLITE_CORRUPT,
            .SQLITE_NOMEM, .SQLITE_CANTOPEN, .SQLITE_NOTADB:
            true
        default:
            false
        }
    }

    private static func wrap(_ error: any Error) -> EventLogError {
        if let error = error as? EventLogError { return error }
        return EventLogError(.unavailable, "a write to the event log failed", cause: error)
    }
}
