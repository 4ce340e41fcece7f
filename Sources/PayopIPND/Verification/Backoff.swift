/// Capped exponential backoff with +-20% jitter: initial, 2x, 4x, ... up to max.
public struct Backoff: Sendable {
    public var initialSeconds: Double
    public var maxSeconds: Double
    /// A factor in 0.8...1.2; injected so tests get exact delays.
    public var jitter: @Sendable () -> Double

    public init(initialSeconds: Double, maxSeconds: Double, jitter: @escaping @Sendable () -> Double = Backoff.randomJitter) {
        self.initialSeconds = initialSeconds
        self.maxSeconds = maxSeconds
        self.jitter = jitter
    }

    public static let randomJitter: @Sendable () -> Double = { Double.random(in: 0.8...1.2) }
    public static let noJitter: @Sendable () -> Double = { 1.0 }

    /// The delay before attempt `attempt + 1`, after `attempt` failed attempts (1-based).
    public func delayMilliseconds(afterAttempt attempt: Int) -> Int64 {
        let exponent = Double(min(max(attempt - 1, 0), 62))
        let base = min(initialSeconds * pow2(exponent), maxSeconds)
        return Int64((min(base * jitter(), maxSeconds) * 1000).rounded())
    }

    private func pow2(_ exponent: Double) -> Double {
        var value = 1.0
        for _ in 0..<Int(exponent) {
            value *= 2
            if value > 1e12 { break }
        }
        return value
    }
}
