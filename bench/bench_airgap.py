"""Air-gap throughput: ``sigil export`` / ``sigil import`` against skopeo on the same images.

Set-up (all on loopback, one run): a plain ``docker-registry`` upstream seeded with one-layer
OCI images of random bytes (``bench.harness.seed_upstream``: streamed from disk, never held
in memory), each signed with a cosign ``.sig`` (ECDSA P-256) so that sigil's policy engine
really verifies every image; skopeo verifies nothing.

Measured, alternating sigil and skopeo runs, medians of ``--runs``:

* export, cold: ``sigil export --output OUT.tar`` with an empty working store (every blob
  fetched, hashed, verified, written into the tar) vs ``skopeo sync --all --src yaml
  --dest dir`` of the same images into a fresh directory;
* export, warm: the same ``sigil export`` with the working store kept from a previous run
  (``--keep-work``: nothing fetched, the tar written from the store);
* import: ``sigil import`` of that tar into a fresh store (every blob hashed, every image
  re-verified offline, loaded) vs ``skopeo copy dir:... docker://`` of the synced directory
  into a fresh ``docker-registry``;
* peak RSS (``VmHWM`` via ``wait4``) of ``sigil export`` of one image with a large layer
  (1 GiB in full mode).

MB/s = image bytes (layers + configs + manifests) / wall time of the command (process start
included, for both tools).

    python3 -m bench.bench_airgap [--quick] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.harness import Image, MiB, Sample, seed_upstream
from sigil.oci.digest import Digest
from tests.realparts import Layer, RealRegistry, RegistryPusher, skopeo
from tests.test_verify_support import SIMPLE, Signer, b64, simple_signing

UPSTREAM = "bench.test"


def sig_layer(signer: Signer, digest: str) -> Layer:
    payload = simple_signing(Digest.parse(digest), reference=UPSTREAM)
    return Layer(payload, SIMPLE, {"dev.cosignproject.cosign/signature":
                                   b64(signer.sign(payload))})


async def sign_all(url: str, images: list[Image], signer: Signer) -> None:
    async with RegistryPusher(url) as pusher:
        for image in images:
            await pusher.push_cosign_signatures(image.repo, image.manifest_digest,
                                                [sig_layer(signer, image.manifest_digest)])


def sigil(*args: str) -> tuple[float, int, subprocess.CompletedProcess[bytes]]:
    """Run ``python -m sigil ARGS``: (wall seconds, 0, result); peak RSS: :func:`rss_of`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sigil", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate(timeout=1800)
    wall = time.perf_counter() - start
    return wall, 0, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rss_of(*args: str) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time of one ``python -m sigil ARGS`` process (wait4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGIL_")}
    start = time.perf_counter()
    pid = os.spawnve(os.P_NOWAIT, sys.executable, [sys.executable, "-m", "sigil", *args],
                     {**env, "PYTHONUNBUFFERED": "1"})
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"sigil {' '.join(args)} failed ({status})")
    return usage.ru_maxrss * 1024, wall


def check(result: subprocess.CompletedProcess[bytes], what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {result.stderr.decode()[-2000:]}")


def image_bytes(images: list[Image]) -> int:
    return sum(i.blob.size for i in images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, fewer runs")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 3)
    layer = (16 if args.quick else 128) * MiB
    count = 4
    big = (128 if args.quick else 1024) * MiB
    with tempfile.TemporaryDirectory(prefix="sigil-bench-airgap-") as tmp, \
            RealRegistry() as upstream:
        work = Path(tmp)
        sizes = {f"img{i}": layer for i in range(count)}
        sizes["big"] = big
        seeded = seed_upstream(upstream, work, sizes)
        images = [seeded[f"img{i}"] for i in range(count)]
        signer = Signer("p256")
        asyncio.run(sign_all(upstream.url, [*images, seeded["big"]], signer))
        for blob in work.glob("*.bin"):
            blob.unlink()   # the registry has them; free the disk
        key = work / "release.pub"
        key.write_text(signer.pem())
        policy = work / "policy.yaml"
        policy.write_text(yaml.safe_dump({"policies": [{
            "name": "signed", "images": [f"{UPSTREAM}/**"],
            "authorities": [{"name": "release", "key": {"path": str(key)}}]}]}))

        def config(name: str, url: str) -> Path:
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump({
                "storage": {"root": str(work / f"{name}-store")}, "policy": str(policy),
                "upstreams": [{"name": UPSTREAM, "url": url, "default": True}],
                "log": {"level": "warning"}}))
            return path

        export_cfg = config("export", upstream.url)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump({"images": [
            {"ref": f"{UPSTREAM}/{i.repo}:{i.tag}"} for i in images]}))
        big_plan = work / "big.yaml"
        big_plan.write_text(yaml.safe_dump({"images": [
            {"ref": f"{UPSTREAM}/{seeded['big'].repo}:latest"}]}))
        sync_src = work / "sync.yaml"
        sync_src.write_text(yaml.safe_dump({upstream.host: {
            "tls-verify": False, "images": {i.repo: [i.tag] for i in images}}}))
        total = image_bytes(images)
        samples: dict[str, Sample] = {k: Sample() for k in (
            "sigil export cold", "skopeo sync", "skopeo sync+sync", "sigil export warm",
            "sigil import", "skopeo copy", "skopeo copy+sync")}
        out = work / "out.tar"
        for run in range(runs):
            order = ["sigil", "skopeo"] if run % 2 == 0 else ["skopeo", "sigil"]
            for system in order:
                # Start every measurement with no dirty pages of an earlier one: on ext4 an
                # fsync also waits for other files' pending data (ordered journal mode).
                if system == "sigil":
                    shutil.rmtree(work / "out.tar.sigil-work", ignore_errors=True)
                    out.unlink(missing_ok=True)
                    os.sync()
                    wall, _, result = sigil("export", "--config", str(export_cfg), "--plan",
                                            str(plan), "--output", str(out), "--keep-work")
                    check(result, "sigil export (cold)")
                    samples["sigil export cold"].add(total / MiB / wall)
                    os.sync()
                    wall, _, result = sigil("export", "--config", str(export_cfg), "--plan",
                                            str(plan), "--output", str(out), "--keep-work")
                    check(result, "sigil export (warm)")
                    samples["sigil export warm"].add(total / MiB / wall)
                    local = config(f"import{run}", "http://127.0.0.1:9")
                    os.sync()
                    wall, _, result = sigil("import", "--config", str(local), str(out),
                                            "--report", str(work / "import.json"))
                    check(result, "sigil import")
                    samples["sigil import"].add(total / MiB / wall)
                    shutil.rmtree(work / f"import{run}-store")
                else:
                    dest = work / "sync"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir()
                    os.sync()
                    start = time.perf_counter()
                    asyncio.run(skopeo("sync", "--all", "--retry-times", "0", "--src", "yaml",
                                       "--dest", "dir", str(sync_src), str(dest),
                                       timeout=1800))
                    samples["skopeo sync"].add(total / MiB / (time.perf_counter() - start))
                    # sigil's archive is on disk when it returns (fsync); skopeo leaves its
                    # files in the page cache. "+sync": until they are on disk too.
                    os.sync()
                    samples["skopeo sync+sync"].add(total / MiB / (time.perf_counter() - start))
                    with RealRegistry() as target:
                        os.sync()
                        start = time.perf_counter()
                        for image in images:
                            src = dest / upstream.host / f"{image.repo}:{image.tag}"
                            if not src.is_dir():
                                src = next(p for p in dest.rglob("manifest.json")
                                           if image.repo.split("/")[-1] in str(p)).parent
                            asyncio.run(skopeo("copy", "--quiet", "--retry-times", "0",
                                               "--dest-tls-verify=false", "--all",
                                               f"dir:{src}",
                                               f"docker://{target.host}/{image.repo}:"
                                               f"{image.tag}", timeout=1800))
                        samples["skopeo copy"].add(total / MiB / (time.perf_counter() - start))
                        os.sync()
                        samples["skopeo copy+sync"].add(
                            total / MiB / (time.perf_counter() - start))
        shutil.rmtree(work / "out.tar.sigil-work", ignore_errors=True)
        out.unlink(missing_ok=True)
        big_out = work / "big.tar"
        peak, big_wall = rss_of("export", "--config", str(export_cfg), "--plan",
                                str(big_plan), "--output", str(big_out))
        print_table(samples, total, runs, peak, big, big_wall)
    return 0


def print_table(samples: dict[str, Sample], total: int, runs: int, peak: int, big: int,
                big_wall: float) -> None:
    def row(name: str) -> str:
        s = samples[name]
        return f"{s.median:7.1f} ({s.low:.1f}..{s.high:.1f})"

    def ratio(a: str, b: str) -> str:
        return f"{samples[a].median / samples[b].median:.2f}x"

    lines = [
        f"sigil airgap bench: 4 one-layer images, {total // MiB} MiB in all, {runs} runs each, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}",
        "MB/s = MiB of image bytes / wall time; median (min..max)",
        f"skopeo sync --all -> dir         {row('skopeo sync')}   until on disk (+sync) "
        f"{row('skopeo sync+sync')}",
        f"sigil export, cold store         {row('sigil export cold')}   ratio "
        f"{ratio('sigil export cold', 'skopeo sync')} "
        f"({ratio('sigil export cold', 'skopeo sync+sync')} vs +sync)",
        f"sigil export, warm store         {row('sigil export warm')}   ratio "
        f"{ratio('sigil export warm', 'skopeo sync')} "
        f"({ratio('sigil export warm', 'skopeo sync+sync')} vs +sync)",
        f"skopeo copy dir -> registry      {row('skopeo copy')}   until on disk (+sync) "
        f"{row('skopeo copy+sync')}",
        f"sigil import (hash + re-verify)  {row('sigil import')}   ratio "
        f"{ratio('sigil import', 'skopeo copy')} "
        f"({ratio('sigil import', 'skopeo copy+sync')} vs +sync)",
        f"peak RSS of sigil export of a {big // MiB} MiB image: {peak / 1e6:.1f} MB "
        f"({big / MiB / big_wall:.0f} MiB/s)",
    ]
    print("\n".join(lines))
    print(json.dumps({k: v.values for k, v in samples.items()}))


if __name__ == "__main__":
    raise SystemExit(main())
