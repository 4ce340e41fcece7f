import Foundation

// The IPN body parser's three ways through the same bytes, side by side in one run (bench/parse.sh):
// the whole value tree (the baseline), only the fields the notification parser reads, and the check
// alone that a stored body gets before it is spliced into a hook's event object.

let benchBody = Array(
    #"{"invoice":{"id":"inv-bench-1-2-3-4567","status":1,"txid":"bench-1-2-3-4567"},"transaction":{"id":"bench-1-2-3-4567","state":2,"order":{"id":"o-4567"},"error":{"message":"","code":""}}}"#
        .utf8)

// Under the default `max_body_bytes` (64 KiB): a checkout whose invoice carries a large metadata object.
let largeBody: [UInt8] = {
    let items = (0..<700).map { #"{"sku": "item-\#($0)", "qty": 1, "note": "a line of merchant metadata"}"# }
    return Array(
        (#"{"invoice":{"id":"inv-1","txid":"tx-1","metadata":{"items":["# + items.joined(separator: ",")
            + #"]}},"transaction":{"id":"tx-1","state":2,"order":{"id":"o-1"},"error":{"message":"","code":""}}}"#).utf8)
}()

func nanoseconds(_ rounds: Int, _ body: () -> Bool) -> Double {
    var kept = 0
    let elapsed = ContinuousClock().measure {
        for _ in 0..<rounds where body() { kept += 1 }
    }
    precondition(kept == rounds)
    let (seconds, attoseconds) = elapsed.components
    return (Double(seconds) * 1e9 + Double(attoseconds) / 1e9) / Double(rounds)
}

for name in CommandLine.arguments.dropFirst() {
    let bytes =
        switch name {
        case "bench": benchBody
        case "large": largeBody
        default: Array(try! String(contentsOfFile: name, encoding: .utf8).utf8)
        }
    let rounds = max(1_000, 50_000_000 / (bytes.count * 100))
    let tree = nanoseconds(rounds) { StrictJSON.value(bytes) != nil }
    let selected = nanoseconds(rounds) { StrictJSON.value(bytes, keeping: NotificationParser.fieldsRead) != nil }
    let checked = nanoseconds(rounds) { StrictJSON.isValid(bytes) }
    print(
        "\(name == "bench" ? "bench/unique-ipn.lua's body" : name == "large" ? "a checkout with large metadata" : name) (\(bytes.count) bytes): whole tree \(Int(tree)) ns,"
            + " fields read \(Int(selected)) ns (\(String(format: "%.2f", selected / tree))x),"
            + " check only \(Int(checked)) ns (\(String(format: "%.2f", checked / tree))x)")
}
