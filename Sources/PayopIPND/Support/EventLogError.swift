/// A failure of the event log, with a stable code a merchant can look up and the cause kept.
public struct EventLogError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// Cannot commit now (disk full, read-only, locked past the deadline): try again later.
        case unavailable
        /// The daemon is stopping and its log is closed: nothing more is written by this process.
        case closed
        /// Another daemon serves this log (one daemon per log).
        case inUse
        /// The file is not there, or is not a payop-ipnd event log.
        case notFound
        case notEventLog
        /// A referenced event or delivery does not exist.
        case noSuchRecord
        /// The storage settings, or the database server's own, must be changed before the log can be
        /// used (a malformed `storage.url`, a server that does not make commits durable).
        case misconfigured
    }

    public var code: Code
    public var message: String
    public var cause: String?

    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause.map { String(describing: $0) }
    }

    public var description: String {
        cause.map { "\(message) (\($0))" } ?? message
    }
}
