-- wrk script: every request is a distinct checkout IPN (a new transaction id), so the daemon does the
-- full durable path (new event + receipt) each time, never the cheaper duplicate path.
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  prefix = string.format("bench-%d-%d-%d-", os.time(), math.random(1, 1000000), tid)
  counter = 0
  path = os.getenv("BENCH_PATH") or "/payop/ipn"
end

function request()
  counter = counter + 1
  local tx = prefix .. counter
  local body = '{"invoice":{"id":"inv-' .. tx .. '","status":1,"txid":"' .. tx .. '"},' ..
    '"transaction":{"id":"' .. tx .. '","state":2,"order":{"id":"o-' .. counter .. '"},' ..
    '"error":{"message":"","code":""}}}'
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT requests=%d rps=%.0f p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), errors))
end
