"""Helpers shared by the end-to-end tests: sigil processes per test, plain HTTP GETs, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.sigilproc import SigilProcess


def sigil_starter(upstream_url: str, tmp_path: Path, upstream_name: str
                  ) -> Iterator[Callable[..., SigilProcess]]:
    """Body of a ``start_sigil`` fixture: ``start(policy, **upstream_keys)`` runs a sigil with
    one default upstream over ``upstream_url``; every process started is stopped afterwards."""
    started: list[SigilProcess] = []

    def start(policy: dict[str, Any] | None, **upstream: Any) -> SigilProcess:
        up = {"name": upstream_name, "url": upstream_url, "default": True, **upstream}
        process = SigilProcess(tmp_path / f"sigil{len(started)}", [up], policy)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def error_code(body: bytes) -> str:
    """The ``code`` of the first error of an OCI error body (``MANIFEST_UNKNOWN``, ...)."""
    code: str = json.loads(body)["errors"][0]["code"]
    return code


def self_signed_cert(tmp_path: Path, common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 and its key, as PEM files (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
