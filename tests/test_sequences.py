"""SequenceStore: per-CORRID state with START / END / idle-TTL semantics (no Triton needed)."""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import pytest

from sortformer_triton.sequences import (
    DEFAULT_TTL_SECONDS,
    TRITON_DEFAULT_IDLE_SECONDS,
    SequenceStore,
    config_parameters,
    sequence_idle_seconds,
    ttl_from_model_config,
    ttl_from_parameters,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_start_get_pop_lifecycle() -> None:
    store: SequenceStore[List[int]] = SequenceStore(10.0)
    assert len(store) == 0 and store.get(7) is None
    value = store.start(7, list, now=0.0)
    value.append(1)
    assert store.get(7, now=1.0) == [1] and 7 in store and len(store) == 1
    assert store.pop(7) == [1]
    assert store.get(7) is None and store.pop(7) is None and len(store) == 0


def test_start_replaces_a_leftover_of_the_same_id() -> None:
    """START always begins a new sequence, even when the id was never ended."""
    store: SequenceStore[Dict[str, int]] = SequenceStore(10.0)
    store.start(1, dict, now=0.0)["step"] = 5
    assert store.start(1, dict, now=1.0) == {}
    assert len(store) == 1


def test_get_or_create_creates_once_and_keeps_the_value() -> None:
    store: SequenceStore[List[int]] = SequenceStore(10.0)
    first = store.get_or_create("a", list, 0.0)
    first.append(3)
    assert store.get_or_create("a", list, 1.0) is first
    assert len(store) == 1


def test_expire_drops_only_entries_idle_longer_than_the_ttl() -> None:
    store: SequenceStore[int] = SequenceStore(10.0)
    store.start(1, lambda: 1, now=0.0)
    store.start(2, lambda: 2, now=5.0)
    store.start(3, lambda: 3, now=9.0)
    assert store.expire(now=10.0) == []  # exactly the TTL idle: kept
    assert store.expire(now=10.5) == [1]
    store.get(2, now=11.0)  # use refreshes
    assert store.expire(now=19.5) == [3]
    assert store.ids() == [2]
    assert store.expire(now=21.5) == [2]
    assert len(store) == 0


def test_every_access_refreshes_and_orders_by_last_use() -> None:
    store: SequenceStore[int] = SequenceStore(5.0)
    for i in range(4):
        store.start(i, lambda i=i: i, now=float(i))
    store.get(0, now=4.0)
    store.get_or_create(1, int, 4.5)
    assert store.ids() == [2, 3, 0, 1]
    assert store.expire(now=8.5) == [2, 3]


def test_explicit_older_now_keeps_order_consistent() -> None:
    """A caller passing an older timestamp cannot make expiry skip a younger entry."""
    store: SequenceStore[int] = SequenceStore(5.0)
    store.start(1, int, now=10.0)
    store.start(2, int, now=3.0)  # older stamp than its predecessor
    assert store.ids() == [1, 2]
    assert store.expire(now=15.5) == [1, 2]


def test_default_clock_is_used_when_now_is_omitted() -> None:
    clock = FakeClock()
    store: SequenceStore[int] = SequenceStore(2.0, clock=clock)
    store.start(42, int)
    clock.now += 1.5
    assert store.get(42) == 0
    clock.now += 1.9
    assert store.expire() == []
    clock.now += 0.2
    assert store.expire() == [42]


def test_expire_is_cheap_when_nothing_expires() -> None:
    store: SequenceStore[int] = SequenceStore(100.0)
    for i in range(10_000):
        store.start(i, int, now=float(i) * 1e-3)
    assert store.expire(now=50.0) == []
    assert len(store) == 10_000


def test_clear_and_contains() -> None:
    store: SequenceStore[int] = SequenceStore(1.0)
    store.start(np.uint64(5), int, now=0.0)
    assert 5 in store  # numpy and Python integers of equal value hash alike
    store.clear()
    assert len(store) == 0


@pytest.mark.parametrize("ttl", [0, -1.0, math.inf, math.nan, "10", True])
def test_bad_ttl_is_refused(ttl: object) -> None:
    with pytest.raises(ValueError, match="state_ttl_seconds"):
        SequenceStore(ttl)  # type: ignore[arg-type]


def test_config_parameters_and_ttl_parsing() -> None:
    config = {
        "parameters": {"state_ttl_seconds": {"string_value": "109"}, "onset": {"string_value": "0.6"}},
        "sequence_batching": {"max_sequence_idle_microseconds": 109000000},
    }
    assert config_parameters(config) == {"state_ttl_seconds": "109", "onset": "0.6"}
    assert sequence_idle_seconds(config) == 109.0
    assert ttl_from_model_config(config) == 109.0
    assert ttl_from_parameters({}) == DEFAULT_TTL_SECONDS
    assert ttl_from_parameters({"state_ttl_seconds": " 2.5 "}) == 2.5
    with pytest.raises(ValueError, match="must be a number"):
        ttl_from_parameters({"state_ttl_seconds": "soon"})
    with pytest.raises(ValueError, match="> 0"):
        ttl_from_parameters({"state_ttl_seconds": "0"})


def test_ttl_shorter_than_the_idle_timeout_is_refused() -> None:
    config = {
        "parameters": {"state_ttl_seconds": {"string_value": "30"}},
        "sequence_batching": {"max_sequence_idle_microseconds": 60_000_000},
    }
    with pytest.raises(ValueError, match="shorter than the sequence batcher's idle timeout"):
        ttl_from_model_config(config)


def test_ttl_default_covers_a_long_idle_timeout() -> None:
    assert sequence_idle_seconds({}) == TRITON_DEFAULT_IDLE_SECONDS
    long_idle = {"sequence_batching": {"max_sequence_idle_microseconds": 900_000_000}}
    assert ttl_from_model_config(long_idle) == 900.0
    assert ttl_from_model_config({}) == DEFAULT_TTL_SECONDS
