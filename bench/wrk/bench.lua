-- wrk script of the relay benchmark (bench/loadgen.py runs it; see bench/README.md).
--   wrk ... -s bench/wrk/bench.lua URL -- BODY_FILE VALUES_FILE|- THREADS [HEADER_NAME]
-- POSTs BODY_FILE (JSON) with the -H headers. With a VALUES_FILE, each request also carries
-- HEADER_NAME (default PAYMENT-SIGNATURE) set to the next unused line of the file: thread i takes
-- lines i, i+T, i+2T, ... and never reuses one (x402 payments are single-use). When a thread runs
-- out it sends "exhausted" (the relay refuses it: a non-2xx) and counts it. done() prints one JSON
-- line, prefixed "WRK_JSON ", with the summary, errors, latency percentiles (microseconds) and
-- requests written vs answered.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  body = f:read("*a")
  f:close()
  local nthreads = tonumber(args[3] or "1")
  header_name = args[4] or "PAYMENT-SIGNATURE"
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  values = {}
  if args[2] and args[2] ~= "-" then
    local i = 0
    for line in io.lines(args[2]) do
      if i % nthreads == id and #line > 0 then values[#values + 1] = line end
      i = i + 1
    end
  end
  nvalues = #values
  sent = 0
  exhausted = 0
  static = wrk.format(nil, nil, nil, body)
end

function request()
  sent = sent + 1
  if nvalues == 0 then
    return static
  end
  local h = {}
  for k, v in pairs(wrk.headers) do h[k] = v end
  if sent <= nvalues then
    h[header_name] = values[sent]
  else
    exhausted = exhausted + 1
    h[header_name] = "exhausted"
  end
  return wrk.format(nil, nil, h, body)
end

local function pct_list()
  local ps = {}
  for p = 1, 99 do ps[#ps + 1] = p end
  ps[#ps + 1] = 99.5
  ps[#ps + 1] = 99.9
  ps[#ps + 1] = 99.99
  return ps
end

function done(summary, latency, requests)
  local sent_total, exhausted_total = 0, 0
  for _, t in ipairs(threads) do
    sent_total = sent_total + (t:get("sent") or 0)
    exhausted_total = exhausted_total + (t:get("exhausted") or 0)
  end
  local parts = {}
  for _, p in ipairs(pct_list()) do
    parts[#parts + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"sent":%d,"exhausted":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,"percentiles":{%s}}}\n',
    summary.duration, summary.requests, summary.bytes, sent_total, exhausted_total,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ",")))
end
