"""How vLLM names the engine requests of one API request (vLLM 0.32).

`InputProcessor` makes an id unique as `<id>-<8 random chars>`, and `n > 1` fans out into
children `<i>_<unique id>` (`ParentRequest.get_child_info`). The worker only ever sees
these engine ids; the API layer knows `<id>`. `test_compat` checks the scheme.
"""

from __future__ import annotations

import re


def choice_index(engine_request_id: str, request_id: str) -> int | None:
    """The choice index of `engine_request_id` within API request `request_id`, else None."""
    m = re.fullmatch(rf"(?:(\d+)_)?{re.escape(request_id)}-[0-9A-Za-z]+", engine_request_id)
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) is not None else 0


def api_request_key(engine_request_id: str) -> str:
    """The engine id without vLLM's random suffix: `<id>`, or `<i>_<id>` for a child."""
    return engine_request_id.rsplit("-", 1)[0]
