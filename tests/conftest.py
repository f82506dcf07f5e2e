"""Shared pytest fixtures (fixtures only; keep it small)."""

from tests.realparts.fixtures import (  # noqa: F401 - fixtures are found by name
    containerd_daemon,
    real_registry,
    registry_factory,
    registry_pusher,
    unique_repo,
)
from tests.realparts.fleet import (  # noqa: F401 - fixtures are found by name
    pg_dsn,
    real_postgres,
    s3_config,
    seaweed_s3,
)
