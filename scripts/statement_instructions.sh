#!/usr/bin/env bash
# PostgreSQL's own instructions per execution of pgbench -S-shaped statements, counted by
# valgrind's callgrind: a number that does not depend on the machine's load, unlike TPS.
#
#   scripts/statement_instructions.sh FILE...
#
# Each FILE holds one SELECT of `abalance` from `pgbench_accounts` with `$1` for `aid` (pgbench
# -S's statement, or its rewrite: `struere-proxy explain --key <bench key> [--parse] "SELECT
# abalance FROM pgbench_accounts WHERE aid = $1"` against the bench's database). A throwaway
# cluster gets `pgbench -i -s 1` with `environment` = 'development' and `organization_id` =
# 'acme' columns (the bench key's tenant); each statement runs in a PL/pgSQL loop (a cached
# generic plan, `$1` an int4 variable) in single-user mode under callgrind, 2,000 and then
# 12,000 times: the difference over 10,000 is the cost of one execution, loop included.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 FILE..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
dir="$(mktemp -d)"
trap 'as_pg "$bin/pg_ctl" -D "$dir/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$dir"
port=$((20000 + RANDOM % 20000))
as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=''" -l "$dir/log" -w start >/dev/null
as_pg "$bin/pgbench" -h "$dir" -p "$port" -U postgres -i -s 1 -q postgres >/dev/null 2>&1
as_pg "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres postgres -c \
  "ALTER TABLE pgbench_accounts ADD environment text NOT NULL DEFAULT 'development',
                               ADD organization_id text NOT NULL DEFAULT 'acme'"
as_pg "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres postgres -c "VACUUM ANALYZE pgbench_accounts"
as_pg "$bin/pg_ctl" -D "$dir/data" stop -m fast >/dev/null

count() { # file, loops -> instructions of the whole single-user run
  local sql
  sql="$(tr '\n' ' ' < "$1" | sed 's/;[[:space:]]*$//; s/\$1/i/g; s/^[[:space:]]*SELECT abalance /SELECT abalance INTO r /')"
  printf 'DO $$ DECLARE r int; i int; BEGIN FOR j IN 1..%d LOOP i := 1 + (j * 7919) %% 100000; %s; END LOOP; END $$;\n' \
    "$2" "$sql" > "$dir/run.sql"
  chmod 644 "$dir/run.sql"
  as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin/postgres" --single -D "$dir/data" postgres \
    < "$dir/run.sql" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

printf '| statement | instructions per execution |\n|---|---:|\n'
for f in "$@"; do
  small="$(count "$f" 2000)"
  large="$(count "$f" 12000)"
  [ -n "$small" ] && [ -n "$large" ] || { echo "$f: callgrind counted nothing" >&2; exit 1; }
  printf '| %s | %s |\n' "$(basename "$f")" "$(( (large - small) / 10000 ))"
done
