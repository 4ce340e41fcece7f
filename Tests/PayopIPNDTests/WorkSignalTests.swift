import Testing

@testable import PayopIPND

/// The wake-up of every background stage: no signal lost, no timeout cut short or overslept, and a
/// cancelled wait ends. Timeouts are real time here (the signal's own clock), kept short.
@Suite struct WorkSignalTests {
    /// What "at once" allows: half the 60 s a wait that missed its signal would take, so that the seconds
    /// a fresh machine may stall the whole suite as it starts (5.8 s once in CI) do not fail it.
    static let prompt: Duration = .seconds(30)

    @Test func signalSentWhileNobodyWaitsEndsTheNextWaitAtOnce() async {
        let signal = WorkSignal()
        signal.signal()
        let started = ContinuousClock.now
        await signal.wait(timeout: .seconds(60))
        #expect(ContinuousClock.now - started < Self.prompt)
    }

    @Test func signalIsRememberedOnceNotForEveryLaterWait() async {
        let signal = WorkSignal()
        signal.signal()
        signal.signal()
        await signal.wait(timeout: .seconds(60))
        let started = ContinuousClock.now
        await signal.wait(timeout: .milliseconds(50))
        #expect(ContinuousClock.now - started >= .milliseconds(45))
    }

    @Test func signalWakesAWaiter() async {
        let signal = WorkSignal()
        let started = ContinuousClock.now
        let signaller = Self.signal(signal, after: .milliseconds(50))
        await signal.wait(timeout: .seconds(60))
        await signaller.value
        #expect(ContinuousClock.now - started < Self.prompt)
    }

    @Test func timeoutEndsAWaitWithoutASignal() async {
        let signal = WorkSignal()
        let started = ContinuousClock.now
        await signal.wait(timeout: .milliseconds(40))
        let waited = ContinuousClock.now - started
        #expect(waited >= .milliseconds(35))
        #expect(waited < Self.prompt)
    }

    @Test func timerOfAnEarlierShorterWaitDoesNotCutALongerOneShort() async {
        let signal = WorkSignal()
        // The first wait arms a 150 ms timer; a signal ends it at about 20 ms, and the timer stays armed.
        let signaller = Self.signal(signal, after: .milliseconds(20))
        await signal.wait(timeout: .milliseconds(150))
        await signaller.value
        await signal.wait(timeout: .zero)  // a signal that came too late for it is not the point here
        let started = ContinuousClock.now
        await signal.wait(timeout: .milliseconds(400))
        #expect(ContinuousClock.now - started >= .milliseconds(390))
    }

    @Test func shorterWaitAfterALongerOneGetsItsOwnTimer() async {
        let signal = WorkSignal()
        // The first wait arms a 60 s timer; a signal ends it long before.
        let signaller = Self.signal(signal, after: .milliseconds(50))
        await signal.wait(timeout: .seconds(60))
        await signaller.value
        let started = ContinuousClock.now
        await signal.wait(timeout: .milliseconds(40))
        #expect(ContinuousClock.now - started < Self.prompt)
    }

    @Test func cancelledWaitEnds() async {
        let signal = WorkSignal()
        let started = ContinuousClock.now
        let waiter = Task { await signal.wait(timeout: nil) }
        waiter.cancel()
        await waiter.value
        #expect(ContinuousClock.now - started < Self.prompt)
        // Nothing is left behind: a later wait still times out as asked, and a signal still counts.
        await signal.wait(timeout: .milliseconds(20))
        signal.signal()
        let again = ContinuousClock.now
        await signal.wait(timeout: .seconds(60))
        #expect(ContinuousClock.now - again < Self.prompt)
    }

    @Test func waitInATaskAlreadyCancelledEndsAtOnce() async {
        let signal = WorkSignal()
        let waiter = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            let started = ContinuousClock.now
            await signal.wait(timeout: nil)
            return ContinuousClock.now - started
        }
        #expect(await waiter.value < Self.prompt)
    }

    @Test(arguments: [Duration.zero, .milliseconds(-1), .nanoseconds(-300_000), .seconds(-5)])
    func timeoutThatIsNotPositiveEndsAtOnce(timeout: Duration) async {
        let signal = WorkSignal()
        let started = ContinuousClock.now
        await signal.wait(timeout: timeout)
        #expect(ContinuousClock.now - started < Self.prompt)
        #expect(WorkSignal.nanoseconds(timeout) == 0)
    }

    @Test func hugeTimeoutWaitsQuietlyForItsSignal() async {
        let signal = WorkSignal()
        let signaller = Self.signal(signal, after: .milliseconds(200))
        await signal.wait(timeout: .seconds(Int64.max))
        await signaller.value
        // No timer fired on the way: one fired at once and re-armed itself for ever would be a spin.
        #expect(signal.timersFired == 0)
        #expect(WorkSignal.nanoseconds(.seconds(Int64.max)) == 1 << 60)
        #expect(WorkSignal.nanoseconds(.seconds(Int64.max) * 4) == 1 << 60)
        #expect(WorkSignal.nanoseconds(.milliseconds(1500)) == 1_500_000_000)
    }

    /// Signals `signal` once `delay` has passed; awaiting the task waits for that.
    private static func signal(_ signal: WorkSignal, after delay: Duration) -> Task<Void, Never> {
        Task {
            try? await Task.sleep(for: delay)
            signal.signal()
        }
    }
}
