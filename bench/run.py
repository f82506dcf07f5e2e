"""``python3 -m bench.run [--quick] [--only 1,3] [--no-profile]``: sigil vs distribution.

Prints the table (and saves it, with the raw numbers, under ``bench/results/``, which git
ignores). See ``bench/README.md`` for what each scenario does and what limits each number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from .scenarios import FULL, QUICK, RESULTS, SCENARIOS, Bench, Params, Row, with_profile

TOOLS = ("docker-registry", "curl", "ab")


def _load(meta: dict[str, object], when: str) -> str:
    value = meta.get(f"loadavg_at_{when}")
    return " ".join(map(str, value)) if isinstance(value, list) else "?"


def table(rows: Sequence[Row], meta: dict[str, object]) -> str:
    """The results as fixed-width text."""
    head = ("#", "scenario", "sigil", "distribution", "ratio", "target", "")
    rows = sorted(rows, key=lambda r: r.key)  # scenario order, whatever order they ran in
    cells = [head] + [(r.key, r.what, r.sigil, r.dist, r.ratio, r.target, r.verdict)
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [
        f"sigil bench, {meta.get('mode')} mode, {meta.get('date')}; {meta.get('cpus')} cores "
        f"({meta.get('cpu')}), load average at start {_load(meta, 'start')}, at end "
        f"{_load(meta, 'end')}, {meta.get('seconds')}s",
        f"sigil {meta.get('commit')}, Python {meta.get('python')}, aiohttp {meta.get('aiohttp')}"
        f"; {meta.get('distribution')}; clients: {meta.get('curl')}, ApacheBench",
        "values: median (min..max) over the runs; ratio = sigil / distribution of medians",
        "",
    ]
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [(r.key, r.note) for r in rows if r.note]
    if notes:
        lines.append("")
        for key, note in notes:
            lines += textwrap.wrap(note, 100, initial_indent=f"{key:>3}: ",
                                   subsequent_indent="     ")
    return "\n".join(lines)


def run(params: Params, only: Sequence[str] | None = None, *,
        log: object = None) -> tuple[str, Bench]:
    """Run the bench and return (table text, the finished Bench)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (apt-get install -y "
                         "docker-registry curl apache2-utils)")
    workdir = Path(tempfile.mkdtemp(prefix="sigil-bench-data-"))
    logger = log if callable(log) else (lambda text: print(text, file=sys.stderr, flush=True))
    bench = Bench(params, workdir, log=logger)
    started = time.monotonic()
    try:
        bench.setup()
        for key in sorted(SCENARIOS):
            if only and key not in only:
                continue
            t0 = time.monotonic()
            SCENARIOS[key](bench)
            logger(f"  scenario {key} took {time.monotonic() - t0:.0f}s")
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    bench.raw["meta"]["seconds"] = round(time.monotonic() - started)
    bench.raw["meta"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return table(bench.rows, bench.raw["meta"]), bench


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="64 MiB / 256 MiB blobs and fewer runs (about a minute)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenario numbers, e.g. 0,1,4 (0 = client ceiling)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the py-spy profiles of the full mode")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.no_profile:
        params = with_profile(params, False)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    text, bench = run(params, only)
    print(text)
    for key in ("herd", "head"):
        lines = bench.raw.get(key, {}).get("profile")
        if lines:
            print(f"\nprofile ({key}):\n" + "\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.txt").write_text(text + "\n")
    raw = {k: v for k, v in bench.raw.items() if not k.startswith("_")}
    (RESULTS / "latest.json").write_text(json.dumps(raw, indent=2, default=str))
    print(f"\n(saved to {RESULTS / 'latest.txt'} and latest.json; "
          f"{bench.raw['meta']['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
