#!/usr/bin/env python3
"""Instructions per small cache hit through the proxy, counted by callgrind.

The one measure of the proxy's own work per request that repeats on a
shared VM without hardware counters (run to run within about 1 %): a
release archiver holding the 15 KiB `bench/small` `v1.0.tar.gz` as a
hit, a release gitball-proxy in front of it under
`valgrind --tool=callgrind`, WARMUP keep-alive GETs through the proxy,
counters zeroed, then HITS GETs over CONNECTIONS keep-alive connections
(wrk's request head), dumped and divided by HITS.

    python3 ops/bench/callgrind_hit.py --workdir DIR [--proxy BIN] [--archiver BIN] [--runs 2]

DIR holds the generated inputs (repos/bench/small.git, made here if
missing, as `run.sh` makes it); binaries default to target/release. Each
run prints its figure and keeps its profile (DIR/callgrind-hit.N.out) for
`callgrind_annotate --inclusive=yes`. Everything listens on 127.0.0.1.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_repo  # noqa: E402
from bench import _read_head, clean_env, free_port, wait_healthy  # noqa: E402

PATH = "/bench/small/archive/v1.0.tar.gz"


def small_repo(workdir):
    repos = os.path.join(workdir, "repos")
    path = os.path.join(repos, "bench", "small.git")
    if not os.path.exists(os.path.join(path, "HEAD")):
        home = os.path.join(workdir, "home")
        os.makedirs(home, exist_ok=True)
        # As bench.py's prepare_inputs makes bench/small.
        gen_repo.write_repository(path, gen_repo.source_like_files(3, 40 * 1024, mean_file_bytes=2048),
                                  extra_tags=("v1.0",), env=clean_env(home))
    return repos


def get_many(port, count):
    """`count` keep-alive GETs of PATH on one connection, wrk's head."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        buf = bytearray()
        for _ in range(count):
            sock.sendall(request)
            status, headers, buf = _read_head(sock, buf)
            if status != 200:
                raise RuntimeError(f"not a 200: {status} {headers}")
            length = int(headers["content-length"])
            while len(buf) < length:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed in the body")
                buf += data
            del buf[:length]


def load(port, hits, connections):
    errors = []

    def one(count):
        try:
            get_many(port, count)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=one, args=(hits // connections,)) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def total_instructions(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def one_run(args, repos, index):
    scratch = tempfile.mkdtemp(prefix="gitball-callgrind-")
    cache = tempfile.mkdtemp(prefix="gitball-callgrind-cache-", dir="/dev/shm")
    archiver_port, proxy_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([
            args.archiver, "--listen", f"127.0.0.1:{archiver_port}", "--repos", repos,
            "--cache-dir", cache, "--cache-max-bytes", "1GiB", "--max-archive-bytes", "1GiB",
            "--shutdown-grace", "1",
        ], stdout=subprocess.DEVNULL, stderr=open(os.path.join(scratch, "archiver.log"), "w")))
        routes = os.path.join(scratch, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{archiver_port}"\n')
        out = os.path.join(scratch, "callgrind.out")
        procs.append(subprocess.Popen([
            "valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}",
            args.proxy, "--listen", f"127.0.0.1:{proxy_port}", "--routes", routes, "--shutdown-grace", "1",
        ], stdout=open(os.path.join(scratch, "proxy.log"), "w"), stderr=subprocess.STDOUT))
        wait_healthy(archiver_port, timeout=30)
        wait_healthy(proxy_port, timeout=120)
        pid = procs[-1].pid
        # Generates the archive (a cold answer is chunked), then warms the proxy's pool.
        subprocess.run(["curl", "-sSf", "-o", "/dev/null", f"http://127.0.0.1:{archiver_port}{PATH}"], check=True)
        load(proxy_port, args.warmup, args.connections)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, stdout=subprocess.DEVNULL)
        load(proxy_port, args.hits, args.connections)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, stdout=subprocess.DEVNULL)
        dumps = sorted(n for n in os.listdir(scratch) if n.startswith("callgrind.out."))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        kept = os.path.join(args.workdir, f"callgrind-hit.{index}.out")
        shutil.copyfile(os.path.join(scratch, dumps[-1]), kept)
        per_hit = total_instructions(kept) / args.hits
        print(f"run {index}: {per_hit:,.0f} instructions per hit ({kept})", flush=True)
        return per_hit
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    release = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "release")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--proxy", default=os.path.join(release, "gitball-proxy"))
    parser.add_argument("--archiver", default=os.path.join(release, "gitball-archiver"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=240)
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    repos = small_repo(args.workdir)
    figures = [one_run(args, repos, index) for index in range(1, args.runs + 1)]
    print(json.dumps({"proxy": args.proxy, "per_hit": [round(f) for f in figures]}), flush=True)


if __name__ == "__main__":
    main()
