#!/usr/bin/env bash
# Fresh-machine setup: system packages (Fashion-MNIST, Chromium for the report test), a venv, the project.
# Idempotent: a second run only checks. TORCH_SPEC picks the torch build (CPU wheel by default; "torch" for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TESTS=${1:-}
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ "$WITH_TESTS" = "--test" ] && ! command -v chromium >/dev/null; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)$WITH_TESTS
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  if [ "$WITH_TESTS" = "--test" ]; then .venv/bin/pip install -q -e ".[test]"; else .venv/bin/pip install -q -e .; fi
  touch "$stamp"
fi
