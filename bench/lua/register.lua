-- wrk script: POST /v1/users with a unique, email-only registration per request.
--
--   wrk -t1 -c32 -d10s -s bench/lua/register.lua http://127.0.0.1:PORT -- TOKEN [RATE]
--
-- TOKEN makes the addresses of one run unique (repeats share a Redis prefix); each address
-- is built from TOKEN, the thread's number and a counter. With RATE (requests per second for
-- each thread) the requests are paced: a schedule of one request every 1000/RATE ms, and
-- the address starts with the wall-clock send time in ms ("p<ms>-..."), which the benchmark
-- compares with the time the SMTP sink received the welcome (registration -> sent latency).
-- done() prints one "BENCH {json}" line with the counts and latency percentiles (us).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } courier_bench_timespec;
int clock_gettime(int clock_id, courier_bench_timespec *tp);
]]
local timespec = ffi.new("courier_bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(0, timespec) -- CLOCK_REALTIME: the sink stamps with the same clock
  return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local counter = 0
local token = "run"
local interval_ms = 0
local next_at = nil
local headers = { ["Content-Type"] = "application/json" }

local function paced_delay()
  local now = now_ms()
  if next_at == nil then
    next_at = now
  end
  local wait = next_at - now
  next_at = next_at + interval_ms
  if wait < 1 then
    return 0
  end
  return math.floor(wait)
end

function init(args)
  token = args[1] or token
  local rate = tonumber(args[2] or "0") or 0
  if rate > 0 then
    interval_ms = 1000 / rate
    delay = paced_delay -- defined only when pacing: wrk then schedules every request
  end
end

function request()
  counter = counter + 1
  local email
  if interval_ms > 0 then
    email = string.format("p%d-%s-%d-%d@bench.example.com", math.floor(now_ms()), token, tid, counter)
  else
    email = string.format("b-%s-%d-%d@bench.example.com", token, tid, counter)
  end
  local body = '{"email":"' .. email .. '","display_name":"Bench","locale":"en","channels":["email"]}'
  return wrk.format("POST", "/v1/users", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
