#!/usr/bin/env bash
# Run the proxy on an embedded default: a throwaway local PostgreSQL it starts (and removes) itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --quiet -- demo "$@"
