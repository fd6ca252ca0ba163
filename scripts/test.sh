#!/usr/bin/env bash
# Run the whole test suite: unit tests (pure parts) and integration tests (a throwaway
# PostgreSQL cluster, the proxy, real clients).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo test --all-targets "$@"
