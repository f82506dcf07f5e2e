"""``python3 -m bench.floor_proxy UPSTREAM_URL STAGING_DIR [--hash-thread]``: the least a
verifying mirror must do per byte of a cold pull, on one thread, with nothing else: a reference
for ``bench/ab_cold.py --floor``, not a server.

Per connection (one at a time, blocking sockets): read the request head, send it to the
upstream with ``Connection: close``, pass the response head on, then for every socket read
(``recv_into`` a 256 KiB buffer) write it to a staging file in 128 KiB slices, hash it
(sha256) and send it to the client; at the end compare nothing and commit nothing (sigil
releases the tail after the hash and commits off the client's path). No HTTP library, no event
loop, no per-read timer, no copies besides the kernel's: what is left is the receive, the file
write, the sha256 and the send that sigil cannot drop. With ``--hash-thread`` the sha256 runs
on a second thread (hashlib releases the GIL), fed each piece through a queue: what two
threads could reach. With ``--mmap`` the staging file is ``posix_fallocate``d to the
Content-Length and mapped: each piece is received straight into the mapping (no staging
``write`` copy), hashed from it and sent from it (``MADV_POPULATE_WRITE`` faults each 1 MiB
window in with one call instead of a fault per 4 KiB page). ``--whole``: 1 MiB reads, one
staging write per read (sigil's sizes, the control for ``--mmap``). It prints its port on stdout.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import socket
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

RECV = 256 * 1024
SLICE = 128 * 1024
WINDOW = 1024 * 1024
MADV_POPULATE_WRITE = 23  # Linux 5.14+; not exported by Python 3.11's mmap module


def _head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(the HTTP head up to and including the blank line, body bytes read past it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("connection closed in the head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _hash_worker(pieces: queue.SimpleQueue[bytes | None]) -> None:
    digest = hashlib.sha256()
    while (piece := pieces.get()) is not None:
        digest.update(piece)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ConnectionError("no Content-Length")


def _serve_mmap(client: socket.socket, up: socket.socket, head: bytes, rest: bytes,
                path: Path) -> None:
    """Receive into the fallocated, mapped staging file; hash and send from the mapping."""
    size = _content_length(head)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size) as mm:
            view = memoryview(mm)
            try:
                view[:len(rest)] = rest
                at = len(rest)
                if at:
                    digest.update(view[:at])
                    client.sendall(view[:at])
                while at < size:
                    end = min(size, at + WINDOW)
                    start = at & ~(mmap.PAGESIZE - 1)
                    try:
                        mm.madvise(MADV_POPULATE_WRITE, start, end - start)
                    except OSError:
                        pass
                    n = up.recv_into(view[at:end])
                    if not n:
                        break
                    piece = view[at:at + n]
                    digest.update(piece)
                    client.sendall(piece)
                    piece.release()
                    at += n
            finally:
                view.release()
    finally:
        os.close(fd)


def _serve(client: socket.socket, upstream: tuple[str, int], staging: Path,
           hash_thread: bool, use_mmap: bool = False) -> None:
    request, _ = _head(client)
    lines = request.split(b"\r\n")
    kept = [line for line in lines[1:] if line and not line.lower().startswith(
        (b"host:", b"connection:"))]
    host = f"{upstream[0]}:{upstream[1]}".encode()
    with socket.create_connection(upstream) as up:
        up.sendall(b"\r\n".join([lines[0], b"Host: " + host, b"Connection: close", *kept])
                   + b"\r\n\r\n")
        head, rest = _head(up)
        client.sendall(head)
        path = staging / uuid.uuid4().hex
        if use_mmap:
            _serve_mmap(client, up, head, rest, path)
            path.unlink()
            return
        digest = hashlib.sha256()
        buf = bytearray(RECV)
        view = memoryview(buf)
        hashing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        worker = threading.Thread(target=_hash_worker, args=(hashing,))
        if hash_thread:
            worker.start()
        with open(path, "xb", buffering=0) as fh:
            first = [memoryview(rest)] if rest else []
            while True:
                if first:
                    piece = first.pop()
                elif hash_thread:
                    piece = memoryview(up.recv(RECV))  # a new buffer per piece: the thread
                    if not piece:                      # may still be hashing the last one
                        break
                else:
                    n = up.recv_into(buf)
                    if not n:
                        break
                    piece = view[:n]
                for at in range(0, len(piece), SLICE):
                    fh.write(piece[at:at + SLICE])
                if hash_thread:
                    hashing.put(piece.obj if isinstance(piece.obj, bytes) else bytes(piece))
                else:
                    digest.update(piece)
                client.sendall(piece)
        if hash_thread:
            hashing.put(None)
            worker.join()
        path.unlink()


def main() -> int:
    url, staging = urlsplit(sys.argv[1]), Path(sys.argv[2])
    hash_thread = "--hash-thread" in sys.argv[3:]
    use_mmap = "--mmap" in sys.argv[3:]
    if "--whole" in sys.argv[3:]:  # 1 MiB reads, one write per read: as sigil since w1
        global RECV, SLICE
        RECV = SLICE = WINDOW
    upstream = (url.hostname or "127.0.0.1", url.port or 80)
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        while True:
            client, _ = server.accept()
            with client:
                try:
                    _serve(client, upstream, staging, hash_thread, use_mmap)
                except OSError as exc:  # a client that went away: next one
                    print(f"floor: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
