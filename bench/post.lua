-- wrk script: POST a distinct, realistic stop.status-changed body per request and print
-- one JSON line of results.  wrk -s bench/post.lua URL -- PATH RUN_TAG
local path, tag = "/", "run"
local counter, thread_no = 0, 0
local threads = {}

local BODY = '{"stopId": %d, "stopRef": "L2022%s%07d", "tripDate": "2022-04-27", "shipmentId": null, '
  .. '"actionDate": "2022-04-27T14:%02d:%02d.%07d+10:00", "oldStatus": "Enroute", "newStatus": "Arrived", '
  .. '"notes": null, "location": null, '
  .. '"assignedTo": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"}, '
  .. '"changedByUser": {"name": "Filbert Nicholas", "id": "a823361e-9d40-4438-bb28-b2b58cdb957e"}, '
  .. '"source": null, "sourceReference": null}'

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

function init(args)
  path = args[1] or path
  tag = (args[2] or tag) .. "T" .. thread_no
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local body = string.format(BODY, 100000 + counter % 5000, tag, counter,
                             math.floor(counter / 60) % 60, counter % 60, counter)
  return wrk.format(nil, path, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, '
    .. '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
