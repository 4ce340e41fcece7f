import Foundation

/// Times are kept as integer milliseconds since 1970 in the log and shown as RFC 3339 in UTC.
public enum Timestamp {
    public static func format(milliseconds ms: Int64) -> String {
        let seconds = Double(ms) / 1000
        let date = Date(timeIntervalSince1970: seconds)
        var style = Date.ISO8601FormatStyle(includingFractionalSeconds: true, timeZone: .gmt)
        style.timeZone = .gmt
        return date.formatted(style)
    }

    public static func parse(_ text: String) -> Int64? {
        let fractional = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
        let whole = Date.ISO8601FormatStyle()
        guard let date = (try? fractional.parse(text)) ?? (try? whole.parse(text)) else { return nil }
        return Int64((date.timeIntervalSince1970 * 1000).rounded())
    }

    public static func milliseconds(_ date: Date) -> Int64 {
        Int64((date.timeIntervalSince1970 * 1000).rounded())
    }
}

/// The one source of "now", so tests can move time instead of waiting for it.
public protocol WallClock: Sendable {
    func nowMilliseconds() -> Int64
}

public struct SystemWallClock: WallClock {
    public init() {}
    public func nowMilliseconds() -> Int64 { Timestamp.milliseconds(Date()) }
}
