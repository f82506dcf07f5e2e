"""Real parts for integration tests and benchmarks: a real registry, image pushing, real clients.

- :mod:`.registry`: :class:`RealRegistry`, Debian ``docker-registry`` (distribution 2.8) on
  loopback, plain or as a pull-through cache (``proxy_remote_url``).
- :mod:`.images`: build images, indexes, signatures and referrers; push them over HTTP.
- :mod:`.clients`: ``skopeo``, containerd's ``ctr`` and ``podman``, isolated and bounded.
- :mod:`.fixtures`: pytest fixtures (re-exported by ``tests/conftest.py``).

Import it as ``tests.realparts`` (like ``tests.support``), which needs the repository root on
``sys.path``: ``python3 -m pytest`` from the root puts it there; scripts in ``bench/`` run as
``python3 -m bench.<name>`` from the root, or add the root to ``sys.path``.
"""

from ._process import DEAD_PORT, DEAD_URL, CommandResult, ProcessError, free_port
from .clients import (
    Containerd,
    CopyResult,
    CtrImage,
    Podman,
    PodmanImage,
    podman_pull,
    registries_conf_mirror,
    shipped_client_config,
    skopeo,
    skopeo_copy,
    skopeo_inspect_raw,
    write_hosts_dir,
)
from .images import Layer, MultiPlatform, Pushed, PushError, RegistryPusher
from .registry import LoggedRequest, RealRegistry

__all__ = [
    "DEAD_PORT",
    "DEAD_URL",
    "CommandResult",
    "Containerd",
    "CopyResult",
    "CtrImage",
    "Layer",
    "LoggedRequest",
    "MultiPlatform",
    "Podman",
    "PodmanImage",
    "ProcessError",
    "PushError",
    "Pushed",
    "RealRegistry",
    "RegistryPusher",
    "free_port",
    "podman_pull",
    "registries_conf_mirror",
    "shipped_client_config",
    "skopeo",
    "skopeo_copy",
    "skopeo_inspect_raw",
    "write_hosts_dir",
]
