import Foundation
import Testing

@testable import PayopIPND

/// Every time a hook, the console or the command line shows: RFC 3339 in UTC with exact milliseconds,
/// the calendar fields Foundation's ISO 8601 style gives, which the hand-written form replaced.
@Suite struct TimestampTests {
    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
        (1_780_000_000_123, "2026-05-28T20:26:40.123Z"),
        (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
        (-2_208_988_800_000, "1900-01-01T00:00:00.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
    ])
    func knownInstantsAreWrittenAsRFC3339InUTC(milliseconds: Int64, text: String) {
        #expect(Timestamp.format(milliseconds: milliseconds) == text)
        #expect(Timestamp.parse(text) == milliseconds)
    }

    @Test(arguments: scenarioSeeds(count: 4, base: 0x7157))
    func handWrittenFormMatchesFoundationsAcrossTheCenturiesAWallClockCanShow(seed: UInt64) {
        var random = SeededRandom(seed: seed)
        // 1900 to 2400, every leap rule in it; and the last and first millisecond of days around 1970.
        let instants =
            (0..<5_000).map { _ in Int64.random(in: -2_208_988_800_000...13_569_465_600_000, using: &random) }
            + (0..<200).flatMap { _ -> [Int64] in
                let day = Int64.random(in: -800...800, using: &random) * 86_400_000
                return [day, day - 1]
            }
        for ms in instants {
            let text = Timestamp.format(milliseconds: ms)
            // Foundation reads a `Double` of seconds and often writes one millisecond short, so it is
            // asked for the whole second (exact in a `Double`) and the milliseconds are checked apart.
            let millisecond = (ms % 1000 + 1000) % 1000
            let second = Timestamp.foundationFormat(milliseconds: ms - millisecond)
            #expect(second.hasSuffix(".000Z"), "\(ms)")
            #expect(text.dropLast(5) == second.dropLast(5), "\(ms)")
            #expect(text.suffix(5) == "." + String(String(millisecond + 1000).dropFirst()) + "Z", "\(ms)")
            #expect(Timestamp.parse(text) == ms, "\(ms)")
        }
    }

    @Test func everyDayFrom1900To2400StartsWhereTheCalendarSays() {
        // The leap rules bite on single days (the end of February, a century's last day), which random
        // instants rarely hit: every day's first and previous millisecond, against Foundation's date.
        let first: Int64 = -25_567  // 1900-01-01, in days from 1970
        let last: Int64 = 157_054  // 2400-01-01
        var mismatches: [Int64] = []
        for day in first...last {
            let ms = day * 86_400_000
            let start = Timestamp.format(milliseconds: ms)
            if start != Timestamp.foundationFormat(milliseconds: ms) || !start.hasSuffix("T00:00:00.000Z")
                || Timestamp.format(milliseconds: ms - 1).prefix(10)
                    != Timestamp.foundationFormat(milliseconds: ms - 1000).prefix(10)
            {
                mismatches.append(day)
            }
        }
        #expect(mismatches.isEmpty, "days from 1970: \(mismatches.prefix(10))")
    }

    @Test(arguments: [
        Int64(253_402_300_800_000),  // 10000-01-01
        -2_208_988_800_001,  // 1899-12-31T23:59:59.999
        -62_135_596_800_000,  // 0001-01-01 proleptic Gregorian; Foundation counts it Julian
    ])
    func yearsOutsideTheWrittenRangeGoThroughFoundation(milliseconds: Int64) {
        #expect(Timestamp.format(milliseconds: milliseconds) == Timestamp.foundationFormat(milliseconds: milliseconds))
    }
}
