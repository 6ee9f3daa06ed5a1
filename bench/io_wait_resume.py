"""The cost of an `io` handler that waits on a future, per handler, in one slot's batch.

    .venv/bin/python bench/io_wait_resume.py [--handlers 100] [--rounds 300] [--repeat 5]

`StageWorker._wait_all` (the slot resumes a handler itself once its future is
done) against one task per waiting handler, as the worker did before: each
handler awaits a future of its own, all of them answered in the same turn of
the loop (as one Redis script call answers a batch's counters), on uvloop.
Interleaved, one line per repetition: microseconds of wall time per handler.
"""
from __future__ import annotations

import argparse
import asyncio
import time
import types

import uvloop

from oms_pipeline.outcome import NEXT
from oms_pipeline.worker import StageWorker


async def _handler(answer: asyncio.Future):
    await answer
    return NEXT


def _slot() -> types.SimpleNamespace:
    """Just what `_wait_all` reads of its worker."""
    worker = types.SimpleNamespace(config=types.SimpleNamespace(timeout=30.0), name="bench")
    for name in ("_wait_all", "_finish", "_failed"):
        setattr(worker, name, types.MethodType(getattr(StageWorker, name), worker))
    return worker


async def task_per_handler(worker, waiting):
    """The previous way: every waiting handler carried on in a task of its own."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(worker._finish(coro, first)) for _, coro, first in waiting]
    await asyncio.wait(tasks, timeout=worker.config.timeout)
    return [(i, task.result()) for (i, _, _), task in zip(waiting, tasks)]


async def per_handler(wait_all, worker, handlers: int, rounds: int) -> float:
    loop = asyncio.get_running_loop()
    spent = 0.0
    for _ in range(rounds):
        answers = [loop.create_future() for _ in range(handlers)]
        waiting = []
        for i, answer in enumerate(answers):
            coro = _handler(answer)
            waiting.append((i, coro, coro.send(None)))
        loop.call_soon(lambda: [a.set_result(True) for a in answers])
        started = time.perf_counter()
        assert len(await wait_all(worker, waiting)) == handlers
        spent += time.perf_counter() - started
    return spent / (rounds * handlers) * 1e6


async def main(args: argparse.Namespace) -> None:
    worker = _slot()
    for _ in range(args.repeat):
        tasked = await per_handler(task_per_handler, worker, args.handlers, args.rounds)
        resumed = await per_handler(lambda w, waiting: w._wait_all(waiting), worker, args.handlers, args.rounds)
        print(f"a task per handler {tasked:.2f} us, resumed by the slot {resumed:.2f} us")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--handlers", type=int, default=100)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--repeat", type=int, default=5)
    uvloop.run(main(p.parse_args()))
