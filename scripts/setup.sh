#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with the pinned torch first, then paratrain itself. torch goes
# first and pinned because peft, or an unpinned torch, would pull whatever build pip picks. On Linux, PyPI's
# torch==2.13.0 is the CUDA build (what a GPU box wants; it also runs on a CPU, at a few GB); for PyTorch's
# CPU-only build set PARATRAIN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu". `--test` adds the test tools,
# Debian's chromium for the browser tests and PostgreSQL for the server tests. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PARATRAIN_VENV:-.venv}
TORCH_SPEC=${PARATRAIN_TORCH:-torch==2.13.0}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY="$VENV/bin/python"
if ! "$PY" -m pip --version >/dev/null 2>&1; then   # none yet, or one a failed attempt left without pip
  echo "setup: creating $VENV" >&2
  if ! python3 -m venv --clear "$VENV"; then
    # Debian/Ubuntu ship venv's pip apart, in python3-venv
    command -v apt-get >/dev/null || { echo "setup: python3 -m venv failed (above)" >&2; exit 1; }
    echo "setup: installing Debian's python3-venv" >&2
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv --clear "$VENV"
  fi
fi
pipq() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (once)" >&2
  read -ra torch_args <<< "$TORCH_SPEC"   # PARATRAIN_TORCH may add pip options (an index URL)
  pipq "${torch_args[@]}"
fi
stamp="$VENV/.paratrain-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ $want_test = 1 ] && ! grep -q test "$stamp"; }; then
  extras=""; [ $want_test = 1 ] && extras="[test]"
  echo "setup: installing paratrain$extras and its dependencies (a few minutes the first time)" >&2
  pipq -e ".$extras"
  "$PY" -c "import torch, transformers, peft, fastapi, gradio" >/dev/null
  echo "ok$extras" | sed 's/\[test\]/ test/' > "$stamp"
fi
missing=""
[ $want_test = 1 ] && [ ! -x /usr/bin/chromium ] && missing="chromium"   # the browser tests
[ $want_test = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && missing="$missing postgresql"
if [ -n "$missing" ]; then  # the server tests also run against a throwaway PostgreSQL
  echo "setup: installing Debian $missing for the tests" >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
