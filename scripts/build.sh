#!/usr/bin/env bash
# Build the struere-proxy binary. The Docker image's build stage runs exactly this script, and
# `.ci/run` runs it too, so CI exercises the image's build commands without a Docker engine.
#
#   bash scripts/build.sh [release|debug]     (default: release)
#
# The image builds `release`; CI builds `debug` (the same steps: setup, then `cargo build
# --locked` of the binary), because a release build of pg_query and the rewriter takes several
# minutes on CI's two cores and the test suite that follows needs the debug build anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
bash scripts/setup.sh build
case "$profile" in
  release) cargo build --release --locked --bin struere-proxy ;;
  debug) cargo build --locked --bin struere-proxy ;;
  *) echo "usage: scripts/build.sh [release|debug]" >&2; exit 2 ;;
esac
