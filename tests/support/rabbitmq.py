"""RabbitMQ for tests: an upstream publisher, and clean-up of everything under a test's prefix."""
from __future__ import annotations

import shutil
import subprocess
import threading

import aio_pika
import anyio

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def delete_topology(prefix: str) -> None:
    """Delete the queues and exchanges named `<prefix>.…` (listed by rabbitmqctl)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in _listed(ctl, "list_queues", prefix):
            await channel.queue_delete(name)
        for name in _listed(ctl, "list_exchanges", prefix):
            await channel.exchange_delete(name)


def _listed(ctl: str, what: str, prefix: str) -> list[str]:
    done = subprocess.run([ctl, "-q", what, "name"], capture_output=True, text=True, timeout=60)
    return [n for n in done.stdout.split() if n.startswith(prefix + ".")]


class Publisher(threading.Thread):
    """An upstream system: publishes each order until it is confirmed, riding out a broker restart."""

    def __init__(self, queue: str, bodies: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.queue, self.bodies, self.sent, self.error = queue, bodies, 0, None

    def run(self) -> None:
        try:
            anyio.run(self._publish_all)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    async def _publish_all(self) -> None:
        connection = await aio_pika.connect_robust(URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            for body in self.bodies:
                await self._until_confirmed(channel, body)
                self.sent += 1
                await anyio.sleep(0.005)  # a steady stream rather than one burst

    async def _until_confirmed(self, channel, body: bytes) -> None:
        while True:
            try:
                await channel.default_exchange.publish(aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), self.queue, mandatory=True)
                return
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                await anyio.sleep(0.2)
