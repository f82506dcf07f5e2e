"""TEST-ONLY STAND-IN, to be deleted when the ``peer`` branch is merged.

Put on ``PYTHONPATH`` of a ``sigil serve`` process, this makes ``sigil.server.peer`` and
``sigil.upstream.peer`` importable from the minimal stand-ins beside it *only if* the real
modules are absent: the finder is appended to ``sys.meta_path``, so the regular path finder,
which finds the real modules once they exist, always wins.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
_STANDINS = {"sigil.server.peer": _HERE / "standin_peer_server.py",
             "sigil.upstream.peer": _HERE / "standin_peer_client.py"}


class _StandinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        location = _STANDINS.get(fullname)
        if location is None:
            return None
        return importlib.util.spec_from_file_location(fullname, location)


sys.meta_path.append(_StandinFinder())
