"""The health verdict on a new build, from counters alone (no traffic, no nginx): when it passes,
fails with the numbers that decided it, or waits for enough requests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from supervisor.proxy.counters import Counters, bucket_of, bucket_upper_ms
from supervisor.release.verdict import Outcome, Rules, judge


def latencies(*seconds: float) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in seconds:
        out[bucket_of(s)] = out.get(bucket_of(s), 0) + 1
    return out


def test_a_build_answering_500_to_a_third_of_its_requests_fails_with_the_numbers() -> None:
    v = judge(Counters(requests=102, http_5xx=31), Counters(requests=410), Rules())
    assert v.outcome is Outcome.FAIL and v.failed
    assert v.reason.startswith("new: 31 of 102 requests failed (30.4 %), old: 0 of 410: above the 1.0 % allowed")


def test_upstream_errors_count_as_failures_too() -> None:
    v = judge(Counters(requests=50, upstream_errors=5), Counters(requests=50), Rules())
    assert v.failed and "5 of 50 requests failed (10.0 %)" in v.reason


def test_a_healthy_build_passes_and_too_few_requests_wait() -> None:
    assert judge(Counters(requests=100), Counters(requests=100), Rules()).outcome is Outcome.PASS
    v = judge(Counters(requests=19, http_5xx=19), Counters(requests=400), Rules(min_requests=20))
    assert v.outcome is Outcome.WAIT and "waiting for 20 requests" in v.reason


def test_when_the_old_build_fails_too_the_new_one_is_judged_relative_to_it() -> None:
    old = Counters(requests=1000, http_5xx=50)  # 5 %: a backend both builds share is flaky
    assert judge(Counters(requests=100, http_5xx=9), old, Rules(error_ratio=2)).outcome is Outcome.PASS
    assert judge(Counters(requests=100, http_5xx=11), old, Rules(error_ratio=2)).failed


def test_latency_is_judged_only_when_latency_ratio_is_set() -> None:
    old = Counters(requests=200, latency=latencies(*[0.005] * 200))
    slow = Counters(requests=200, latency=latencies(*[0.005] * 150, *[0.060] * 50))
    assert judge(slow, old, Rules()).outcome is Outcome.PASS
    v = judge(slow, old, Rules(latency_ratio=3))
    assert v.failed and "p99 new" in v.reason and "rollout.latency_ratio 3" in v.reason


def test_percentiles_come_from_the_histogram_within_one_bucket() -> None:
    c = Counters(requests=100, latency=latencies(*[0.010] * 98, 0.100, 1.0))
    assert 10 <= c.percentile_ms(50) <= 12.1  # type: ignore[operator]
    assert 100 <= c.percentile_ms(99) <= 121  # type: ignore[operator]
    assert Counters().percentile_ms(99) is None


@given(st.floats(min_value=0.00001, max_value=100.0))
def test_a_time_lies_in_its_bucket_and_buckets_are_about_a_fifth_wide(seconds: float) -> None:
    i = bucket_of(seconds)
    assert seconds * 1000 <= bucket_upper_ms(i) * (1 + 1e-9)
    assert i == 0 or seconds * 1000 > bucket_upper_ms(i - 1) * (1 - 1e-9)
    if seconds > 0.01:
        assert bucket_upper_ms(i) / (seconds * 1000) <= 1.21
