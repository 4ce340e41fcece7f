/// The stages' settings, from the configuration: stages see plain values, never `DaemonConfig`.
extension VerificationPolicy {
    public init(_ config: DaemonConfig, jitter: @escaping @Sendable () -> Double = Backoff.randomJitter) {
        self.init(
            backoff: Backoff(
                initialSeconds: config.payop.retryInitialSeconds, maxSeconds: config.payop.retryMaxSeconds,
                jitter: jitter),
            notFoundRetryMilliseconds: Int64(config.payop.notFoundRetryMinutes * 60_000),
            reconcileIntervalMilliseconds: Int64(config.reconcile.intervalSeconds * 1000))
    }
}

extension DeliveryPolicy {
    public init(_ config: DaemonConfig, jitter: @escaping @Sendable () -> Double = Backoff.randomJitter) {
        self.init(
            backoff: Backoff(
                initialSeconds: config.delivery.retryInitialSeconds, maxSeconds: config.delivery.retryMaxSeconds,
                jitter: jitter),
            killGraceSeconds: config.delivery.killGraceSeconds,
            shutdownGraceSeconds: config.delivery.shutdownGraceSeconds)
    }
}
