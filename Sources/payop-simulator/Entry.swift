import Foundation
import Logging
import PayopSimulator
import ServiceLifecycle

/// A development tool, not part of the daemon: runs the Payop simulator on its own, for benchmarks and
/// for pointing a real payop-ipnd at it (`payop.api_base_url: http://127.0.0.1:PORT`).
///
///   payop-simulator [--port 8081] [--jwt-file FILE] [--accept-unknown]
@main
struct Entry {
    static func main() async throws {
        var port = 8081
        var jwt = "simulator-jwt"
        var acceptUnknown = false
        var arguments = CommandLine.arguments.dropFirst()
        while let argument = arguments.popFirst() {
            switch argument {
            case "--port": port = Int(arguments.popFirst() ?? "") ?? port
            case "--jwt-file":
                let path = arguments.popFirst() ?? ""
                jwt = try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            case "--accept-unknown": acceptUnknown = true
            default:
                FileHandle.standardError.write(Data("usage: payop-simulator [--port N] [--jwt-file F] [--accept-unknown]\n".utf8))
                exit(64)
            }
        }
        var logger = Logger(label: "payop-simulator")
        logger.logLevel = .warning
        let payop = SimulatedPayop(jwt: jwt)
        payop.updateFaults { $0.acceptUnknown = acceptUnknown }
        let app = SimulatorServer.makeApplication(payop: payop, port: port, logger: logger) { bound in
            print("payop-simulator listening on http://127.0.0.1:\(bound)")
        }
        let group = ServiceGroup(
            configuration: .init(services: [app], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
