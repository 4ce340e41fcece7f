import Foundation
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Sends `READY=1` once every listener is bound (and the event log, opened before them, is open).
final class Readiness: Sendable {
    private let remaining: Mutex<Int>
    private let notifier: SystemdNotifier
    private let onReady: @Sendable () async -> Void

    init(listeners: Int, notifier: SystemdNotifier, onReady: @escaping @Sendable () async -> Void) {
        remaining = Mutex(listeners)
        self.notifier = notifier
        self.onReady = onReady
    }

    func listenerBound() async {
        let last = remaining.withLock { count -> Bool in
            count -= 1
            return count == 0
        }
        guard last else { return }
        notifier.notify("READY=1", "STATUS=listening")
        await onReady()
    }
}

/// `WATCHDOG=1` at half of `$WATCHDOG_USEC`, each ping earned: the writer committed an empty write and
/// an event loop ran a task. A stuck writer or loop stops the pings, and systemd restarts us.
struct WatchdogService: Service {
    let interval: Duration
    let notifier: SystemdNotifier
    let log: any EventLog
    /// Whether a ping needs the log to take a write. Yes for the SQLite log (its writer thread is ours,
    /// and stuck is a fault a restart cures); no for a shared PostgreSQL log, whose outage a restart
    /// does not cure and must not turn into every daemon killing its running hooks (`/readyz` says it).
    let probesLog: Bool
    let status: @Sendable () async -> String

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    if probesLog { try await log.checkWritable() }
                    try await MultiThreadedEventLoopGroup.singleton.any().submit {}.get()
                    notifier.notify("WATCHDOG=1", "STATUS=" + (await status()))
                } catch {
                    // No ping: if this lasts, systemd's watchdog acts.
                }
                try? await Task.sleep(for: interval)
            }
        }
    }
}

/// Says `STOPPING=1` as soon as shutdown begins. It is the last service in the group, so the first told.
struct StoppingNotifierService: Service {
    let notifier: SystemdNotifier
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        logger.info("stopping: no new IPNs; finishing what was accepted")
        notifier.notify("STOPPING=1")
    }
}

/// SIGHUP: `RELOADING=1`, re-read the configuration and apply what can change while running, then
/// `READY=1`. A broken new configuration is refused with a log line and the old one keeps running.
struct ReloadService: Service {
    let notifier: SystemdNotifier
    let logger: Logger
    let reload: @Sendable () async throws -> Void

    func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        await cancelWhenGracefulShutdown {
            for await _ in hangups {
                notifier.notify("RELOADING=1", "MONOTONIC_USEC=\(SystemdNotifier.monotonicMicroseconds())")
                do {
                    try await reload()
                    logger.notice("configuration reloaded")
                    notifier.notify("READY=1", "STATUS=configuration reloaded")
                } catch {
                    logger.error("reload refused; the running configuration stays", metadata: ["error": "\(error)"])
                    notifier.notify("READY=1", "STATUS=reload refused: see the log")
                }
            }
        }
    }
}
