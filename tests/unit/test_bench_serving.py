"""`kiln bench serving`'s report: every figure comes from the results, verdicts follow the targets."""

from __future__ import annotations

from pathlib import Path

from benchmarks.serving import _markdown


def _results(admitted_p99: float, rejected_p99: float | None, server_errors: int) -> dict:
    return {
        "machine": {"cpu": "test cpu", "usable_cores": 2, "load_average_1m_at_start": 0.1},
        "command": "kiln bench serving",
        "quick": False,
        "server_args": "--no-train --models vit-soft",
        "capacity": {
            "concurrency": 32,
            "duration_s": 10.0,
            "req_per_s": 123.4,
            "latency_ms_p50": 200.0,
            "latency_ms_p99": 300.0,
            "errors": 0,
        },
        "overload": {
            "offered_rate": 493.6,
            "admitted_per_s": 120.0,
            "admitted_ms_p50": 900.0,
            "admitted_ms_p99": admitted_p99,
            "rejected_429": 3000,
            "rejected_ms_p99": rejected_p99,
            "server_errors_5xx": server_errors,
            "other_outcomes": {} if server_errors == 0 else {"500": server_errors},
        },
    }


def test_report_renders_measured_figures_and_met_targets():
    text = _markdown(_results(1200.0, 40.0, 0), Path("serving.json"))
    assert "123.4" in text and "493.6" in text and "3000" in text and "serving.json" in text
    assert text.count("**MET**") == 3


def test_report_says_missed_when_overload_is_not_contained():
    text = _markdown(_results(5000.0, 400.0, 2), Path("serving.json"))
    assert text.count("**MISSED**") == 3
    assert "500 × 2" in text


def test_histogram_quantile_reads_the_bucket_holding_the_quantile():
    from benchmarks.serving import histogram_quantile

    def scrape(counts):
        return "\n".join(
            f'kiln_x_bucket{{model="m",le="{le}"}} {c}'
            for le, c in zip(("0.1", "1.0", "+Inf"), counts, strict=True)
        )

    before, after = scrape((5, 5, 5)), scrape((95, 104, 105))  # 100 new: 90 ≤ 0.1 s, 9 ≤ 1 s, 1 above
    assert histogram_quantile(before, after, "kiln_x", 0.5, model="m") == 0.1
    assert histogram_quantile(before, after, "kiln_x", 0.95, model="m") == 1.0
    assert histogram_quantile(before, after, "kiln_x", 0.999, model="m") == float("inf")
    assert histogram_quantile(before, before, "kiln_x", 0.5, model="m") is None


def _connections_phase(admitted_p99: float, rejected_p99: float, errors: int) -> dict:
    run = {
        "status_counts": {"200": 900, "429": 20000},
        "errors": {"connection: ConnectionResetError": errors} if errors else {},
        "connection_errors": errors,
        "server_errors_5xx": 0,
        "client_lag_ms_p50": 0.2,
        "client_lag_ms_p99": 8.0,
        "server_rejections": {"queue_full": 0.0, "queue_delay": 3.0, "server_in_flight": 19997.0},
    }
    for name, p99 in (("admitted", admitted_p99), ("rejected", rejected_p99)):
        run |= {
            f"{name}_per_s": 60.0,
            f"{name}_ms_p50": p99 / 2,
            f"{name}_ms_p99": p99,
            f"{name}_server_ms_p50": 0.01,
            f"{name}_server_ms_p99": 0.05,
            f"{name}_before_server_ms_p50": 1.0,
            f"{name}_before_server_ms_p99": 2.0,
        }
    args = "--no-train --models vit-soft --max-queue-size 64 --workers"
    return {
        "connections": 2000,
        "runs": [
            run | {"server_args": f"{args} 1", "workers": 1, "honor_retry_after": True},
            run | {"server_args": f"{args} 1", "workers": 1, "honor_retry_after": False},
            run | {"server_args": f"{args} 2", "workers": 2, "honor_retry_after": True},
        ],
    }


def test_report_renders_the_connections_phase_and_its_targets():
    results = _results(1200.0, 40.0, 0) | {"connections": _connections_phase(4321.0, 876.0, 0)}
    text = _markdown(results, Path("serving.json"))
    assert "### 2000 connections at once" in text and "--max-queue-size 64" in text
    assert "4,321.0" in text and "876.0" in text and "20000" in text
    assert text.count("**MET**") == 6 and "server_in_flight" in text

    results["connections"] = _connections_phase(6000.0, 1500.0, 3)
    text = _markdown(results, Path("serving.json"))
    assert text.count("**MISSED**") == 3 and "3 connection errors" in text


def test_connection_parses_answers_split_anywhere():
    import asyncio

    from benchmarks.load import _Connection

    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nServer-Timing: edge;dur=12.5\r\n\r\nok"
    refused = b'HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 11\r\n\r\n{"error":1}'

    class Transport:
        def write(self, data):
            pass

    async def scenario():
        conn = _Connection()
        conn.connection_made(Transport())
        answers = []
        for raw in (ok, refused):
            waiter = conn.request(b"GET / HTTP/1.1\r\n\r\n")
            for i in range(0, len(raw), 7):  # seven bytes at a time: headers and body cut anywhere
                conn.data_received(raw[i : i + 7])
            answers.append(await waiter)
        waiter = conn.request(b"GET / HTTP/1.1\r\n\r\n")
        conn.connection_lost(None)
        try:
            await waiter
        except ConnectionResetError:
            answers.append("reset")
        return answers

    assert asyncio.run(scenario()) == [(200, 12.5, 0.0), (429, None, 1.0), "reset"]


def test_summarize_storm_splits_latency_into_server_client_and_before_the_server():
    from benchmarks.load import summarize_storm

    outcomes = {"200": [(0.5, 100.0), (0.7, 300.0)], "429": [(0.2, 0.01)], "500": [(0.1, 1.0)]}
    lags = [0.001, 0.001, 0.003]  # client lag p50: 1 ms
    out = summarize_storm(outcomes, {"timeout": 2}, lags, 4, 4, 2.0, 1.0, True)
    assert out["status_counts"] == {"200": 2, "429": 1, "500": 1}
    assert out["admitted_per_s"] == 1.0 and out["rejected_per_s"] == 0.5
    assert out["admitted_ms_p50"] == 600.0 and out["admitted_server_ms_p50"] == 200.0
    # before the server = client − server − client lag p50: 500 − 100 − 1 and 700 − 300 − 1
    assert abs(out["admitted_before_server_ms_p50"] - 399.0) < 1e-6
    assert abs(out["rejected_before_server_ms_p50"] - (200.0 - 0.01 - 1.0)) < 1e-6
    assert out["server_errors_5xx"] == 1 and out["connection_errors"] == 2
    assert abs(out["client_lag_ms_p50"] - 1.0) < 1e-9


def test_storm_drives_a_real_socket_server_and_honours_retry_after():
    """A loopback asyncio HTTP server answering 200 and 429 (Retry-After: 0) in turn; every connection
    is opened and every answer counted with its Server-Timing."""
    import asyncio
    import json

    from benchmarks.load import storm

    meta = {"inputs": [{"name": "input", "shape": [-1, 1, 2, 2]}], "outputs": [{"name": "logits"}]}
    turn = 0

    async def handle(reader, writer):
        nonlocal turn
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if head.startswith(b"GET"):
                body = json.dumps(meta).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif turn % 2:
                writer.write(b"HTTP/1.1 429 Too Many\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nServer-Timing: edge;dur=0.5\r\nContent-Length: 2\r\n\r\nok")
            turn += 1
            await writer.drain()

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await storm(f"http://127.0.0.1:{port}", "m", 8, 0.5, 0.1)

    out = asyncio.run(scenario())
    assert out["connections_opened"] == 8 and out["errors"] == {} and out["server_errors_5xx"] == 0
    assert out["status_counts"]["200"] > 0 and out["status_counts"]["429"] > 0
    assert out["admitted_server_ms_p50"] == 0.5 and out["rejected_server_ms_p50"] is None
