import Foundation

/// Times are kept as integer milliseconds since 1970 in the log and shown as RFC 3339 in UTC.
public enum Timestamp {
    /// `2026-11-30T11:34:25.123Z`. Written by hand for the years 1900 to 9999 because every delivery's
    /// event object carries two of these, and Foundation's format style was most of that object's cost.
    /// Other years (never a wall clock's) go through Foundation as before: before 1582 it counts in the
    /// Julian calendar. The hand-written milliseconds are exact, where Foundation's, read from a
    /// `Double`, were often one short. A test holds the two to one another across the range.
    public static func format(milliseconds ms: Int64) -> String {
        let (seconds, millisecond) = floorDivision(ms, 1000)
        let (days, secondOfDay) = floorDivision(seconds, 86_400)
        let (year, month, day) = civilDate(daysSince1970: days)
        guard (1900...9999).contains(year) else { return foundationFormat(milliseconds: ms) }
        return String(unsafeUninitializedCapacity: 24) { out in
            func put(_ value: Int64, digits: Int, at offset: Int) {
                var rest = value
                for i in stride(from: offset + digits - 1, through: offset, by: -1) {
                    out[i] = UInt8(ascii: "0") + UInt8(rest % 10)
                    rest /= 10
                }
            }
            put(year, digits: 4, at: 0)
            out[4] = UInt8(ascii: "-")
            put(month, digits: 2, at: 5)
            out[7] = UInt8(ascii: "-")
            put(day, digits: 2, at: 8)
            out[10] = UInt8(ascii: "T")
            put(secondOfDay / 3600, digits: 2, at: 11)
            out[13] = UInt8(ascii: ":")
            put(secondOfDay / 60 % 60, digits: 2, at: 14)
            out[16] = UInt8(ascii: ":")
            put(secondOfDay % 60, digits: 2, at: 17)
            out[19] = UInt8(ascii: ".")
            put(millisecond, digits: 3, at: 20)
            out[23] = UInt8(ascii: "Z")
            return 24
        }
    }

    /// The same through Foundation's ISO 8601 style: the years `format` does not write itself.
    static func foundationFormat(milliseconds ms: Int64) -> String {
        let date = Date(timeIntervalSince1970: Double(ms) / 1000)
        return date.formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true, timeZone: .gmt))
    }

    /// The quotient rounded down and a remainder that is never negative: a time before 1970 falls in the
    /// day and second it belongs to.
    private static func floorDivision(_ value: Int64, _ divisor: Int64) -> (Int64, Int64) {
        let remainder = value % divisor
        return remainder < 0 ? (value / divisor - 1, remainder + divisor) : (value / divisor, remainder)
    }

    /// The proleptic Gregorian (year, month, day) of a day count from 1970-01-01: Howard Hinnant's
    /// `civil_from_days` (http://howardhinnant.github.io/date_algorithms.html), in 400-year eras.
    private static func civilDate(daysSince1970 days: Int64) -> (year: Int64, month: Int64, day: Int64) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthFromMarch = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * monthFromMarch + 2) / 5 + 1
        let month = monthFromMarch < 10 ? monthFromMarch + 3 : monthFromMarch - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
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
