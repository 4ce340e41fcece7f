import GRDB

/// AND-ed conditions with their bound arguments, for the list queries of the CLI.
struct SQLFilter {
    private(set) var conditions: [String] = []
    private(set) var arguments: StatementArguments = []

    /// Adds `condition` (with one `?`) when `value` is given.
    mutating func add(_ condition: String, _ value: (some DatabaseValueConvertible)?) {
        guard let value else { return }
        conditions.append(condition)
        arguments += [value]
    }

    /// Adds `condition` with all the arguments its `?`s take.
    mutating func add(_ condition: String, arguments values: StatementArguments) {
        conditions.append(condition)
        arguments += values
    }

    mutating func add(_ condition: String, when enabled: Bool) {
        if enabled { conditions.append(condition) }
    }

    var whereClause: String { conditions.isEmpty ? "" : "WHERE " + conditions.joined(separator: " AND ") }
}
