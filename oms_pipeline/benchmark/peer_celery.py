"""The Celery peer: one task per stage, a chain of them per order (worker side too).

Started as `celery -A oms_pipeline.benchmark.peer_celery worker`; the run's
settings come from the environment (see `peers.PeerMix`).
"""
from __future__ import annotations

from celery import Celery, chain

from .peer_mix import PeerMix

mix = PeerMix.from_env()
app = Celery("oms_bench", broker=mix.broker)
app.conf.update(task_ignore_result=True, task_default_queue=mix.tag, worker_prefetch_multiplier=4,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

stages = [app.task(name=f"{mix.tag}.s{i:02d}")(mix.stage_function(i)) for i in range(len(mix.stages))]


def send(order: int, sent: float) -> None:
    chain(*(s.si(order, sent) for s in stages)).apply_async()
