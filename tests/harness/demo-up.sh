#!/usr/bin/env bash
# Brings the whole demo stack up on this machine and serves OpenAI on :8000.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
"$repo/tests/harness/bootstrap.sh"
cd "$repo"
exec .venvs/ssw/bin/python -m tests.harness.demo up
