"""Dashboards and alerts proven against real parts: promtool checks the rules (and their unit
tests) and sigil's metrics, and a real Prometheus scrapes a real sigil that served pulls and
denials; every PromQL expression of the Grafana dashboard and of the rules is evaluated
through that Prometheus's HTTP API, and the key panels must show the traffic."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sigil import __version__, metrics
from tests.realparts import DEAD_URL, ProcessError, RealRegistry, RegistryPusher, skopeo_copy
from tests.support.e2e import http_get
from tests.support.prometheus import PROMTOOL_BINARY, Prometheus, value
from tests.support.sigilproc import SigilProcess
from tests.test_e2e_verify import UPSTREAM, key_policy_doc, sig_layer
from tests.test_verify_support import Signer

pytestmark = pytest.mark.realparts

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "sigil-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "sigil-rules.test.yaml"
SAMPLE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sigil.json"
OPERATIONS = ROOT / "docs" / "operations.md"
MAX_BYTES = 3 * 1024**3
DEAD_UPSTREAM = "dead.test"  # configured at a loopback port where nothing listens
# $__rate_interval stands for "a few scrapes" in Grafana; 5m keeps this run's traffic inside
# the window however long the other tests of the module take.
RATE_INTERVAL = "5m"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run promtool, bounded."""
    return subprocess.run([PROMTOOL_BINARY, *args], input=stdin, capture_output=True,
                          timeout=120, cwd=RULES.parent)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel(title: str) -> dict[str, Any]:
    (found,) = [p for p in panels() if p["title"] == title]
    return found


def substitute(expr: str, instance: str) -> str:
    """A dashboard expression as Grafana sends it, for one instance and all upstreams. Grafana
    regex-escapes a variable's value inside a PromQL string literal, so each backslash is
    written twice."""
    escaped = re.escape(instance).replace("\\", "\\\\")
    out = (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "15s")
           .replace("$__range", "1h").replace("$instance", escaped)
           .replace("$upstream", ".*"))
    assert "$" not in out, out
    return out


# --- promtool on the files -------------------------------------------------------------------

def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found".encode() in done.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"SUCCESS" in done.stdout
    # Each alert has a case where it fires and one where it must stay silent.
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names == firing == silent


def test_sample_prometheus_config_is_valid() -> None:
    done = promtool("check", "config", str(SAMPLE_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(SAMPLE_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["sigil"]


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rules) gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_annotations_and_a_runbook_section() -> None:
    anchors = {_slug(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines()
               if line.startswith("#")}
    for rule in alerts():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


# --- metric names ------------------------------------------------------------------------

def _defined_metrics() -> list[Counter | Gauge | Histogram]:
    return [m for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram)]


def _exposition_of_every_metric() -> bytes:
    """Every metric of sigil.metrics with one sample of each label set, in a registry of its
    own (the shared one only shows labelled metrics once something used them)."""
    registry = CollectorRegistry()
    for metric in _defined_metrics():
        kind = type(metric)
        args: dict[str, Any] = {"labelnames": metric._labelnames, "registry": registry}
        if isinstance(metric, Histogram):
            args["buckets"] = metric._upper_bounds
        copy = kind(metric._name, metric._documentation, **args)
        child = copy.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else copy
        if isinstance(child, Histogram):
            child.observe(1)
        else:
            child.inc()
    return generate_latest(registry)


def test_every_metric_passes_promtool_check_metrics() -> None:
    text = _exposition_of_every_metric()
    assert text.count(b"# TYPE") >= len(_defined_metrics())
    done = promtool("check", "metrics", stdin=text)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)


def _metrics_table() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) from the metrics table of docs/operations.md."""
    table: dict[str, tuple[str, set[str]]] = {}
    for line in OPERATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`sigil_"):
            continue
        labels = re.sub(r"\([^)]*\)", "", cells[2])
        table[cells[0].strip("`")] = (cells[1], {n.strip().strip("`") for n in
                                                 labels.split(",") if n.strip()})
    return table


def test_docs_table_lists_every_metric_with_its_type_and_labels() -> None:
    table = _metrics_table()
    exported = {}
    for metric in _defined_metrics():
        kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[type(metric)]
        name = metric._name + ("_total" if kind == "counter" else "")
        exported[name] = (kind, set(metric._labelnames))
    missing = sorted(set(exported) - set(table))
    assert not missing, f"metrics missing from docs/operations.md: {missing}"
    stale = sorted(set(table) - set(exported))
    assert not stale, f"docs/operations.md lists metrics that do not exist: {stale}"
    for name, (kind, labels) in exported.items():
        assert table[name] == (kind, labels), name


# --- a real Prometheus scraping a real sigil -----------------------------------------------

@dataclass
class Observed:
    """A sigil that served pulls and denials, and a Prometheus that scraped it meanwhile."""

    sigil: SigilProcess
    prometheus: Prometheus
    scrape: bytes  # sigil's /metrics after the traffic

    @property
    def instance(self) -> str:
        return self.sigil.host


async def _traffic(registry: RealRegistry, sigil: SigilProcess, prometheus: Prometheus,
                   signer: Signer, workdir: Path) -> None:
    """Two rounds of pulls (signed: allowed) and denials (unsigned), with a scrape between
    them, so every counter has moved between two samples and rate() is above zero."""
    repo = f"t/observability-{int(time.time() * 1000) % 10**8}"
    async with RegistryPusher(registry.url) as pusher:
        images = {}
        for tag in ("signed-1", "signed-2", "unsigned-1", "unsigned-2"):
            images[tag] = await pusher.make_image(repo, tag)
        for tag in ("signed-1", "signed-2"):
            await pusher.push_cosign_signatures(
                repo, images[tag].digest, [sig_layer(signer, images[tag].digest)])

    async def round_of(n: int) -> None:
        pulled = await skopeo_copy(f"{sigil.host}/{repo}:signed-{n}", workdir / f"pull-{n}")
        assert pulled.digest == images[f"signed-{n}"].digest
        # Pulled again: manifest, config and layers come from the store.
        await skopeo_copy(f"{sigil.host}/{repo}:signed-1", workdir / f"again-{n}")
        with pytest.raises(ProcessError, match=r"(?i)denied"):
            await skopeo_copy(f"{sigil.host}/{repo}:unsigned-{n}", workdir / f"denied-{n}")
        # An upstream where nothing listens: a connection error, answered 502/503.
        status, _ = await asyncio.to_thread(
            http_get, f"{sigil.url}/v2/{DEAD_UPSTREAM}/t/gone/manifests/v{n}")
        assert status in (502, 503), status

    await round_of(1)
    seen = f'sigil_verifications_total{{instance="{sigil.host}", result="denied"}}'
    await asyncio.to_thread(prometheus.wait_for, seen, bool, timeout=30,
                            what="the first denial scraped")
    await round_of(2)


@pytest.fixture(scope="module")
def observed(real_registry: RealRegistry, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("observability")
    signer = Signer("p256")
    key_file = workdir / "release.pub"
    key_file.write_text(signer.pem())
    sigil = SigilProcess(workdir / "sigil",
                         [{"name": UPSTREAM, "url": real_registry.url, "default": True},
                          {"name": DEAD_UPSTREAM, "url": DEAD_URL, "retries": 0}],
                         key_policy_doc(key_file),
                         extra={"storage": {"root": str(workdir / "sigil" / "store"),
                                            "max_bytes": MAX_BYTES}})
    with sigil, Prometheus(workdir / "prometheus", [sigil.host],
                           rule_files=[RULES]) as prometheus:
        prometheus.wait_for(f'up{{instance="{sigil.host}"}} == 1', bool, timeout=30,
                            what="first scrape")
        asyncio.run(_traffic(real_registry, sigil, prometheus, signer, workdir))
        # A scrape that started after the traffic ended has everything.
        ended = time.time()
        prometheus.wait_for(f'timestamp(up{{instance="{sigil.host}"}}) > {ended:.3f}', bool,
                            timeout=30, what="a scrape after the traffic")
        # The first gc pass (5 s after start) sets the store and gc gauges.
        prometheus.wait_for(f'sigil_gc_last_success_timestamp_seconds{{instance="{sigil.host}"}}'
                            " > 0", bool, timeout=60, what="first gc pass scraped")
        with urllib.request.urlopen(f"{sigil.url}/metrics", timeout=10) as response:
            scrape = response.read()
        yield Observed(sigil, prometheus, scrape)


def test_live_scrape_passes_promtool_check_metrics(observed: Observed) -> None:
    done = promtool("check", "metrics", stdin=observed.scrape)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(observed.scrape.decode())
               for s in family.samples}

    def labelled(name: str, **labels: str) -> list[float]:
        return [v for (n, got), v in samples.items()
                if n == name and labels.items() <= dict(got).items()]

    # The scrape is the one after the traffic: decisions of both kinds, bytes of both sources.
    assert sum(labelled("sigil_verifications_total", result="denied")) == 2
    assert sum(labelled("sigil_verifications_total", result="allowed")) == 2
    assert labelled("sigil_bytes_served_total", source="cache")[0] > 0
    assert labelled("sigil_bytes_served_total", source="upstream")[0] > 0
    assert labelled("sigil_build_info", version=__version__) == [1.0]
    assert labelled("sigil_store_max_bytes") == [MAX_BYTES]
    assert labelled("sigil_gc_duration_seconds_count")[0] >= 1


def test_dashboard_model() -> None:
    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "upstream"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for target in p["targets"]:
            if "sigil_" in target["expr"]:  # every sigil series is filtered by $instance
                assert '$instance"' in target["expr"], (p["title"], target["expr"])
    titles = {p["title"] for p in panels()}
    required = {"Request rate by route and status", "Errors by route and status",
                "Latency percentiles", "Cache hit ratio by kind", "Bytes served by source",
                "Upstream requests by status", "Upstream errors by reason", "Upstream latency",
                "Docker Hub rate limit remaining", "Verification results by policy and reason",
                "Denials", "Stale serves", "In-flight downloads and coalesced waiters",
                "Store bytes vs max_bytes", "Evictions", "gc duration"}
    assert required <= titles, required - titles


def test_every_dashboard_query_evaluates(observed: Observed) -> None:
    queries = [t["expr"] for p in panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # label_values(selector, label) is Grafana's; the same selector as PromQL.
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        queries.append(f"group by ({match[2]}) ({match[1]})")
    for expr in queries:
        observed.prometheus.query(substitute(expr, observed.instance))  # raises on an error
    instances = observed.prometheus.query(
        substitute("group by (instance) (sigil_build_info)", observed.instance))
    assert [s["metric"]["instance"] for s in instances] == [observed.instance]


def _series(observed: Observed, title: str) -> list[dict[str, Any]]:
    found = []
    for target in panel(title)["targets"]:
        found += observed.prometheus.query(substitute(target["expr"], observed.instance))
    return found


def _positive(series: list[dict[str, Any]], **labels: str) -> bool:
    return any(value(s) > 0 and all(s["metric"].get(k) == v for k, v in labels.items())
               for s in series)


def test_key_panels_show_the_traffic(observed: Observed) -> None:
    requests = _series(observed, "Request rate by route and status")
    assert _positive(requests, route="manifests", status="200")
    assert _positive(requests, route="manifests", status="403")
    assert _positive(requests, route="blobs", status="200")
    assert _positive(_series(observed, "Cache hits and misses"), kind="blob", result="hit")
    hit_ratio = _series(observed, "Cache hit ratio by kind")
    assert {s["metric"]["kind"] for s in hit_ratio} >= {"tag", "blob"}  # pulls by tag
    assert all(0 <= value(s) <= 1 for s in hit_ratio)
    served = _series(observed, "Bytes served by source")
    assert _positive(served, source="cache") and _positive(served, source="upstream")
    decisions = _series(observed, "Verification results by policy and reason")
    assert _positive(decisions, policy="signed-images", result="allowed", reason="ok")
    assert _positive(decisions, policy="signed-images", result="denied", reason="no_signature")
    assert _positive(_series(observed, "Denials"), policy="signed-images")
    assert _positive(_series(observed, "Upstream requests by status"), upstream=UPSTREAM)
    assert _positive(_series(observed, "Upstream requests by status"), upstream=DEAD_UPSTREAM,
                     status="error")
    assert _positive(_series(observed, "Upstream errors by reason"), upstream=DEAD_UPSTREAM,
                     reason="connect")
    errors = _series(observed, "Errors by route and status")
    assert any(value(s) > 0 and s["metric"]["route"] == "manifests"
               and s["metric"]["status"] in ("502", "503") for s in errors), errors
    store = _series(observed, "Store bytes vs max_bytes")
    assert sorted(value(s) for s in store)[-1] == MAX_BYTES
    assert 0 < sorted(value(s) for s in store)[0] < MAX_BYTES
    assert _series(observed, "gc duration")  # the first pass ran and was timed


def test_every_rule_expression_evaluates(observed: Observed) -> None:
    for rule in rules():
        observed.prometheus.query(rule["expr"])  # raises on an error
    # Prometheus loaded the same file and evaluates it every second: every rule healthy.
    expected = {rule.get("record") or rule.get("alert") for rule in rules()}

    def evaluated() -> list[dict[str, Any]]:
        groups = observed.prometheus.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    deadline = time.monotonic() + 30
    while any(r["lastEvaluation"].startswith("0001") for r in evaluated()):
        assert time.monotonic() < deadline, "rules not evaluated within 30s"
        time.sleep(0.25)
    loaded = evaluated()
    assert {r["name"] for r in loaded} == expected
    assert all(r["health"] == "ok" for r in loaded), [r for r in loaded if r["health"] != "ok"]
    # Recorded series appear with the first evaluation after the scrapes they need.
    usage = observed.prometheus.wait_for(
        f'sigil:store_usage:ratio{{instance="{observed.instance}"}}', bool, timeout=30,
        what="store usage recorded")
    assert len(usage) == 1 and 0 < value(usage[0]) < 1
    denied = observed.prometheus.wait_for(
        f'sigil:verifications_denied:ratio_rate5m{{instance="{observed.instance}"}}', bool,
        timeout=30, what="denied ratio recorded")
    assert [s["metric"]["policy"] for s in denied] == ["signed-images"]
    assert 0 < value(denied[0]) < 1  # two denied of four decisions
    failing = observed.prometheus.wait_for(
        f'sigil:upstream_errors:ratio_rate5m{{instance="{observed.instance}"}}',
        lambda result: len(result) == 2, timeout=30, what="upstream error ratios recorded")
    ratios = {s["metric"]["upstream"]: value(s) for s in failing}
    assert ratios[DEAD_UPSTREAM] == 1 and ratios[UPSTREAM] == 0


def test_a_failing_gc_pass_in_the_server_is_counted(tmp_path: Path,
                                                    real_registry: RealRegistry) -> None:
    """The server's maintenance task counts a gc pass that raises (here: the store's blobs/
    directory vanished) and keeps serving; the last-success gauge stays unset."""
    sigil = SigilProcess(tmp_path / "sigil", [{"name": UPSTREAM, "url": real_registry.url,
                                               "default": True}])
    with sigil:
        for path in (sigil.store / "blobs").iterdir():
            path.rmdir()  # nothing was pulled: only empty fan-out directories, if any
        (sigil.store / "blobs").rmdir()
        deadline = time.monotonic() + 60  # the first pass runs 5 s after start
        while sigil.metric("sigil_gc_failures_total") < 1:
            assert time.monotonic() < deadline, sigil.logs()
            time.sleep(0.2)
        assert sigil.metric("sigil_gc_last_success_timestamp_seconds") == 0
        assert sigil.metric("sigil_gc_duration_seconds_count") >= 1
        assert http_get(f"{sigil.url}/v2/")[0] == 200
    assert any(e.get("event") == "gc.failed" for e in sigil.log_events())
