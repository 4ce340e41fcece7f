import Synchronization

/// Identifiers that sort by creation time: a prefix, 48 bits of milliseconds and 80 random bits in
/// Crockford base32 (the ULID layout), so `ORDER BY id` is also time order and ids never collide.
/// Within one millisecond the random part counts up (monotonic ULIDs), so ids made in the same
/// millisecond still sort in creation order, and the system's randomness is asked once per millisecond,
/// not once per id.
public enum SortableID {
    private static let alphabet = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)

    private struct State {
        var milliseconds: Int64 = -1
        var high: UInt16 = 0
        var low: UInt64 = 0
    }

    private static let state = Mutex(State())

    public static func make(prefix: String, millisecondsSince1970 ms: Int64) -> String {
        let (time, high, low) = state.withLock { state -> (Int64, UInt16, UInt64) in
            if ms > state.milliseconds {
                var generator = SystemRandomNumberGenerator()
                state.milliseconds = ms
                state.high = UInt16.random(in: .min ... .max, using: &generator) >> 1  // room to count up
                state.low = generator.next()
            } else {
                // Same millisecond, or a clock that stepped back: keep counting from the last id.
                let (next, overflow) = state.low.addingReportingOverflow(1)
                state.low = next
                if overflow { state.high &+= 1 }
            }
            return (state.milliseconds, state.high, state.low)
        }
        var chars = timeDigits(time)
        // 80 bits, most significant first: 16 digits of 5 bits.
        var random = UInt128(high) << 64 | UInt128(low)
        for index in stride(from: 25, through: 10, by: -1) {
            chars[index] = alphabet[Int(random & 31)]
            random >>= 5
        }
        return prefix + String(decoding: chars, as: UTF8.self)
    }

    /// The smallest id `make` can return for `prefix` at `ms` or later: ids at or above it were made
    /// at `ms` or later, and an id is never older than the time it was made for (a clock stepped back
    /// keeps counting from the newest), so a time range is a range of ids.
    public static func first(prefix: String, millisecondsSince1970 ms: Int64) -> String {
        prefix + String(decoding: timeDigits(ms), as: UTF8.self)
    }

    /// 26 digits: the time's 10, then zeros.
    private static func timeDigits(_ ms: Int64) -> [UInt8] {
        var chars = [UInt8](repeating: alphabet[0], count: 26)
        var timeBits = UInt64(max(0, ms))
        for index in stride(from: 9, through: 0, by: -1) {
            chars[index] = alphabet[Int(timeBits & 31)]
            timeBits >>= 5
        }
        return chars
    }
}
