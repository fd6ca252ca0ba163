#!/usr/bin/env bash
# Client compatibility runner (issue 6): psql, a JDBC program, and the tokio-postgres, SQLAlchemy
# and Django test suites against PostgreSQL directly, through an operator key and through a
# development key; prints a markdown table. See scripts/compat/runner.py and README
# ("Client compatibility").
#
#   bash scripts/compat.sh [--suites psql,jdbc,tokio-postgres,sqlalchemy,django] [--quick] [--modes …]
#   bash scripts/compat.sh --serve NAME,… [--debug]   the cluster, proxy and keys only, for suites run
#                                                   by hand (prints a TARGET line per name and mode)
#
# Downloads (suite sources, Python packages, crates) go to ${STRUERE_COMPAT_DIR:-~/.cache/struere-compat}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh compat
exec python3 scripts/compat/runner.py "$@"
