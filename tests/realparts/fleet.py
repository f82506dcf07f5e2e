"""pytest fixtures for the fleet backends' real servers; ``tests/conftest.py`` re-exports them.

- ``seaweed_s3`` (session): one :class:`SeaweedS3` for the run.
- ``real_postgres`` (session): one :class:`RealPostgres` for the run.
- ``s3_config`` (function): an :class:`~sigil.config.S3Config` on ``seaweed_s3`` with a key
  prefix unique to the test (one shared bucket), so tests never see each other's objects.
- ``pg_dsn`` (function): the DSN of a new, empty database unique to the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sigil.config import S3Config

from .postgres import RealPostgres
from .seaweed import SeaweedS3

TEST_BUCKET = "sigil-tests"


@pytest.fixture(scope="session")
def seaweed_s3() -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 gateway on loopback for the whole session."""
    with SeaweedS3() as server:
        yield server
        if not server.running:
            pytest.fail(f"seaweedfs died during the session; see {server.log_path}")


@pytest.fixture(scope="session")
def real_postgres() -> Iterator[RealPostgres]:
    """A real PostgreSQL server on loopback for the whole session."""
    with RealPostgres() as server:
        yield server


def s3_config_for(server: SeaweedS3, prefix: str, **overrides: object) -> S3Config:
    """Settings for ``server``'s test bucket under ``prefix`` (overrides: other fields)."""
    fields: dict[str, object] = {
        "bucket": TEST_BUCKET, "endpoint": server.endpoint, "prefix": prefix,
        "access_key": server.access_key, "secret_key": server.secret_key,
        "credential_source": "storage.s3.access_key_env (TEST_S3_ACCESS) and "
                             "storage.s3.secret_key_env (TEST_S3_SECRET)",
        "create_bucket": True, "max_attempts": 3, "part_size": 5 * 1024 * 1024}
    fields.update(overrides)
    return S3Config(**fields)  # type: ignore[arg-type]


@pytest.fixture
def s3_config(seaweed_s3: SeaweedS3) -> S3Config:
    """S3 settings with a key prefix unique to this test."""
    return s3_config_for(seaweed_s3, f"t-{os.urandom(6).hex()}/")


@pytest.fixture
def pg_dsn(real_postgres: RealPostgres) -> Iterator[str]:
    """A fresh database on ``real_postgres``, dropped after the test. (Synchronous, through
    ``psql``, so that async fixtures may request it with ``getfixturevalue``.)"""
    name = f"t_{os.urandom(6).hex()}"
    real_postgres.psql(f"CREATE DATABASE {name}")
    yield real_postgres.dsn(name)
    if real_postgres.running:
        real_postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
