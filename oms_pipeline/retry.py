"""Retry backoff: exponential with jitter, capped."""
from __future__ import annotations

import random

from .config import RetrySettings


def backoff(policy: RetrySettings, attempt: int, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1` (attempt counts from 1)."""
    delay = min(policy.max_delay, policy.base_delay * policy.factor ** (attempt - 1))
    spread = delay * policy.jitter
    return max(0.0, delay + rng.uniform(-spread, spread))
