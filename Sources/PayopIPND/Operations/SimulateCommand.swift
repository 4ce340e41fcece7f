import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore

/// `simulate KIND --state S`: plays Payop against a simulator (the sandbox's, by default): creates the
/// transaction there, then has the simulator post its IPN the way Payop does.
struct SimulateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate", abstract: "Play Payop: create a transaction in a simulator and post its IPN.",
        discussion: """
            States by name: checkout new, accepted, failed, pending, timeout, rejected, pre_approved; refund new, \
            accepted, rejected; withdrawal pending, accepted, rejected. Or Payop's number.
            """)

    enum Kind: String, ExpressibleByArgument, CaseIterable {
        case checkout, refund, withdrawal
    }

    @Argument(help: "checkout, refund or withdrawal.") var kind: Kind
    @Option(help: "The status to play: a name (accepted) or Payop's state number.") var state: String
    @Option(help: "Where the IPN is posted.") var url = "http://127.0.0.1:8080/payop/ipn"
    @Option(help: "The simulator's address.") var simulator = "http://127.0.0.1:8081"
    @Option(help: "Use this id (default: a new one); repeat it with another --state to change a status.") var id: String?
    @Option(help: "Amount, as a decimal.") var amount = "100.00"
    @Option(help: "Currency code.") var currency = "EUR"
    @Option(name: .customLong("order-id"), help: "The merchant's order id.") var orderID: String?
    @Option(help: "Extra copies of the IPN after the first 200, as Payop sometimes sends.") var duplicates = 0

    func validate() throws {
        guard Self.resolve(state, kind: kind) != nil else {
            throw ValidationError("--state \(state) is not a \(kind.rawValue) status name or state number")
        }
        guard duplicates >= 0 else { throw ValidationError("--duplicates must be 0 or more") }
    }

    /// A status name (or number) as Payop's state number and error message.
    static func resolve(_ text: String, kind: Kind) -> (state: Int, message: String)? {
        if let number = Int(text), number > 0 { return (number, "") }
        let names: [String: (Int, String)]
        switch kind {
        case .checkout:
            names = [
                "new": (1, ""), "accepted": (2, ""), "failed": (3, ""), "pending": (4, ""), "timeout": (15, ""),
                "rejected": (5, PaymentStatus.securityRejectionMessage), "pre_approved": (9, ""),
            ]
        case .refund:
            names = ["new": (1, ""), "accepted": (2, ""), "rejected": (3, "")]
        case .withdrawal:
            names = ["pending": (1, ""), "accepted": (2, ""), "rejected": (3, "")]
        }
        return names[text].map { (state: $0.0, message: $0.1) }
    }

    func run() async throws {
        try await reportingFailures {
            guard let (number, message) = Self.resolve(state, kind: kind) else { return }
            // A one-shot tool: the process-wide shared client needs no shutdown.
            let http = HTTPClient.shared
            let base = simulator.hasSuffix("/") ? String(simulator.dropLast()) : simulator
            var entity: [String: Any]
            if let id, let changed = try await call(
                http, "\(base)/sim/transactions/\(kind.rawValue)/\(id)/state", ["state": number, "error_message": message],
                allowNotFound: true)
            {
                entity = changed
            } else {
                var create: [String: Any] = [
                    "kind": kind.rawValue, "state": number, "amount": amount, "currency": currency, "error_message": message,
                ]
                if let id { create["id"] = id }
                if let orderID { create["order_id"] = orderID }
                entity = try await call(http, "\(base)/sim/transactions", create, allowNotFound: false) ?? [:]
            }
            let entityID = entity["id"] as? String ?? "?"
            print("simulator: \(kind.rawValue) \(entityID) is now in state \(number) (\(state))")
            let posted = try await call(
                http, "\(base)/sim/ipn", ["kind": kind.rawValue, "id": entityID, "url": url, "duplicates": duplicates],
                allowNotFound: false)
            let answers = (posted?["answers"] as? [Int]) ?? []
            print("posted its IPN to \(url): answers \(answers.map { $0 == 0 ? "no answer" : String($0) }.joined(separator: ", "))")
            guard answers.contains(200) else {
                throw CommandFailure.user("the IPN was never answered 200: is the daemon running on \(url)?")
            }
        }
    }

    private func call(_ http: HTTPClient, _ url: String, _ body: [String: Any], allowNotFound: Bool) async throws
        -> [String: Any]?
    {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let response: HTTPClientResponse
        let data: ByteBuffer
        do {
            response = try await http.execute(request, timeout: .seconds(30))
            data = try await response.body.collect(upTo: 1 << 20)
        } catch {
            throw CommandFailure.unavailable(
                "no simulator answers at \(simulator): start one with 'payop-ipnd serve --sandbox' (\(error))")
        }
        if response.status == .notFound, allowNotFound { return nil }
        guard (200..<300).contains(Int(response.status.code)) else {
            throw CommandFailure.user("the simulator answered \(response.status.code) to \(url)")
        }
        return (try? JSONSerialization.jsonObject(with: Data(data.readableBytesView))) as? [String: Any]
    }
}
