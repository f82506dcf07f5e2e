"""The bench machinery on tiny blobs: every scenario runs end to end, and the counts are right.

Asserts counts and correctness only (bodies are checked by sha256), never times: this machine
is shared and the sizes are far too small for times to mean anything.
"""

from __future__ import annotations

import pytest

from bench.run import run
from bench.scenarios import SMOKE

pytestmark = [
    pytest.mark.realparts,
    pytest.mark.timeout(90),
]


def test_bench_scenarios_on_tiny_blobs() -> None:
    text, bench = run(SMOKE, log=lambda _line: None)
    raw = bench.raw

    # 5 concurrent cold clients of one blob: sigil fetched it from the upstream exactly once
    # per run. (distribution fetches once per client plus once to store, but a 1 MiB blob is
    # often stored before the last clients ask, so only "at least once" holds for it here.)
    assert SMOKE.clients == 5
    assert raw["herd"]["upstream_gets"]["sigil"] == [1] * SMOKE.conc_runs
    assert all(n >= 1 for n in raw["herd"]["upstream_gets"]["dist"])
    assert raw["herd_wan"]["upstream_gets"]["sigil"] == [1] * SMOKE.wan_runs
    # The same herd over `--workers 2`: still one upstream GET per run (the fetch lease).
    assert raw["herd_workers"]["upstream_gets"] == [1] * SMOKE.conc_runs
    assert len(raw["herd_wan"]["single_wall_s"]["dist"]) == SMOKE.wan_runs
    # One cold pull: one upstream GET for sigil; warm pulls: none at all.
    assert raw["cold"]["upstream_gets"]["sigil"] == [1] * SMOKE.cold_runs
    assert raw["warm"]["upstream_gets"] == 0
    # Warm HEAD by tag within tag_ttl never reaches the upstream, and both workers ran.
    assert raw["head"]["upstream_requests_from_sigil"] == 0
    assert raw["head"]["w2_workers_alive"] == 2
    # Every run produced its numbers.
    assert len(raw["warm"]["sigil"]) == len(raw["warm"]["dist"]) == SMOKE.warm_runs
    assert len(raw["cold"]["mib_s"]["sigil"]) == SMOKE.cold_runs
    for name in ("plain", "sigil w1", "sigil w2", "sigil w1 log=warning"):
        assert len(raw["head"][name]) == SMOKE.head_runs
        assert all(rate > 0 for rate in raw["head"][name])
    assert len(raw["rss"]["sigil_cold"]) == SMOKE.rss_runs
    assert all(0 < v < 10**9 for v in raw["rss"]["sigil_cold"] + raw["rss"]["sigil_warm"])

    keys = sorted(row.key for row in bench.rows)
    assert keys == ["0", "0b", "1", "2", "2w", "3a", "3b", "3c", "3d", "3w", "4a", "4b", "4c",
                    "5a", "5b"]
    assert "distribution" in text and "3w" in text
