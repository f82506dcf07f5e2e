"""The per-digest fetch lease: who downloads a cold blob when several processes share a store.

One process (a ``--workers`` sibling on one host, or a replica of a fleet) holds the lease for a
digest while it fetches the blob from the upstream; the others find the holder and stream from
it (on one host: the growing staging file; in a fleet: the holder's peer endpoint) instead of
fetching again. A lease carries an expiry: a holder that dies or stalls stops renewing it and
another process takes it over once it has expired.

Expiry is judged by one clock only, the one of the lease table's owner (SQLite: the host; the
shared database: the database server's ``now()``), never by comparing the clocks of two
processes, so clock skew between replicas cannot make two holders at once.

Implementations: the local one (beside the SQLite index) and the PostgreSQL one. Both pass the
same contract tests.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sigil.oci.digest import Digest


def process_holder_id() -> str:
    """A lease (or deletion mark) holder id unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` of this host (pid namespace) exist, and is it not a zombie (a
    killed process its parent has not reaped yet)? A reused pid counts as alive: callers only
    ever spare things for it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # Linux: the state follows the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def holder_alive(holder: str) -> bool:
    """False only if ``holder`` (:func:`process_holder_id`) names a process of this host that
    no longer exists. Another host's (or an unparsable) holder counts as alive: what it
    holds then ends by expiry only."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    return pid_alive(int(pid_text))


@dataclass(frozen=True)
class LeaseInfo:
    """The current holder of a digest's lease."""

    digest: Digest
    holder: str          # an opaque, unique id of the holding process (e.g. "host:pid:uuid")
    location: str        # where waiters stream from: a staging file path or a peer URL
    expires_at: float    # seconds since the epoch, on the lease table's clock
    size: int | None = None  # the blob's size once the holder knows it (upstream Content-Length)


class FetchLeases(Protocol):
    """Per-digest fetch leases shared by every process using one store."""

    async def acquire(self, digest: Digest, holder: str, location: str,
                      ttl: float) -> LeaseInfo:
        """Take the lease if it is free or expired and return it; otherwise return the live
        lease of the current holder (``result.holder != holder``). Atomic."""
        ...

    async def renew(self, digest: Digest, holder: str, ttl: float,
                    size: int | None = None) -> bool:
        """Extend a lease this holder still holds (and record the size once known).
        False if it was lost (expired and taken over): the caller must stop publishing."""
        ...

    async def release(self, digest: Digest, holder: str) -> None:
        """Give the lease up (after commit or failure). A lease held by another is untouched."""
        ...

    async def current(self, digest: Digest) -> LeaseInfo | None:
        """The live (unexpired) lease for ``digest``, if any."""
        ...
