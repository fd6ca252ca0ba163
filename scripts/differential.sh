#!/usr/bin/env bash
# Differential testing against native row-level security (docs/security.md): generated statements
# run through the proxy and natively on a reference database enforcing the same policies with RLS
# policies and security_barrier views; prints generated / equal / refused by class / divergent.
#
#   scripts/differential.sh [COUNT] [FIRST_SEED]      (defaults: 10000 statements from seed 100000)
#   STRUERE_DIFF_ONLY=<seed> cargo test --test it differential -- --nocapture   replays one statement
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-10000}"
seed="${2:-100000}"
report="$(mktemp)"
STRUERE_DIFF_COUNT="$count" STRUERE_DIFF_SEED="$seed" STRUERE_DIFF_REPORT="$report" \
    cargo test --test it differential::differential_long_run -- --ignored --nocapture >/dev/null 2>&1 || status=$?
cat "$report" 2>/dev/null || echo "no report written (see: cargo test --test it differential::differential_long_run -- --ignored --nocapture)"
rm -f "$report"
exit "${status:-0}"
