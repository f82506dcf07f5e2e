"""TLS for clients: minimum TLS 1.2, optional client certificates (mTLS), and certificate
reload without dropping a connection.

The listening socket keeps one :class:`ssl.SSLContext` for its lifetime (asyncio hands it to the
accept loop once). Its ``sni_callback`` runs at every handshake, also when the client sends no
server name (OpenSSL calls it with ``None``), and moves the new connection to the context built
from the files most recently loaded; connections already established keep theirs. A reload
builds a whole new context, so a broken replacement (unreadable, not PEM, key not matching the
certificate) changes nothing: the old certificate stays in use and an error is logged.

Reloads happen on SIGHUP and when the certificate, key or client CA file changes (their
``stat`` is polled every ``server.tls.reload_interval``; Kubernetes Secret volumes swap a
symlink, which ``stat`` follows).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass

from cryptography import x509

from sigil import metrics
from sigil.config import ServerConfig
from sigil.logs import get_logger

log = get_logger("sigil.tls")
_VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                 "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class TLSFiles:
    """The files a context is built from."""

    cert: str
    key: str
    client_ca: str | None = None
    client_auth: str = "none"

    @classmethod
    def from_config(cls, server: ServerConfig) -> TLSFiles | None:
        if not server.tls_cert or not server.tls_key:
            return None
        return cls(server.tls_cert, server.tls_key, server.tls_client_ca,
                   server.tls_client_auth)

    def signature(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """What identifies the files' current contents cheaply: (inode, device, size,
        mtime_ns) of each, None for a file that cannot be stat'ed now."""
        result: list[tuple[int, int, int, int] | None] = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                result.append(None)
                continue
            result.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
        return tuple(result)


def build_context(files: TLSFiles) -> ssl.SSLContext:
    """A server context from ``files``; raises ``ssl.SSLError``/``OSError`` if unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(files.cert, files.key)
    if files.client_ca and files.client_auth != "none":
        context.load_verify_locations(cafile=files.client_ca)
        context.verify_mode = _VERIFY_MODES[files.client_auth]
    return context


def certificate_info(path: str) -> tuple[str, float]:
    """(serial number in hex, notAfter as Unix time) of the first certificate in ``path``."""
    with open(path, "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    return format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()


class CertificateReloader:
    """Owns the listening context and swaps the certificate in for new handshakes."""

    def __init__(self, files: TLSFiles, interval: float = 5.0) -> None:
        self.files = files
        self.interval = interval
        self._current = build_context(files)
        self._signature = files.signature()
        # The listener's context: the same settings (protocol bounds and verify mode come
        # from the context a connection starts with), plus the switch to the current one.
        self.listener = build_context(files)
        self.listener.sni_callback = self._select
        self.serial = self._record()

    def _select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if connection.context is not self._current:
            connection.context = self._current

    def _record(self) -> str:
        try:
            serial, not_after = certificate_info(self.files.cert)
        except (OSError, ValueError):
            return ""
        metrics.TLS_CERT_EXPIRY.set(not_after)
        return serial

    def reload(self, why: str = "signal") -> bool:
        """Build a context from the files now; on success new handshakes use it. A broken
        replacement keeps the old certificate and logs an error."""
        self._signature = self.files.signature()
        try:
            context = build_context(self.files)
        except (ssl.SSLError, OSError, ValueError) as exc:
            metrics.TLS_RELOADS.labels("failure").inc()
            log.error("tls.reload_failed", why=why, cert=self.files.cert, key_file=self.files.key,
                      error=getattr(exc, "reason", None) or str(exc) or type(exc).__name__,
                      kept_serial=self.serial)
            return False
        self._current = context
        old, self.serial = self.serial, self._record()
        metrics.TLS_RELOADS.labels("success").inc()
        log.info("tls.reloaded", why=why, cert=self.files.cert, old_serial=old,
                 new_serial=self.serial)
        return True

    def changed(self) -> bool:
        """Whether any file changed since the last load attempt."""
        return self.files.signature() != self._signature

    async def watch(self) -> None:
        """Poll the files' stat every ``interval`` seconds; reload when one changed."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self.changed():
                    # A certificate written before its key fails once and loads on the next
                    # change, so a half-finished rotation never replaces a working pair.
                    await asyncio.to_thread(self.reload, "files changed")
            except Exception:  # the watcher must outlive any surprise
                log.exception("tls.watch_failed")
