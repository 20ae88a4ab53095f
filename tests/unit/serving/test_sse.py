"""The server-sent events encoder (serving.sse), read back by a parser written from the WHATWG
standard's "interpret an event stream" steps."""

from __future__ import annotations

import json

import pytest

from serving.sse import encode_event


def _parse(stream: bytes) -> list[dict[str, str]]:
    """The standard's parsing: lines end at CRLF, LF or CR; a blank line dispatches; ``data`` lines are
    joined with LF; one space after the colon is dropped; an event whose data is empty is not dispatched."""
    events, fields, data = [], {}, []
    text = stream.decode()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for line in lines:
        if line == "":
            if "\n".join(data):
                events.append({**fields, "data": "\n".join(data)})
            fields, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    return events


def test_one_json_event_is_one_data_line_and_a_blank_line():
    body = {"step": 3, "steps": 20, "t": 857, "preview": ["iVBORw0KGgo="]}
    raw = encode_event(json.dumps(body), event="step")
    assert raw == b'event: step\ndata: {"step": 3, "steps": 20, "t": 857, "preview": ["iVBORw0KGgo="]}\n\n'
    assert [json.loads(e["data"]) for e in _parse(raw)] == [body]


def test_events_in_sequence_come_back_in_order_with_their_types():
    raw = b"".join(
        [encode_event("1", event="step"), encode_event("2"), encode_event('{"error": "x"}', event="error")]
    )
    assert _parse(raw) == [
        {"event": "step", "data": "1"},
        {"data": "2"},  # no event field: the client calls it "message"
        {"event": "error", "data": '{"error": "x"}'},
    ]


@pytest.mark.parametrize("data", ["a\nb", "a\r\nb", "a\rb", "a\n\nb", "\n", " leading space"])
def test_line_breaks_in_data_become_data_lines_and_round_trip(data):
    raw = encode_event(data, id="7")
    normalised = data.replace("\r\n", "\n").replace("\r", "\n")
    assert _parse(raw) == [{"id": "7", "data": normalised}]
    assert raw.endswith(b"\n\n") and b"\r" not in raw


def test_empty_data_is_an_event_clients_drop():
    assert encode_event("", event="step") == b"event: step\ndata: \n\n"
    assert _parse(encode_event("", event="step")) == []


def test_non_ascii_data_is_utf8():
    assert encode_event("x̂₀") == "data: x̂₀\n\n".encode()


@pytest.mark.parametrize(
    ("field", "value"), [("event", "a\nb"), ("event", "a\rb"), ("id", "1\n2"), ("id", "a\0")]
)
def test_a_field_that_would_break_the_stream_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        encode_event("x", **{field: value})
