"""What nginx counts (the runtime switch's lua, bluegreen.lua): per upstream port, the numbers a
watch judges (release/verdict.py) and the metrics show; and what its hold server held."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

# Latency buckets: bucket i holds times t (seconds) with floor(log(t * 10000 + 1) / log(1.2)) == i,
# about 20 % wide from 0.1 ms up; bluegreen.lua computes the same index.
BUCKET_BASE = 1.2
BUCKET_UNIT = 10000.0  # per second: tenths of a millisecond


def bucket_upper_ms(i: int) -> float:
    """The upper bound of latency bucket `i`, in milliseconds."""
    return (BUCKET_BASE ** (i + 1) - 1) / BUCKET_UNIT * 1000


def bucket_of(seconds: float) -> int:
    return math.floor(math.log(seconds * BUCKET_UNIT + 1) / math.log(BUCKET_BASE))


@dataclass(frozen=True)
class Counters:
    """What nginx counted for one upstream port in one watch generation."""

    requests: int = 0
    http_5xx: int = 0  # the app answered 500-599
    upstream_errors: int = 0  # the app did not answer: refused, reset, timed out
    latency: Mapping[int, int] = field(default_factory=dict)  # bucket -> requests

    @property
    def failed(self) -> int:
        return self.http_5xx + self.upstream_errors

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def percentile_ms(self, q: float) -> float | None:
        """The q-th percentile of the upstream response time (the bucket's upper bound), None with no samples."""
        total = sum(self.latency.values())
        if not total:
            return None
        rank, seen = math.ceil(total * q / 100), 0
        for i in sorted(self.latency):
            seen += self.latency[i]
            if seen >= rank:
                return bucket_upper_ms(i)
        return bucket_upper_ms(max(self.latency))  # pragma: no cover - rank <= total

    def describe(self) -> str:
        return f"{self.failed} of {self.requests} requests failed ({100 * self.error_rate:.1f} %)"


@dataclass(frozen=True)
class Hold:
    """What nginx's hold server counted since nginx started (a restart starts them again)."""

    held: int = 0  # requests sent to the hold server
    holding: int = 0  # of those, waiting now
    timed_out: int = 0  # answered 503 at hold.timeout
    held_ms: int = 0  # milliseconds waited, all held requests together
    longest_ms: int = 0  # the longest wait since the last outage began (a `down` mark)
    lost: int = 0  # sent to an app that failed before answering, not retried
    paused: float = 0.0  # the pause's hold timeout, 0: not paused
    down: int = 0  # the port known not to answer, 0: none
    full: int = 0  # turned away at once (503): hold.max_requests were held already

    def since(self, before: "Hold") -> "Hold":
        """The counts from `before` to this one (nginx restarted between: all of these)."""
        if self.held < before.held or self.lost < before.lost:
            return self
        return Hold(self.held - before.held, self.holding, self.timed_out - before.timed_out,
                    self.held_ms - before.held_ms, self.longest_ms, self.lost - before.lost, self.paused, self.down,
                    self.full - before.full)

    def report(self) -> dict[str, int | float]:
        """For an event, the history and status: what a crash or a pause cost."""
        return {"held": self.held, "held_longest": round(self.longest_ms / 1000, 3), "hold_timeouts": self.timed_out,
                "turned_away": self.full, "still_held": self.holding, "lost": self.lost}

