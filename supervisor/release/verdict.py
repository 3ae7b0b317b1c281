"""Is the new build healthy? A pure verdict on what nginx counted, apart from what acts on it.

nginx (the runtime switch's log phase) counts, per upstream port and per watch generation:
requests, 5xx answers from the app, upstream errors (no answer at all: refused, reset, timed
out) and a latency histogram. `judge` compares the new build's counters with the old build's
over the same time and says pass, fail (with the numbers that decided it) or wait (too few
requests yet). The rollout (a later step) acts on the verdict; nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..proxy.counters import Counters


@dataclass(frozen=True)
class Rules:
    """When the new build counts as healthy (the [rollout] keys of the same names)."""

    min_requests: int = 20
    max_error_rate: float = 0.01  # always tolerated, whatever the old build does
    error_ratio: float = 2.0  # or up to this many times the old build's rate
    latency_ratio: float | None = None  # new p99 <= old p99 x this (unset: latency not judged)


class Outcome(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"  # not enough requests to tell yet

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAIL


def judge(new: Counters, old: Counters, rules: Rules) -> Verdict:
    """The new build's health, judged against the old build's over the same time."""
    numbers = f"new: {new.describe()}, old: {old.failed} of {old.requests}"
    if new.requests < rules.min_requests:
        return Verdict(Outcome.WAIT, f"{numbers}; waiting for {rules.min_requests} requests on the new build")
    allowed = max(rules.max_error_rate, old.error_rate * rules.error_ratio)
    if new.error_rate > allowed:
        return Verdict(Outcome.FAIL, f"{numbers}: above the {100 * allowed:.1f} % allowed (rollout.max_error_rate "
                                     f"{100 * rules.max_error_rate:g} %, or the old build's rate x "
                                     f"rollout.error_ratio {rules.error_ratio:g})")
    if rules.latency_ratio is not None:
        new_p99, old_p99 = new.percentile_ms(99), old.percentile_ms(99)
        if new_p99 is not None and old_p99 is not None and new_p99 > old_p99 * rules.latency_ratio:
            return Verdict(Outcome.FAIL, f"{numbers}; p99 new {new_p99:.1f} ms > old {old_p99:.1f} ms x "
                                         f"rollout.latency_ratio {rules.latency_ratio:g}")
        numbers += f"; p99 new {_ms(new_p99)}, old {_ms(old_p99)}"
    return Verdict(Outcome.PASS, numbers)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"
