import GRDB
import GRDBSQLite

/// The writer's per-IPN statements, bound and stepped through SQLite's C API. GRDB boxes every argument
/// in an existential and needs the body as `Data` (a copy): on the ingest path that was a few percent
/// of the writer thread's samples, the thread every commit waits for. Everything else keeps GRDB's API;
/// errors come out as GRDB's `DatabaseError`, so the group commit judges them the same way.
extension Statement {
    /// Runs the statement to its end with the parameters `bind` sets, in order.
    func run(_ bind: (inout RawParameters) -> Void) throws {
        _ = try firstRow(bind) { _ in () }
    }

    /// Runs the statement with the parameters `bind` sets and reads its first row, if any, with `read`.
    func firstRow<T>(_ bind: (inout RawParameters) -> Void, read: (RawColumns) -> T) throws -> T? {
        let handle = sqliteStatement
        sqlite3_reset(handle)
        sqlite3_clear_bindings(handle)
        var parameters = RawParameters(handle: handle)
        bind(&parameters)
        defer { sqlite3_reset(handle) }
        // As GRDB refuses to run a statement with a value missing or one too many: a column added to an
        // INSERT without its value must fail the write, not store NULL.
        if let failure = parameters.failure { throw error(failure) }
        guard parameters.count == sqlite3_bind_parameter_count(handle) else {
            throw DatabaseError(
                resultCode: .SQLITE_MISUSE,
                message: "\(parameters.count) values bound for \(sqlite3_bind_parameter_count(handle)) parameters",
                sql: sql)
        }
        var row: T?
        while true {
            switch sqlite3_step(handle) {
            case SQLITE_ROW:
                if row == nil { row = read(RawColumns(handle: handle)) }
            case SQLITE_DONE:
                return row
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

/// The current row's columns, by position.
struct RawColumns {
    fileprivate let handle: OpaquePointer

    func text(_ column: Int32) -> String? {
        guard let bytes = sqlite3_column_text(handle, column) else { return nil }
        return String(cString: bytes)
    }
}
