#!/usr/bin/env python3
"""Client compatibility runner (issue 6): real clients' own test suites against PostgreSQL
directly, through an operator key and through a development key, side by side.

    bash scripts/compat.sh [--suites psql,jdbc,tokio-postgres,sqlalchemy,django] [--quick]

It builds the proxy, starts a throwaway PostgreSQL cluster and the proxy in front of it, runs
every suite three ways and prints a markdown table (also written to the run directory).

Three targets, each a host/port/user/password/database that every suite is pointed at:
  direct       PostgreSQL itself, as its superuser, database <suite>_direct
  operator     the proxy with an operator key (forwarded as sent, runs as the owner), database
               <suite>_op
  development  the proxy with a development key of role `admin` (policies in
               scripts/compat/policies: `unmanaged_tables = true`, every statement parsed,
               rewritten and verified), database compat_dev; each suite is an organization of
               its own, so its tables live in a scratch schema of its own

Third-party code (suite sources, Python packages, the crate's dev-dependencies) is fetched from
the package registries at run time into the cache directory ($STRUERE_COMPAT_DIR, default
~/.cache/struere-compat); copies that hard-code connection settings are patched there, never in
this repository.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("STRUERE_COMPAT_DIR") or Path.home() / ".cache" / "struere-compat")
MODES = ["direct", "operator", "development"]

# Versions fetched from the registries (pinned so numbers are comparable between runs).
SQLALCHEMY_VERSION = "2.0.58"
DJANGO_VERSION = "5.2.19"
JDBC_JAR = "/usr/share/java/postgresql.jar"


def log(msg: str) -> None:
    print(f"compat: {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nice(cmd: list[str]) -> list[str]:
    return ["nice", "-n", "10", *cmd]


# --------------------------------------------------------------------------------------------
# The throwaway cluster


class Cluster:
    def __init__(self, logs: Path):
        # Under /tmp: the postgres OS user must reach it (a home directory may be closed to it).
        base = Path(tempfile.mkdtemp(prefix="struere-compat-pg-"))
        self.base = base
        self.bin = self.find_bin()
        self.data = base / "pgdata"
        self.sock = base / "pgsock"
        self.logfile = base / "postgres.log"
        self.logs = logs
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.as_postgres = os.geteuid() == 0

    @staticmethod
    def find_bin() -> Path:
        if os.environ.get("STRUERE_PG_BIN"):
            return Path(os.environ["STRUERE_PG_BIN"])
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if found:
            return Path(found[-1]).parent
        initdb = shutil.which("initdb")
        if not initdb:
            sys.exit("compat: no PostgreSQL server binaries (bash scripts/setup.sh installs them)")
        return Path(initdb).parent

    def pg(self, tool: str, *args: str, **kw):
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return run(cmd, **kw)

    def start(self) -> None:
        self.sock.mkdir(parents=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_postgres:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
            shutil.chown(pwfile, "postgres")
        self.pg("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile), "-E", "UTF8",
                "--locale", "C.UTF-8", "--auth-local", "trust", "--auth-host", "scram-sha-256",
                stdout=subprocess.DEVNULL)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"""
port = {self.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self.sock}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
max_prepared_transactions = 20
password_encryption = 'scram-sha-256'
shared_buffers = 128MB
max_wal_size = 256MB
""")
        hba = self.data / "pg_hba.conf"
        # tokio-postgres' own tests log in as pass_user (password), md5_user (md5) and scram_user
        # (SCRAM, which the cluster's passwords use); every other login from loopback is trusted,
        # the same for direct clients and the proxy's own upstream connections, so a suite that
        # opens thousands of connections measures its statements, not key derivation.
        hba.write_text("host all pass_user 127.0.0.1/32 password\nhost all md5_user 127.0.0.1/32 md5\n"
                       "host all scram_user 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n"
                       + hba.read_text())
        self.logfile.touch()
        if self.as_postgres:
            shutil.chown(self.logfile, "postgres")
        self.pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "start", stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.logfile.exists():
            shutil.copy(self.logfile, self.logs / "postgres.log")

    def psql(self, db: str, sql: str) -> str:
        out = run([str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.sock),
                   "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql], capture_output=True)
        return out.stdout.strip()

    def url(self, user: str, password: str, db: str) -> str:
        return f"postgres://{user}:{password}@127.0.0.1:{self.port}/{db}?sslmode=disable"


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    mode: str
    host: str
    port: int
    user: str
    password: str
    dbname: str

    def conninfo(self, sslmode: str = "prefer") -> str:
        return (f"host={self.host} port={self.port} user={self.user} password={self.password} "
                f"dbname={self.dbname} sslmode={sslmode}")

    def env(self) -> dict:
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGDATABASE": self.dbname, "PGSSLMODE": "prefer"}


@dataclass
class Result:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: set = field(default_factory=set)
    note: str = ""
    seconds: float = 0.0

    def cell(self) -> str:
        if self.note and not (self.passed or self.failed or self.skipped):
            return self.note
        return f"{self.passed} / {self.failed} / {self.skipped}"


class Env:
    """The cluster, the proxy, the keys."""

    def __init__(self, base: Path, binary: Path, suites: list[str]):
        self.base = base
        self.binary = binary
        self.suites = suites
        self.cluster = Cluster(base)
        self.proxy_port = free_port()
        self.proxy = None
        self.app_password = secrets.token_hex(16)
        self.dev_keys: dict[str, str] = {}
        self.operator_key = ""

    def db(self, suite: str, mode: str) -> str:
        return {"direct": f"{suite}_direct", "operator": f"{suite}_op"}.get(mode, "compat_dev").replace("-", "_")

    def org(self, suite: str) -> str:
        return "compat_" + suite.replace("-", "_")

    def target(self, suite: str, mode: str) -> Target:
        db = self.db(suite, mode)
        if mode == "direct":
            return Target(mode, "127.0.0.1", self.cluster.port, "postgres", self.cluster.password, db)
        if mode == "operator":
            return Target(mode, "127.0.0.1", self.proxy_port, "postgres", self.operator_key, db)
        return Target(mode, "127.0.0.1", self.proxy_port, "compat", self.dev_keys[suite], db)

    def cli(self, *args: str, capture=True) -> str:
        out = run([str(self.binary), *args, "--admin-upstream", self.admin_url, "--policies",
                   str(HERE / "policies")], capture_output=capture)
        return (out.stdout or "").strip()

    def start(self) -> None:
        c = self.cluster
        c.start()
        log(f"cluster on 127.0.0.1:{c.port} ({c.bin})")
        # What the ORM suites expect of a server: extensions and a collation in every new database.
        # (A development key cannot create extensions: the ones the suites use are there already.)
        extensions = ["hstore", "citext", "ltree", "bloom", "btree_gin", "btree_gist", '"uuid-ossp"', "pg_trgm",
                      "unaccent", "pgcrypto"]
        c.psql("template1", " ".join(f"CREATE EXTENSION IF NOT EXISTS {e};" for e in extensions)
               + " CREATE COLLATION IF NOT EXISTS \"en_US\" (locale = 'C.UTF-8');")
        c.psql("postgres", f"CREATE ROLE compat_app LOGIN PASSWORD '{self.app_password}' NOSUPERUSER NOCREATEDB "
                           "NOCREATEROLE; CREATE ROLE pass_user LOGIN PASSWORD 'password'; "
                           "CREATE ROLE scram_user LOGIN PASSWORD 'password'; SET password_encryption = 'md5'; "
                           "CREATE ROLE md5_user LOGIN PASSWORD 'password';")
        for suite in self.suites:
            for mode in ("direct", "operator"):
                db = self.db(suite, mode)
                c.psql("postgres", f"CREATE DATABASE {db}")
                c.psql(db, "CREATE SCHEMA test_schema; CREATE SCHEMA test_schema_2; "
                           f"ALTER DATABASE {db} SET default_text_search_config = 'pg_catalog.english'")
        c.psql("postgres", "CREATE DATABASE compat_dev")
        c.psql("compat_dev", (HERE / "policies" / "schema.sql").read_text())
        c.psql("compat_dev", "ALTER DATABASE compat_dev SET default_text_search_config = 'pg_catalog.english'")
        c.psql("compat_dev", "GRANT USAGE ON SCHEMA public TO compat_app; "
                             "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO compat_app;")
        self.admin_url = c.url("postgres", c.password, "compat_dev")
        self.cli("init")
        self.cli("policy", "dev")
        self.cli("policy", "deploy")
        self.operator_key = self.cli("keys", "create", "--operator", "--name", "compat-operator")
        for suite in self.suites:
            self.dev_keys[suite] = self.cli("keys", "create", "--org", self.org(suite), "--env", "development",
                                            "--role", "admin", "--actor-type", "system", "--actor-id",
                                            f"compat-{suite}", "--name", f"compat-{suite}")
        config = self.base / "proxy.toml"
        config.write_text(f"""
listen = "127.0.0.1:{self.proxy_port}"
upstream = "{c.url('compat_app', self.app_password, 'compat_dev')}"
admin_upstream = "{self.admin_url}"
operator_keys = true
event_store = "refused"
max_connections_per_key = 300
# pg_sleep for the cancel tests; extension functions the suites call (hstore, pgcrypto,
# unaccent, pg_trgm), as an operator allows them for development work.
allow_functions = ["pg_sleep", "hstore", "akeys", "avals", "skeys", "svals", "slice", "exist", "defined",
                   "hstore_to_json", "hstore_to_jsonb", "digest", "unaccent", "similarity", "word_similarity",
                   "strict_word_similarity"]
""")
        self.proxy_log = open(self.base / "proxy.log", "w")
        self.proxy = subprocess.Popen([str(self.binary), "serve", "--config", str(config)], stdout=self.proxy_log,
                                      stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1).close()
                break
            except OSError:
                if self.proxy.poll() is not None:
                    sys.exit(f"compat: the proxy exited; see {self.base / 'proxy.log'}")
                time.sleep(0.2)
        log(f"proxy on 127.0.0.1:{self.proxy_port}")

    def refusals(self, suite: str) -> list[tuple[str, int]]:
        """The development key's refusals for one suite (its organization), most frequent first."""
        time.sleep(1.5)  # events are flushed in batches
        org = self.org(suite)
        out = self.cluster.psql("compat_dev", "SELECT sum(statements), left(regexp_replace(reason, '\\s+', ' ', 'g'), 160) "
                                f"FROM struere.events WHERE organization_id = '{org}' AND verdict = 'refused' "
                                "GROUP BY 2 ORDER BY 1 DESC")
        rows = []
        for line in out.splitlines():
            n, _, reason = line.partition("|")
            rows.append((reason, int(n)))
        return rows

    def stop(self) -> None:
        if self.proxy and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
        self.cluster.stop()
        shutil.rmtree(self.cluster.base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Suites. Each takes (env, target, workdir, quick) and returns a Result.


def count_lines(text: str) -> Result:
    r = Result()
    for line in text.splitlines():
        if line.startswith("PASS "):
            r.passed += 1
        elif line.startswith("FAIL "):
            r.failed += 1
            r.failures.add(line[5:].split(":")[0].strip())
        elif line.startswith("REFUSED "):
            r.failed += 1
            r.failures.add(line[8:].strip() + " (refused)")
        elif line.startswith("SKIP "):
            r.skipped += 1
    return r


def suite_psql(env: Env, t: Target, work: Path, quick: bool) -> Result:
    script = HERE / "psql.sql"
    names = re.findall(r"^\\echo PASS (\w+)", script.read_text(), re.M)
    out = run([str(env.cluster.bin / "psql"), "-X", "-f", str(script), "-v", f"t=compat_psql_{t.mode}", "-v",
               f"dir={work}", t.conninfo("prefer")], capture_output=True, check=False)
    (work / "psql.log").write_text(out.stdout + out.stderr)
    r = count_lines(out.stdout)
    done = set(re.findall(r"^PASS (\w+)", out.stdout, re.M))
    refused = set(re.findall(r"^REFUSED (\w+)", out.stdout, re.M))
    for n in names:
        if n not in done and n not in r.failures and n not in refused:
            r.failed += 1
            r.failures.add(n)
    return r


def suite_jdbc(env: Env, t: Target, work: Path, quick: bool) -> Result:
    classes = CACHE / "jdbc"
    source = HERE / "jdbc" / "Compat.java"
    stamp = classes / "Compat.class"
    if not stamp.exists() or stamp.stat().st_mtime < source.stat().st_mtime:
        classes.mkdir(parents=True, exist_ok=True)
        run(["javac", "-cp", JDBC_JAR, "-d", str(classes), str(source)])
    out = run(["java", "-cp", f"{JDBC_JAR}:{classes}", "Compat", t.host, str(t.port), t.dbname, t.user, t.password,
               f"compat_jdbc_{t.mode}"], capture_output=True, check=False, timeout=600)
    (work / "jdbc.log").write_text(out.stdout + out.stderr)
    return count_lines(out.stdout)


# tokio-postgres: the crate's own integration tests (tests/test), from the registry's source of the
# version this repository locks; its dev-dependencies come from the registry when first built.
TOKIO_POSTGRES_PATCH = r'''
// Added by struere-proxy's compatibility runner: connection settings from the environment.
pub fn compat_addr() -> String {
    format!("{}:{}", std::env::var("PGHOST").unwrap(), std::env::var("PGPORT").unwrap())
}

pub fn compat_conn(s: &str) -> String {
    let port = std::env::var("PGPORT").unwrap();
    let mut s = s
        .replace("port=5432,5433", &format!("port=1,{port}"))
        .replace("port=5433,5433", &format!("port={port},{port}"))
        .replace("port=5433", &format!("port={port}"));
    if s.contains("user=postgres") {
        let with = format!(
            "user={} password={} dbname={}",
            std::env::var("PGUSER").unwrap(),
            std::env::var("PGPASSWORD").unwrap(),
            std::env::var("PGDATABASE").unwrap()
        );
        s = s.replace("user=postgres", &with);
    }
    s
}
'''


def tokio_postgres_source() -> Path:
    meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--locked", "--manifest-path",
                           str(ROOT / "Cargo.toml")], capture_output=True).stdout)
    pkg = next(p for p in meta["packages"] if p["name"] == "tokio-postgres")
    src = Path(pkg["manifest_path"]).parent
    dest = CACHE / f"tokio-postgres-{pkg['version']}"
    if not (dest / ".compat-patched").exists():
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        main = dest / "tests" / "test" / "main.rs"
        text = main.read_text()
        text = text.replace('TcpStream::connect("127.0.0.1:5433")', "TcpStream::connect(crate::compat_addr())")
        text = text.replace("let config = s.parse::<Config>().unwrap();",
                            "let config = crate::compat_conn(s).parse::<Config>().unwrap();")
        main.write_text(text + TOKIO_POSTGRES_PATCH)
        rt = dest / "tests" / "test" / "runtime.rs"
        text = rt.read_text()
        text = re.sub(r'tokio_postgres::connect\(\s*("(?:[^"\\]|\\.)*")',
                      lambda m: f"tokio_postgres::connect(&crate::compat_conn({m.group(1)})", text, flags=re.S)
        text = text.replace("tokio_postgres::connect(s, NoTls)", "tokio_postgres::connect(&crate::compat_conn(s), NoTls)")
        text = text.replace('connect("host=localhost port=5433 user=postgres")',
                            'connect(&crate::compat_conn("host=localhost port=5433 user=postgres"))')
        rt.write_text(text)
        # The crate is its own workspace here.
        with open(dest / "Cargo.toml", "a") as f:
            f.write("\n[workspace]\n")
        (dest / ".compat-patched").write_text("")
    return dest


def suite_tokio_postgres(env: Env, t: Target, work: Path, quick: bool) -> Result:
    src = tokio_postgres_source()
    target_dir = CACHE / "target-tokio-postgres"
    cmd = nice(["cargo", "test", "--test", "test", "--manifest-path", str(src / "Cargo.toml"), "--", "--test-threads",
                "4"])
    e = dict(os.environ, CARGO_TARGET_DIR=str(target_dir), **t.env())
    out = run(cmd, capture_output=True, check=False, env=e, timeout=3600)
    (work / "tokio-postgres.log").write_text(out.stdout + out.stderr)
    r = Result()
    for line in out.stdout.splitlines():
        m = re.match(r"test (\S+) \.\.\. (ok|FAILED|ignored)", line)
        if m:
            if m.group(2) == "ok":
                r.passed += 1
            elif m.group(2) == "FAILED":
                r.failed += 1
                r.failures.add(m.group(1))
            else:
                r.skipped += 1
    if not (r.passed or r.failed):
        r.note = "did not run (see log)"
    return r


def venv() -> Path:
    v = CACHE / "venv"
    py = v / "bin" / "python"
    if not (v / ".ready").exists():
        run([sys.executable, "-m", "venv", str(v)])
        run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        run([str(py), "-m", "pip", "install", "-q", "pytest", "psycopg[binary]", "asyncpg", "psycopg2-binary"])
        (v / ".ready").write_text("")
    return py


def sdist(name: str, version: str) -> Path:
    """The source distribution of name==version from the package index, unpacked in the cache."""
    name = name.lower()
    dest = CACHE / f"{name}-{version}"
    if dest.exists():
        return dest
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    py = venv()
    if not glob.glob(str(dl / f"{name}-{version}.tar.gz")):
        run([str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", name, "-d", str(dl),
             f"{name}=={version}"])
    archive = glob.glob(str(dl / f"{name}-{version}.tar.gz"))[0]
    with tarfile.open(archive) as tf:
        tf.extractall(CACHE, filter="data")
    return dest


def parse_pytest(out: str, r: Result) -> None:
    for line in out.splitlines():
        m = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if m:
            r.failures.add(m.group(2))
    tail = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if tail:
        last = tail[-1]
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last):
            n = int(n)
            if what == "passed" or what == "xfailed":
                r.passed += n
            elif what in ("failed", "error", "errors", "xpassed"):
                r.failed += n
            elif what == "skipped":
                r.skipped += n


SQLALCHEMY_SUBSET = ["test/dialect/postgresql", "test/sql/test_types.py", "test/sql/test_query.py",
                     "test/engine/test_execute.py", "test/engine/test_transaction.py",
                     "test/engine/test_reflection.py", "test/orm/test_query.py", "test/orm/test_unitofwork.py"]
SQLALCHEMY_QUICK = ["test/dialect/postgresql/test_query.py", "test/engine/test_transaction.py"]
# asyncpg: the dialect's own tests and the core query and transaction tests.
SQLALCHEMY_ASYNCPG_SUBSET = ["test/dialect/postgresql", "test/sql/test_query.py", "test/engine/test_transaction.py"]


def suite_sqlalchemy(driver: str):
    def suite(env: Env, t: Target, work: Path, quick: bool) -> Result:
        py = venv()
        src = sdist("SQLAlchemy", SQLALCHEMY_VERSION)
        run([str(py), "-m", "pip", "install", "-q", f"sqlalchemy=={SQLALCHEMY_VERSION}"])
        # The suite's pre-drop diagnostic lists idle sessions from pg_stat_activity, which a
        # development key refuses (other tenants' queries): in that mode the runner's copy skips
        # the diagnostic (a warning in the suite, not a test), so the tables are still dropped.
        provision = src / "lib" / "sqlalchemy" / "dialects" / "postgresql" / "provision.py"
        text = provision.read_text()
        marker = '    """Ensure there are no locks on the current username/database."""\n'
        if "STRUERE_COMPAT_NO_PG_STAT_ACTIVITY" not in text and marker in text:
            provision.write_text(text.replace(marker, marker + '    if __import__("os").environ.get('
                                              '"STRUERE_COMPAT_NO_PG_STAT_ACTIVITY"):\n        return\n'))
        extra = {"STRUERE_COMPAT_NO_PG_STAT_ACTIVITY": "1"} if t.mode == "development" else {}
        uri = f"postgresql+{driver}://{t.user}:{t.password}@{t.host}:{t.port}/{t.dbname}"
        paths = SQLALCHEMY_QUICK if quick else SQLALCHEMY_SUBSET if driver == "psycopg" else SQLALCHEMY_ASYNCPG_SUBSET
        cmd = nice([str(py), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--maxfail=1000000", "--dburi", uri, *paths])
        out = run(cmd, capture_output=True, check=False, cwd=src, timeout=5400, env=dict(os.environ, **extra))
        (work / f"sqlalchemy-{driver}.log").write_text(out.stdout + out.stderr)
        r = Result()
        parse_pytest(out.stdout, r)
        if not (r.passed or r.failed):
            r.note = "did not run (see log)"
        return r

    return suite


DJANGO_SUBSET = ["basic", "queries", "expressions", "transactions", "backends", "model_fields", "lookup",
                 "aggregation", "select_for_update", "bulk_create", "postgres_tests", "introspection", "schema",
                 "migrations", "db_functions", "annotations", "update", "delete", "timezones", "raw_query",
                 "get_or_create", "constraints", "indexes", "inspectdb", "many_to_many", "many_to_one", "ordering",
                 "custom_lookups", "datatypes", "model_regress"]
DJANGO_QUICK = ["basic", "transactions"]


def suite_django(env: Env, t: Target, work: Path, quick: bool) -> Result:
    py = venv()
    src = sdist("Django", DJANGO_VERSION)
    if not (CACHE / f".django-{DJANGO_VERSION}-2").exists():
        # The release itself, and what the chosen test apps import (not the suite's whole
        # requirements file, which builds native packages).
        run([str(py), "-m", "pip", "install", "-q", f"django=={DJANGO_VERSION}", "tblib", "Pillow", "PyYAML",
             "jinja2", "numpy", "argon2-cffi", "bcrypt", "psycopg-pool"])
        (CACHE / f".django-{DJANGO_VERSION}-2").write_text("")
    settings = work / "compat_settings.py"
    dev = t.mode == "development"

    def db(alias_test_name: str, mirror: bool) -> str:
        test = "{'MIRROR': 'default'}" if mirror else ("{'NAME': %r}" % alias_test_name)
        return (f"{{'ENGINE': 'django.db.backends.postgresql', 'HOST': {t.host!r}, 'PORT': {t.port}, "
                f"'USER': {t.user!r}, 'PASSWORD': {t.password!r}, 'NAME': {t.dbname!r}, "
                f"'OPTIONS': {{'sslmode': 'prefer'}}, 'TEST': {test}}}")

    # Through a development key there is one database (the proxy's): the test database is that
    # database (kept, never created), and the `other` alias mirrors it.
    test_name = t.dbname if dev else f"test_{t.dbname}"
    settings.write_text(
        # Through a development key the maintenance database `postgres` is refused (3D000, the
        # proxy serves one database); Django then uses the configured one with a RuntimeWarning,
        # which Django's test runner would turn into an error.
        "import warnings\n"
        "warnings.filterwarnings('ignore', message=\"Normally Django will use a connection to the 'postgres'\")\n"
        "DATABASES = {\n"
        f"    'default': {db(test_name, False)},\n"
        f"    'other': {db(t.dbname if dev else 'other_' + test_name, dev)},\n"
        "}\n"
        "SECRET_KEY = 'django_tests_secret_key'\n"
        "PASSWORD_HASHERS = ['django.contrib.auth.hashers.MD5PasswordHasher']\n"
        "DEFAULT_AUTO_FIELD = 'django.db.models.AutoField'\n"
        "USE_TZ = False\n")
    apps = DJANGO_QUICK if quick else DJANGO_SUBSET
    cmd = nice([str(py), "runtests.py", "--settings", "compat_settings", "--parallel", "1", "--noinput", "-v", "2",
                *(["--keepdb"] if dev else []), *apps])
    e = dict(os.environ, PYTHONPATH=str(work))
    out = run(cmd, capture_output=True, check=False, cwd=src / "tests", env=e, timeout=5400)
    (work / "django.log").write_text(out.stdout + out.stderr)
    return parse_django(out.stdout + out.stderr)


def parse_django(text: str) -> Result:
    r = Result()
    # Names from the per-test lines and the summary's headers; numbers from the summary.
    for line in text.splitlines():
        m = re.match(r"^(\w+) \(([\w.]+)\).* \.\.\. (FAIL|ERROR|unexpected success)$", line) or \
            re.match(r"^(FAIL|ERROR): (\w+) \(([\w.]+)\)", line)
        if m and m.group(1) in ("FAIL", "ERROR"):
            r.failures.add(m.group(3))
        elif m:
            r.failures.add(m.group(2))
    ran = re.search(r"^Ran (\d+) tests?", text, re.M)
    summary = re.search(r"^(OK|FAILED)(?: \((.*)\))?$", text, re.M)
    if ran and summary:
        counts = dict((k.strip(), int(v)) for k, v in re.findall(r"([\w ]+)=(\d+)", summary.group(2) or ""))
        r.failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpected successes", 0)
        r.skipped = counts.get("skipped", 0)
        r.passed = int(ran.group(1)) - r.failed - r.skipped
    else:
        r.note = "did not run (see log)"
    return r


SUITES = {
    "psql": suite_psql,
    "jdbc": suite_jdbc,
    "tokio-postgres": suite_tokio_postgres,
    "sqlalchemy": suite_sqlalchemy("psycopg"),
    "sqlalchemy-asyncpg": suite_sqlalchemy("asyncpg"),
    "django": suite_django,
}


# --------------------------------------------------------------------------------------------


def differences(results: dict[str, Result], refusals: list[tuple[str, int]]) -> str:
    d, o, v = (results.get(m) for m in MODES)
    parts = []
    if d and o:
        extra = sorted(o.failures - d.failures)
        fixed = sorted(d.failures - o.failures)
        if extra:
            parts.append(f"operator fails {len(extra)} that pass directly: {', '.join(extra[:5])}"
                         + (" …" if len(extra) > 5 else ""))
        if fixed:
            parts.append(f"operator passes {len(fixed)} that fail directly")
    if d and v:
        extra = sorted(v.failures - d.failures)
        if extra:
            parts.append(f"development fails {len(extra)} more: {', '.join(extra[:5])}" + (" …" if len(extra) > 5 else ""))
    if refusals:
        top = "; ".join(f"{n}× {reason}" for reason, n in refusals[:4])
        parts.append(f"refusals: {top}")
    return " — ".join(parts) if parts else "none"


def build(debug: bool) -> Path:
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    profile = "debug" if debug else "release"
    log(f"building the proxy ({profile})")
    run(nice(["cargo", "build", "--manifest-path", str(ROOT / "Cargo.toml"), "--bin", "struere-proxy",
              *([] if debug else ["--release"])]))
    return target_dir / profile / "struere-proxy"


def serve(names: list[str], debug: bool) -> int:
    """The targets of `names` (as for suites of those names), for suites run by hand (README,
    "Suites run from their public source"). One line per target on stdout:
    TARGET <name> <mode> PGHOST=… PGPORT=… PGUSER=… PGPASSWORD=… PGDATABASE=…, then READY."""
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            sys.exit(f"compat: {name!r}: a name is lower-case letters, digits, '-' and '_'")
    CACHE.mkdir(parents=True, exist_ok=True)
    binary = build(debug)
    base = CACHE / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-serve"
    base.mkdir(parents=True)
    env = Env(base, binary, names)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        env.start()
        for name in names:
            for mode in MODES:
                t = env.target(name, mode)
                print(f"TARGET {name} {mode} PGHOST={t.host} PGPORT={t.port} PGUSER={t.user} "
                      f"PGPASSWORD={t.password} PGDATABASE={t.dbname}", flush=True)
        print("READY", flush=True)
        log(f"proxy log: {base / 'proxy.log'}; Ctrl-C ends")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for name in names:
            refusals = env.refusals(name)
            if refusals:
                (base / f"{name}-refusals.txt").write_text("".join(f"{n} {r}\n" for r, n in refusals))
        env.stop()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="psql,jdbc,tokio-postgres,sqlalchemy,sqlalchemy-asyncpg,django",
                    help=f"comma-separated, from {', '.join(SUITES)}")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--quick", action="store_true", help="a small subset of each suite")
    ap.add_argument("--debug", action="store_true", help="a debug build of the proxy (default: release)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster and proxy running at the end (Ctrl-C)")
    ap.add_argument("--serve", metavar="NAMES",
                    help="run no suite: start the cluster and the proxy with the three targets of each of these "
                         "comma-separated names, print them, and wait (Ctrl-C) while a suite run by hand uses them")
    args = ap.parse_args()
    if args.serve:
        return serve([s for s in args.serve.split(",") if s], args.debug)
    suites = [s for s in args.suites.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for s in suites:
        if s not in SUITES:
            sys.exit(f"compat: unknown suite {s} (known: {', '.join(SUITES)})")
    CACHE.mkdir(parents=True, exist_ok=True)
    binary = build(args.debug)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = CACHE / "runs" / f"{stamp}-{os.getpid()}"
    base.mkdir(parents=True)
    env = Env(base, binary, suites)
    table = {}
    try:
        env.start()
        for suite in suites:
            table[suite] = {}
            for mode in modes:
                work = base / suite / mode
                work.mkdir(parents=True)
                t = env.target(suite, mode)
                log(f"{suite} {mode} …")
                start = time.monotonic()
                try:
                    res = SUITES[suite](env, t, work, args.quick)
                except subprocess.TimeoutExpired:
                    res = Result(note="timed out")
                except subprocess.CalledProcessError as e:
                    res = Result(note=f"could not run ({e.cmd[0]} exited {e.returncode})")
                res.seconds = time.monotonic() - start
                table[suite][mode] = res
                log(f"{suite} {mode}: {res.cell()} in {res.seconds:.0f} s (log: {work})")
            refusals = env.refusals(suite) if "development" in modes else []
            table[suite]["_refusals"] = refusals
        if args.keep:
            log(f"kept: cluster 127.0.0.1:{env.cluster.port}, proxy 127.0.0.1:{env.proxy_port}; Ctrl-C ends")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        env.stop()
    lines = ["| suite | direct passed / failed / skipped | operator key | development key | differences and causes |",
             "|---|---|---|---|---|"]
    for suite, res in table.items():
        refusals = res.pop("_refusals", [])
        cells = [res[m].cell() if m in res else "—" for m in MODES]
        lines.append(f"| {suite}{' (quick)' if args.quick else ''} | {' | '.join(cells)} | "
                     f"{differences(res, refusals)} |")
    report = "\n".join(lines)
    details = []
    for suite, res in table.items():
        for mode, r in res.items():
            if r.failures:
                details.append(f"{suite} {mode} failures: {', '.join(sorted(r.failures))}")
    (base / "report.md").write_text(report + "\n\n" + "\n".join(details) + "\n")
    print(report)
    log(f"report and logs: {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
