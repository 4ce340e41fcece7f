import Logging
import NIOCore
import Synchronization

/// Who gets a connection on the IPN port, decided when the connection is accepted, before a byte is
/// read: Payop must get through whatever one other client does.
///
/// - A peer the source policy refuses (and that is not a trusted proxy) is answered 403 at once and
///   closed; past `maxLingeringRefusals` such answers at once it is closed without one.
/// - One address holds at most `maxPerAddress` connections (trusted proxies and Payop's own
///   addresses excepted: everything arrives through them), listed addresses included.
/// - Of `maxConnections`, the last `reserve` are kept for privileged peers: Payop's addresses, the
///   configured allow list and trusted proxies. With `allowed_sources: any`, anyone else shares the rest.
public final class ConnectionGate: Sendable {
    public struct Limits: Sendable {
        public var maxConnections = 1024
        public var reserve = 128
        public var maxPerAddress = 64
        public var maxLingeringRefusals = 256

        public init() {}
    }

    public enum Decision: Sendable, Equatable {
        case admit
        /// Answer 403 and close.
        case forbid
        /// Close at once, no answer.
        case drop
    }

    /// What `admit` decided and counted; handed back to `release` when the connection closes, so the
    /// counts stay right even if a reload changes who is privileged meanwhile.
    public struct Ticket: Sendable {
        public let decision: Decision
        let peer: IPAddress?
        let perAddress: Bool
    }

    private struct State {
        var open = 0
        var perAddress: [IPAddress: Int] = [:]
        var lingering = 0
    }

    private let limits: Limits
    private let state = Mutex(State())
    private let sources: @Sendable () -> SourcePolicy

    public init(limits: Limits = Limits(), sources: @escaping @Sendable () -> SourcePolicy) {
        self.limits = limits
        self.sources = sources
    }

    private static let payop = SourcePolicy.payopAddresses.compactMap(IPAddress.init)

    /// Decides for a connection from `peer`; the ticket must be `release`d when it closes.
    public func admit(_ peer: IPAddress?) -> Ticket {
        guard let peer else { return Ticket(decision: .drop, peer: nil, perAddress: false) }
        let policy = sources()
        let proxy = policy.isTrustedProxy(peer)
        guard proxy || policy.allows(peer) else {
            return state.withLock { state in
                guard state.lingering < limits.maxLingeringRefusals else {
                    return Ticket(decision: .drop, peer: peer, perAddress: false)
                }
                state.lingering += 1
                return Ticket(decision: .forbid, peer: peer, perAddress: false)
            }
        }
        // Everything arrives through a trusted proxy, and Payop's own addresses are Payop: no cap there.
        let capped = !proxy && !Self.payop.contains(peer)
        let privileged = !capped || policy.listsExplicitly(peer)
        return state.withLock { state in
            let limit = privileged ? limits.maxConnections : limits.maxConnections - limits.reserve
            guard state.open < limit else { return Ticket(decision: .drop, peer: peer, perAddress: false) }
            if capped {
                guard state.perAddress[peer, default: 0] < limits.maxPerAddress else {
                    return Ticket(decision: .drop, peer: peer, perAddress: false)
                }
                state.perAddress[peer, default: 0] += 1
            }
            state.open += 1
            return Ticket(decision: .admit, peer: peer, perAddress: capped)
        }
    }

    public func release(_ ticket: Ticket) {
        guard let peer = ticket.peer else { return }
        state.withLock { state in
            switch ticket.decision {
            case .admit:
                state.open -= 1
                if ticket.perAddress, let count = state.perAddress[peer] {
                    state.perAddress[peer] = count > 1 ? count - 1 : nil
                }
            case .forbid:
                state.lingering -= 1
            case .drop:
                break
            }
        }
    }

    public var openConnections: Int { state.withLock { $0.open } }
}

/// First in a refused connection's pipeline: answers 403 (or nothing) as soon as the connection is
/// up, reads nothing further, and closes.
final class RefusingHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let answer: Bool

    init(answer: Bool) { self.answer = answer }

    static let forbidden: ByteBuffer = {
        let body = IngressAnswer.forbidden.body
        return ByteBuffer(
            string: "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
                + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body)
    }()

    func channelActive(context: ChannelHandlerContext) {
        guard answer else {
            context.close(promise: nil)
            return
        }
        let channel = context.channel
        context.writeAndFlush(NIOAny(Self.forbidden)).whenComplete { _ in channel.closeAfterAnswer() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Dropped: nothing a refused client sends is parsed.
    }
}
