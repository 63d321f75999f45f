"""Which arm a unit gets: a pure function of (experiment, salt, unit), identical on every
replica and across restarts (so no assignment table has to be read on the request path).

The unit's point u in [0, 1) is the first 8 bytes of SHA-256 over the three strings
(NUL-separated, so ("ab", "c") and ("a", "bc") differ); the arms split [0, 1) into
consecutive intervals proportional to their weights, in the order they are listed.
Enrolment by traffic share uses the same hash over a different domain ("enrol"), so being
enrolled and the arm received are independent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import accumulate


def unit_point(experiment: str, salt: str, unit: str, domain: str = "arm") -> float:
    digest = hashlib.sha256("\0".join((domain, experiment, salt, unit)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def pick(weights: Sequence[float], u: float) -> int:
    """Index of the interval of [0, 1) that u falls in, intervals sized by weight."""
    total = float(sum(weights))
    for i, edge in enumerate(accumulate(weights)):
        if u * total < edge:
            return i
    return len(weights) - 1  # u * total rounded up to the total


def arm_index(experiment: str, salt: str, unit: str, weights: Sequence[float]) -> int:
    return pick(weights, unit_point(experiment, salt, unit))


def enrolled(experiment: str, salt: str, unit: str, share: float) -> bool:
    return unit_point(experiment, salt, unit, domain="enrol") < share
