"""How the benchmarks reach the loader's admin API: its address and bearer token."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8001"
DEFAULT_TOKEN_FILE = "/var/lib/ssw/admin.token"  # the loader's, readable by root


def add_arguments(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument("--admin", default=DEFAULT_URL, help=f"the loader's admin API ({purpose})")
    parser.add_argument("--admin-token-file", default=DEFAULT_TOKEN_FILE, help="'' when the admin API is open")


def headers(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header for the admin API; read once, before any load runs."""
    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else ""
    return {"Authorization": f"Bearer {token}"} if token else {}
