/// A merchant's hook, as configured.
public struct HookConfig: Sendable, Equatable {
    public enum Target: Sendable, Equatable {
        case command([String])
        case url(String)
    }

    public var name: String
    public var target: Target
    public var events: [String]
    public var timeoutSeconds: Double
    public var maxAttempts: Int
    public var signingSecretFile: String?

    /// `events:` entries are exact types or globs (`checkout.*`, `*`).
    public func matches(type: String) -> Bool {
        events.contains { Glob.matches(pattern: $0, text: type) }
    }
}

/// Shell-style globs for event types: `*` any run of characters, `?` one character.
enum Glob {
    static func matches(pattern: String, text: String) -> Bool {
        matches(Array(pattern.utf8)[...], Array(text.utf8)[...])
    }

    private static func matches(_ pattern: ArraySlice<UInt8>, _ text: ArraySlice<UInt8>) -> Bool {
        guard let first = pattern.first else { return text.isEmpty }
        switch first {
        case UInt8(ascii: "*"):
            let rest = pattern.dropFirst()
            var candidate = text
            while true {
                if matches(rest, candidate) { return true }
                guard !candidate.isEmpty else { return false }
                candidate = candidate.dropFirst()
            }
        case UInt8(ascii: "?"):
            return !text.isEmpty && matches(pattern.dropFirst(), text.dropFirst())
        default:
            return text.first == first && matches(pattern.dropFirst(), text.dropFirst())
        }
    }
}
