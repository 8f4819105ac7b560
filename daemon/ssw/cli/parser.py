"""The ``ssw`` command line: every verb, its arguments, and the function that runs it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from ssw.cli import verbs
from ssw.config import Config

Verb = Callable[[Config, argparse.Namespace], Any]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssw", description="systemd-native model serving")
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("SSW_CONFIG"),
        help=f"config file (default: $SSW_CONFIG or {verbs.DEFAULT_CONFIG})",
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, help_ in (
        ("gateway", "run the public OpenAI gateway"),
        ("loader", "run the loader (admin API, workers)"),
        ("serve", "run gateway and loader in one process (development, demo)"),
    ):
        sub.add_parser(name, help=help_).set_defaults(run=verbs.run_roles)

    def verb(name: str, help_: str, run: Verb) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(run=run)
        return p

    verb("status", "GPUs, workers and models", verbs.show_status).add_argument(
        "--fleet", action="store_true", help="every host of the fleet (from the fleet's Redis)"
    )
    verb("models", "the models and aliases on this host", verbs.models)
    p_load = verb("load", "load a model", verbs.load)
    p_load.add_argument("model")
    p_load.add_argument("--gpu", type=int, help="place it on this GPU")
    p_load.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until ready, showing progress (default)",
    )
    verb("unload", "stop a model's workers (or one worker, by its unit name)", verbs.unload).add_argument("model")
    p_pull = verb("pull", "download a model from the hub into the models dir (a job of the loader)", verbs.pull)
    p_pull.add_argument("source", metavar="REPO[@REVISION]")
    p_pull.add_argument("--name", help="model name and directory (default: the repo's name)")
    p_pull.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True, help="follow it to the end (default)"
    )
    verb(
        "clear-check",
        "clear a model's known-answer failure: it may sleep again, its answer is recorded anew",
        verbs.clear_check,
    ).add_argument("model")
    verb("jobs", "the loader's pull jobs", verbs.jobs)
    verb("cancel", "cancel a pull (its partial data is removed)", verbs.cancel).add_argument("job")
    p_logs = verb("logs", "a worker's journal", verbs.logs)
    p_logs.add_argument("model")
    p_logs.add_argument("-n", "--lines", type=int, default=100)
    p_logs.add_argument("-f", "--follow", action="store_true")
    p_logs.add_argument("--replica", type=int, default=1)
    p_batches = verb("batches", "batches of every API key (from Redis), newest first; or one batch", verbs.batches)
    p_batches.add_argument("batch", nargs="?", help="a batch id: show it")
    p_batches.add_argument("--cancel", action="store_true", help="cancel that batch")
    p_batches.add_argument("--limit", type=int, default=50)
    verb("stats", "request statistics from Redis", verbs.stats).add_argument(
        "--window", default="5m", help="e.g. 30s, 5m, 1h"
    )
    verb("check-config", "validate the config and models.yaml and print the resolved registry", verbs.check_config)
    verb("config", "print the effective config with defaults", verbs.show_config)
    p_keys = sub.add_parser("keys", help="API keys of the public API")
    p_keys.set_defaults(run=verbs.keys, json=False)
    keys_sub = p_keys.add_subparsers(dest="keys_verb", required=True)
    k_add = keys_sub.add_parser("add", help="create a key (printed once)")
    k_add.add_argument("name")
    k_add.add_argument("--models", help="comma-separated models or aliases it may use (default: all)")
    k_add.add_argument("--max-in-flight", type=int)
    k_add.add_argument(
        "--not-loaded",
        choices=("wait", "accept", "unavailable"),
        help="what this key's requests get while their model is not ready (default: gateway.not_loaded)",
    )
    k_add.add_argument("--pull", action="store_true", help="it may pull models from the hub (Ollama's /api/pull)")
    k_add.add_argument(
        "--no-keep-alive", action="store_true", help="it may not set a model's keep_alive (Ollama's) nor unload it"
    )
    k_add.add_argument(
        "--operator", action="store_true", help="it may open the live status page (/ui): every model, worker, GPU"
    )
    keys_sub.add_parser("revoke", help="delete a key").add_argument("name")
    keys_sub.add_parser("list", help="key names and scopes (never the keys)")
    return parser
