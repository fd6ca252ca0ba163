#!/usr/bin/env bash
# Throughput against direct PostgreSQL and PgBouncer, a policy workload against native row-level
# security, memory per idle connection and what cache misses cost other sessions (scripts/bench.py
# has the details). Prints markdown.
#
#   scripts/bench.sh [--seconds 15] [--reps 3] [--quick] [--phases memory,throughput,statement,policy,misses,instructions]
#                    [--clients 1,8,32] [--modes simple,extended,prepared] [--idle 1000] [--scale 10]
#
# The full run takes about 35 minutes; --quick (-T 2, one repetition, fewer cells) is a smoke test.
# Needs: PostgreSQL's server binaries and pgbench (scripts/setup.sh), PgBouncer and valgrind
# (installed from Debian's packages here when missing and run as root), Rust. Builds in ${CARGO_TARGET_DIR:-target}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# PgBouncer (the throughput phase needs it) and valgrind (the instructions phase skips without it).
for tool in pgbouncer valgrind; do
  command -v "$tool" >/dev/null 2>&1 && continue
  if [ "$(id -u)" -eq 0 ]; then
    echo "bench: installing $tool" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$tool" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "$tool" >&2; }
  elif [ "$tool" = pgbouncer ]; then
    echo "bench: pgbouncer is missing; run: sudo apt-get install -y pgbouncer" >&2
    exit 1
  fi
done

# 1,000 idle client sessions hold 1,000 client sockets in the bench, 2,000 in the proxy.
want=8192
hard="$(ulimit -Hn)"
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then want="$hard"; fi
ulimit -n "$want" 2>/dev/null || true

target="${CARGO_TARGET_DIR:-target}"
# The proxy, and the native-RLS reference generator (examples/rls_reference.rs) for the policy workload.
cargo build --release --quiet --bin struere-proxy --example rls_reference
exec python3 scripts/bench.py "$@"
