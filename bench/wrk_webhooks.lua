-- wrk script for `bench_throughput.py ingest`: cycle through pre-built, distinct, signed webhooks.
--
--   wrk -t1 -c50 -d10s --latency -s bench/wrk_webhooks.lua http://127.0.0.1:PORT -- DATAFILE NTHREADS
--
-- DATAFILE has one request per line: method, path, webhook-id, webhook-timestamp,
-- webhook-signature and the JSON body, tab-separated (the body is one line of JSON).
-- Thread t of n takes lines t, t+n, t+2n, ...: no two threads send the same webhook.
-- Each thread counts the answers by status and how often it ran out of requests and started
-- over (`wrapped`: from then on it resends webhooks already sent, which a deduplicating
-- receiver answers 200 "duplicate"); `done` prints both for the bench to check.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local file, nthreads = args[1], tonumber(args[2])
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid then
      local method, path, id, ts, sig, body =
        line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format(method, path, {
        ["webhook-id"] = id,
        ["webhook-timestamp"] = ts,
        ["webhook-signature"] = sig,
        ["content-type"] = "application/json",
      }, body)
    end
    i = i + 1
  end
  idx = 0
  wrapped = 0
  statuses = {}
end

function request()
  idx = idx + 1
  if idx > #reqs then
    idx = 1
    wrapped = wrapped + 1
  end
  return reqs[idx]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total, wraps = {}, 0
  for _, thread in ipairs(threads) do
    wraps = wraps + (thread:get("wrapped") or 0)
    local counts = thread:get("statuses") or {}
    for status, n in pairs(counts) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("BENCH_STATUS %d %d\n", status, n))
  end
  io.write(string.format("BENCH_WRAPPED %d\n", wraps))
end
