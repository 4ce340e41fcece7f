import Foundation
import GRDB
import GRDBSQLite

/// The hot path's statements, bound and stepped through SQLite's C API: the writer's per-IPN and
/// per-delivery statements and the stages' reads of what is due. GRDB boxes every argument in an
/// existential and needs the body as `Data` (a copy): on the ingest path that was a few percent of the
/// writer thread's samples, the thread every commit waits for. A row GRDB reads lowercases every column
/// name of its statement and hashes it, however the row is then read. Everything else keeps GRDB's API;
/// errors come out as GRDB's `DatabaseError`, so the group commit judges them the same way.
extension Statement {
    /// Runs the statement to its end with the parameters `bind` sets, in order.
    func run(_ bind: (inout RawParameters) -> Void) throws {
        try forEachRow(bind) { _ in true }
    }

    /// Runs the statement with the parameters `bind` sets and reads its first row, if any, with `read`.
    func firstRow<T>(_ bind: (inout RawParameters) -> Void, read: (RawColumns) throws -> T) throws -> T? {
        var row: T?
        try forEachRow(bind) { columns in
            row = try read(columns)
            return false
        }
        return row
    }

    /// Every row of the statement, each read with `read`.
    func allRows<T>(_ bind: (inout RawParameters) -> Void = { _ in }, read: (RawColumns) throws -> T) throws -> [T] {
        var rows: [T] = []
        try forEachRow(bind) { columns in
            rows.append(try read(columns))
            return true
        }
        return rows
    }

    /// Runs the statement with the parameters `bind` sets, handing each row to `body` until it returns
    /// false (then the rest are not computed), or to its end.
    func forEachRow(_ bind: (inout RawParameters) -> Void, _ body: (RawColumns) throws -> Bool) throws {
        let handle = sqliteStatement
        // Every walk ends reset (below): one still going here is a walk of the same statement nested in
        // another's body, which this reset would restart.
        assert(sqlite3_stmt_busy(handle) == 0, "a statement walked again while its walk is going on")
        sqlite3_reset(handle)
        sqlite3_clear_bindings(handle)
        var parameters = RawParameters(handle: handle)
        bind(&parameters)
        // Reset and unbound whichever way the walk ends: a statement left stepping would hold its read
        // snapshot (and the WAL) after the transaction, and a bound hook output would be kept in memory.
        defer {
            sqlite3_reset(handle)
            sqlite3_clear_bindings(handle)
        }
        // As GRDB refuses to run a statement with a value missing or one too many: a column added to an
        // INSERT without its value must fail the write, not store NULL.
        if let failure = parameters.failure { throw error(failure) }
        guard parameters.count == sqlite3_bind_parameter_count(handle) else {
            throw DatabaseError(
                resultCode: .SQLITE_MISUSE,
                message: "\(parameters.count) values bound for \(sqlite3_bind_parameter_count(handle)) parameters",
                sql: sql)
        }
        while true {
            switch sqlite3_step(handle) {
            case SQLITE_ROW:
                guard try body(RawColumns(handle: handle)) else { return }
            case SQLITE_DONE:
                return
            case let code:
                throw error(code)
            }
        }
    }

    /// SQLite's `code` and its message for this connection, as GRDB reports them.
    private func error(_ code: Int32) -> DatabaseError {
        DatabaseError(
            resultCode: ResultCode(rawValue: code),
            message: String(cString: sqlite3_errmsg(sqlite3_db_handle(sqliteStatement))), sql: sql)
    }
}

/// A statement's parameters, set in order from the first.
struct RawParameters {
    fileprivate let handle: OpaquePointer
    private var next: Int32 = 1
    /// How many values were bound, and the first binding SQLite refused.
    fileprivate var count: Int32 { next - 1 }
    fileprivate private(set) var failure: Int32?

    fileprivate init(handle: OpaquePointer) { self.handle = handle }

    private mutating func bound(_ code: Int32) {
        if code != SQLITE_OK, failure == nil { failure = code }
        next += 1
    }

    /// SQLite copies what it is given (`SQLITE_TRANSIENT`): nothing has to outlive the call.
    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

    /// As a C string, the way GRDB binds text (a NUL ends it): the same value must match the same rows
    /// whichever way it was bound (the dedupe key is also looked up through GRDB).
    mutating func add(_ value: String?) {
        guard let value else { return bound(sqlite3_bind_null(handle, next)) }
        bound(sqlite3_bind_text(handle, next, value, -1, Self.transient))
    }

    mutating func add(_ value: Int64?) {
        guard let value else { return bound(sqlite3_bind_null(handle, next)) }
        bound(sqlite3_bind_int64(handle, next, value))
    }

    mutating func add(_ value: Int?) { add(value.map(Int64.init)) }

    mutating func add(_ value: Bool) { add(Int64(value ? 1 : 0)) }

    /// A blob, never NULL (an empty body is an empty blob).
    mutating func add(blob bytes: [UInt8]) {
        let code = bytes.withUnsafeBytes { buffer in
            if let base = buffer.baseAddress {
                sqlite3_bind_blob(handle, next, base, Int32(buffer.count), Self.transient)
            } else {
                sqlite3_bind_zeroblob(handle, next, 0)
            }
        }
        bound(code)
    }
}

/// A result row read by position: GRDB's `Row` where operations read, SQLite's current row
/// (`RawColumns`) on the hot path, so that one initializer (`Event(row:)`, `Delivery(row:)`) serves
/// both. A NULL reads as nil.
protocol PositionalRow {
    func text(_ column: Int) -> String?
    func integer(_ column: Int) -> Int64?
    func blob(_ column: Int) -> [UInt8]?
    /// The columns' names (debug builds check that a row has the columns its reader expects).
    var names: [String] { get }
}

extension PositionalRow {
    func int(_ column: Int) -> Int? { integer(column).map { Int($0) } }
    func bool(_ column: Int) -> Bool? { integer(column).map { $0 != 0 } }

    // Columns the schema declares NOT NULL. NULL there is a damaged log, which GRDB's typed reads also
    // stop on.
    func text(required column: Int) -> String { notNull(text(column), column) }
    func integer(required column: Int) -> Int64 { notNull(integer(column), column) }
    func int(required column: Int) -> Int { notNull(int(column), column) }
    func bool(required column: Int) -> Bool { notNull(bool(column), column) }

    private func notNull<T>(_ value: T?, _ column: Int) -> T {
        guard let value else { preconditionFailure("column \(column) (\(names[column])) of a NOT NULL read is NULL") }
        return value
    }
}

extension Row: PositionalRow {
    func text(_ column: Int) -> String? { self[column] }
    func integer(_ column: Int) -> Int64? { self[column] }
    func blob(_ column: Int) -> [UInt8]? { (self[column] as Data?).map { Array($0) } }
    var names: [String] { Array(columnNames) }
}

/// The current row's columns, by position, valid until the statement steps again.
struct RawColumns: PositionalRow {
    fileprivate let handle: OpaquePointer

    private func isNull(_ column: Int) -> Bool { sqlite3_column_type(handle, Int32(column)) == SQLITE_NULL }

    /// As GRDB reads text (a NUL ends it), so that a value read here and bound again (`add`, as a C
    /// string) finds the same rows.
    func text(_ column: Int) -> String? {
        guard !isNull(column), let bytes = sqlite3_column_text(handle, Int32(column)) else { return nil }
        return String(cString: bytes)
    }

    /// The column as stored, when it is NULL (`.some(nil)`) or text that `text` reads back byte for byte
    /// (UTF-8 without a NUL); nil when `text` would change it (a blob, a NUL inside, bytes that are not
    /// UTF-8), so that two stored values could read as one.
    func exactText(_ column: Int) -> String?? {
        switch sqlite3_column_type(handle, Int32(column)) {
        case SQLITE_NULL:
            return .some(nil)
        case SQLITE_TEXT:
            guard let bytes = sqlite3_column_text(handle, Int32(column)) else { return nil }
            let stored = UnsafeBufferPointer(start: bytes, count: Int(sqlite3_column_bytes(handle, Int32(column))))
            guard !stored.contains(0), let text = String(validating: stored, as: UTF8.self) else { return nil }
            return .some(text)
        default:
            return nil
        }
    }

    /// SQLite converts any stored value to an integer; the columns read as integers hold integers or
    /// NULL (debug builds check it).
    func integer(_ column: Int) -> Int64? {
        let type = sqlite3_column_type(handle, Int32(column))
        assert(type == SQLITE_INTEGER || type == SQLITE_NULL, "column \(column) read as an integer is not one")
        return type == SQLITE_NULL ? nil : sqlite3_column_int64(handle, Int32(column))
    }

    func blob(_ column: Int) -> [UInt8]? {
        guard !isNull(column) else { return nil }
        // The pointer first, then its length (SQLite's advice: a conversion would move it).
        let bytes = sqlite3_column_blob(handle, Int32(column))
        let count = Int(sqlite3_column_bytes(handle, Int32(column)))
        guard count > 0, let bytes else { return [] }
        return Array(UnsafeRawBufferPointer(start: bytes, count: count))
    }

    var names: [String] {
        (0..<sqlite3_column_count(handle)).map { String(cString: sqlite3_column_name(handle, $0)) }
    }
}
