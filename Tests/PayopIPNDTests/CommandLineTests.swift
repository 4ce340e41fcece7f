import ArgumentParser
import Testing

@testable import PayopIPND

@Suite struct CommandLineTests {
    @Test func sinceTakesRFC3339OrADuration() throws {
        #expect(SinceArgument(argument: "2026-11-26T12:00:00Z")?.milliseconds == 1_795_694_400_000)
        #expect(SinceArgument(argument: "2026-11-26T12:00:00.250Z")?.milliseconds == 1_795_694_400_250)
        let now = SystemWallClock().nowMilliseconds()
        let day = try #require(SinceArgument(argument: "24h")?.milliseconds)
        #expect(abs(now - 86_400_000 - day) < 5_000)
        #expect(SinceArgument(argument: "yesterday") == nil)
        #expect(SinceArgument(argument: "0d") == nil)
        #expect(SinceArgument(argument: "7w") == nil)
        #expect(SinceArgument(argument: "999999999999999d") == nil)
    }

    @Test(arguments: [
        ["events", "list", "--since", "yesterday"],
        ["events", "list", "--limit", "0"],
        ["events", "list", "--state", "paid"],
        ["receipts", "list", "--limit", "-3"],
    ])
    func malformedOptionValuesAreUsageErrors(arguments: [String]) {
        #expect(throws: (any Error).self) { try PayopIPNDCommand.parseAsRoot(arguments) }
        do {
            _ = try PayopIPNDCommand.parseAsRoot(arguments)
        } catch {
            #expect(PayopIPNDCommand.exitCode(for: error).rawValue == 64)
        }
    }

    @Test(arguments: [
        ["serve", "--sandbox"], ["serve", "--config", "/x.yaml"], ["check-config", "--config", "/x.yaml"],
        ["events", "list", "--status", "accepted", "--state", "rejected"], ["events", "show", "evt_1", "--json"],
        ["receipts", "list", "--refused", "--since", "90m"], ["prune", "--older-than", "30"],
        ["simulate", "checkout", "--state", "accepted"], ["simulate", "refund", "--state", "2", "--url", "http://127.0.0.1:1/x"],
    ])
    func everyDesignedCommandParses(arguments: [String]) throws {
        _ = try PayopIPNDCommand.parseAsRoot(arguments)
    }

    @Test func simulateRefusesAStatusTheKindDoesNotHave() {
        #expect(throws: (any Error).self) {
            try PayopIPNDCommand.parseAsRoot(["simulate", "withdrawal", "--state", "pre_approved"])
        }
    }

    @Test func wellFormedOptionsParse() throws {
        let command = try PayopIPNDCommand.parseAsRoot([
            "events", "list", "--type", "checkout.accepted", "--since", "7d", "--limit", "5", "--json",
        ])
        let list = try #require(command as? EventsCommand.List)
        #expect(list.limit.limit == 5 && list.json && list.type == "checkout.accepted")
    }
}
