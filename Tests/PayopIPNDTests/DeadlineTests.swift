import Synchronization
import Testing

@testable import PayopIPND

/// `withDeadline`, which bounds every statement of the PostgreSQL log: the body's answer when it comes
/// in time, `DeadlineExceeded` at the deadline even when the body never ends, and the caller's
/// cancellation at once.
@Suite struct DeadlineTests {
    @Test func aBodyThatEndsInTimeAnswersAtOnce() async throws {
        let started = ContinuousClock.now
        for n in 0..<1_000 {
            #expect(try await withDeadline(.seconds(60)) { n * 2 } == n * 2)
        }
        // A thousand answers, none of them waiting for its 60 s timer.
        #expect(ContinuousClock.now - started < .seconds(10))
    }

    @Test func aBodyThatThrowsPassesItsErrorOn() async {
        struct Refused: Error {}
        await #expect(throws: Refused.self) { try await withDeadline(.seconds(60)) { () async throws -> Int in throw Refused() } }
    }

    @Test func aBodyThatNeverEndsIsAbandonedAtTheDeadline() async throws {
        // A body cancellation does not reach (a statement on a connection gone silent): it is left.
        let stuck = StuckBody()
        let started = ContinuousClock.now
        await #expect(throws: DeadlineExceeded.self) { try await withDeadline(.milliseconds(100)) { await stuck.wait() } }
        let waited = ContinuousClock.now - started
        // Bounds leave room for a stall of the whole suite at its start on a fresh machine (5.8 s once).
        #expect(waited >= .milliseconds(90) && waited < .seconds(30))
        stuck.release()
    }

    @Test func cancellingTheCallerEndsTheWaitAtOnce() async throws {
        let stuck = StuckBody()
        let caller = Task { try await withDeadline(.seconds(60)) { await stuck.wait() } }
        try await Task.sleep(for: .milliseconds(50))
        let started = ContinuousClock.now
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
        #expect(ContinuousClock.now - started < .seconds(30))  // the deadline is 60 s
        stuck.release()
    }
}

/// A body that waits until released, whatever cancellation says.
private final class StuckBody: Sendable {
    private let waiting = Mutex<(released: Bool, continuation: CheckedContinuation<Void, Never>?)>((false, nil))

    func wait() async {
        await withCheckedContinuation { continuation in
            let released = waiting.withLock { state in
                if !state.released { state.continuation = continuation }
                return state.released
            }
            if released { continuation.resume() }
        }
    }

    func release() {
        waiting.withLock { state in
            state.released = true
            defer { state.continuation = nil }
            return state.continuation
        }?.resume()
    }
}
