#!/usr/bin/env bash
# Runs every check of ssw on this machine: lint, types, and the whole test
# suite (real systemd in a disposable host, real vLLM on the CPU, the fake
# engine). Installs what it needs first (tests/harness/bootstrap.sh).
# Extra arguments go to pytest, e.g. -m "not vllm" for a quick run.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
"$repo/tests/harness/bootstrap.sh"
cd "$repo"
.venvs/ssw/bin/ruff check daemon tests bench
.venvs/ssw/bin/ruff format --check daemon tests bench
.venvs/ssw/bin/mypy
.venvs/ssw/bin/mypy bench/*.py
# The house rules: the wings never import each other, decide/ does no I/O (pyproject.toml).
.venvs/ssw/bin/lint-imports
exec .venvs/ssw/bin/pytest "$@"
