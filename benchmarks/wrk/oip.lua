-- wrk script for kiln bench vit: POST one prepared Open Inference Protocol body on every request.
--
--   KILN_WRK_BODY=body.bin [KILN_WRK_HEADER_LENGTH=N] wrk -t1 -c32 -d5s -s oip.lua URL
--
-- The body file holds the exact bytes (OIP JSON, or with KILN_WRK_HEADER_LENGTH the binary tensor
-- extension's JSON header followed by the raw little-endian FP32 tensor), written once by
-- benchmarks/served.py so every server gets byte-identical requests; Lua only reads it, so the
-- client spends no CPU building bodies. done() prints one line "KILN_WRK {json}" with the counts
-- and latency percentiles (microseconds) for the harness to parse.

local body_path = assert(os.getenv("KILN_WRK_BODY"), "set KILN_WRK_BODY to the request body file")
local f = assert(io.open(body_path, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()

local header_length = os.getenv("KILN_WRK_HEADER_LENGTH")
if header_length and header_length ~= "" then
  -- Triton's binary tensor data extension: JSON header length, then the tensor bytes.
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = header_length
else
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KILN_WRK {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"latency_us_p50": %d, "latency_us_p99": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
