"""The upstream connection pool: aiohttp's, minus reuse of a connection that spoke out of turn.

HTTP/1.1 keep-alive trusts the server to send nothing between responses. aiohttp parses bytes
that arrive on an idle pooled connection as the start of the *next* response, and hands that
to whichever request reuses the connection next (tested on aiohttp 3.14: a second response
written 0.1 s after the first became the answer to the next request). For sigil that request
may be for another repository or reference, so an upstream that sends too much (a buggy proxy,
a body past its Content-Length) would desynchronise every later exchange on the connection.
Large blob bodies do not take this path (upstream/client.py reads them beside aiohttp and
closes their connection); everything else does: manifests, tags, referrers, small blobs.

:class:`StrictConnector` closes instead of reusing a pooled connection that received any byte
after it was released, or that aiohttp itself marks as not reusable (a complete extra message
in the same read as the body). On plain TCP it also peeks at the socket for bytes the event
loop has not delivered yet; over TLS a peek would see TLS records (a session ticket, say), so
only decrypted bytes count there.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler


class _CountingHandler(ResponseHandler):
    """aiohttp's response protocol, counting the bytes it was handed."""

    bytes_in = 0        # bytes received on this connection so far
    released_at = -1    # ``bytes_in`` when the connection last went back to the pool

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)


def _spoke_out_of_turn(protocol: ResponseHandler) -> bool:
    """True if an idle pooled connection must not carry another request."""
    if not isinstance(protocol, _CountingHandler):
        return False
    if protocol.bytes_in != protocol.released_at or protocol.should_close:
        return True
    transport = protocol.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return False
    wrapped = transport.get_extra_info("socket")  # asyncio's TransportSocket: no recv()
    if wrapped is None:
        return False
    # A socket object on the same descriptor, detached again (never closed) after the peek.
    peek = socket.socket(fileno=wrapped.fileno())
    try:
        return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False  # nothing waiting: the usual case
    except OSError:
        return True   # reset or otherwise broken: do not reuse
    finally:
        peek.detach()


class StrictConnector(aiohttp.TCPConnector):
    """A TCPConnector that never reuses a connection which received bytes while idle."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # BaseConnector builds every connection's protocol from this factory.
        self._factory = functools.partial(_CountingHandler, loop=self._loop)  # type: ignore[assignment]

    def _release(self, key: Any, protocol: ResponseHandler, **kwargs: Any) -> None:
        if isinstance(protocol, _CountingHandler):
            protocol.released_at = protocol.bytes_in
        super()._release(key, protocol, **kwargs)

    async def _get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        idle = self._conns.get(key)
        if idle:
            for entry in [entry for entry in idle if _spoke_out_of_turn(entry[0])]:
                idle.remove(entry)
                entry[0].close()
            if not idle:
                del self._conns[key]
        return await super()._get(key, *args, **kwargs)
