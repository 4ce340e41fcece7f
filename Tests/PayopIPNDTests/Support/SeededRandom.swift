import Foundation

/// A seeded generator (SplitMix64): a scenario is replayed exactly from its seed.
struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func chance(_ probability: Double) -> Bool { Double.random(in: 0..<1, using: &self) < probability }
    mutating func pick<T>(_ values: [T]) -> T { values[Int.random(in: 0..<values.count, using: &self)] }
}

/// Seeds for randomised tests: `PAYOP_IPND_SEED` replays one, else a fixed range (deterministic runs).
func scenarioSeeds(count: Int, base: UInt64) -> [UInt64] {
    if let text = ProcessInfo.processInfo.environment["PAYOP_IPND_SEED"], let seed = UInt64(text) { return [seed] }
    let extra = ProcessInfo.processInfo.environment["PAYOP_IPND_SCENARIOS"].flatMap(Int.init) ?? count
    return (0..<UInt64(extra)).map { base &+ $0 }
}
