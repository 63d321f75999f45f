"""The stream codec: vLLM's SSE chunks decoded once, edited as dicts, encoded again."""

from __future__ import annotations

import json

from server import sse


def test_a_data_event_round_trips_through_a_dict():
    data = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": 'é "x"\n'}}]}
    event = sse.decode(f"data: {json.dumps(data)}\n\n")
    assert event.data == data and not event.done and event.error is None
    event.data["steering"] = {"fingerprint": "abc"}
    out = sse.encode(event.data)
    assert out.startswith("data: {") and out.endswith("\n\n")
    assert json.loads(out[len("data: ") :]) == {**data, "steering": {"fingerprint": "abc"}}


def test_done_error_and_other_lines_are_told_apart():
    done = sse.decode("data: [DONE]\n\n")
    assert done.done and done.data is None
    assert sse.DONE_EVENT == "data: [DONE]\n\n"
    error = sse.decode('data: {"error": {"message": "boom", "code": 400}}\n\n')
    assert error.error == {"message": "boom", "code": 400} and not error.done
    comment = sse.decode(": keep-alive\n\n")
    assert comment.data is None and not comment.done and comment.raw == ": keep-alive\n\n"
    not_error = sse.decode('data: {"error": "a string field"}\n\n')
    assert not_error.error is None and not_error.data == {"error": "a string field"}
