#!/usr/bin/env bash
# Run the whole test suite: unit tests (pure parts), integration tests (a throwaway PostgreSQL
# cluster, the proxy, real clients), and the benches once each as smoke tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
cargo test --bench hot_path "$@"
cargo test --lib --bins --tests "$@"
