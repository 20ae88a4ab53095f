"""Server-sent events (the WHATWG HTML standard's ``text/event-stream``): the encoding of one event.

An event is optional ``event:`` and ``id:`` fields, then its data as ``data:`` lines, then a blank line.
A data value with line breaks takes one ``data:`` line per line (a client joins them with ``\\n``); CR,
LF and CRLF all end a line in the format, so each is split on. Field values other than data may not hold
a line break at all. Kiln's streams send JSON, which never holds a raw line break, so every event is one
``data:`` line; the splitting keeps the encoder right for any text.
"""

from __future__ import annotations

import re

MEDIA_TYPE = "text/event-stream"
# Headers for a stream: not cached, and not buffered by a reverse proxy (nginx's X-Accel-Buffering),
# so each event reaches the client when it is sent.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """One event as UTF-8 bytes, ending in the blank line that dispatches it.

    Args:
        data: the event's data; each of its lines becomes a ``data:`` line.
        event: the event type (``event:``); None leaves it out, which a client reads as "message".
        id: the event id (``id:``); None leaves it out.

    Raises:
        ValueError: ``event`` or ``id`` holds a line break (it would end the field early), or ``id``
            holds NUL (clients ignore such an id).
    """
    lines = []
    for name, value in (("event", event), ("id", id)):
        if value is None:
            continue
        if _LINE_BREAK.search(value):
            raise ValueError(f"an event's {name} may not contain a line break: {value!r}")
        if name == "id" and "\0" in value:
            raise ValueError(f"an event's id may not contain NUL: {value!r}")
        lines.append(f"{name}: {value}")
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return ("\n".join(lines) + "\n\n").encode()
