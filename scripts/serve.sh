#!/usr/bin/env bash
# Set up (idempotently) and start the embedded default: server + UI + one local worker, SQLite and the
# demo model/dataset under ./.paratrain. Extra arguments go to `paratrain serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec "${PARATRAIN_VENV:-.venv}/bin/paratrain" serve "$@"
