import Foundation

/// Secrets live in files (never in the YAML, arguments or environment) and are never logged.
public enum SecretFile {
    public enum Check: Equatable {
        case ok
        case missing
        case unreadable(String)
        case worldReadable
        /// Readable by the group or writable by anyone but the owner: allowed, with a warning.
        case groupExposed(String)
    }

    public static func check(_ path: String) -> Check {
        var info = stat()
        guard stat(path, &info) == 0 else {
            return errno == ENOENT ? .missing : .unreadable(String(cString: strerror(errno)))
        }
        guard access(path, R_OK) == 0 else { return .unreadable(String(cString: strerror(errno))) }
        let mode = info.st_mode
        if mode & S_IROTH != 0 { return .worldReadable }
        if mode & (S_IWOTH | S_IWGRP) != 0 { return .groupExposed("may be written by others than its owner") }
        if mode & S_IRGRP != 0 { return .groupExposed("may be read by its group") }
        return .ok
    }

    /// The secret, with trailing whitespace and newlines trimmed.
    public static func read(_ path: String) throws -> String {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var end = text.endIndex
        while end > text.startIndex, text[text.index(before: end)].isWhitespace { end = text.index(before: end) }
        return String(text[..<end])
    }
}
