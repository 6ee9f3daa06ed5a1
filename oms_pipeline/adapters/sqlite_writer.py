"""The embedded store's writer process: SQLite's group commits on the second core.

A commit of a few thousand checkpoint rows is milliseconds of CPU inside SQLite
(B-tree pages, WAL frames). On the event loop's thread it competes with the
stages for one core; in a thread it is starved of the GIL (sqlite3 releases
and retakes it at every step, bench/RESULTS.md). A process of its own runs it
beside the loop instead: the loop pickles a batch of writes (a few
microseconds a row) and hands it over, the writer applies them in one transaction
and answers with their results, and meanwhile the loop works on and gathers
the next batch. A batch is hundreds of kilobytes of order documents: it goes
through a memory file both processes hold (memfd), one copy each way that
never blocks, and only its length goes down the socket. Through the socket
itself the loop would hand it over a socket buffer at a time, once per turn
of the busy loop, and the writer would wait for it (measured: ~67 µs a row,
the writer idle 40% of the time, instead of ~20).

The writer ignores SIGINT and SIGTERM (systemd signals the whole control
group, PITFALLS #2): it stops when its parent says so or goes away (its end of
the pipe closes), after the transaction in hand. A writer that died is
replaced at the next batch; the writes it had in hand fail as StoreUnavailable
(they may or may not have committed, as any lost database connection), and
the pipeline writes them again.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from typing import Any, Callable

from ..ports.store import StoreUnavailable

Batch = list[tuple[str, Any]]  # (operation name, argument)
_HEADER = struct.Struct("!Q")  # a reply: its length, then the pickled value
_BATCH = struct.Struct("!QQ")  # a batch: where in the memory file it starts, and its length
REGIONS = 4  # batches that may be in flight at once (the store sends fewer)


class Writer:
    """The parent's side: batches in flight in the order sent; `on_reply` gets (results, error)
    for each, in that order."""

    def __init__(self, path: str, synchronous: str, on_reply: Callable[[list | None, BaseException | None], None]) -> None:
        self.path = path
        self.synchronous = synchronous
        self.on_reply = on_reply
        self.in_flight = 0  # batches sent and not answered yet
        self._sent = 0  # batches sent so far: each goes to its own region of the memory file
        self._process: subprocess.Popen | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._memory = -1  # the memfd batches travel through
        self._waiting: list[Batch] | None = None  # batches held while a new writer starts

    async def start(self) -> None:
        # A plain child interpreter (spawned, never forked from the running loop: PITFALLS #1), which
        # imports only this module: multiprocessing would re-import the parent's __main__ in it.
        ours, theirs = socket.socketpair()
        memory = os.memfd_create("oms-sqlite-writer")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, self.path, self.synchronous, str(theirs.fileno()), str(memory)],
                pass_fds=(theirs.fileno(), memory), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            os.close(memory)
            raise
        finally:
            theirs.close()
        reader, self._stream = await asyncio.open_connection(sock=ours)
        self._process, self._memory = process, memory
        self._reading = asyncio.ensure_future(self._read(reader))

    def send(self, batch: Batch) -> None:
        self.in_flight += 1
        if self._waiting is not None:  # a new writer is starting: it takes this one too
            self._waiting.append(batch)
        elif self._stream is None:  # the last one died: one new writer first
            self._waiting = [batch]
            asyncio.ensure_future(self._restart())
        else:
            self._send(batch)

    def _send(self, batch: Batch) -> None:
        data = pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
        # Regions 4 GiB apart (the file is sparse: only written pages take memory), one per batch that
        # may be in flight at once, so a batch is never overwritten before the writer has read it.
        start = (self._sent % REGIONS) << 32
        self._sent += 1
        os.pwrite(self._memory, data, start)
        self._stream.write(_BATCH.pack(start, len(data)))

    async def stop(self, timeout: float = 10.0) -> None:
        process, stream, reading = self._process, self._stream, self._reading
        self._process = self._stream = self._reading = None
        if reading is not None:
            reading.cancel()
        if stream is not None:
            stream.close()  # the writer sees the end of its input and stops
        if self._memory >= 0:
            os.close(self._memory)
            self._memory = -1
        if process is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, process.wait, timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    async def _restart(self) -> None:
        try:
            await self.stop()
            await self.start()
        except Exception as exc:  # noqa: BLE001 - the callers see the store as away, and retry
            self._waiting = None
            self._fail_all(StoreUnavailable(f"the SQLite writer process could not start: {exc!r}"))
            return
        waiting, self._waiting = self._waiting, None
        for batch in waiting:
            self._send(batch)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size, = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                ok, value = pickle.loads(await reader.readexactly(size))
                self.in_flight -= 1
                self.on_reply(value, None) if ok else self.on_reply(None, value)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        """The writer died (killed, out of memory): what it had in hand may or may not be written."""
        stream, self._stream, self._process, self._reading = self._stream, None, None, None
        if stream is not None:
            stream.close()
        self._fail_all(StoreUnavailable(f"the SQLite writer process stopped: {exc!r}"))

    def _fail_all(self, error: BaseException) -> None:
        while self.in_flight:
            self.in_flight -= 1
            self.on_reply(None, error)


def serve(path: str, synchronous: str, sock: socket.socket, memory: int) -> None:
    """The writer process: apply each batch in one transaction until its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .sqlite_store import OPERATIONS, connect, transaction  # here, not at import: a cycle otherwise
    conn = connect(path, synchronous)
    stream = sock.makefile("rwb")
    try:
        while header := stream.read(_BATCH.size):
            if len(header) < _BATCH.size:
                return  # the parent is gone
            start, size = _BATCH.unpack(header)
            batch = pickle.loads(_read_at(memory, start, size))
            try:
                reply = (True, transaction(conn, [(OPERATIONS[op], arg) for op, arg in batch]))
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                reply = (False, _picklable(exc))
            data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
            try:
                stream.write(_HEADER.pack(len(data)) + data)
                stream.flush()
            except OSError:
                return
    finally:
        conn.close()


def _read_at(fd: int, start: int, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, start + got)
        if not part:
            raise EOFError("the batch in the memory file is shorter than announced")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        return sqlite3.OperationalError(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":  # the writer process: PATH SYNCHRONOUS SOCKET_FD MEMORY_FD
    serve(sys.argv[1], sys.argv[2], socket.socket(fileno=int(sys.argv[3])), int(sys.argv[4]))
