#!/usr/bin/env bash
# Quickstart command 1: set up (idempotent) and run the demo on an embedded broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tensorstream demo "$@"
