-- psql compatibility checks (issue 6): run by scripts/compat.sh (direct, operator key, development
-- key) and by tests/it/compat.rs in CI. Every check ends with `\echo PASS <name>`; the first
-- failure stops the script (ON_ERROR_STOP) after `\echo FAIL <name>` where an assertion fails.
-- A check a development key deliberately refuses prints `REFUSED <name>` and the script goes on.
--
--   psql -X -f scripts/compat/psql.sql -v t=<table name> -v dir=<writable directory> "<conninfo>"
--
-- :t is the table this run owns (dropped first and at the end); :dir holds \copy and \o files.
\set ON_ERROR_STOP on
\if :{?t}
\else
\set t compat_psql
\endif
\if :{?dir}
\cd :dir
\endif
\pset pager off

SELECT current_setting('server_version_num')::int >= 100000 AS ok \gset
\if :ok
\echo PASS server_version
\else
\echo FAIL server_version
SELECT 1 / 0;
\endif

DROP TABLE IF EXISTS :"t";
CREATE TABLE :"t" (
    id int PRIMARY KEY,
    name text NOT NULL,
    amount numeric(10, 2),
    tags text[],
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON :"t" (name);
COMMENT ON TABLE :"t" IS 'psql compatibility check';
\echo PASS create_table

INSERT INTO :"t" (id, name, amount, tags) VALUES (1, 'one', 1.5, '{a,b}'), (2, 'two', NULL, '{}'), (3, 'three', 3.25, NULL);
\set wanted 2
SELECT name AS wanted_name FROM :"t" WHERE id = :wanted \gset
\if `test ":wanted_name" = two && echo 1 || echo 0`
\echo PASS variables_and_gset
\else
\echo FAIL variables_and_gset
SELECT 1 / 0;
\endif

-- Meta-commands: each runs catalog queries; their output is checked for the table.
\o dt.out
\dt
\o
\if `grep -q ":t" dt.out && echo 1 || echo 0`
\echo PASS dt
\else
\echo FAIL dt
SELECT 1 / 0;
\endif
\o d.out
\d
\d :"t"
\d+ :"t"
\o
\if `grep -q "amount" d.out && grep -q "Indexes:" d.out && echo 1 || echo 0`
\echo PASS d_and_d_plus
\else
\echo FAIL d_and_d_plus
SELECT 1 / 0;
\endif
\o meta.out
\di
\dn
\dT
\df pg_catalog.lower
\dx
\l
\du
\o
\echo PASS other_meta_commands

-- \dt+ shows sizes (pg_table_size): a development key refuses them (see README), and psql then
-- prints nothing for it; that is reported as REFUSED and the script goes on.
\set ON_ERROR_STOP off
\o meta_plus.out
\dt+
\o
\set ON_ERROR_STOP on
\if `grep -q ":t" meta_plus.out && echo 1 || echo 0`
\echo PASS dt_plus
\else
\echo REFUSED dt_plus
\endif

-- \copy into a temporary table from inline data, then out to a file and back in.
CREATE TEMP TABLE compat_psql_copy (id int, name text, amount numeric(10, 2));
\copy compat_psql_copy FROM stdin WITH (FORMAT csv)
10,ten,10.5
11,"eleven, quoted",
12,twelve,12
\.
SELECT count(*) = 3 AS ok FROM compat_psql_copy \gset
\if :ok
\echo PASS copy_from_stdin
\else
\echo FAIL copy_from_stdin
SELECT 1 / 0;
\endif
\copy (SELECT id, name, amount FROM compat_psql_copy ORDER BY id) TO 'copy.csv' WITH (FORMAT csv, HEADER)
\if `test "$(wc -l < copy.csv)" -eq 4 && grep -q '"eleven, quoted"' copy.csv && echo 1 || echo 0`
\echo PASS copy_to_file
\else
\echo FAIL copy_to_file
SELECT 1 / 0;
\endif
TRUNCATE compat_psql_copy;
\copy compat_psql_copy FROM 'copy.csv' WITH (FORMAT csv, HEADER)
INSERT INTO :"t" (id, name, amount) SELECT id, name, amount FROM compat_psql_copy;
SELECT count(*) = 6 AS ok FROM :"t" \gset
\if :ok
\echo PASS copy_from_file
\else
\echo FAIL copy_from_file
SELECT 1 / 0;
\endif
\copy (SELECT id, name FROM compat_psql_copy ORDER BY id) TO stdout
\copy compat_psql_copy (id, name) TO stdout WITH (FORMAT text)
\echo PASS copy_to_stdout

-- Expanded and other output formats.
\x on
SELECT id, name, amount, tags FROM :"t" WHERE id = 1;
\x off
\pset format csv
SELECT id, name FROM :"t" ORDER BY id LIMIT 2;
\pset format aligned
\echo PASS expanded_and_formats

-- Transactions: ON_ERROR_ROLLBACK makes psql wrap each statement in a savepoint.
\set ON_ERROR_STOP off
\set ON_ERROR_ROLLBACK on
BEGIN;
INSERT INTO :"t" (id, name) VALUES (100, 'kept');
INSERT INTO :"t" (id, name) VALUES (1, 'duplicate key: rolled back to the savepoint');
INSERT INTO :"t" (id, name) VALUES (101, 'kept too');
COMMIT;
\set ON_ERROR_ROLLBACK off
\set ON_ERROR_STOP on
SELECT count(*) = 2 AS ok FROM :"t" WHERE id IN (100, 101) \gset
\if :ok
\echo PASS on_error_rollback_savepoints
\else
\echo FAIL on_error_rollback_savepoints
SELECT 1 / 0;
\endif

BEGIN;
SAVEPOINT a;
UPDATE :"t" SET name = 'changed' WHERE id = 100;
ROLLBACK TO SAVEPOINT a;
RELEASE SAVEPOINT a;
COMMIT;
SELECT name = 'kept' AS ok FROM :"t" WHERE id = 100 \gset
\if :ok
\echo PASS explicit_savepoints
\else
\echo FAIL explicit_savepoints
SELECT 1 / 0;
\endif

-- SQL-level prepared statements and cursors; FETCH_COUNT makes psql itself use a cursor.
PREPARE compat_q (int) AS SELECT name FROM :"t" WHERE id = $1;
EXECUTE compat_q (3);
DEALLOCATE compat_q;
BEGIN;
DECLARE compat_c CURSOR FOR SELECT id FROM :"t" ORDER BY id;
FETCH 2 FROM compat_c;
MOVE 1 IN compat_c;
FETCH ALL FROM compat_c;
CLOSE compat_c;
COMMIT;
\set FETCH_COUNT 2
SELECT id, name FROM :"t" ORDER BY id;
\unset FETCH_COUNT
\echo PASS prepare_and_cursors

-- Settings clients commonly change, and \gexec.
SET application_name = 'compat-psql';
SET statement_timeout = '5s';
SET TIME ZONE 'UTC';
RESET statement_timeout;
SELECT format('SELECT %s AS gexec_value', 40 + 2) \gexec
\timing on
SELECT 1 AS timed;
\timing off
\echo PASS settings_and_gexec

-- Errors are reported and the session goes on.
\set ON_ERROR_STOP off
SELECT * FROM compat_psql_no_such_table;
\set ON_ERROR_STOP on
SELECT :'LAST_ERROR_SQLSTATE' = '42P01' AS ok \gset
\if :ok
\echo PASS error_then_continue
\else
\echo FAIL error_then_continue
SELECT 1 / 0;
\endif

DROP TABLE :"t";
\echo PASS drop_table
