#!/usr/bin/env bash
# Measure how fast a deployed policy version reaches a second proxy (LISTEN/NOTIFY): see
# examples/policy_switch.rs. Usage: bash scripts/policy_switch.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STRUERE_LOG="${STRUERE_LOG:-warn}" exec cargo run --release --quiet --example policy_switch -- "$@"
