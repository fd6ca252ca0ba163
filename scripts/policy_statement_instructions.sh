#!/usr/bin/env bash
# PostgreSQL's own instructions per execution of statements as proxy binaries rewrite them for a
# demo caller (the teacher by default), counted by valgrind's callgrind: a number that does not
# depend on the machine's load, for comparing two builds' rewrites.
#
#   scripts/policy_statement_instructions.sh --proxy BIN [--proxy BIN2 ...] SQL...
#   (ROLE=teacher ACTOR=acme-teacher-1 by default; the caller is acme's development environment)
#
# A throwaway cluster gets the demo schema and seed (policies/) plus 10,000 sessions of two
# organizations (every 50th acme session the teacher's); each binary prints its rewrite of each
# statement (`explain`), which then runs in a PL/pgSQL loop in single-user mode under callgrind,
# 200 and then 1,200 times: the difference over 1,000 is the cost of one execution, loop included.
# Needs PostgreSQL's server binaries (scripts/setup.sh) and valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
proxies=()
while [ "${1:-}" = --proxy ]; do proxies+=("$2"); shift 2; done
[ ${#proxies[@]} -ge 1 ] && [ $# -ge 1 ] || { echo "usage: $0 --proxy BIN [--proxy BIN2 ...] SQL..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
role="${ROLE:-teacher}"
actor="${ACTOR:-acme-teacher-1}"
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
dir="$(mktemp -d)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$dir"
trap 'as_pg "$bin/pg_ctl" -D "$dir/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 20000))
as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
psql_() { as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres postgres "$@"; }
psql_ -f policies/schema.sql >/dev/null
psql_ -f policies/seed.sql >/dev/null
psql_ -c "INSERT INTO entities (id, organization_id, environment, entity_type, data, created_at)
  SELECT 'x-' || o || '-' || n, o, 'development', 'session',
         jsonb_build_object('teacherId', CASE WHEN n % 50 = 0 THEN 'acme-teacher-1' ELSE 't' || (n % 50) END,
                            'status', CASE WHEN n % 3 = 0 THEN 'scheduled' ELSE 'confirmed' END,
                            'startTime', '2026-12-01', 'studentId', 's', 'paymentAmount', '10'),
         now() - n * interval '1 hour'
  FROM unnest(ARRAY['acme', 'globex']) o, generate_series(1, 5000) n"
psql_ -c "VACUUM ANALYZE"
url="postgres://postgres@127.0.0.1:$port/postgres"
"${proxies[0]}" --admin-upstream "$url" --policies policies init >/dev/null
"${proxies[0]}" --admin-upstream "$url" --policies policies policy dev >/dev/null
n=0
for sql in "$@"; do
  n=$((n + 1))
  for p in "${!proxies[@]}"; do
    "${proxies[$p]}" --policies policies --admin-upstream "$url" explain --env development --org acme \
      --role "$role" --actor-id "$actor" "$sql" > "$dir/q$n-$p.sql"
  done
done
as_pg "$bin/pg_ctl" -D "$dir/data" stop -m fast >/dev/null

count() { # file, loops -> instructions of the whole single-user run
  printf 'DO $$ DECLARE r record; BEGIN FOR j IN 1..%d LOOP FOR r IN %s LOOP END LOOP; END LOOP; END $$;\n' \
    "$2" "$(tr '\n' ' ' < "$1" | sed 's/;[[:space:]]*$//')" > "$dir/run.sql"
  chmod 644 "$dir/run.sql"
  as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin/postgres" --single -D "$dir/data" postgres \
    < "$dir/run.sql" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

printf '| statement | proxy | instructions per execution |\n|---|---|---:|\n'
n=0
for sql in "$@"; do
  n=$((n + 1))
  for p in "${!proxies[@]}"; do
    small="$(count "$dir/q$n-$p.sql" 200)"
    large="$(count "$dir/q$n-$p.sql" 1200)"
    [ -n "$small" ] && [ -n "$large" ] || { echo "$sql: callgrind counted nothing" >&2; exit 1; }
    printf '| `%s` | %s | %s |\n' "$sql" "${proxies[$p]}" "$(( (large - small) / 1000 ))"
  done
done
