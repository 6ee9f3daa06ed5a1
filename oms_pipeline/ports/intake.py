"""Intake queues: what a handler of a broker intake queue answers for each message.

A handler takes the bodies of a batch of messages and answers one verdict per
body, in order. The adapter (RabbitMQ: oms_pipeline/adapters/rabbitmq_intake.py)
acks accepted and duplicate messages, dead-letters invalid ones with their
reason at once, and retries `RETRY` ones with backoff until its delivery limit.

A handler that raises has failed for the whole batch: the adapter tries the
messages one by one to find the one at fault, and treats each failure as a
`RETRY`. `NotNow` (the pipeline is shutting down) is no failure at all: the
messages are left for redelivery.
"""
from __future__ import annotations

from typing import Awaitable, Callable, NamedTuple

ACCEPTED = "accepted"
DUPLICATE = "duplicate"  # seen before: nothing new, the message is done with
INVALID = "invalid"  # will never be accepted as it is: dead-lettered at once
RETRY = "retry"  # failed for now: tried again later

QUEUES = ("orders", "payments", "reverse", "reports")


class Verdict(NamedTuple):
    result: str
    reason: str = ""


class NotNow(Exception):
    """The handler takes nothing now (shutting down): leave the messages to be delivered again."""


Handler = Callable[[list[bytes]], Awaitable[list[Verdict]]]
