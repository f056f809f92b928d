"""Per-sequence state of a Triton Python-backend model, keyed by correlation id, with an idle TTL.

Why this exists: a Python-backend model that keeps state per sequence (the postprocessor's timelines,
the local stateful ONNX runner's state tensors) must key it by CORRID itself, and Triton never tells it
that a sequence went idle (``max_sequence_idle_microseconds``) or that a client vanished without END.
Without a TTL such a dict grows forever. ``SequenceStore`` is that dict plus last-use times:

* ``start(id, factory)`` on a request with START: a fresh value, replacing any leftover of the id
  (START always begins a new sequence in Triton, even for a reused id).
* ``get(id)`` on later requests: the value, or None when the id is unknown (never started, ended, or
  expired) -- the model answers those requests with an error.
* ``get_or_create(id, factory)``: the value, created when missing (for callers that create lazily).
* ``pop(id)`` at END; ``expire(now)`` once per ``execute`` drops entries idle longer than the TTL.

Every access refreshes the entry's last-use time. The TTL must be at least the sequence batcher's
``max_sequence_idle_microseconds``, or state would vanish while Triton still routes the sequence here.
Expiry is O(expired entries): entries are kept in last-use order.

Not thread-safe: Triton calls a Python model's ``execute`` one batch at a time per instance, and a
sequence stays on the instance it started on.
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable, Dict, Generic, Hashable, List, Mapping, Optional, Tuple, TypeVar

T = TypeVar("T")

DEFAULT_TTL_SECONDS = 300.0
TTL_PARAMETER = "state_ttl_seconds"
# Triton's max_sequence_idle_microseconds when a config leaves it out (1 s)
TRITON_DEFAULT_IDLE_SECONDS = 1.0

Clock = Callable[[], float]


class SequenceStore(Generic[T]):
    """``dict[sequence id -> T]`` with last-use times and an idle TTL (see the module docstring)."""

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, clock: Clock = time.monotonic) -> None:
        self._ttl = check_ttl_seconds(ttl_seconds)
        self._clock = clock
        # id -> (last use, value); insertion order == last-use order (move_to_end on every touch)
        self._entries: "collections.OrderedDict[Hashable, Tuple[float, T]]" = collections.OrderedDict()

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._entries

    def ids(self) -> List[Hashable]:
        """Ids held now, least recently used first."""
        return list(self._entries)

    def start(self, seq_id: Hashable, factory: Callable[[], T], now: Optional[float] = None) -> T:
        """A fresh value for a sequence that starts (START), replacing whatever the id held."""
        value = factory()
        self._entries.pop(seq_id, None)
        self._entries[seq_id] = (self._now(now), value)
        return value

    def get(self, seq_id: Hashable, now: Optional[float] = None) -> Optional[T]:
        """The value of a running sequence (refreshing its last use), or None when the id is unknown."""
        entry = self._entries.get(seq_id)
        if entry is None:
            return None
        self._touch(seq_id, entry[1], now)
        return entry[1]

    def get_or_create(self, seq_id: Hashable, factory: Callable[[], T], now: Optional[float] = None) -> T:
        """The value of ``seq_id``, created with ``factory`` when missing; refreshes its last use."""
        entry = self._entries.get(seq_id)
        value = factory() if entry is None else entry[1]
        self._touch(seq_id, value, now)
        return value

    def pop(self, seq_id: Hashable) -> Optional[T]:
        """Forget a sequence (END); its value, or None when it was not held."""
        entry = self._entries.pop(seq_id, None)
        return None if entry is None else entry[1]

    def expire(self, now: Optional[float] = None) -> List[Hashable]:
        """Drop the sequences idle for more than the TTL; their ids, least recently used first."""
        limit = self._now(now) - self._ttl
        expired: List[Hashable] = []
        while self._entries:
            seq_id, (last_use, _) = next(iter(self._entries.items()))
            if last_use >= limit:
                break
            del self._entries[seq_id]
            expired.append(seq_id)
        return expired

    def clear(self) -> None:
        self._entries.clear()

    # ---- internals --------------------------------------------------------------------------------
    def _now(self, now: Optional[float]) -> float:
        return self._clock() if now is None else float(now)

    def _touch(self, seq_id: Hashable, value: T, now: Optional[float]) -> None:
        # Keep the order == last-use order even when a caller passes an older explicit `now`.
        stamp = self._now(now)
        if self._entries:
            newest = next(reversed(self._entries.values()))[0]
            stamp = max(stamp, newest)
        self._entries[seq_id] = (stamp, value)
        self._entries.move_to_end(seq_id)


def check_ttl_seconds(value: float) -> float:
    """A TTL must be a finite number of seconds > 0 (0 would drop every sequence between requests)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{TTL_PARAMETER} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{TTL_PARAMETER} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def config_parameters(model_config: Mapping[str, object]) -> Dict[str, str]:
    """A Triton model config's ``parameters`` (JSON form, as a Python model receives it) as strings."""
    out: Dict[str, str] = {}
    params = model_config.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"model config 'parameters' must be a mapping, got {type(params).__name__}")
    for key, value in params.items():
        out[str(key)] = str(value["string_value"]) if isinstance(value, Mapping) else str(value)
    return out


def ttl_from_parameters(params: Mapping[str, str], default: float = DEFAULT_TTL_SECONDS) -> float:
    """``state_ttl_seconds`` from model config parameters (``default`` when absent), validated."""
    text = params.get(TTL_PARAMETER)
    if text is None or str(text).strip() == "":
        return check_ttl_seconds(default)
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{TTL_PARAMETER} must be a number of seconds, got {text!r}") from None
    return check_ttl_seconds(value)


def sequence_idle_seconds(model_config: Mapping[str, object]) -> float:
    """The sequence batcher's idle timeout in seconds (Triton's 1 s default when unset)."""
    batching = model_config.get("sequence_batching") or {}
    if not isinstance(batching, Mapping):
        return TRITON_DEFAULT_IDLE_SECONDS
    micros = int(batching.get("max_sequence_idle_microseconds", 0) or 0)
    return micros / 1e6 if micros > 0 else TRITON_DEFAULT_IDLE_SECONDS


def ttl_from_model_config(model_config: Mapping[str, object], default: float = DEFAULT_TTL_SECONDS) -> float:
    """``state_ttl_seconds`` of a model config, refused when shorter than the sequence idle timeout.

    A TTL below Triton's idle timeout would drop the state of a sequence Triton still routes to the
    model: its next request would fail as "unknown sequence". Without the parameter the TTL is
    ``max(default, idle timeout)``.
    """
    idle = sequence_idle_seconds(model_config)
    params = config_parameters(model_config)
    ttl = ttl_from_parameters(params, default=max(default, idle))
    if ttl < idle:
        raise ValueError(
            f"{TTL_PARAMETER}={ttl:g} s is shorter than the sequence batcher's idle timeout ({idle:g} s): "
            "a sequence Triton still keeps open would lose its state"
        )
    return ttl
