"""Retention is pure: infos in, names out. Examples plus hypothesis properties."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptstore import ConfigError
from ckptstore.manifest import CheckpointInfo
from ckptstore.retention import RetentionPolicy, ranked_best, to_keep

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def infos(losses: list[float | None]) -> list[CheckpointInfo]:
    return [
        CheckpointInfo(f"s{step}", step, "safetensors", {} if v is None else {"loss": v}, created=T0 + timedelta(seconds=step))
        for step, v in enumerate(losses)
    ]


def test_keep_last_only():
    assert to_keep(infos([5, 4, 3, 2, 1]), RetentionPolicy(keep_last=2)) == {"s3", "s4"}


def test_keep_all_when_keep_last_is_none():
    assert to_keep(infos([1, 2, 3]), RetentionPolicy()) == {"s0", "s1", "s2"}


def test_best_min_and_max():
    data = infos([0.5, 0.1, 0.9, 0.3])
    assert to_keep(data, RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")) == {"s1", "s3"}
    assert to_keep(data, RetentionPolicy(keep_last=1, keep_best=1, monitor="loss", mode="max")) == {"s2", "s3"}
    assert to_keep(data, RetentionPolicy(keep_last=1, keep_best=2, monitor="loss")) == {"s1", "s3"}


def test_nan_and_missing_are_never_best():
    data = infos([math.nan, None, 0.7, math.inf, -math.inf])
    ranked = ranked_best(data, "loss", "min")
    assert [i.name for i in ranked] == ["s2"]


def test_ties_keep_the_newer():
    data = infos([0.2, 0.2, 0.5])
    assert to_keep(data, RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")) == {"s1", "s2"}


def test_newest_survives_even_if_worst():
    assert "s2" in to_keep(infos([0.1, 0.2, 9.0]), RetentionPolicy(keep_last=1, keep_best=1, monitor="loss"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_last": 0}, "`keep_last` must be an int >= 1 or None (keep all), got 0"),
        ({"keep_last": -1}, "`keep_last` must be an int >= 1 or None (keep all), got -1"),
        ({"keep_last": 2.0}, "`keep_last` must be an int >= 1 or None (keep all), got 2.0"),
        ({"keep_best": -1, "monitor": "loss"}, "`keep_best` must be an int >= 0, got -1"),
        ({"keep_best": -1}, "`keep_best` must be an int >= 0, got -1"),  # checked before the missing monitor
        ({"keep_best": "2", "monitor": "loss"}, "`keep_best` must be an int >= 0, got '2'"),
        ({"mode": "avg"}, "`mode` must be 'min' or 'max', got 'avg'"),
        ({"keep_best": 1}, "`keep_best` needs `monitor`, the metric name to rank checkpoints by"),
    ],
)
def test_bad_options_say_exactly_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError) as err:
        RetentionPolicy(**kwargs)
    assert str(err.value) == message


metric = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0]))


@given(
    losses=st.lists(metric, min_size=1, max_size=30),
    keep_last=st.one_of(st.none(), st.integers(1, 5)),
    keep_best=st.integers(0, 4),
    mode=st.sampled_from(["min", "max"]),
)
def test_policy_properties(losses, keep_last, keep_best, mode):
    data = infos(losses)
    policy = RetentionPolicy(keep_last, keep_best, "loss", mode)
    kept = to_keep(data, policy)
    assert data[-1].name in kept  # the latest committed step survives
    finite = [(i.metric("loss"), i) for i in data if i.metric("loss") is not None]
    if keep_best and finite:
        best_value = (min if mode == "min" else max)(v for v, _ in finite)
        newest_best = max((i for v, i in finite if v == best_value), key=lambda i: i.step)
        assert newest_best.name in kept  # the best survives, ties go to the newer one
    expected_max = len(data) if keep_last is None else keep_last + keep_best + 1
    assert len(kept) <= expected_max
    newest = sorted(data, key=lambda i: i.step)[-(keep_last or len(data)):]
    assert {i.name for i in newest} <= kept
