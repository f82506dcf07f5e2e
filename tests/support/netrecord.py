"""A listener that records every connection made to a port: the stand-in for an upstream
that must never be contacted (offline serving, the air-gapped round trip)."""

from __future__ import annotations

import socket
import threading
import time


class ConnectionRecorder:
    """Listens on a port and records (then closes) every connection: the stand-in for an
    upstream that must never be contacted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections: list[tuple[str, int]] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:  # the registry has just released the port; bind as soon as it is free
            try:
                self._sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise
                time.sleep(0.05)
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def assert_untouched(self) -> None:
        """Fail if anything connected to the upstream port."""
        assert self.connections == [], f"connections to the upstream port: {self.connections}"
