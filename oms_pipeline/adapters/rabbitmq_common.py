"""What every RabbitMQ adapter here does the same way: its connection's life, and acks on a
channel that may have died under them (PITFALL 14)."""
from __future__ import annotations

import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

log = logging.getLogger(__name__)

# The channel or connection is gone (a reconnect is under way): nothing to retry on it.
DEAD_CHANNEL = (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError)


class Connected:
    """An adapter holding one robust connection in `_connection`."""

    _connection: AbstractRobustConnection | None = None

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def ping(self) -> bool:
        """Readiness probe, without I/O: connected now (connect_robust clears this while it reconnects)."""
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()


def live_channel(message: AbstractIncomingMessage) -> Any:
    """The channel a message came on, or None when that channel has closed."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


async def quietly(awaitable: Any, who: str) -> None:
    """Acks, cancels and closes on a channel that may have died meanwhile: nothing to do then."""
    try:
        await awaitable
    except ChannelInvalidStateError:
        pass  # the expected case after a reconnect: the broker has requeued the delivery
    except DEAD_CHANNEL as exc:
        log.warning("%s: ignored a failed ack/cancel/close: %r", who, exc)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


async def ack_below(group: list[AbstractIncomingMessage], floor: float, who: str) -> None:
    """Settle one channel's deliveries: one multiple-ack for those below `floor` (the lowest
    delivery tag still in hand on that channel), the rest one by one."""
    below = [m for m in group if m.delivery_tag < floor]
    if below:
        await quietly(max(below, key=lambda m: m.delivery_tag).ack(multiple=True), who)
    for message in group:
        if message.delivery_tag > floor:
            await quietly(message.ack(), who)
