#!/usr/bin/env bash
# Make sure this machine can build and run struere-proxy. As root, missing Debian packages are
# installed; otherwise the exact command is printed.
#
#   bash scripts/setup.sh          libclang (pg_query's build needs it) and PostgreSQL's server
#                                  binaries (the demo and the tests start a throwaway cluster)
#   bash scripts/setup.sh build    libclang only (the Docker image's build stage)
#   bash scripts/setup.sh test     both, plus chromium and chromedriver (the dashboard's browser
#                                  test runs Debian's chromium headless; it fails without them), a
#                                  JDK and Debian's PostgreSQL JDBC driver (tests/it/compat.rs)
#   bash scripts/setup.sh compat   what scripts/compat.sh needs: the JDK, the JDBC driver, python3's
#                                  venv module (the suites themselves come from the registries)
set -euo pipefail

mode="${1:-run}"
case "$mode" in run | build | test | compat) ;; *) echo "usage: scripts/setup.sh [build|test|compat]" >&2; exit 2 ;; esac

missing=()

have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 \
    || ls /usr/lib/aarch64-linux-gnu/libclang*.so* >/dev/null 2>&1
}
have_clang_headers() {
  ls -d /usr/lib/llvm-*/lib/clang/*/include >/dev/null 2>&1
}
have_postgres() {
  [ -n "${STRUERE_PG_BIN:-}" ] && [ -x "${STRUERE_PG_BIN}/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1
}

have_libclang && have_clang_headers || missing+=(libclang-dev)
if [ "$mode" != build ]; then
  have_postgres || missing+=(postgresql)
fi
if [ "$mode" = test ]; then
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
fi
if [ "$mode" = test ] || [ "$mode" = compat ]; then
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  [ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
fi
if [ "$mode" = compat ]; then
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
else
  echo "setup: missing Debian packages: ${missing[*]}" >&2
  echo "run:   sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
