"""Retry with exponential backoff for the one request that can safely be sent again: a stream's START.

A stream's later requests change the server's per-sequence state (speaker cache, FIFO, timeline). When
one of them fails, the client cannot know whether the server applied it, so resending could feed the
same audio twice: those failures are never retried (``StreamError``; open a new stream). The first
request is different: START resets the sequence, and a retry uses a *new* sequence id (after a best
effort END for the old one), so a START that did arrive late can never mix with its retry.

Retried: ``ServerUnavailable`` (the server is down or restarting) and ``RequestTimeout`` (no answer in
time, e.g. every sequence slot is busy and the START waits in Triton's backlog). Not retried:
``ModelUnavailable`` and refused requests (retrying cannot fix them).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Tuple, Type

from .errors import DiarizationError, RequestTimeout, ServerUnavailable

RETRIED: Tuple[Type[DiarizationError], ...] = (ServerUnavailable, RequestTimeout)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries of a stream's first request in all (1 = no retry), waiting
    ``backoff_s * 2**k`` (capped at ``max_backoff_s``, +- ``jitter`` of it at random) before retry k+1."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an integer >= 1, got {self.attempts!r}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= max_backoff_s, got {self.backoff_s!r}, {self.max_backoff_s!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.backoff_s * 2 ** retry, self.max_backoff_s)
        spread = random.uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1 + spread))

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether try number ``attempt`` (1-based) that failed with ``error`` is followed by another."""
        return attempt < self.attempts and isinstance(error, RETRIED)


NO_RETRY = RetryPolicy(attempts=1)
