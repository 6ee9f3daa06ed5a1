"""Clean-up of a test's RabbitMQ topology: every queue and exchange under its prefix."""
from __future__ import annotations

import shutil
import subprocess

import aio_pika

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
