"""A model's cold start with each set of start options, side by side: what
enforce_eager, a load format or a compilation config saves on this host.

    python bench/coldstart.py --admin-token-file /var/lib/ssw/admin.token --model qwen3-8b \\
        --try '{}' --try '{"enforce_eager": true}' --try '{"compilation_config": {"level": 0}}' \\
        --rounds 2 --json out.json

Each try asks the loader (POST /coldstart) to start the model with those
options, times it phase by phase until /health answers, and stops it again;
the model must not be loaded. The loader keeps each option set's figures in
its fact store (`cold_starts` and `cold_start_best` in /status); "{}" is the
model as models.yaml configures it, and its figures are also the model's
load time that Retry-After and eviction use. --clear-cache removes the
model's compile caches (/var/cache/ssw/<model>, seen under --worker-root)
before every start, for first-start figures. Put the best options in
models.yaml to use them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import admin_api

from ssw.loader.systemd.engine import cache_directory


def cold_start(args: argparse.Namespace, headers: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"model": args.model, "options": options}).encode()
    req = urllib.request.Request(
        args.admin.rstrip("/") + "/coldstart",
        data=body,
        headers={**headers, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as exc:
        with exc:
            error = json.loads(exc.read() or b"{}").get("error", {})
        sys.exit(f"coldstart: {json.dumps(options)}: HTTP {exc.code}: {error.get('message', '')}")


def main(args: argparse.Namespace) -> dict[str, Any]:
    headers = admin_api.headers(args)
    tries = [json.loads(t) for t in args.tries or ["{}"]]
    cache = Path(args.worker_root) / "var/cache" / cache_directory(args.model)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for options in tries:
            if args.clear_cache:
                shutil.rmtree(cache, ignore_errors=True)
            result = cold_start(args, headers, options)
            runs.setdefault(result["options"], []).append(result)
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in (result["phases_s"] or {}).items() if k != "total")
            print(f"{result['options']:<40} {result['seconds']:7.2f} s  ({phases})")
    summary = {options: statistics.median(r["seconds"] for r in rs) for options, rs in runs.items()}
    best = min(summary, key=lambda k: summary[k])
    print(f"\n{'options':<40} {'median':>8}")
    for options, seconds in summary.items():
        print(f"{options:<40} {seconds:7.2f} s{'  <- best' if options == best else ''}")
    return {"model": args.model, "clear_cache": args.clear_cache, "runs": runs, "median_s": summary, "best": best}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    admin_api.add_arguments(p, "to start and stop the model")
    p.add_argument("--model", required=True, help="a model that is not loaded")
    p.add_argument("--try", dest="tries", action="append", help="start options as JSON (repeat; default: {})")
    p.add_argument("--rounds", type=int, default=1, help="starts per option set, alternating")
    p.add_argument("--clear-cache", action="store_true", help="remove the model's compile caches before each start")
    p.add_argument("--worker-root", default="/", help="where the workers' file system is seen from here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one start may take")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    report = main(options)
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2) + "\n")
