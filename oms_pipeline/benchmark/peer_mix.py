"""What a peer's workers run: the same stage mix as the generated stages, as plain functions.

The harness passes the run's settings to the worker processes in one
environment variable (JSON); the last stage of each order pushes the order's
end-to-end latency to a Redis list, which the harness counts and reads.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .synthetic import spin

ENV = "OMS_BENCH_PEER"


@dataclass(frozen=True)
class PeerMix:
    tag: str  # queue names and the Redis key of this run
    broker: str
    redis: str
    stages: list[tuple[str, float, int]]  # (kind, wait seconds, cpu iterations)

    @property
    def done_key(self) -> str:
        return f"{self.tag}:done"

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "PeerMix":
        raw = json.loads(os.environ[ENV])
        return cls(raw["tag"], raw["broker"], raw["redis"], [tuple(s) for s in raw["stages"]])

    def stage_function(self, i: int) -> Callable[[int, float], None]:
        kind, wait, iterations = self.stages[i]
        last = i == len(self.stages) - 1
        mix = self

        def stage(order: int, sent: float) -> None:
            if kind == "io" and wait:
                time.sleep(wait)
            elif iterations:
                spin(iterations)
            if last:
                _redis(mix.redis).rpush(mix.done_key, time.time() - sent)

        stage.__name__ = stage.__qualname__ = f"s{i:02d}"
        return stage


_clients: dict[str, object] = {}


def _redis(url: str):
    client = _clients.get(url)
    if client is None:
        import redis
        client = _clients[url] = redis.Redis.from_url(url)
    return client
