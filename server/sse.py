"""The server-sent events of vLLM's streamed responses, as data.

vLLM's handlers yield each event as one string, `data: <json>\\n\\n`, and end the stream
with `data: [DONE]\\n\\n`. steerserve adds fields to some events, re-numbers choices and
appends events of its own; it decodes each event once here, edits the dict and encodes it
again, never splicing JSON text.
"""

from __future__ import annotations

import json
from typing import Any, Final

PREFIX: Final = "data: "
DONE: Final = "[DONE]"
DONE_EVENT: Final = f"{PREFIX}{DONE}\n\n"


class Event:
    """One event: `data` is its JSON object, or None for `[DONE]` or a non-JSON line."""

    __slots__ = ("data", "raw")

    def __init__(self, raw: str, data: dict[str, Any] | None):
        self.raw = raw
        self.data = data

    @property
    def done(self) -> bool:
        return self.data is None and self.raw.strip() == PREFIX + DONE

    @property
    def error(self) -> dict[str, Any] | None:
        """The `error` object of an error event (vLLM's mid-stream failures)."""
        if self.data is None:
            return None
        error = self.data.get("error")
        return error if isinstance(error, dict) else None


def decode(raw: str) -> Event:
    """The event in one chunk vLLM's handler yielded."""
    text = raw.strip()
    if text.startswith(PREFIX) and text[len(PREFIX) :].lstrip().startswith("{"):
        return Event(raw, json.loads(text[len(PREFIX) :]))
    return Event(raw, None)


def encode(data: dict[str, Any]) -> str:
    return f"{PREFIX}{json.dumps(data)}\n\n"
