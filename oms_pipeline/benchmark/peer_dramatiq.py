"""The Dramatiq peer: one actor per stage, a `pipeline` of them per order (worker side too).

Started as `dramatiq oms_pipeline.benchmark.peer_dramatiq`; the run's settings
come from the environment (see `peers.PeerMix`).
"""
from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from .peer_mix import PeerMix

mix = PeerMix.from_env()
broker = RabbitmqBroker(url=mix.broker)
dramatiq.set_broker(broker)

stages = [dramatiq.actor(mix.stage_function(i), actor_name=f"{mix.tag}_s{i:02d}", queue_name=mix.tag,
                         max_retries=0) for i in range(len(mix.stages))]


def send(order: int, sent: float) -> None:
    dramatiq.pipeline([s.message_with_options(args=(order, sent), pipe_ignore=True) for s in stages]).run()
