"""Bodies of ``sigil export`` and ``sigil import`` (``cli.py`` only parses arguments)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from sigil.airgap.layout import canonical_json
from sigil.config import Config
from sigil.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                default_config: str) -> None:
    """Add the ``export`` and ``import`` subcommands."""
    export = sub.add_parser("export", help="write verified images, their signatures and "
                            "trust material to an archive (air-gapped mirrors)")
    export.add_argument("--config", default=os.environ.get("SIGIL_CONFIG", default_config))
    export.add_argument("--plan", required=True, help="plan file: which images to carry")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="OUT.tar, OUT.tar.zst or a directory (OCI layout)")
    target.add_argument("--to-store", action="store_true",
                        help="no archive: fetch and verify into the config's store")
    export.add_argument("--since", default=None,
                        help="previous archive or its .manifest.json: write a delta")
    export.add_argument("--allow-unverified", action="store_true",
                        help="carry denied images too, marked unverified in the report")
    export.add_argument("--keep-work", action="store_true",
                        help="keep the working store OUT.sigil-work after success")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    imp = sub.add_parser("import", help="check, re-verify offline and load archives")
    imp.add_argument("archives", nargs="+", metavar="ARCHIVE",
                     help="archives in order (a base before its deltas)")
    imp.add_argument("--config", default=os.environ.get("SIGIL_CONFIG", default_config))
    imp.add_argument("--report", default=None,
                     help="where to write the JSON report (default: "
                          "<storage.root>/reports/import-<time>.json)")
    imp.add_argument("--json", action="store_true", help="print the report as JSON")


def run_export(config: Config, args: argparse.Namespace) -> int:
    """``sigil export``; exit 0 all exported, 1 something denied or failed."""
    from sigil.airgap.export import Exporter
    from sigil.airgap.plan import load_plan

    plan = load_plan(args.plan, config)
    if args.since and args.to_store:
        raise ConfigError("--since makes a delta archive; it does not go with --to-store")
    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir() and any(out.iterdir()) \
            and not (out / "oci-layout").is_file():
        raise ConfigError(f"--output {out} is a non-empty directory that is not an OCI layout; "
                          "not overwriting it")
    if out is not None and out.name.endswith(".zst"):
        try:
            import zstandard  # noqa: F401
        except ImportError as exc:
            raise ConfigError("a .tar.zst archive needs the Python package 'zstandard' "
                              "(pip install 'sigil[airgap]')") from exc
    if not config.policy:
        print("sigil: warning: no policy configured: every image is exported as allowed "
              "without verification (set `policy` in the config)", file=sys.stderr)
    exporter = Exporter(config, plan, out, since=Path(args.since) if args.since else None,
                        allow_unverified=args.allow_unverified, keep_work=args.keep_work)
    result = asyncio.run(exporter.run())
    report = result.report
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for image in report["images"]:
            mark = "exported" if image["verified"] else "UNVERIFIED"
            print(f"{mark:10} {image['name']}  {image['digest']}")
        for item in report["denied"]:
            print(f"{'DENIED':10} {item['name']}  {item.get('digest', '')}  "
                  f"({item['reason']}: {item['message']})")
        for item in report["failed"]:
            print(f"{'FAILED':10} {item['name']}  ({item['error']})")
        for item in report["interrupted"]:
            print(f"{'INTERRUPTED':10} {item['name']}  ({item['error']})")
        if report["interrupted"]:
            print("upstream failures: no archive written; re-run the same command to resume "
                  "(finished blobs are kept)", file=sys.stderr)
        elif result.output is not None:
            print(f"archive {result.output} ({report.get('archive')}, "
                  f"{report.get('held_blobs')} blobs, {report.get('held_bytes')} bytes)")
    return result.exit_code


def run_import(config: Config, args: argparse.Namespace) -> int:
    """``sigil import``; exit 0 everything loaded, 1 something refused."""
    from sigil.airgap.importer import Importer, render

    report = asyncio.run(Importer(config).run([Path(a) for a in args.archives]))
    if args.report:
        path = Path(args.report)
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = Path(config.storage.root) / "reports" / f"import-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical_json(report) + b"\n")
    print(json.dumps(report, indent=2) if args.json else render(report))
    print(f"report: {path}", file=sys.stderr)
    return 0 if report["ok"] else 1
