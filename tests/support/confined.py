"""Run a process the way a hardened container runs it: read-only root, non-root user.

No container runtime can run here, so the two properties the deploy kit promises
(``readOnlyRootFilesystem`` with writes only to named volumes, and a non-root user) are
reproduced with kernel primitives: a private mount namespace (``unshare --mount``) in which
every mount is remounted read-only, then only the given directories are bind-mounted writable,
and the command runs under ``setpriv`` as the given uid/gid with no supplementary groups.
Needs root (to create the namespace); the mounts vanish with the process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# Kernel file systems stay as they are: /proc, /sys and /dev are not the image's root.
_KERNEL_MOUNTS = r"^/(proc|sys|dev)(/|$)"


def confined_argv(argv: Sequence[str], *, uid: int, gid: int,
                  writable: Sequence[Path]) -> list[str]:
    """``argv`` wrapped to run as ``uid:gid`` with everything read-only except ``writable``."""
    script = [
        # Every mount point visible now becomes read-only (the namespace's own copy of it).
        "for m in $(awk '{print $5}' /proc/self/mountinfo | grep -vE '" + _KERNEL_MOUNTS + "');"
        ' do mount -o remount,bind,ro "$m" || exit 97; done',
    ]
    for path in writable:
        quoted = shlex.quote(str(path))
        script.append(f"mount --bind {quoted} {quoted} && mount -o remount,bind,rw {quoted}"
                      " || exit 98")
    script.append(f"exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "
                  + shlex.join(argv))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            "; ".join(script)]


def start_confined(argv: Sequence[str], *, uid: int, gid: int, writable: Sequence[Path],
                   env: Mapping[str, str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` confined (see :func:`confined_argv`), output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(confined_argv(argv, uid=uid, gid=gid, writable=writable),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=str(cwd), start_new_session=True)


def run_confined(argv: Sequence[str], *, uid: int, gid: int, writable: Sequence[Path],
                 env: Mapping[str, str], cwd: Path, timeout: float = 60.0
                 ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` confined to completion (killed after ``timeout`` seconds)."""
    return subprocess.run(confined_argv(argv, uid=uid, gid=gid, writable=writable),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=dict(env), cwd=str(cwd), timeout=timeout, check=False)


@contextmanager
def world_readable_tempdir(prefix: str) -> Iterator[Path]:
    """A temp dir that a non-root uid can traverse (pytest's ``tmp_path`` is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
