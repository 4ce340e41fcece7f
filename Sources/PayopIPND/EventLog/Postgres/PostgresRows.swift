import Foundation
import PostgresNIO

/// The shared value types read from PostgreSQL rows: the same columns as the SQLite log's queries
/// (`Event.select`, `Receipt.columns`, ...), so both logs hand the rest of the daemon the same values,
/// plus the `node_id` of receipts and deliveries (which daemon answered, which claimed).
extension PostgresRandomAccessRow {
    func value<T: PostgresDecodable>(_ column: String, as type: T.Type = T.self) throws -> T {
        try self[column].decode(T.self)
    }

    func int(_ column: String) throws -> Int { Int(try value(column, as: Int64.self)) }
    func optionalInt(_ column: String) throws -> Int? { try value(column, as: Int64?.self).map(Int.init) }
    func bytes(_ column: String) throws -> [UInt8]? { try value(column, as: ByteBuffer?.self).map { Array($0.readableBytesView) } }
}

extension Event {
    init(postgres row: PostgresRandomAccessRow) throws {
        self.init(
            id: try row.value("id"), kind: try row.value("kind"), status: try row.value("status"),
            state: try row.value("state"), rejectionReason: try row.value("rejection_reason"),
            source: try row.value("source"), transactionID: try row.value("transaction_id"),
            invoiceID: try row.value("invoice_id"), orderID: try row.value("order_id"),
            refundID: try row.value("refund_id"), withdrawalID: try row.value("withdrawal_id"),
            amount: try row.value("amount"), currency: try row.value("currency"),
            payopState: try row.optionalInt("payop_state"), errorMessage: try row.value("error_message"),
            legacy: try row.value("legacy"), verification: try row.value("verification"),
            receivedAt: try row.value("received_at"), verifiedAt: try row.value("verified_at"),
            duplicates: try row.int("duplicates"), ipn: try row.bytes("ipn"))
    }
}

extension Receipt {
    init(postgres row: PostgresRandomAccessRow) throws {
        id = try row.value("id")
        receivedAt = try row.value("received_at")
        sourceIP = try row.value("source_ip")
        path = try row.value("path")
        answer = try row.int("answer")
        reason = try row.value("reason")
        kind = try row.value("kind")
        entityID = try row.value("entity_id")
        eventID = try row.value("event_id")
        size = try row.int("size")
        body = row.contains("body") ? try row.bytes("body") : nil
        nodeID = row.contains("node_id") ? try row.value("node_id") : nil
    }
}

extension Delivery {
    init(postgres row: PostgresRandomAccessRow) throws {
        self.init(
            id: try row.value("id"), eventID: try row.value("event_id"), hook: try row.value("hook"),
            state: DeliveryState(rawValue: try row.value("state")) ?? .pending, attempts: try row.int("attempts"),
            nextAttemptAt: try row.value("next_attempt_at"), lastExitCode: try row.optionalInt("last_exit_code"),
            lastHTTPStatus: try row.optionalInt("last_http_status"), lastError: try row.value("last_error"),
            output: try row.value("output"), deliveredAt: try row.value("delivered_at"))
        nodeID = row.contains("node_id") ? try row.value("node_id") : nil
    }
}

extension DeliveryAttempt {
    init(postgres row: PostgresRandomAccessRow) throws {
        deliveryID = try row.value("delivery_id")
        attempt = try row.int("attempt")
        finishedAt = try row.value("finished_at")
        outcome = try row.value("outcome")
        exitCode = try row.optionalInt("exit_code")
        httpStatus = try row.optionalInt("http_status")
        error = try row.value("error")
        output = try row.value("output")
    }
}

extension Receipt {
    static let postgresColumns = columns + ", node_id"
}

extension Delivery {
    static let postgresColumns = columns + ", node_id"
}
