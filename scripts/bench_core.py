#!/usr/bin/env python3
"""Core overhead of the proxy, measured against direct PostgreSQL in the same run.

1. Round-trip latency of a trivial query (`SELECT 1`) with pgbench, one client, simple and
   extended protocol: direct to PostgreSQL, through the proxy with an environment key (full
   parse -> rewrite -> print -> verify path, cache hits), and with an operator key (relay only).
   Rounds are interleaved and medians reported, because these machines are noisy.
2. Memory per idle connection: the proxy process's RSS before and after opening N authenticated
   idle sessions.

Usage: python3 scripts/bench_core.py [--seconds 5] [--rounds 3] [--idle 200]
"""
import argparse
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_demo():
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    env = dict(os.environ, STRUERE_LOG="warn")
    proc = subprocess.Popen(
        [os.path.join(ROOT, "target/release/struere-proxy"), "demo", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True, env=env)
    # The demo's stdout format: UPSTREAM, LISTEN, KEY <env> <org> <role> <actor> <key>, OPERATOR,
    # psql commands, READY.
    info = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "READY":
            break
        parts = line.split()
        if parts[:1] == ["KEY"] and len(parts) == 6 and parts[1:4] == ["development", "acme", "admin"]:
            info["DEV_KEY"] = parts[5]
        elif parts[:1] in (["UPSTREAM"], ["LISTEN"], ["OPERATOR"]) and len(parts) == 2:
            info[parts[0]] = parts[1]
        elif parts and parts[0].endswith("/psql"):
            info.setdefault("PSQL", parts[0])
    return proc, info


def pgbench(pgbench_bin, conn, protocol, seconds, script):
    out = subprocess.run(
        [pgbench_bin, "-n", "-c", "1", "-j", "1", "-T", str(seconds), "-M", protocol, "-f", script, conn],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if failed and int(failed.group(1)) > 0:
        raise RuntimeError(f"pgbench reported failed transactions: {out.stdout}")
    lat = float(re.search(r"latency average = ([\d.]+) ms", out.stdout).group(1))
    return lat * 1000.0  # microseconds


def raw_session(host, port, key):
    """An authenticated session on a raw socket, left idle."""
    s = socket.create_connection((host, port))
    body = struct.pack("!i", 3 << 16) + b"user\0bench\0database\0app\0\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    buf = b""

    def read_until(tag):
        nonlocal buf
        while True:
            while len(buf) >= 5:
                t, n = buf[0:1], struct.unpack("!i", buf[1:5])[0]
                if len(buf) < 1 + n:
                    break
                msg, buf = buf[:1 + n], buf[1 + n:]
                if t == tag:
                    return
                if t == b"E":
                    raise RuntimeError(f"refused: {msg[5:]!r}")
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("closed")
            buf += chunk

    read_until(b"R")
    pw = key.encode() + b"\0"
    s.sendall(b"p" + struct.pack("!i", len(pw) + 4) + pw)
    read_until(b"Z")
    return s


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=200)
    args = ap.parse_args()

    proc, info = start_demo()
    try:
        host, port = info["LISTEN"].rsplit(":", 1)
        upstream = info["UPSTREAM"]
        m = re.match(r"postgres://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)", upstream)
        direct = f"host={m.group(3)} port={m.group(4)} user={m.group(1)} password={m.group(2)} dbname={m.group(5)} sslmode=disable"
        via = lambda key: f"host={host} port={port} user=bench password={key} dbname=app sslmode=disable"
        pgb = os.path.join(os.path.dirname(info["PSQL"]), "pgbench")
        script = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
        script.write("SELECT 1;\n")
        script.close()
        targets = [("direct PostgreSQL", direct), ("proxy, environment key", via(info["DEV_KEY"])),
                   ("proxy, operator key", via(info["OPERATOR"]))]
        print(f"## Round-trip latency of SELECT 1 (1 client, {args.rounds} interleaved rounds of {args.seconds}s, median)\n")
        print("| protocol | path | latency (µs) | vs direct |")
        print("|---|---|---:|---:|")
        for protocol in ("simple", "extended"):
            samples = {name: [] for name, _ in targets}
            for _ in range(args.rounds):
                for name, conn in targets:
                    samples[name].append(pgbench(pgb, conn, protocol, args.seconds, script.name))
            base = statistics.median(samples["direct PostgreSQL"])
            for name, _ in targets:
                med = statistics.median(samples[name])
                print(f"| {protocol} | {name} | {med:.0f} | {med / base:.2f}x |")
        os.unlink(script.name)

        time.sleep(0.5)
        before = rss_kib(proc.pid)
        socks = [raw_session(host, int(port), info["DEV_KEY"]) for _ in range(args.idle)]
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        print(f"\n## Memory per idle connection\n")
        print(f"proxy RSS {before} KiB with no sessions, {after} KiB with {args.idle} idle authenticated sessions: "
              f"{(after - before) / args.idle:.1f} KiB per idle connection (proxy side only; each session also holds one "
              f"upstream PostgreSQL backend).")
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
