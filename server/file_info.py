"""`steerserve vectors info` and `steerserve features info`: describe each file given.

A file that cannot be read is reported on stderr and the others are still described; the
exit status says whether any failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def print_file_info(
    command: str,
    names: Iterable[str],
    describe: Callable[[Path], dict],
    errors: tuple[type[Exception], ...],
    format_one: Callable[[dict], str],
    as_json: bool,
) -> int:
    status = 0
    described = []
    for name in names:
        path = Path(name)
        try:
            described.append(describe(path))
        except (OSError, *errors) as e:
            print(f"steerserve {command} info: {path}: {e}", file=sys.stderr)
            status = 1
    if as_json:
        print(json.dumps(described, indent=2))
    elif described:
        print("\n\n".join(format_one(d) for d in described))
    return status
