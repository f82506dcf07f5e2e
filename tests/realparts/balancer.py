"""A tiny round-robin TCP balancer on loopback, in front of several sigil replicas.

Each accepted connection goes to the next backend in turn and bytes are copied both ways
until either side closes: what an L4 load balancer does, so HTTP keep-alive connections stay
on one replica. Bounded: at most ``max_connections`` at once (further ones wait in the accept
queue), and it only ever connects to the loopback backends it was given.

With ``pause`` it also throttles what the backends send (``chunk`` bytes, then a pause): in
front of the upstream registry it keeps a download in flight long enough for a test to act
during it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from types import TracebackType
from typing import Self

COPY_CHUNK = 256 * 1024


class RoundRobinBalancer:
    """``async with RoundRobinBalancer([("127.0.0.1", p1), ...]) as lb``; ``lb.host`` is
    ``127.0.0.1:<port>``. ``lb.connections`` counts connections per backend index."""

    def __init__(self, backends: Sequence[tuple[str, int]], *,
                 max_connections: int = 256, chunk: int = COPY_CHUNK,
                 pause: float = 0.0, hold: tuple[int, asyncio.Event] | None = None) -> None:
        for host, _ in backends:
            if not host.startswith("127."):
                raise ValueError(f"backend {host} is not on loopback")
        self.backends = list(backends)
        self.connections = [0] * len(self.backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._chunk = chunk
        self._pause = pause
        # (n, event): each backend-to-client stream stops after n bytes until event is set.
        self._hold = hold

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>`` of the balancer."""
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with self._slots:
                which = next(self._next)
                self.connections[which] += 1
                host, port = self.backends[which]
                try:
                    up_reader, up_writer = await asyncio.open_connection(host, port)
                except OSError:
                    writer.close()  # the replica is down: the client sees a reset
                    return
                await asyncio.gather(_copy(reader, up_writer),
                                     _copy(up_reader, writer, self._chunk, self._pause,
                                           self._hold),
                                     return_exceptions=True)
        finally:
            self._tasks.discard(task)
            writer.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                chunk: int = COPY_CHUNK, pause: float = 0.0,
                hold: tuple[int, asyncio.Event] | None = None) -> None:
    """Copy until EOF or an error on either side; then close the sink (both directions end
    together, so a replica killed mid-body cuts its client). ``hold=(n, event)``: after n
    bytes, wait for ``event`` before copying more."""
    copied = 0
    try:
        while data := await source.read(chunk if hold is None or copied >= hold[0]
                                        else min(chunk, hold[0] - copied)):
            sink.write(data)
            await sink.drain()
            copied += len(data)
            if hold is not None and copied >= hold[0]:
                await hold[1].wait()
            if pause:
                await asyncio.sleep(pause)
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            sink.close()
