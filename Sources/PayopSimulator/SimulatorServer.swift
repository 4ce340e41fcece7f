import AsyncHTTPClient
import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle

/// The simulator on a real loopback port: Payop's three lookups (and the batch filter) with Payop's
/// answer shapes and Bearer auth, plus a control surface under `/sim/` to create entities, change their
/// state, inject faults and post IPNs the way Payop does.
public enum SimulatorServer {
    public static func makeApplication(
        payop: SimulatedPayop, host: String = "127.0.0.1", port: Int, logger: Logger,
        onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        let router = Router()
        let poster = IPNPoster()
        router.get("/v2/transactions/:id") { request, context in
            // Hummingbird leaves a path parameter percent-encoded (query values it decodes).
            let id = context.parameters.get("id").map { $0.removingPercentEncoding ?? $0 } ?? ""
            return await apiAnswer(payop, path: "/v2/transactions/\(id)", request)
        }
        for path in ["/v1/transactions/filter", "/v1/refunds/user-refunds", "/v1/withdrawals/user-withdrawals"] {
            router.get(RouterPath(path)) { request, _ in await apiAnswer(payop, path: path, request) }
        }
        router.post("/sim/transactions") { request, context in
            let create = try await request.decode(as: CreateRequest.self, context: context)
            let entity = payop.create(
                create.kind, id: create.id, state: create.state, amount: create.amount ?? "100.00",
                currency: create.currency ?? "EUR", orderID: create.orderID, errorMessage: create.errorMessage ?? "",
                sourceTransactionID: create.sourceTransactionID)
            return try jsonResponse(entity, status: .created)
        }
        router.post("/sim/transactions/:kind/:id/state") { request, context in
            let change = try await request.decode(as: StateChange.self, context: context)
            guard let kind = context.parameters.get("kind").flatMap(SimulatedPayop.Kind.init(rawValue:)),
                let entity = payop.setState(
                    kind, id: context.parameters.get("id") ?? "", state: change.state, errorMessage: change.errorMessage)
            else { return Response(status: .notFound) }
            return try jsonResponse(entity, status: .ok)
        }
        router.post("/sim/faults") { request, context in
            payop.setFaults(try await request.decode(as: SimulatedPayop.Faults.self, context: context))
            return Response(status: .noContent)
        }
        router.post("/sim/ipn") { request, context in
            let post = try await request.decode(as: PostRequest.self, context: context)
            guard let entity = payop.entity(post.kind, id: post.id) else {
                return Response(status: .notFound)
            }
            let body = SimulatedPayop.ipnBody(for: entity, claimingState: post.claimState)
            let answers = await poster.post(body, to: post.url, duplicates: post.duplicates ?? 0)
            return try jsonResponse(PostResult(answers: answers, body: String(decoding: body, as: UTF8.self)), status: .ok)
        }
        return Application(
            router: router, configuration: .init(address: .hostname(host, port: port), serverName: "payop-simulator"),
            services: [poster], onServerRunning: { await onRunning($0.localAddress?.port ?? port) }, logger: logger)
    }

    private static func apiAnswer(_ payop: SimulatedPayop, path: String, _ request: Request) async -> Response {
        // Hummingbird has percent-decoded the values already; decoding them again would turn an id's
        // own `%41` into `A`.
        var query: [String: String] = [:]
        for (key, value) in request.uri.queryParameters {
            query[String(key).removingPercentEncoding ?? String(key)] = String(value)
        }
        let (status, body) = await payop.answer(
            path: path, query: query, authorization: request.headers[.authorization])
        return Response(
            status: .init(code: status), headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    private static func jsonResponse(_ value: some Encodable, status: HTTPResponse.Status) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Response(
            status: status, headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
    }

    struct CreateRequest: Decodable {
        var kind: SimulatedPayop.Kind
        var id: String?
        var state: Int
        var amount: String?
        var currency: String?
        var orderID: String?
        var errorMessage: String?
        var sourceTransactionID: String?

        enum CodingKeys: String, CodingKey {
            case kind, id, state, amount, currency, orderID = "order_id", errorMessage = "error_message"
            case sourceTransactionID = "source_transaction_id"
        }
    }

    struct StateChange: Decodable {
        var state: Int
        var errorMessage: String?
        enum CodingKeys: String, CodingKey { case state, errorMessage = "error_message" }
    }

    struct PostRequest: Decodable {
        var kind: SimulatedPayop.Kind
        var id: String
        var url: String
        /// Extra copies after the first 200, as Payop sometimes sends.
        var duplicates: Int?
        /// Claim another state than the entity has (an IPN that disagrees with the API).
        var claimState: Int?
        enum CodingKeys: String, CodingKey { case kind, id, url, duplicates, claimState = "claim_state" }
    }

    struct PostResult: Encodable {
        var answers: [Int]
        var body: String
    }
}

/// Posts IPN bodies as Payop does: again until 200 (a few quick tries here, Payop keeps trying for a
/// day), then `duplicates` more copies.
final class IPNPoster: Service, Sendable {
    let http = HTTPClient(eventLoopGroupProvider: .singleton)
    static let maxTries = 5

    func post(_ body: Data, to url: String, duplicates: Int) async -> [Int] {
        var answers: [Int] = []
        var delivered = false
        for _ in 0..<Self.maxTries where !delivered {
            let status = await send(body, to: url)
            answers.append(status)
            delivered = status == 200
            if !delivered { try? await Task.sleep(for: .milliseconds(200)) }
        }
        if delivered {
            for _ in 0..<duplicates { answers.append(await send(body, to: url)) }
        }
        return answers
    }

    private func send(_ body: Data, to url: String) async -> Int {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "User-Agent", value: "payop-ipnd simulator")
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let response = try await http.execute(request, timeout: .seconds(10))
            _ = try await response.body.collect(upTo: 1 << 20)
            return Int(response.status.code)
        } catch {
            return 0
        }
    }

    func run() async throws {
        try? await gracefulShutdown()
        try await http.shutdown()
    }
}
