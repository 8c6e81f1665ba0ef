-- wrk script of the bench: POSTs a JSON body to the paths listed in $BENCH_TARGETS (one "path token" per
-- line; the token is sent as "Authorization: Bearer <token>", "-" for none), round-robin per thread.
--   BENCH_BODY                    the JSON body (default: one AI token)
--   BENCH_IDEMPOTENCY=1           a unique Idempotency-Key per request: run id, thread id, counter
--   BENCH_RUN_ID                  prefix of those keys, unique per run (keys are per principal for 24 h)
--   BENCH_MAX_REQUESTS_PER_THREAD stop a thread after this many responses (wrk's -d bounds the time)
-- done() prints one line "BENCH_JSON {...}" that bench/loadgen.py reads.

local body = os.getenv("BENCH_BODY") or '{"resource_type":"AI_TOKENS","amount":1}'
local idempotency = os.getenv("BENCH_IDEMPOTENCY") == "1"
local run_id = os.getenv("BENCH_RUN_ID") or "wrk"
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS_PER_THREAD") or "0") or 0

local targets = {}
local file = assert(io.open(assert(os.getenv("BENCH_TARGETS"), "BENCH_TARGETS is not set"), "r"))
for line in file:lines() do
  local path, token = line:match("^(%S+)%s+(%S+)$")
  if path then
    table.insert(targets, { path = path, token = token })
  end
end
file:close()
assert(#targets > 0, "no targets in BENCH_TARGETS")

-- Main state: the threads, so that done() can add up their counters.
local threads = {}
local next_thread_id = 0

function setup(thread)
  next_thread_id = next_thread_id + 1
  thread:set("thread_id", next_thread_id)
  table.insert(threads, thread)
end

-- Thread state: globals, so that thread:get() can read them.
thread_id = 0
sent = 0
responses = 0
status_201 = 0
status_2xx = 0
status_409 = 0
status_429 = 0
status_4xx = 0
status_5xx = 0
status_other = 0

function request()
  sent = sent + 1
  -- Threads start at different targets so that they do not walk the same rows in step.
  local target = targets[((sent + thread_id * 7919) % #targets) + 1]
  local headers = { ["Content-Type"] = "application/json" }
  if target.token ~= "-" then
    headers["Authorization"] = "Bearer " .. target.token
  end
  if idempotency then
    headers["Idempotency-Key"] = run_id .. "-" .. thread_id .. "-" .. sent
  end
  return wrk.format("POST", target.path, headers, body)
end

function response(status, headers, response_body)
  responses = responses + 1
  if status == 201 then
    status_201 = status_201 + 1
  elseif status >= 200 and status < 300 then
    status_2xx = status_2xx + 1
  elseif status == 409 then
    status_409 = status_409 + 1
  elseif status == 429 then
    status_429 = status_429 + 1
  elseif status >= 400 and status < 500 then
    status_4xx = status_4xx + 1
  elseif status >= 500 then
    status_5xx = status_5xx + 1
  else
    status_other = status_other + 1
  end
  if max_requests > 0 and responses >= max_requests then
    wrk.thread:stop()
  end
end

local counters = {
  "responses", "status_201", "status_2xx", "status_409", "status_429", "status_4xx", "status_5xx", "status_other",
}

function done(summary, latency, requests)
  local totals = {}
  for _, name in ipairs(counters) do
    totals[name] = 0
  end
  for _, thread in ipairs(threads) do
    for _, name in ipairs(counters) do
      totals[name] = totals[name] + (tonumber(thread:get(name)) or 0)
    end
  end
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"connect_errors":%d', summary.errors.connect),
    string.format('"read_errors":%d', summary.errors.read),
    string.format('"write_errors":%d', summary.errors.write),
    string.format('"status_errors":%d', summary.errors.status),
    string.format('"timeouts":%d', summary.errors.timeout),
    string.format('"p50_us":%d', latency:percentile(50)),
    string.format('"p95_us":%d', latency:percentile(95)),
    string.format('"p99_us":%d', latency:percentile(99)),
    string.format('"max_us":%d', latency.max),
  }
  for _, name in ipairs(counters) do
    table.insert(parts, string.format('"%s":%d', name, totals[name]))
  end
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
