#!/usr/bin/env bash
# Set up (idempotently) and run every test: unit, property, real-process integration, browser.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PARATRAIN_VENV:-.venv}/bin/python" -m pytest "$@"
