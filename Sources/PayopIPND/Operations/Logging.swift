import Logging
import Synchronization

/// The log level every logger of the daemon follows, changeable at run time (SIGHUP reload).
public final class LogLevelControl: Sendable {
    private let level: Mutex<Logger.Level>
    public init(_ level: Logger.Level) { self.level = Mutex(level) }
    public var current: Logger.Level {
        get { level.withLock { $0 } }
    }
    public func set(_ newLevel: Logger.Level) { level.withLock { $0 = newLevel } }
}

/// swift-log's stderr handler (one line per record, key=value metadata, which journald keeps as is),
/// with its level read from a `LogLevelControl` on every record.
public struct DaemonLogHandler: LogHandler {
    private var inner: StreamLogHandler
    private let control: LogLevelControl

    public init(label: String, control: LogLevelControl) {
        inner = StreamLogHandler.standardError(label: label)
        inner.logLevel = .trace
        self.control = control
    }

    public var logLevel: Logger.Level {
        get { control.current }
        set { control.set(newValue) }
    }

    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    public func log(event: LogEvent) {
        inner.log(event: event)
    }
}
