"""TLS for clients: certificate reload (SIGHUP, changed files) without dropping connections,
a broken replacement keeps the old certificate, minimum TLS 1.2, client certificates (mTLS),
and clear start-up errors for missing or unusable TLS files."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509

from sigil import metrics
from sigil.config import build_config
from sigil.errors import ConfigError
from sigil.server.app import build_app
from sigil.server.tls import CertificateReloader, TLSFiles
from tests.realparts import RealRegistry
from tests.support.sigilproc import SigilProcess
from tests.test_auth_support import (
    BOUND,
    PASSWORD_FOR_TESTS,
    TestCA,
    basic,
    client_context,
    https_serial,
    replace_pair,
    wait_for,
    write_htpasswd,
)


def reloads(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("sigil_tls_reloads_total",
                                             {"result": result}) or 0.0


def serial_of(writer: asyncio.StreamWriter) -> int:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[tuple[TestCA, CertificateReloader, int,
                                                             dict[str, Any]]]:
    """A TLS line-echo server on the reloader's listener context."""
    ca = TestCA(tmp_path / "ca")
    cert, key, serial = ca.issue("server")
    reloader = CertificateReloader(TLSFiles(str(cert), str(key)), interval=0.05)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=reloader.listener)
    port = server.sockets[0].getsockname()[1]
    yield ca, reloader, port, {"cert": cert, "key": key, "serial": serial}
    server.close()
    await server.wait_closed()


async def connect(port: int, context: ssl.SSLContext
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context),
                                  BOUND)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), BOUND)


async def test_reload_serves_new_handshakes_and_keeps_open_connections(echo_server) -> None:
    ca, reloader, port, files = echo_server
    old_reader, old_writer = await connect(port, client_context(ca))
    assert serial_of(old_writer) == files["serial"]
    new_serial = replace_pair(ca, files, "second")
    before = reloads("success")
    assert reloader.reload("test") is True
    assert reloads("success") == before + 1
    new_reader, new_writer = await connect(port, client_context(ca))
    assert serial_of(new_writer) == new_serial != files["serial"]
    # The connection opened before the reload is still up, on its old certificate.
    assert await roundtrip(old_reader, old_writer, b"still here\n") == b"still here\n"
    assert serial_of(old_writer) == files["serial"]
    assert await roundtrip(new_reader, new_writer, b"new\n") == b"new\n"
    for writer in (old_writer, new_writer):
        writer.close()


@pytest.mark.parametrize("breakage", ["garbage", "key_mismatch", "missing_key", "empty"])
async def test_broken_replacement_keeps_old_certificate(echo_server, breakage) -> None:
    ca, reloader, port, files = echo_server
    if breakage == "garbage":
        files["cert"].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n"
                                 "-----END CERTIFICATE-----\n")
    elif breakage == "key_mismatch":
        other_cert, _, _ = ca.issue("other")
        other_cert.replace(files["cert"])  # a new certificate, but the old key stays
    elif breakage == "missing_key":
        files["key"].unlink()
    else:
        files["cert"].write_bytes(b"")
    before = reloads("failure")
    assert reloader.reload("test") is False
    assert reloads("failure") == before + 1
    _, writer = await connect(port, client_context(ca))
    assert serial_of(writer) == files["serial"]
    writer.close()


async def test_changed_files_are_picked_up_by_polling(echo_server) -> None:
    ca, reloader, port, files = echo_server
    watcher = asyncio.get_running_loop().create_task(reloader.watch())
    try:
        new_serial = replace_pair(ca, files, "polled")
        deadline = time.monotonic() + BOUND
        seen = files["serial"]
        while seen != new_serial and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            _, writer = await connect(port, client_context(ca))
            seen = serial_of(writer)
            writer.close()
        assert seen == new_serial
        assert not reloader.changed()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_minimum_tls_1_2(echo_server) -> None:
    ca, reloader, port, _ = echo_server
    assert reloader.listener.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(port, client_context(ca, max_version=ssl.TLSVersion.TLSv1_1))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        reader, writer = await connect(port, client_context(ca, max_version=version))
        assert writer.get_extra_info("ssl_object").version() == {
            ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert await roundtrip(reader, writer, b"ok\n") == b"ok\n"
        writer.close()


async def test_client_certificate_required(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    stranger = TestCA(tmp_path / "stranger", "another CA")
    cert, key, _ = ca.issue("server")
    reloader = CertificateReloader(TLSFiles(str(cert), str(key), str(ca.path), "required"))

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"hello\n")
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=reloader.listener)
    port = server.sockets[0].getsockname()[1]
    try:
        member = ca.issue("node-1", "node-1", client=True)[:2]
        outsider = stranger.issue("node-2", "node-2", client=True)[:2]
        reader, writer = await connect(port, client_context(ca, cert=member))
        assert await asyncio.wait_for(reader.readline(), BOUND) == b"hello\n"
        writer.close()
        for context in (client_context(ca), client_context(ca, cert=outsider)):
            # TLS 1.3: the client learns of the refusal on its first read.
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                reader, writer = await connect(port, context)
                line = await asyncio.wait_for(reader.readline(), BOUND)
                if not line:
                    raise ConnectionError("closed without a word")
                writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_optional_client_certificate_replaces_the_password(tmp_path: Path,
                                                                 real_registry: RealRegistry
                                                                 ) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key, _ = ca.issue("server")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": PASSWORD_FOR_TESTS})
    config = build_config({
        "server": {"tls": {"cert": str(cert), "key": str(key), "client_ca": str(ca.path),
                           "client_auth": "optional"},
                   "auth": {"type": "htpasswd", "htpasswd": str(htpasswd)}},
        "storage": {"root": str(tmp_path / "store")},
        "upstreams": [{"name": "docker.io", "url": real_registry.url, "default": True}],
        "log": {"level": "warning"}}, env={})
    files = TLSFiles.from_config(config.server)
    assert files is not None
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0,
                       ssl_context=CertificateReloader(files).listener)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    member = ca.issue("node-1", "node-1", client=True)[:2]

    def get(context: ssl.SSLContext, headers: dict[str, str] | None = None) -> int:
        request = urllib.request.Request(f"https://127.0.0.1:{port}/v2/", headers=headers or {})
        try:
            with urllib.request.urlopen(request, context=context, timeout=BOUND) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        # A verified certificate is the credential; without one, the password is asked.
        assert await asyncio.to_thread(get, client_context(ca, cert=member)) == 200
        assert await asyncio.to_thread(get, client_context(ca)) == 401
        assert await asyncio.to_thread(get, client_context(ca), {
            "Authorization": basic("alice", PASSWORD_FOR_TESTS)}) == 200
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------ start-up errors
@pytest.fixture
def pair(tmp_path: Path) -> tuple[TestCA, Path, Path]:
    ca = TestCA(tmp_path / "ca")
    cert, key, _ = ca.issue("server")
    return ca, cert, key


def tls_config(**tls: Any) -> Any:
    return build_config({"server": {"tls": tls}}, env={}, source="sigil.yaml")


def test_missing_or_unusable_tls_files_are_start_up_errors(pair, tmp_path: Path) -> None:
    ca, cert, key = pair
    other_cert, _, _ = ca.issue("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"cert": str(tmp_path / "nope.crt"), "key": str(key)}, "server.tls.cert",
         "does not exist"),
        ({"cert": str(cert), "key": str(tmp_path / "nope.key")}, "server.tls.key",
         "does not exist"),
        ({"cert": str(tmp_path), "key": str(key)}, "server.tls.cert", "does not exist"),
        ({"cert": str(garbage), "key": str(key)}, "server.tls", "not a usable certificate"),
        ({"cert": str(cert), "key": str(garbage)}, "server.tls", "not a usable certificate"),
        ({"cert": str(other_cert), "key": str(key)}, "server.tls", "not a usable certificate"),
        ({"cert": str(cert)}, "server.tls", "cert and key must be given together"),
        ({"cert": str(cert), "key": str(key), "client_ca": str(garbage)},
         "server.tls.client_ca", "no usable CA certificate"),
        ({"cert": str(cert), "key": str(key), "client_auth": "required"},
         "server.tls.client_auth", "client_ca"),
        ({"cert": str(cert), "key": str(key), "client_ca": str(ca.path),
          "client_auth": "sometimes"}, "server.tls.client_auth", "none, optional or required"),
        ({"client_ca": str(ca.path)}, "server.tls.client_ca", "need TLS"),
        ({"cert": str(cert), "key": str(key), "client_ca": str(ca.path),
          "client_auth": "none"}, "server.tls.client_auth", "set optional or required"),
        ({"cert": str(cert), "key": str(key), "reload_interval": "often"},
         "server.tls.reload_interval", "duration"),
    ]
    for tls, key_name, problem in cases:
        with pytest.raises(ConfigError) as info:
            tls_config(**tls)
        message = str(info.value)
        assert message.startswith("sigil.yaml: ") and key_name in message \
            and problem in message, (tls, message)
    # client_ca alone means required, as distribution's clientcas.
    config = tls_config(cert=str(cert), key=str(key), client_ca=str(ca.path))
    assert config.server.tls_client_auth == "required"


def test_cli_missing_tls_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "sigil.yaml"
    config.write_text(json.dumps({"server": {"listen": "127.0.0.1:0", "tls": {
        "cert": str(tmp_path / "gone.crt"), "key": str(tmp_path / "gone.key")}},
        "storage": {"root": str(tmp_path / "s")}}))
    done = subprocess.run([sys.executable, "-m", "sigil", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "server.tls.cert" in done.stderr, done.stderr
    assert "gone.crt" in done.stderr


# ------------------------------------------------------------------------ a real process
def tls_process(tmp_path: Path, upstream: RealRegistry, cert: Path, key: Path,
                **tls: Any) -> SigilProcess:
    process = SigilProcess(tmp_path / "sigil", [{"name": "docker.io", "url": upstream.url,
                                                 "default": True}], tls=(cert, key))
    config = yaml.safe_load(process.config_path.read_text())
    config["server"]["tls"].update(tls)
    process.config_path.write_text(yaml.safe_dump(config))
    return process


def test_process_reloads_on_sighup_and_on_change_and_keeps_old_on_breakage(
        tmp_path: Path, real_registry: RealRegistry) -> None:
    ca = TestCA(tmp_path / "ca")
    cert, key, first = ca.issue("server")
    files = {"cert": cert, "key": key}
    # Polling off: this part shows SIGHUP alone reloads.
    with tls_process(tmp_path, real_registry, cert, key, reload_interval=0) as process:
        assert process.proc is not None
        assert https_serial(process, ca) == first
        second = replace_pair(ca, files, "second")
        assert https_serial(process, ca) == first  # nothing reloads by itself
        process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: https_serial(process, ca) == second, "the SIGHUP reload")
        # A broken replacement: the error is logged and the old certificate stays.
        cert.write_text("garbage\n")
        process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "tls.reload_failed"
                             for e in process.log_events()), "the reload error")
        assert https_serial(process, ca) == second
        failed = [e for e in process.log_events() if e.get("event") == "tls.reload_failed"]
        assert failed[0]["level"] == "error" and failed[0]["kept_serial"] == format(second, "x")
    # Polling on: a changed file is picked up without a signal.
    cert, key, third = ca.issue("server")
    files = {"cert": cert, "key": key}
    with tls_process(tmp_path / "p", real_registry, cert, key,
                     reload_interval="200ms") as process:
        assert https_serial(process, ca) == third
        fourth = replace_pair(ca, files, "fourth")
        wait_for(lambda: https_serial(process, ca) == fourth, "the polled reload")
        assert any(e.get("event") == "tls.reloaded" and e.get("why") == "files changed"
                   for e in process.log_events())
