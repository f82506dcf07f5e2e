"""pytest fixtures for the real parts; ``tests/conftest.py`` re-exports them.

- ``real_registry`` (session): one :class:`RealRegistry` for the whole run. Tests share it,
  so each test pushes under its own repository name (``unique_repo``).
- ``registry_factory`` (function): starts more registries, e.g. distribution in proxy mode
  (``registry_factory(proxy_remote_url=real_registry.url)``); all stopped at teardown.
- ``registry_pusher`` (function, async): an open :class:`RegistryPusher` on ``real_registry``.
- ``unique_repo`` (function): a repository name unique to the test, like ``t/test-name-1a2b3c``.
- ``containerd_daemon`` (session): one private :class:`Containerd` (root only).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from .clients import Containerd
from .images import RegistryPusher
from .registry import RealRegistry


@pytest.fixture(scope="session")
def real_registry() -> Iterator[RealRegistry]:
    """A real distribution registry on loopback for the whole session."""
    with RealRegistry() as registry:
        yield registry
        if not registry.running:
            pytest.fail(f"{registry} died during the session; see {registry.log_path}")


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., RealRegistry]]:
    """Start extra registries (``RealRegistry`` keyword arguments); stopped at teardown."""
    started: list[RealRegistry] = []

    def start(**kwargs: Any) -> RealRegistry:
        registry = RealRegistry(**kwargs).start()
        started.append(registry)
        return registry

    try:
        yield start
    finally:
        for registry in reversed(started):
            registry.stop()


@pytest.fixture
async def registry_pusher(real_registry: RealRegistry) -> AsyncIterator[RegistryPusher]:
    """A :class:`RegistryPusher` for ``real_registry``, closed after the test."""
    async with RegistryPusher(real_registry.url) as pusher:
        yield pusher


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A valid repository name unique to this test (two path components)."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"t/{name or 'test'}-{os.urandom(3).hex()}"


@pytest.fixture(scope="session")
def containerd_daemon() -> Iterator[Containerd]:
    """A private containerd daemon for the session (needs root)."""
    with Containerd() as daemon:
        yield daemon
