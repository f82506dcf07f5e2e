"""The Dockerfile and the package build: checked by reading and by running its install step."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*?/healthz", text, re.MULTILINE | re.DOTALL)
    entry = re.search(r'^ENTRYPOINT \["sigil", "serve", "--config", "(/etc/sigil/[^"]+)"\]',
                      text, re.MULTILINE)
    assert entry is not None
    # The config the entrypoint names is what `COPY config/ /etc/sigil/` puts there.
    assert "COPY config/ /etc/sigil/" in text
    assert (REPO / "config" / Path(entry.group(1)).name).is_file()


def test_package_builds_with_entry_point(tmp_path: Path) -> None:
    """The Dockerfile's `pip install .` step: build the wheel the same way and inspect it."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    wheels = list(tmp_path.glob("sigil-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        assert "sigil/cli.py" in names and "sigil/server/app.py" in names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "sigil = sigil.cli:main" in wheel.read(entry_points).decode()
