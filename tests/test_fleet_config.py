"""The fleet configuration keys: storage.backend/s3, index.backend/postgres, server.peer_listen.
Secrets come from env or files and never show in a repr or an error message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sigil.config import IndexConfig, S3Config, build_config, load_config
from sigil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value-that-must-never-leak"
ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET,
       "SIGIL_PEER_SECRET": "peer-secret-value"}


def s3(**keys: Any) -> dict[str, Any]:
    return {"storage": {"backend": "s3", "s3": {"bucket": "sigil", **keys}}}


def test_defaults_are_the_embedded_backends() -> None:
    config = build_config({}, env={})
    assert config.storage.backend == "filesystem" and config.storage.s3 is None
    assert config.index == IndexConfig()
    assert config.index.backend == "sqlite"
    assert config.server.peer_listen is None


def test_shipped_config_documents_the_fleet_defaults() -> None:
    """config/sigil.yaml switched to the fleet by env overrides gives the dataclass defaults:
    the documented defaults and the code's cannot drift apart."""
    env = {**ENV, "SIGIL_STORAGE_BACKEND": "s3", "SIGIL_INDEX_BACKEND": "postgres",
           "SIGIL_PG_DSN": "postgresql://sigil@db.internal:5432/sigil"}
    config = load_config(REPO / "config" / "sigil.yaml", env=env)
    assert config.storage.backend == "s3"
    expected = S3Config(bucket="sigil", access_key="AKIDEXAMPLE", secret_key=SECRET,
                        credential_source="storage.s3.access_key_env (AWS_ACCESS_KEY_ID) and "
                                          "storage.s3.secret_key_env (AWS_SECRET_ACCESS_KEY)")
    assert config.storage.s3 == expected
    assert config.index == IndexConfig(
        backend="postgres", postgres_dsn="postgresql://sigil@db.internal:5432/sigil",
        dsn_source="index.postgres.dsn_env (SIGIL_PG_DSN)")
    assert config.server.peer_listen is None


def test_s3_keys() -> None:
    config = build_config({**s3(endpoint="http://127.0.0.1:8333/", region="eu-west-1",
                                prefix="mirror", create_bucket=True, redirect=True,
                                redirect_expiry="90s", part_size="16MiB", max_attempts=7,
                                upload_concurrency=4,
                                abandoned_after="2h"),
                           "server": {"peer_listen": "127.0.0.1:5001"}}, env=ENV)
    settings = config.storage.s3
    assert settings is not None
    assert settings.endpoint == "http://127.0.0.1:8333"
    assert (settings.region, settings.prefix) == ("eu-west-1", "mirror/")
    assert settings.create_bucket and settings.redirect
    assert settings.redirect_expiry == 90 and settings.abandoned_after == 7200
    assert settings.part_size == 16 * 1024 * 1024 and settings.max_attempts == 7
    assert settings.upload_concurrency == 4
    assert config.server.peer_listen == ("127.0.0.1", 5001)


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("AKFROMFILE\n")
    (tmp_path / "sk").write_text(SECRET + "\n")
    config = build_config(s3(access_key_file=str(tmp_path / "ak"),
                             secret_key_file=str(tmp_path / "sk")), env={})
    settings = config.storage.s3
    assert settings is not None
    assert (settings.access_key, settings.secret_key) == ("AKFROMFILE", SECRET)
    assert "storage.s3.secret_key_file" in settings.credential_source
    assert SECRET not in repr(settings) and SECRET not in repr(config)
    pg = build_config({"index": {"backend": "postgres",
                                 "postgres": {"dsn": f"postgresql://u:{SECRET}@h/db"}}}, env={})
    assert pg.index.postgres_dsn is not None and SECRET in pg.index.postgres_dsn
    assert SECRET not in repr(pg.index) and SECRET not in repr(pg)


def test_default_credential_chain_when_both_env_keys_are_null() -> None:
    config = build_config(s3(access_key_env=None, secret_key_env=None), env={})
    assert config.storage.s3 is not None
    assert config.storage.s3.access_key is None and config.storage.s3.secret_key is None
    assert config.storage.s3.credential_source == "the default AWS credential chain"


@pytest.mark.parametrize(("data", "env", "key", "problem"), [
    ({"storage": {"backend": "nfs"}}, {}, "storage.backend", "expected filesystem or s3"),
    ({"storage": {"backend": "s3"}}, {}, "storage.s3", "storage.s3 is missing"),
    (s3(bucket="No_Such"), ENV, "storage.s3.bucket", "invalid bucket name"),
    (s3(endpoint="ftp://x"), ENV, "storage.s3.endpoint", "expected an http(s) URL"),
    (s3(prefix="/abs"), ENV, "storage.s3.prefix", "relative key prefix"),
    (s3(), {"AWS_ACCESS_KEY_ID": "x"}, "storage.s3.secret_key_env",
     "environment variable AWS_SECRET_ACCESS_KEY is not set"),
    (s3(access_key_file="/nonexistent/ak"), ENV, "storage.s3.access_key_file", "cannot read"),
    (s3(access_key_env=None), ENV, "storage.s3", "both be given or both be null"),
    (s3(part_size="1MiB"), ENV, "storage.s3.part_size", "expected an integer from"),
    (s3(max_attempts=0), ENV, "storage.s3.max_attempts", "expected an integer from 1 to 20"),
    (s3(colour="red"), ENV, "storage.s3", "unknown key 'colour'"),
    ({"index": {"backend": "mysql"}}, {}, "index.backend", "expected sqlite or postgres"),
    ({"index": {"backend": "postgres"}}, {}, "index.postgres.dsn_env",
     "environment variable SIGIL_PG_DSN is not set"),
    ({"index": {"backend": "postgres", "postgres": {"dsn": f"mysql://u:{SECRET}@h/db"}}}, {},
     "index.postgres.dsn", "expected a postgresql://"),
    ({"index": {"backend": "postgres"}}, {"SIGIL_PG_DSN": f"host=h password={SECRET}"},
     "index.postgres.dsn_env", "expected a postgresql://"),
    ({"index": {"postgres": {"port": 1}}}, {}, "index.postgres", "unknown key 'port'"),
    ({"server": {"peer_listen": "nowhere"}}, {}, "server.peer_listen", "expected host:port"),
])
def test_bad_fleet_config_names_file_key_and_problem(
        data: dict[str, Any], env: dict[str, str], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(data, source="/etc/sigil/sigil.yaml", env=env)
    message = str(caught.value)
    assert message.startswith(f"/etc/sigil/sigil.yaml: {key}: "), message
    assert problem in message
    assert SECRET not in message


def test_env_overrides_select_backends() -> None:
    config = build_config({"storage": {"s3": {"bucket": "from-file"}}},
                          env={**ENV, "SIGIL_STORAGE_BACKEND": "s3",
                               "SIGIL_SERVER_PEER_LISTEN": "0.0.0.0:5001"})
    assert config.storage.backend == "s3"
    assert config.storage.s3 is not None and config.storage.s3.bucket == "from-file"
    assert config.server.peer_listen == ("0.0.0.0", 5001)


def test_peer_endpoint_needs_a_secret_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"server": {"peer_listen": "127.0.0.1:5001"}}, env={})
    assert "server.peer_secret_env" in str(info.value)
    assert "SIGIL_PEER_SECRET" in str(info.value)
    secret_file = tmp_path / "peer"
    secret_file.write_text("from-a-file-and-secret\n")
    config = build_config({"server": {"peer_listen": "127.0.0.1:5001",
                                      "peer_advertise": "10.0.0.7:5001",
                                      "peer_secret_file": str(secret_file)}}, env={})
    assert config.server.peer_secret == "from-a-file-and-secret"
    assert config.server.peer_advertise == ("10.0.0.7", 5001)
    assert "from-a-file-and-secret" not in repr(config)
    # No peer endpoint: the secret is not required (nor read).
    assert build_config({}, env={}).server.peer_secret is None
