import Foundation
import Synchronization

/// Payop's side of the world, in memory: transactions, refunds and withdrawals with their states, the
/// JWT Payop accepts, and the faults a test or the sandbox asks for.
public final class SimulatedPayop: Sendable {
    public enum Kind: String, Sendable, Codable {
        case checkout, refund, withdrawal
    }

    public struct Entity: Sendable, Codable, Equatable {
        public var kind: Kind
        public var id: String
        public var state: Int
        public var amount: String
        public var currency: String
        public var orderID: String
        public var invoiceID: String
        public var errorMessage: String
        /// For a refund: the refunded checkout transaction.
        public var sourceTransactionID: String?

        enum CodingKeys: String, CodingKey {
            case kind, id, state, amount, currency, orderID = "order_id", invoiceID = "invoice_id"
            case errorMessage = "error_message", sourceTransactionID = "source_transaction_id"
        }
    }

    /// Misbehaviour on demand, as Payop's API sometimes shows it.
    public struct Faults: Sendable, Codable, Equatable {
        /// The next N API answers fail with `failStatus`.
        public var failNext: Int = 0
        public var failStatus: Int = 500
        /// Every API call answers 401, as with a wrong or expired JWT.
        public var unauthorized: Bool = false
        /// Every API answer waits this long first.
        public var delayMilliseconds: Int = 0
        /// The API reports these states instead of the real ones (a status that disagrees with the IPN).
        public var reportState: [String: Int] = [:]
        /// Unknown checkout transactions are reported as accepted (state 2, 100.00 EUR): for load tests
        /// whose IPNs carry ids nobody created.
        public var acceptUnknown: Bool = false

        public init() {}

        enum CodingKeys: String, CodingKey {
            case failNext = "fail_next", failStatus = "fail_status", unauthorized
            case delayMilliseconds = "delay_ms", reportState = "report_state", acceptUnknown = "accept_unknown"
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            failNext = try c.decodeIfPresent(Int.self, forKey: .failNext) ?? 0
            failStatus = try c.decodeIfPresent(Int.self, forKey: .failStatus) ?? 500
            unauthorized = try c.decodeIfPresent(Bool.self, forKey: .unauthorized) ?? false
            delayMilliseconds = try c.decodeIfPresent(Int.self, forKey: .delayMilliseconds) ?? 0
            reportState = try c.decodeIfPresent([String: Int].self, forKey: .reportState) ?? [:]
            acceptUnknown = try c.decodeIfPresent(Bool.self, forKey: .acceptUnknown) ?? false
        }
    }

    /// One call to the simulated API, for tests that check what the daemon sent.
    public struct APICall: Sendable, Equatable {
        public var path: String
        public var authorization: String?
        public var answer: Int
    }

    private struct State {
        var entities: [String: Entity] = [:]
        var faults = Faults()
        var calls: [APICall] = []
    }

    private let state = Mutex(State())
    public let jwt: String

    public init(jwt: String) {
        self.jwt = jwt
    }

    private static func key(_ kind: Kind, _ id: String) -> String { "\(kind.rawValue)/\(id)" }

    @discardableResult
    public func create(
        _ kind: Kind, id: String? = nil, state: Int, amount: String = "100.00", currency: String = "EUR",
        orderID: String? = nil, errorMessage: String = "", sourceTransactionID: String? = nil
    ) -> Entity {
        let id = id ?? UUID().uuidString.lowercased()
        let entity = Entity(
            kind: kind, id: id, state: state, amount: amount, currency: currency,
            orderID: orderID ?? "ORDER-\(id.prefix(8))", invoiceID: UUID().uuidString.lowercased(),
            errorMessage: errorMessage,
            sourceTransactionID: kind == .refund ? (sourceTransactionID ?? UUID().uuidString.lowercased()) : nil)
        self.state.withLock { $0.entities[Self.key(kind, id)] = entity }
        return entity
    }

    public func setState(_ kind: Kind, id: String, state newState: Int, errorMessage: String? = nil) -> Entity? {
        state.withLock { s in
            guard var entity = s.entities[Self.key(kind, id)] else { return nil }
            entity.state = newState
            if let errorMessage { entity.errorMessage = errorMessage }
            s.entities[Self.key(kind, id)] = entity
            return entity
        }
    }

    public func entity(_ kind: Kind, id: String) -> Entity? {
        state.withLock { $0.entities[Self.key(kind, id)] }
    }

    public func setFaults(_ faults: Faults) { state.withLock { $0.faults = faults } }
    public func updateFaults(_ change: (inout Faults) -> Void) { state.withLock { change(&$0.faults) } }
    /// The latest calls to the API, oldest first: once `callsKept` are kept, the older half is dropped.
    public var calls: [APICall] { state.withLock { $0.calls } }

    // MARK: - The API, as Payop answers it

    /// The answer to a GET of Payop's API: status and JSON body. Only the lookup holds the lock; the
    /// answer is encoded after it, so that concurrent questions do not wait for each other's JSON.
    public func answer(path: String, query: [String: String], authorization: String?) async -> (Int, Data) {
        let delay = state.withLock { $0.faults.delayMilliseconds }
        if delay > 0 { try? await Task.sleep(for: .milliseconds(delay)) }
        let (status, body) = state.withLock { s -> (Int, any Encodable) in
            let result = Self.respond(path: path, query: query, authorization: authorization, jwt: jwt, state: &s)
            if s.calls.count == Self.callsKept { s.calls.removeFirst(Self.callsKept / 2) }
            s.calls.append(APICall(path: path, authorization: authorization, answer: result.0))
            return result
        }
        return (status, (try? JSONEncoder().encode(body)) ?? Data("{}".utf8))
    }

    /// The most API calls `calls` keeps (between half of it and all of it): a sandbox runs for days.
    public static let callsKept = 10_000

    private static func respond(path: String, query: [String: String], authorization: String?, jwt: String, state: inout State)
        -> (Int, any Encodable)
    {
        if state.faults.unauthorized || authorization != "Bearer \(jwt)" {
            return (401, Message(message: "Unauthorized"))
        }
        if state.faults.failNext > 0 {
            state.faults.failNext -= 1
            return (state.faults.failStatus, Message(message: "Internal server error"))
        }
        let overrides = state.faults.reportState
        let reported = { (entity: Entity) -> Int in overrides[entity.id] ?? entity.state }
        let acceptUnknown = state.faults.acceptUnknown
        let entities = state.entities
        let checkout = { (id: String) -> Entity? in
            entities[key(.checkout, id)]
                ?? (acceptUnknown
                    ? Entity(
                        kind: .checkout, id: id, state: 2, amount: "100.00", currency: "EUR", orderID: "", invoiceID: "",
                        errorMessage: "") : nil)
        }
        if path.hasPrefix("/v2/transactions/") {
            let id = String(path.dropFirst("/v2/transactions/".count))
            guard let entity = checkout(id) else {
                return (404, Message(message: "Transaction not found"))
            }
            return (200, Found(data: TransactionRecord(entity, state: reported(entity))))
        }
        switch path {
        case "/v1/transactions/filter":
            let ids = (query["query[identifiers]"] ?? "").split(separator: ",").map(String.init)
            let found = ids.compactMap(checkout)
            return (200, Found(data: found.map { TransactionRecord($0, state: reported($0)) }))
        case "/v1/refunds/user-refunds":
            let id = query["query[identifier]"] ?? ""
            let found = state.entities[key(.refund, id)].map { [RefundRecord($0, state: reported($0))] } ?? []
            return (200, Found(data: found))
        case "/v1/withdrawals/user-withdrawals":
            let id = query["query[identifier]"] ?? ""
            let found = state.entities[key(.withdrawal, id)].map { [WithdrawalRecord($0, state: reported($0))] } ?? []
            return (200, Found(data: found))
        default:
            return (404, Message(message: "Not found"))
        }
    }

    // The API's answer shapes (Payop's field names), encoded with `JSONEncoder`: `JSONSerialization`
    // with sorted keys compared every key through ICU's collation, most of the simulator's CPU in
    // `bench/burst.sh`.

    private struct Message: Encodable { var message: String }

    private struct Found<Payload: Encodable>: Encodable {
        var data: Payload
        var status = 1
    }

    private struct TransactionRecord: Encodable {
        var identifier, amount, currency: String
        var state: Int
        var error: String
        var createdAt = 1_700_000_000
        var orderId: String
        var resultUrl = "https://shop.example/result"

        init(_ e: Entity, state: Int) {
            (identifier, amount, currency, error, orderId) = (e.id, e.amount, e.currency, e.errorMessage, e.orderID)
            self.state = state
        }
    }

    private struct RefundRecord: Encodable {
        struct Source: Encodable { var identifier: String }
        var identifier: String
        var status: Int
        var amount, currency: String
        var sourceTransaction: Source
        var metadata: [String: String] = [:]

        init(_ e: Entity, state: Int) {
            (identifier, status, amount, currency) = (e.id, state, e.amount, e.currency)
            sourceTransaction = Source(identifier: e.sourceTransactionID ?? "")
        }
    }

    private struct WithdrawalRecord: Encodable {
        var identifier: String
        var status: Int
        var amount, currency: String
        var comment = ""

        init(_ e: Entity, state: Int) { (identifier, status, amount, currency) = (e.id, state, e.amount, e.currency) }
    }

    // MARK: - IPNs, as Payop posts them

    /// The IPN body Payop would post for `entity`, claiming `state` (default: its current state).
    public static func ipnBody(for entity: Entity, claimingState state: Int? = nil) -> Data {
        let state = state ?? entity.state
        let error = ["message": entity.errorMessage, "code": ""]
        switch entity.kind {
        case .checkout:
            return json([
                "invoice": [
                    "id": entity.invoiceID, "status": state == 2 ? 1 : 0, "txid": entity.id,
                    "metadata": ["orderId": entity.orderID],
                ],
                "transaction": ["id": entity.id, "state": state, "order": ["id": entity.orderID], "error": error],
            ])
        case .refund:
            return json([
                "transaction": [
                    "refundId": entity.id, "state": state, "amount": decimalNumber(entity.amount),
                    "currency": entity.currency, "metadata": [String: String](), "error": error,
                ],
                "sourceTransaction": ["id": entity.sourceTransactionID ?? "", "state": 2],
            ])
        case .withdrawal:
            return json([
                "transaction": [
                    "withdrawalId": entity.id, "state": state, "amount": decimalNumber(entity.amount),
                    "currency": entity.currency, "comment": "", "metadata": [String: String](), "error": error,
                ]
            ])
        }
    }

    private static func decimalNumber(_ text: String) -> Any {
        Decimal(string: text, locale: Locale(identifier: "en_US_POSIX")).map { NSDecimalNumber(decimal: $0) } ?? text
    }

    static func json(_ object: Any) -> Data {
        (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
    }
}
