import Mustache

/// The console's pages: Mustache, HTML-escaped by default (`{{value}}`); nothing here uses the
/// unescaped forms, so an IPN's attacker-controlled text always shows as text.
enum ConsoleTemplates {
    static let library: MustacheLibrary = {
        var library = MustacheLibrary()
        for (name, text) in templates {
            do {
                try library.register(text, named: name)
            } catch {
                preconditionFailure("console template \(name) does not parse: \(error)")
            }
        }
        return library
    }()

    static func render(_ name: String, _ values: [String: Any]) -> String {
        library.render(values, withTemplate: name) ?? ""
    }

    static let templates: [String: String] = [
        "layout": layout, "overview": overview, "events": events, "event": event, "deliveries": deliveries,
        "receipts": receipts, "login": login, "message": message,
    ]

    static let layout = """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
        {{#refresh}}<meta http-equiv="refresh" content="{{refresh}}">{{/refresh}}
        <title>{{title}} · payop-ipnd</title>
        <style>
        body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
        header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
        header a{color:#fff;text-decoration:none}header a:hover{text-decoration:underline}
        header .brand{font-weight:600;margin-right:1em}header form{margin-left:auto}
        main{padding:1em 1.2em;max-width:1400px}
        table{border-collapse:collapse;width:100%;background:#fff;margin:.4em 0 1.2em}
        th,td{text-align:left;padding:.3em .5em;border-bottom:1px solid #e3e6eb;vertical-align:top}
        th{background:#eef0f4;font-weight:600}
        pre{white-space:pre-wrap;word-break:break-all;background:#f0f2f5;padding:.5em;margin:0;max-height:18em;overflow:auto}
        .cards{display:flex;flex-wrap:wrap;gap:.8em}.card{background:#fff;padding:.7em 1em;border:1px solid #e3e6eb;min-width:10em}
        .card b{display:block;font-size:1.6em}
        .state-verified,.state-delivered{color:#11703a}.state-rejected,.state-dead{color:#b3261e}
        .state-received,.state-pending,.state-running{color:#8a5a00}
        .notice{background:#e6f4ea;border:1px solid #11703a;padding:.5em 1em}.error{background:#fce8e6;border:1px solid #b3261e;padding:.5em 1em}
        form.inline{display:inline}form.filters{display:flex;gap:.5em;flex-wrap:wrap;align-items:end;margin:.5em 0}
        dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;background:#fff;padding:.7em 1em}dt{color:#5b6475}dd{margin:0}
        svg{background:#fff;border:1px solid #e3e6eb;width:100%;height:140px}
        .axis{display:flex;justify-content:space-between;color:#5b6475;font-size:.85em}
        </style></head>
        <body><header><span class="brand">payop-ipnd</span><a href="/">Overview</a><a href="/events">Events</a>
        <a href="/deliveries">Deliveries</a><a href="/receipts?refused=1">Refused IPNs</a>
        {{#session}}<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{csrf}}"><button>Log out</button></form>{{/session}}
        </header><main>
        {{#notice}}<p class="notice">{{notice}}</p>{{/notice}}
        {{$content}}{{/content}}
        </main></body></html>
        """

    static let overview = """
        {{<layout}}{{$content}}
        <h1>Overview</h1>
        <div class="cards">
        <div class="card">IPNs, last hour<b id="ipns-hour">{{ipnsHour}}</b></div>
        <div class="card">IPNs, last day<b id="ipns-day">{{ipnsDay}}</b></div>
        <div class="card">Refused, last day<b id="refused-day">{{refusedDay}}</b></div>
        <div class="card">Events, last hour<b id="events-hour">{{eventsHour}}</b></div>
        <div class="card">Events, last day<b id="events-day">{{eventsDay}}</b></div>
        <div class="card">Awaiting Payop<b id="verification-backlog">{{awaitingVerification}}</b></div>
        <div class="card">Deliveries to run<b id="delivery-backlog">{{deliveryBacklog}}</b></div>
        <div class="card">Dead deliveries<b id="dead-deliveries"><a href="/deliveries?state=dead">{{dead}}</a></b></div>
        </div>
        <dl>
        <dt>Last IPN</dt><dd id="last-ipn">{{lastIPN}}</dd>
        <dt>Payop API</dt><dd id="payop-api">{{payopAPI}}</dd>
        </dl>
        <h2>IPNs per minute, last 24 hours (peak {{chartPeak}})</h2>
        <svg id="ipn-chart" viewBox="0 0 1440 120" preserveAspectRatio="none" role="img" aria-label="IPNs per minute over the last day">
        <polyline fill="none" stroke="#2a5bd7" stroke-width="2" vector-effect="non-scaling-stroke" points="{{chartPoints}}"/>
        </svg>
        <div class="axis"><span>24 h ago</span><span>12 h ago</span><span>now</span></div>
        {{/content}}{{/layout}}
        """

    static let events = """
        {{<layout}}{{$content}}
        <h1>Events</h1>
        <form id="search" class="filters" method="get" action="/events">
        <label>Find <input name="q" value="{{q}}" placeholder="order, transaction, refund, withdrawal or event id" size="40"></label>
        <label>Type <select name="type"><option value="">any</option>{{#types}}<option{{#selected}} selected{{/selected}}>{{name}}</option>{{/types}}</select></label>
        <label>Status <input name="status" value="{{status}}" placeholder="accepted" size="10"></label>
        <label>State <select name="state"><option value="">any</option>{{#states}}<option{{#selected}} selected{{/selected}}>{{name}}</option>{{/states}}</select></label>
        <button type="submit">Search</button>
        </form>
        <table id="events"><thead><tr><th>Received</th><th>Event</th><th>Type</th><th>State</th><th>Order</th><th>Entity</th><th>Amount</th><th>Copies</th></tr></thead>
        <tbody>{{#events}}<tr class="event"><td>{{receivedAt}}</td><td><a class="event-link" href="/events/{{id}}">{{id}}</a></td><td>{{type}}</td>
        <td class="state-{{state}}">{{state}}{{#reason}} ({{reason}}){{/reason}}</td><td class="order">{{order}}</td><td>{{entity}}</td><td>{{amount}}</td><td>{{copies}}</td></tr>
        {{/events}}{{^events}}<tr><td colspan="8">No events{{#filtered}} match{{/filtered}}.</td></tr>{{/events}}</tbody></table>
        {{#next}}<a id="next-page" href="{{next}}">Older events</a>{{/next}}
        {{/content}}{{/layout}}
        """

    static let event = """
        {{<layout}}{{$content}}
        <h1>Event {{id}}</h1>
        <dl>
        <dt>Type</dt><dd id="event-type">{{type}}</dd>
        <dt>State</dt><dd id="event-state" class="state-{{state}}">{{state}}{{#reason}} ({{reason}}){{/reason}}</dd>
        {{#fields}}<dt>{{name}}</dt><dd{{#elementID}} id="{{elementID}}"{{/elementID}}>{{value}}</dd>{{/fields}}
        </dl>
        {{#replayable}}<form class="replay" method="post" action="/events/{{id}}/replay"><input type="hidden" name="csrf" value="{{csrf}}"><button>Replay</button> to every matching hook</form>{{/replayable}}
        <section id="receipts"><h2>IPN copies received</h2>
        <table><thead><tr><th>Received</th><th>Source</th><th>Answer</th><th>Size</th><th>IPN body</th></tr></thead><tbody>
        {{#receipts}}<tr class="receipt"><td>{{receivedAt}}</td><td>{{source}}</td><td>{{answer}}</td><td>{{size}}</td><td><pre class="ipn-body">{{body}}</pre></td></tr>{{/receipts}}
        </tbody></table>{{#receiptsHidden}}<p>{{receiptsHidden}} later copies are not shown here: <code>payop-ipnd receipts list</code> has them all.</p>{{/receiptsHidden}}</section>
        <section id="verification-attempts"><h2>Questions to Payop</h2>
        <table><thead><tr><th>At</th><th>Outcome</th><th>Payop state</th><th>Detail</th></tr></thead><tbody>
        {{#attempts}}<tr class="verification-attempt"><td>{{at}}</td><td>{{outcome}}</td><td>{{payopState}}</td><td>{{detail}}</td></tr>{{/attempts}}
        {{^attempts}}<tr><td colspan="4">None{{#signed}}: a legacy IPN, proven by its signature{{/signed}}.</td></tr>{{/attempts}}
        </tbody></table></section>
        <section id="deliveries"><h2>Deliveries</h2>
        <table><thead><tr><th>Hook</th><th>State</th><th>Attempts</th><th>Next attempt</th><th>Delivered</th><th>Last error</th><th></th></tr></thead><tbody>
        {{#deliveries}}<tr class="delivery" data-hook="{{hook}}"><td>{{hook}}{{#node}}<br><small class="node">claimed by {{node}}</small>{{/node}}</td><td class="delivery-state state-{{state}}">{{state}}</td><td>{{attempts}}</td><td>{{nextAttempt}}</td><td>{{deliveredAt}}</td><td>{{lastError}}</td>
        <td>{{#replayable}}<form class="replay" method="post" action="/events/{{eventID}}/replay"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="hook" value="{{hook}}"><button>Replay</button></form>{{/replayable}}</td></tr>
        <tr><td></td><td colspan="6"><table class="delivery-attempts"><thead><tr><th>Attempt</th><th>Finished</th><th>Outcome</th><th>Exit code</th><th>HTTP status</th><th>Error</th><th>Output</th></tr></thead><tbody>
        {{#runs}}<tr class="delivery-attempt"><td>{{attempt}}</td><td>{{finishedAt}}</td><td>{{outcome}}</td><td>{{exitCode}}</td><td>{{httpStatus}}</td><td>{{error}}</td><td><pre class="output">{{output}}</pre></td></tr>{{/runs}}
        {{^runs}}<tr><td colspan="7">Not run yet.</td></tr>{{/runs}}
        </tbody></table></td></tr>
        {{/deliveries}}{{^deliveries}}<tr><td colspan="7">None{{^replayable}}: only verified events are delivered{{/replayable}}.</td></tr>{{/deliveries}}
        </tbody></table></section>
        {{/content}}{{/layout}}
        """

    static let deliveries = """
        {{<layout}}{{$content}}
        <h1>Deliveries</h1>
        <form class="filters" method="get" action="/deliveries">
        <label>State <select name="state"><option value="">any</option>{{#states}}<option{{#selected}} selected{{/selected}}>{{name}}</option>{{/states}}</select></label>
        <label>Hook <select name="hook"><option value="">any</option>{{#hooks}}<option{{#selected}} selected{{/selected}}>{{name}}</option>{{/hooks}}</select></label>
        <button type="submit">Filter</button></form>
        {{#deadHooks}}<form class="replay-hook" method="post" action="/deliveries/replay-dead"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="hook" value="{{hook}}"><button>Replay all {{count}} dead deliveries of {{hook}}</button></form>{{/deadHooks}}
        {{#orphans}}<p class="error">{{count}} pending deliveries wait for hook {{hook}}, which is not in the configuration: add it back to hooks (or rename it back) and reload.</p>{{/orphans}}
        <table id="deliveries"><thead><tr><th>Delivery</th><th>Event</th><th>Hook</th><th>State</th><th>Attempts</th><th>Next attempt</th><th>Last error</th><th></th></tr></thead><tbody>
        {{#deliveries}}<tr class="delivery" data-hook="{{hook}}"><td>{{id}}</td><td><a class="event-link" href="/events/{{eventID}}">{{eventID}}</a></td><td>{{hook}}{{#node}}<br><small class="node">claimed by {{node}}</small>{{/node}}</td>
        <td class="delivery-state state-{{state}}">{{state}}</td><td>{{attempts}}</td><td>{{nextAttempt}}</td><td>{{lastError}}</td>
        <td>{{#dead}}<form class="replay" method="post" action="/events/{{eventID}}/replay"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="hook" value="{{hook}}"><button>Replay</button></form>{{/dead}}</td></tr>
        {{/deliveries}}{{^deliveries}}<tr><td colspan="8">No deliveries.</td></tr>{{/deliveries}}</tbody></table>
        {{/content}}{{/layout}}
        """

    static let receipts = """
        {{<layout}}{{$content}}
        <h1>{{#refusedOnly}}Refused IPNs{{/refusedOnly}}{{^refusedOnly}}Every IPN{{/refusedOnly}}</h1>
        <p>{{#refusedOnly}}Requests answered 400 or 401 (nothing was verified or delivered for them). <a href="/receipts">Show every IPN</a>{{/refusedOnly}}{{^refusedOnly}}<a href="/receipts?refused=1">Only refused ones</a>{{/refusedOnly}}</p>
        <table id="receipts"><thead><tr><th>Received</th><th>Source</th><th>Answer</th><th>Reason</th><th>Kind</th><th>Entity</th><th>Event</th></tr></thead><tbody>
        {{#receipts}}<tr class="receipt"><td>{{receivedAt}}</td><td>{{source}}</td><td>{{answer}}</td><td>{{reason}}</td><td>{{kind}}</td><td>{{entity}}</td><td>{{#hasEvent}}<a href="/events/{{eventID}}">{{eventID}}</a>{{/hasEvent}}</td></tr>{{/receipts}}
        {{^receipts}}<tr><td colspan="7">None.</td></tr>{{/receipts}}</tbody></table>
        {{/content}}{{/layout}}
        """

    static let login = """
        {{<layout}}{{$content}}
        <h1>Sign in</h1>
        {{#failed}}<p class="error">That is not the console's token.</p>{{/failed}}
        <form id="login" method="post" action="/login"><label>Token (the content of admin.token_file)
        <input type="password" name="token" autocomplete="current-password" autofocus></label> <button>Sign in</button></form>
        {{/content}}{{/layout}}
        """

    static let message = """
        {{<layout}}{{$content}}
        <h1>{{heading}}</h1><p class="error">{{text}}</p><p><a href="/">Back to the overview</a></p>
        {{/content}}{{/layout}}
        """
}
