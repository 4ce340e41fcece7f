import Testing

@testable import PayopIPND

@Suite struct MetricsTests {
    @Test func eachLabelledMetricIsMadeOnceAndCountsEveryUse() {
        let metrics = DaemonMetrics()
        for index in 0..<50 {
            metrics.delivery(hook: index.isMultiple(of: 2) ? "fulfil" : "mail", outcome: "delivered", milliseconds: 5)
            metrics.ipn(kind: "checkout", answer: 200)
        }
        metrics.delivery(hook: "fulfil", outcome: "failed", milliseconds: 7)
        metrics.ipn(kind: "refund", answer: 200)
        metrics.ipn(kind: nil, answer: 400)
        metrics.ipn(kind: nil, answer: 400)
        // One latency timer per hook, one counter per (hook, outcome) and per (kind, answer); the three
        // kinds' accepted counters are made up front.
        #expect(metrics.timers.count == 2)
        #expect(metrics.counters.count == 7)
        let text = metrics.render()
        #expect(text.contains(#"payop_ipnd_deliveries_total{hook="fulfil",outcome="delivered"} 25"#))
        #expect(text.contains(#"payop_ipnd_deliveries_total{hook="fulfil",outcome="failed"} 1"#))
        #expect(text.contains(#"payop_ipnd_deliveries_total{hook="mail",outcome="delivered"} 25"#))
        #expect(text.contains(#"payop_ipnd_delivery_latency_seconds_count{hook="fulfil"} 26"#))
        #expect(text.contains(#"payop_ipnd_ipn_requests_total{kind="checkout",answer="200"} 50"#))
        #expect(text.contains(#"payop_ipnd_ipn_requests_total{kind="refund",answer="200"} 1"#))
        #expect(text.contains(#"payop_ipnd_ipn_requests_total{kind="withdrawal",answer="200"} 0"#))
        #expect(text.contains(#"payop_ipnd_ipn_requests_total{kind="unknown",answer="400"} 2"#))
    }
}
