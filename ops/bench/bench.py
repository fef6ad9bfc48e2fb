#!/usr/bin/env python3
"""gitball benchmarks: gitball and its peers, side by side, in one run.

Driven by ops/bench/run.sh (which builds the release binaries first); see
BENCHMARKS.md for what each scenario measures and the latest figures.
Everything listens on 127.0.0.1; every load run is bounded in time and
count; every process started here is stopped by its pid.
"""

import argparse
import base64
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_repo  # noqa: E402
from scenario_cache_trace import scenario_cache_trace  # noqa: E402
import scenario_stalled  # noqa: E402
import scenario_realrepo  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BEGIN = "<!-- BEGIN GENERATED: ops/bench/run.sh rewrites from here to END -->"
END = "<!-- END GENERATED -->"


# ---------------------------------------------------------------- settings

class Settings:
    def __init__(self, quick):
        self.quick = quick
        self.runs = 1 if quick else 3
        self.large_bytes = 24 * MiB if quick else 350 * MiB
        self.huge_bytes = 64 * MiB if quick else 1 * GiB
        self.small_bytes = 40 * 1024
        self.wrk_seconds = 2 if quick else 10
        self.wrk_threads = 2
        self.wrk_connections = 64
        self.concurrent = 30
        self.stalled = 100
        self.stall_read_bytes = 64 * 1024
        self.cache_max = "8GiB"
        self.max_archive = "4GiB"


# ---------------------------------------------------------------- processes

class Processes:
    """Every process this run starts, stopped by pid (never by name)."""

    def __init__(self, gitball_env=None):
        self.running = []
        # Set for every gitball process ("archiver", "proxy"): --tcp-congestion.
        self.gitball_env = gitball_env or {}

    def start(self, name, argv, log_path, env=None):
        if name in ("archiver", "proxy") and self.gitball_env:
            env = {**(os.environ if env is None else env), **self.gitball_env}
        log = open(log_path, "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=10):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running = [(n, p) for (n, p) in self.running if p is not proc]

    def stop_all(self):
        for _, proc in list(reversed(self.running)):
            self.stop(proc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITBALL_", "GIT_"))}
    env["HOME"] = home
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["LC_ALL"] = "C"
    return env


def wait_healthy(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, _, _ = http_get_small(port, "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing healthy on 127.0.0.1:{port} after {timeout}s")


def wait_listening(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


# ---------------------------------------------------------------- HTTP client

def _read_head(sock, buf):
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed before the response head")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, bytearray(rest)


def http_get_small(port, path, method="GET"):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        status, headers, rest = _read_head(sock, bytearray())
        if method == "HEAD":
            return status, headers, b""
        body = bytearray(rest)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            body += data
    return status, headers, bytes(body)


def metric_value(port, name):
    """The value of an unlabelled series on the /metrics page at `port`."""
    _, _, body = http_get_small(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_parked(port, n, timeout=40):
    """Waits until the proxy at `port` has parked `n` downloads (released
    their upstreams after --park-after, 10 s by default); returns the
    seconds waited, or None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metric_value(port, "gitball_proxy_parked_downloads") >= n:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def timed_get(port, path):
    """GET over a fresh connection; times the response head, the first body
    byte and the end. Decodes chunked bodies; counts body bytes."""
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        status, headers, pending = _read_head(sock, bytearray())
        t_head = time.perf_counter()
        t_first = None
        nbytes = 0
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunk_left = 0  # body bytes left in the current chunk
            state = "size"
            done = False
            while not done:
                while not done:
                    if state == "size":
                        end = pending.find(b"\r\n")
                        if end < 0:
                            break
                        size = int(bytes(pending[:end]).split(b";")[0], 16)
                        del pending[: end + 2]
                        if size == 0:
                            done = True
                            break
                        chunk_left = size
                        state = "data"
                    elif state == "data":
                        if not pending:
                            break
                        take = min(chunk_left, len(pending))
                        if t_first is None:
                            t_first = time.perf_counter()
                        nbytes += take
                        chunk_left -= take
                        del pending[:take]
                        if chunk_left == 0:
                            state = "crlf"
                    elif state == "crlf":
                        if len(pending) < 2:
                            break
                        del pending[:2]
                        state = "size"
                if done:
                    break
                if state == "data" and not pending:
                    # Fast path: read chunk data straight into the buffer.
                    n = sock.recv_into(view, min(len(buffer), chunk_left))
                    if n == 0:
                        raise RuntimeError("connection closed inside a chunk")
                    if t_first is None:
                        t_first = time.perf_counter()
                    nbytes += n
                    chunk_left -= n
                    if chunk_left == 0:
                        state = "crlf"
                    continue
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("connection closed before the last chunk")
                pending += data
        else:
            length = int(headers.get("content-length", "-1"))
            if pending:
                t_first = time.perf_counter()
                nbytes += len(pending)
            while length < 0 or nbytes < length:
                n = sock.recv_into(view)
                if n == 0:
                    break
                if t_first is None:
                    t_first = time.perf_counter()
                nbytes += n
            if length >= 0 and nbytes != length:
                raise RuntimeError(f"short body: {nbytes} of {length}")
        t_end = time.perf_counter()
    finally:
        sock.close()
    if status != 200:
        raise RuntimeError(f"GET {path} on :{port} answered {status}")
    return {
        "status": status,
        "cache": headers.get("x-gitball-cache"),
        "head": t_head - t0,
        "first": (t_first or t_end) - t0,
        "total": t_end - t0,
        "bytes": nbytes,
        "headers": headers,
    }


def timed_command(stages, env):
    """Runs a pipeline (list of argv) with the last stage's stdout read here;
    times its first byte and its end, like the HTTP client does."""
    t0 = time.perf_counter()
    procs = []
    stdin = subprocess.DEVNULL
    for argv in stages:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, env=env)
        if procs:
            procs[-1].stdout.close()  # the next stage owns it now
        procs.append(proc)
        stdin = proc.stdout
    fd = procs[-1].stdout.fileno()
    first = None
    at_block = None  # when the output reached 128 KiB (gitball's pipe block)
    nbytes = 0
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            break
        if first is None:
            first = time.perf_counter()
        nbytes += len(data)
        if at_block is None and nbytes >= 128 * 1024:
            at_block = time.perf_counter()
    procs[-1].stdout.close()
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
    t_end = time.perf_counter()
    return {"first": first - t0, "total": t_end - t0, "bytes": nbytes,
            "first_128k": (at_block or t_end) - t0}


def timed_to_null(argv, env):
    """Seconds `argv` takes with its output into /dev/null."""
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - t0


def curl(url, *extra):
    out = subprocess.run(
        ["curl", "-s", "--max-time", "300", "-o", "/dev/null", *extra,
         "-w", "%{http_code} %{size_download} %{speed_download} %{time_starttransfer} %{time_total}", url],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    code, size, speed, ttfb, total = int(out[0]), int(out[1]), float(out[2]), float(out[3]), float(out[4])
    if code != 200:
        raise RuntimeError(f"curl {url}: HTTP {code}")
    return {"size": size, "speed": speed, "ttfb": ttfb, "total": total}


# ---------------------------------------------------------------- /proc

def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_times(pid):
    """(utime, stime, cutime, cstime) of pid, all threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return tuple(int(x) / ticks for x in fields[11:15])


def cpu_seconds(pid):
    """utime + stime of pid and of its reaped children (git), seconds."""
    return sum(cpu_times(pid))


def cpu_split(pids):
    """(user, kernel) CPU seconds of the processes pids, all threads."""
    times = [cpu_times(pid) for pid in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def children_cpu_seconds():
    """CPU of this script's reaped children (the curl clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def foreign_heavy_processes():
    """cargo/rustc processes (other builds on the machine) running now."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("cargo", "rustc") or comm.startswith("rustc"):
            found.append(comm)
    return found


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def alternated(specs, rounds, measure):
    """`measure(binary, round_, name)` for each build of `specs` ("NAME=BIN")
    in each of `rounds`, the builds' order rotated each round, the load
    average printed before and after: the builds, as (name, binary), and
    each one's rows (the A/B scripts' loop)."""
    builds = [tuple(spec.split("=", 1)) for spec in specs]
    rows = {name: [] for name, _ in builds}
    print(f"load before {loadavg()}", flush=True)
    for round_ in range(rounds):
        for i in range(len(builds)):
            name, binary = builds[(i + round_) % len(builds)]
            rows[name].append(measure(binary, round_, name))
    print(f"load after {loadavg()}")
    return builds, rows


# ---------------------------------------------------------------- the stack

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 8192; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    types {{ application/gzip gz; application/x-tar tar; }}
    keepalive_requests 100000;

    # Peer 1: the cached file served from tmpfs with sendfile.
    server {{
        listen 127.0.0.1:{static_port};
        root {docroot};
        sendfile on;
        tcp_nopush on;
        location / {{ }}
    }}

    upstream archiver {{
        server 127.0.0.1:{archiver_port};
        keepalive 128;
    }}

    # Peer 2: nginx as the reverse proxy in front of the same archiver,
    # streaming (proxy_buffering off), 256k buffers, pooled upstream
    # connections: nginx at its best for this job.
    server {{
        listen 127.0.0.1:{rp_port};
        location / {{
            proxy_pass http://archiver;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 256k;      # the one buffer used when not buffering
            proxy_buffers 4 256k;
            proxy_busy_buffers_size 256k;
        }}
    }}

    # Peer 2 with nginx's default buffer sizes (as most configs have it).
    server {{
        listen 127.0.0.1:{rp_default_port};
        location / {{
            proxy_pass http://archiver;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Stack:
    """One archiver (fresh cache dir), one gitball-proxy routing to it, and
    nginx as the peers: a static tmpfs server and two reverse proxies to
    the same archiver."""

    def __init__(self, ctx, name):
        self.ctx = ctx
        self.name = name
        self.dir = os.path.join(ctx.work, name)
        shutil.rmtree(self.dir, ignore_errors=True)  # a reused --workdir
        os.makedirs(self.dir)
        self.cache = os.path.join(ctx.shm, name + "-cache")
        self.docroot = os.path.join(ctx.shm, name + "-docroot")
        os.makedirs(self.docroot, mode=0o755)
        os.chmod(self.docroot, 0o755)
        self.archiver_port = free_port()
        self.proxy_port = free_port()
        self.static_port = free_port()
        self.rp_port = free_port()
        self.rp_default_port = free_port()
        self.hyper_port = free_port()

    def __enter__(self):
        ctx = self.ctx
        env = clean_env(ctx.home)
        self.archiver = ctx.procs.start("archiver", [
            ctx.archiver_bin, "--listen", f"127.0.0.1:{self.archiver_port}", "--repos", ctx.repos,
            "--cache-dir", self.cache, "--cache-max-bytes", ctx.s.cache_max,
            "--max-archive-bytes", ctx.s.max_archive, "--shutdown-grace", "1",
        ], os.path.join(self.dir, "archiver.log"), env)
        routes = os.path.join(self.dir, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{self.archiver_port}"\n')
        self.proxy = ctx.procs.start("proxy", [
            ctx.proxy_bin, "--listen", f"127.0.0.1:{self.proxy_port}", "--routes", routes,
        ], os.path.join(self.dir, "proxy.log"), env)
        self.hyper = ctx.procs.start("hyper-floor", [
            ctx.hyper_floor_bin, f"127.0.0.1:{self.hyper_port}", f"http://127.0.0.1:{self.archiver_port}",
        ], os.path.join(self.dir, "hyper-floor.log"), env)
        prefix = os.path.join(self.dir, "nginx")
        os.makedirs(prefix)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(
                prefix=prefix, docroot=self.docroot,
                user="user root root;" if os.geteuid() == 0 else "",
                static_port=self.static_port, archiver_port=self.archiver_port,
                rp_port=self.rp_port, rp_default_port=self.rp_default_port,
            ))
        self.nginx = ctx.procs.start("nginx", ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
                                     os.path.join(prefix, "stderr.log"))
        wait_healthy(self.archiver_port)
        wait_healthy(self.proxy_port)
        for port in (self.static_port, self.rp_port, self.rp_default_port, self.hyper_port):
            wait_listening(port)
        return self

    def __exit__(self, *exc):
        for proc in (self.nginx, self.hyper, self.proxy, self.archiver):
            self.ctx.procs.stop(proc, sig=signal.SIGQUIT if proc is self.nginx else signal.SIGTERM)
        shutil.rmtree(self.cache, ignore_errors=True)
        shutil.rmtree(self.docroot, ignore_errors=True)

    def nginx_workers(self):
        return children(self.nginx.pid)

    def cached_file(self, headers):
        """The archiver's cache file for a complete response (found by the
        SHA-256 in its Repr-Digest, which names the file)."""
        digest = headers["repr-digest"]
        hexsum = base64.b64decode(digest.split(":")[1]).hex()
        for name in os.listdir(self.cache):
            if name.endswith("-" + hexsum):
                return os.path.join(self.cache, name)
        raise RuntimeError(f"no cache file for sha-256 {hexsum}")

    def publish(self, port, path, name):
        """Copies the archiver's cached file for `path` into nginx's tmpfs
        docroot; returns its URL path there."""
        status, headers, _ = http_get_small(port, path, "HEAD")
        if status != 200 or headers.get("x-gitball-cache") != "hit":
            raise RuntimeError(f"{path} is not cached ({status}, {headers.get('x-gitball-cache')})")
        target = os.path.join(self.docroot, name)
        shutil.copyfile(self.cached_file(headers), target)
        os.chmod(target, 0o644)
        return "/" + name


# ---------------------------------------------------------------- statistics

def summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


class Results:
    def __init__(self):
        self.rows = []

    def add(self, scenario, what, unit, gitball, peer_name, peer, goal=None, better="lower", note=""):
        """gitball/peer: summaries (or None). goal: (kind, value) with kind
        'ratio<=', 'ratio>=', 'diff<=' (gitball - peer, unit's base), 'abs<'."""
        ratio = None
        if peer is not None and gitball is not None and peer["median"] > 0:
            ratio = gitball["median"] / peer["median"]
        met = None
        if goal is not None and gitball is not None:
            kind, value = goal
            if kind == "ratio<=":
                met = ratio is not None and ratio <= value
            elif kind == "ratio>=":
                met = ratio is not None and ratio >= value
            elif kind == "diff<=":
                met = peer is not None and gitball["median"] - peer["median"] <= value
            elif kind == "abs<":
                met = gitball["median"] < value
        row = dict(scenario=scenario, what=what, unit=unit, gitball=gitball, peer_name=peer_name, peer=peer,
                   ratio=ratio, goal=goal, met=met, better=better, note=note)
        self.rows.append(row)
        print(f"  {what}: gitball {fmt_value(gitball, unit)} | {peer_name} {fmt_value(peer, unit)}"
              f" | ratio {'%.2f' % ratio if ratio is not None else '—'} | met {met}", flush=True)
        return row


def fmt_number(value, unit):
    if unit == "s":
        return f"{value:.2f} s" if value >= 1 else f"{value:.3f} s"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "GiB/s":
        return f"{value / GiB:.2f} GiB/s"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "MiB/dl":
        return f"{value / MiB:.3f} MiB"
    if unit == "fds/dl":
        return f"{value:.2f}"
    if unit == "µs":
        return f"{value * 1e6:.1f} µs"
    return f"{value:g}"


def fmt_value(summary_, unit):
    if summary_ is None:
        return "—"
    med = fmt_number(summary_["median"], unit)
    if len(summary_["samples"]) > 1:
        lo = fmt_number(summary_["min"], unit).split()[0]
        hi = fmt_number(summary_["max"], unit).split()[0]
        return f"{med} ({lo}–{hi})"
    return med


def fmt_goal(goal, unit):
    if goal is None:
        return "—"
    kind, value = goal
    if kind == "ratio<=":
        return f"≤ {value:g}×"
    if kind == "ratio>=":
        return f"≥ {value:g}×"
    if kind == "diff<=":
        return f"≤ peer + {value * 1000:g} ms"
    if kind == "abs<":
        return f"< {fmt_number(value, unit)}"
    return str(goal)


# ---------------------------------------------------------------- scenarios

def scenario_cold(ctx, stack, results, owner, repo, keys, formats, title, time_goal=True):
    """Cold archives: gitball (archiver direct, and through the proxy) vs
    git archive run directly, for each format. A distinct key (tag) per
    gitball run keeps each one cold."""
    repo_dir = ctx.repo_path(owner, repo)
    env = clean_env(ctx.home)
    # Warm both sides the same way: the pack in the page cache, the
    # repository opened by the archiver (a 404 resolves a ref on it).
    timed_command([["git", "-C", repo_dir, "archive", "--format=tar", keys[0]]], env)
    http_get_small(stack.archiver_port, f"/{owner}/{repo}/archive/no-such-ref-warmup.tar")
    http_get_small(stack.proxy_port, f"/{owner}/{repo}/archive/no-such-ref-warmup.tar")
    key_iter = iter(keys[1:])
    peers = {
        "tar.gz": ("git archive --format=tar.gz", lambda prefix, key: [["git", "-C", repo_dir, "archive", "--format=tar.gz", f"--prefix={prefix}/", key]]),
        "zip": ("git archive --format=zip", lambda prefix, key: [["git", "-C", repo_dir, "archive", "--format=zip", f"--prefix={prefix}/", key]]),
        "tar.zst": ("git archive --format=tar | zstd -3", lambda prefix, key: [["git", "-C", repo_dir, "archive", "--format=tar", f"--prefix={prefix}/", key], ["zstd", "-3", "-q", "-c"]]),
    }
    first_row = len(results.rows)
    for fmt in formats:
        peer_name, peer_cmd = peers[fmt]
        samples = {"git": [], "direct": [], "proxy": []}
        sizes = {}
        for run in range(ctx.s.runs):
            run_keys = {"direct": next(key_iter), "proxy": next(key_iter)}
            run_keys["git"] = run_keys["direct"]  # git has no cache: any key is cold for it
            for side in ("git", "direct", "proxy"):
                key = run_keys[side]
                if side == "git":
                    # Same commit, same --prefix (top folder) as gitball's archive.
                    r = timed_command(peer_cmd(f"{repo}-{key}", key), env)
                    sizes["git"] = r["bytes"]
                else:
                    port = stack.archiver_port if side == "direct" else stack.proxy_port
                    r = timed_get(port, f"/{owner}/{repo}/archive/{key}.{fmt}")
                    if r["cache"] != "miss":
                        raise RuntimeError(f"expected a cold generation, got X-Gitball-Cache {r['cache']}")
                    sizes["gitball"] = r["bytes"]
                samples[side].append(r)
                print(f"    {fmt} run {run} {side}: total {r['total']:.3f}s first byte {r['first'] * 1000:.1f}ms ({r['bytes']} bytes)", flush=True)
        git_total = summary([r["total"] for r in samples["git"]])
        git_first = summary([r["first"] for r in samples["git"]])
        # Time goals (issue 11): tar.gz <= 0.35x git's, zip <= 0.5x, tar.zst
        # <= 0.9x, on every repository; first byte <= the peer's + 2 ms.
        goal = ("ratio<=", {"tar.gz": 0.35, "zip": 0.5, "tar.zst": 0.9}[fmt])
        ttfb_goal = ("diff<=", 0.002)
        note = f"{sizes['gitball'] / MiB:.1f} MiB vs git's {sizes['git'] / MiB:.1f} MiB"
        for side, via in (("direct", "archiver direct"), ("proxy", "through the proxy")):
            results.add(f"1. cold {title}", f"cold {fmt} of {title}, {via}: total time", "s",
                        summary([r["total"] for r in samples[side]]), peer_name, git_total, goal, "lower", note)
        block = statistics.median([r["first_128k"] for r in samples["git"]])
        for side, via in (("direct", "archiver direct"), ("proxy", "through the proxy")):
            results.add(f"1. cold {title}", f"cold {fmt} of {title}, {via}: first byte", "ms",
                        summary([r["first"] for r in samples[side]]), peer_name + " (first byte)", git_first, ttfb_goal, "lower",
                        f"the peer's output reaches 128 KiB after {block * 1000:.1f} ms")
    # The floor under every format (issue 11): git's tar alone, same commits
    # and prefix, measured in the same run. It is one core's work that no
    # format can spread over cores.
    # Into /dev/null: git alone, no reader's cost (a reader woken for each
    # of git's 10 KiB writes, as this script's is, adds a fifth here).
    floor = summary([timed_to_null(["git", "-C", repo_dir, "archive", "--format=tar", f"--prefix={repo}-{key}/", key], env)
                     for key in keys[1:1 + ctx.s.runs]])
    print(f"    git archive --format=tar > /dev/null: {fmt_value(floor, 's')}", flush=True)
    for row in results.rows[first_row:]:
        if row["unit"] == "s":
            row["note"] += f"; git archive --format=tar > /dev/null (the floor): {fmt_value(floor, 's')}"
    return key_iter


def scenario_stream(ctx, stack, results):
    """Cache hit, one large stream: archiver direct vs nginx sendfile from
    tmpfs; through the proxy vs nginx reverse proxy."""
    path = "/bench/huge/archive/main.tar"
    print("  generating the large cached archive…", flush=True)
    r = timed_get(stack.archiver_port, path)
    size = r["bytes"]
    static_path = stack.publish(stack.archiver_port, path, "huge.tar")
    urls = {
        "direct": f"http://127.0.0.1:{stack.archiver_port}{path}",
        "static": f"http://127.0.0.1:{stack.static_port}{static_path}",
        "proxy": f"http://127.0.0.1:{stack.proxy_port}{path}",
        "rp": f"http://127.0.0.1:{stack.rp_port}{path}",
        "rp_default": f"http://127.0.0.1:{stack.rp_default_port}{path}",
    }
    for url in urls.values():  # warm-up: connections, page cache, allocators
        curl(url)
    samples = {k: [] for k in urls}
    for run in range(ctx.s.runs):
        for name, url in urls.items():
            c = curl(url)
            if c["size"] != size:
                raise RuntimeError(f"{url}: {c['size']} bytes, expected {size}")
            samples[name].append(c["speed"])
            print(f"    run {run} {name}: {c['speed'] / GiB:.2f} GiB/s", flush=True)
    what = f"cache hit, one {size / MiB:,.0f} MiB stream"
    results.add("2. cache-hit stream", f"{what}, archiver direct", "GiB/s", summary(samples["direct"]),
                "nginx sendfile from tmpfs", summary(samples["static"]), ("ratio>=", 0.8), "higher")
    results.add("2. cache-hit stream", f"{what}, through the proxy", "GiB/s", summary(samples["proxy"]),
                "nginx reverse proxy (256k buffers)", summary(samples["rp"]), ("ratio>=", 1.0), "higher")
    results.add("2. cache-hit stream", f"{what}, through the proxy", "GiB/s", summary(samples["proxy"]),
                "nginx reverse proxy (default buffers)", summary(samples["rp_default"]), None, "higher",
                "informational: nginx as most configs have it")
    return size


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad:
        raise RuntimeError(f"wrk saw non-2xx responses: {bad.group(1)}")
    return rps, errors.group(1) if errors else ""


def scenario_small(ctx, stack, results):
    """Small cached archives under load (wrk, 64 connections)."""
    path = "/bench/small/archive/v1.0.tar.gz"
    r = timed_get(stack.archiver_port, path)
    size = r["bytes"]
    static_path = stack.publish(stack.archiver_port, path, "small.tar.gz")
    s = ctx.s
    urls = {
        "proxy": f"http://127.0.0.1:{stack.proxy_port}{path}",
        "rp": f"http://127.0.0.1:{stack.rp_port}{path}",
        "direct": f"http://127.0.0.1:{stack.archiver_port}{path}",
        "static": f"http://127.0.0.1:{stack.static_port}{static_path}",
        "hyper": f"http://127.0.0.1:{stack.hyper_port}{path}",
    }
    samples = {k: [] for k in urls}
    # CPU per hit (user, kernel) of the front and of the archiver behind it,
    # from /proc over each load run: what caps the chain on shared cores.
    fronts = {"proxy": lambda: [stack.proxy.pid], "rp": lambda: stack.nginx_workers(),
              "hyper": lambda: [stack.hyper.pid]}
    cpu = {(name, part, kind): [] for name in fronts for part in ("front", "archiver") for kind in ("user", "kernel")}
    for url in urls.values():
        subprocess.run(["wrk", "-t1", "-c8", "-d1s", url], check=True, capture_output=True, timeout=30)
    for run in range(s.runs):
        for name, url in urls.items():
            pids = {"front": fronts[name](), "archiver": [stack.archiver.pid]} if name in fronts else {}
            before = {part: cpu_split(p) for part, p in pids.items()}
            out = subprocess.run(
                ["wrk", f"-t{s.wrk_threads}", f"-c{s.wrk_connections}", f"-d{s.wrk_seconds}s", "--timeout", "5s", url],
                check=True, capture_output=True, text=True, timeout=s.wrk_seconds + 30,
            ).stdout
            rps, errors = parse_wrk(out)
            requests = int(re.search(r"(\d+) requests in", out).group(1))
            for part, p in pids.items():
                after = cpu_split(p)
                cpu[(name, part, "user")].append((after[0] - before[part][0]) / requests)
                cpu[(name, part, "kernel")].append((after[1] - before[part][1]) / requests)
            samples[name].append(rps)
            print(f"    run {run} {name}: {rps:,.0f} req/s {errors}", flush=True)
    what = f"{size / 1024:.1f} KiB cached tar.gz, wrk -t{s.wrk_threads} -c{s.wrk_connections} -d{s.wrk_seconds}s"
    results.add("3. small archives under load", f"{what}, through the proxy", "req/s", summary(samples["proxy"]),
                "nginx reverse proxy → same archiver", summary(samples["rp"]), ("ratio>=", 1.0), "higher")
    results.add("3. small archives under load", f"{what}, through the proxy", "req/s", summary(samples["proxy"]),
                "nginx sendfile from tmpfs", summary(samples["static"]), ("ratio>=", 0.35), "higher",
                "the proxy and its archiver against nginx serving the file itself")
    results.add("3. small archives under load", f"{what}, archiver direct", "req/s", summary(samples["direct"]),
                "nginx sendfile from tmpfs", summary(samples["static"]), ("ratio>=", 0.5), "higher")
    hyper_note = ("informational: hyper's server and pooled client and nothing else (method, path and query "
                  "forwarded; no routing, limits, timeouts or log line; proxy/examples/hyper_floor.rs)")
    results.add("3. small archives under load", f"{what}, through a bare hyper proxy", "req/s", summary(samples["hyper"]),
                "nginx reverse proxy → same archiver", summary(samples["rp"]), None, "higher", hyper_note)
    for part, label in (("front", "the front (gitball-proxy; nginx's workers)"), ("archiver", "the archiver behind it")):
        for kind in ("user", "kernel"):
            results.add("3. small archives under load", f"{what}: {kind} CPU per hit in {label}", "µs",
                        summary(cpu[("proxy", part, kind)]), "behind nginx reverse proxy" if part == "archiver" else "nginx reverse proxy",
                        summary(cpu[("rp", part, kind)]), None, "lower", "informational: /proc utime or stime over each load run ÷ requests")
    for kind in ("user", "kernel"):
        results.add("3. small archives under load", f"{what}: {kind} CPU per hit in a bare hyper proxy", "µs",
                    summary(cpu[("hyper", "front", kind)]), "nginx reverse proxy", summary(cpu[("rp", "front", kind)]),
                    None, "lower", hyper_note)
    hits_while_compressing(ctx, stack, results, urls["direct"], size)


def wrk_p99(out):
    """wrk --latency's 99th percentile, in seconds."""
    value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def hits_while_compressing(ctx, stack, results, url, size):
    """Small cached hits from the archiver while one cold tar.gz of
    bench/large compresses on every core (its compression threads run at a
    lower priority, docs/archiver.md), against the same load on an idle
    archiver. A distinct tag per run keeps each generation cold."""
    seconds = 2 if ctx.s.quick else 4
    command = ["wrk", "-t1", "-c8", f"-d{seconds}s", "--latency", "--timeout", "5s", url]
    samples = {"busy": [], "idle": []}
    p99 = {"busy": [], "idle": []}
    cold_times = []
    for run in range(ctx.s.runs):
        out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=seconds + 30).stdout
        samples["idle"].append(parse_wrk(out)[0])
        p99["idle"].append(wrk_p99(out))
        cold = {}
        generation = threading.Thread(
            target=lambda: cold.update(timed_get(stack.archiver_port, f"/bench/large/archive/b{run:02d}.tar.gz")))
        generation.start()
        time.sleep(0.5)
        out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=seconds + 30).stdout
        generation.join(timeout=600)
        if cold.get("cache") != "miss":
            raise RuntimeError(f"expected a cold generation, got {cold}")
        samples["busy"].append(parse_wrk(out)[0])
        p99["busy"].append(wrk_p99(out))
        cold_times.append(cold["total"])
        print(f"    run {run}: idle {samples['idle'][-1]:,.0f} req/s p99 {p99['idle'][-1] * 1000:.1f} ms; "
              f"during a cold tar.gz ({cold['total']:.1f} s) {samples['busy'][-1]:,.0f} req/s "
              f"p99 {p99['busy'][-1] * 1000:.1f} ms", flush=True)
    what = f"{size / 1024:.1f} KiB cached tar.gz, archiver direct, wrk -t1 -c8 -d{seconds}s"
    note = (f"p99 {statistics.median(p99['busy']) * 1000:.1f} ms against {statistics.median(p99['idle']) * 1000:.1f} ms idle; "
            f"the cold tar.gz took {statistics.median(cold_times):.1f} s")
    results.add("3. small archives under load", f"{what}, while a cold tar.gz of bench/large compresses", "req/s",
                summary(samples["busy"]), "same load, archiver idle", summary(samples["idle"]), None, "higher", note)


def timed_curls(url, n, hdr_dir):
    """Starts `n` `curl`s of `url` together and waits for all of them:
    (seconds from before the first starts to after the last exited, each
    one's X-Gitball-Cache, each one's own `time_total`). One request and
    thirty are timed by this same clock, so the ratio of the two counts
    a process start on both sides (with `curl`'s `time_total` for the one
    and this clock for the thirty, only the thirty's were counted)."""
    os.makedirs(hdr_dir)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-s", "--max-time", "300", "-o", "/dev/null", "-D", os.path.join(hdr_dir, f"{i}.h"),
                               "-w", "%{http_code} %{size_download} %{time_total}", url], stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    outs = [p.communicate()[0].split() for p in procs]
    wall = time.perf_counter() - t0
    codes = {o[0] for o in outs}
    sizes = {o[1] for o in outs}
    if codes != {"200"} or len(sizes) != 1:
        raise RuntimeError(f"concurrent downloads: codes {codes}, sizes {sizes}")
    cache_states = []
    for i in range(n):
        with open(os.path.join(hdr_dir, f"{i}.h")) as f:
            m = re.search(r"(?im)^x-gitball-cache:\s*(\S+)", f.read())
            cache_states.append(m.group(1) if m else "?")
    return wall, cache_states, [float(o[2]) for o in outs]


def scenario_concurrent(ctx, stack, results, key_iter):
    """N concurrent cold requests for one key vs one generation alone,
    both timed from the first client's start to the last one's exit."""
    n = ctx.s.concurrent
    singles, walls, joins, cpu = [], [], [], []
    for run in range(ctx.s.runs):
        key = next(key_iter)
        a0, c0 = cpu_seconds(stack.archiver.pid), children_cpu_seconds()
        url = f"http://127.0.0.1:{stack.archiver_port}/bench/large/archive/{key}.tar.gz"
        single, single_state, single_total = timed_curls(url, 1, os.path.join(stack.dir, f"single-{run}"))
        if single_state != ["miss"]:
            raise RuntimeError(f"expected a cold generation, got {single_state}")
        time.sleep(0.2)  # let the archiver reap git (its children's CPU)
        a1, c1 = cpu_seconds(stack.archiver.pid), children_cpu_seconds()
        singles.append(single)
        key = next(key_iter)
        url = f"http://127.0.0.1:{stack.archiver_port}/bench/large/archive/{key}.tar.gz"
        wall, cache_states, totals = timed_curls(url, n, os.path.join(stack.dir, f"concurrent-{run}"))
        time.sleep(0.2)
        a2, c2 = cpu_seconds(stack.archiver.pid), children_cpu_seconds()
        cpu.append({"single_archiver": a1 - a0, "single_client": c1 - c0, "archiver": a2 - a1, "clients": c2 - c1})
        joins.append({s: cache_states.count(s) for s in set(cache_states)})
        walls.append(wall)
        print(f"    run {run}: one generation {single:.2f}s (curl's time_total {single_total[0]:.2f}s), "
              f"{n} concurrent {wall:.2f}s (longest time_total {max(totals):.2f}s), cache {joins[-1]}, CPU s {cpu[-1]}",
              flush=True)
    c = {k: statistics.median(x[k] for x in cpu) for k in cpu[0]}
    cpu_note = (f"; CPU seconds (archiver + git, clients): one {c['single_archiver']:.2f} + {c['single_client']:.2f},"
                f" {n} concurrent {c['archiver']:.2f} + {c['clients']:.2f} on {os.cpu_count()} CPUs")
    results.add("4. concurrent cold requests", f"{n} concurrent cold tar.gz requests for one key (archiver direct): wall time", "s",
                summary(walls), "one generation alone", summary(singles), ("ratio<=", 1.15), "lower",
                "X-Gitball-Cache: " + ", ".join(f"{k} {v}" for k, v in sorted(joins[-1].items())) + cpu_note)


def open_stalled(port, path, n, read_bytes):
    socks = []
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request)
        socks.append(s)
    for s in socks:
        got = 0
        while got < read_bytes:
            data = s.recv(read_bytes - got)
            if not data:
                raise RuntimeError("stalled download closed early")
            got += len(data)
    return socks


def settle(pids, timeout=15):
    """Waits until the RSS of `pids` stops moving (or timeout): within
    64 KiB over four samples 0.5 s apart. The 1.5 s is longer than the
    proxy allocator's decay (jemalloc returns freed pages within 1 s, in
    steps when its background thread wakes): two samples alike were often
    taken before a step, 4 MiB (40 KiB per download with 100) too high."""
    samples = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        samples = (samples + [sum(rss_bytes(p) for p in pids)])[-4:]
        if len(samples) == 4 and max(samples) - min(samples) < 64 * 1024:
            return


def scenario_memory(ctx, stack, results, size):
    """N stalled downloads of the large cached archive: RSS and fds per
    download, gitball-proxy vs nginx as the reverse proxy."""
    n = ctx.s.stalled
    path = "/bench/huge/archive/main.tar"
    out = {"proxy": [], "archiver_behind_proxy": [], "nginx": [], "archiver_behind_nginx": [],
           "proxy_fds": [], "archiver_fds": [], "nginx_fds": [], "archiver_fds_nginx": [],
           "proxy_fds_after": [], "archiver_fds_after": []}
    for run in range(ctx.s.runs):
        # gitball: client → proxy → archiver
        curl(f"http://127.0.0.1:{stack.proxy_port}{path}")
        time.sleep(0.5)
        pids = [stack.proxy.pid, stack.archiver.pid]
        rss0 = {p: rss_bytes(p) for p in pids}
        fd0 = {p: fd_count(p) for p in pids}
        socks = open_stalled(stack.proxy_port, path, n, ctx.s.stall_read_bytes)
        settle(pids)
        held = rss_bytes(stack.proxy.pid)
        # The proxy releases a stalled download's upstream after
        # --park-after (10 s): what it holds from then on is what a
        # stalled download costs.
        parked_after = wait_parked(stack.proxy_port, n)
        settle(pids)
        rss1 = {p: rss_bytes(p) for p in pids}
        fd1 = {p: fd_count(p) for p in pids}
        out.setdefault("proxy_before_parking", []).append((held - rss0[stack.proxy.pid]) / n)
        out.setdefault("parked_after", []).append(parked_after if parked_after is not None else float("nan"))
        for s in socks:
            s.close()
        time.sleep(1.5)
        fd2 = {p: fd_count(p) for p in pids}
        out["proxy"].append((rss1[stack.proxy.pid] - rss0[stack.proxy.pid]) / n)
        out["archiver_behind_proxy"].append((rss1[stack.archiver.pid] - rss0[stack.archiver.pid]) / n)
        out["proxy_fds"].append((fd1[stack.proxy.pid] - fd0[stack.proxy.pid]) / n)
        out["archiver_fds"].append((fd1[stack.archiver.pid] - fd0[stack.archiver.pid]) / n)
        out["proxy_fds_after"].append(fd2[stack.proxy.pid] - fd0[stack.proxy.pid])
        out["archiver_fds_after"].append(fd2[stack.archiver.pid] - fd0[stack.archiver.pid])
        # peer: client → nginx (reverse proxy, 256k buffers) → archiver
        curl(f"http://127.0.0.1:{stack.rp_port}{path}")
        time.sleep(0.5)
        workers = stack.nginx_workers()
        npids = [stack.nginx.pid, *workers]
        rss0 = sum(rss_bytes(p) for p in npids)
        fdn0 = sum(fd_count(p) for p in npids)
        a0 = rss_bytes(stack.archiver.pid)
        afd0 = fd_count(stack.archiver.pid)
        socks = open_stalled(stack.rp_port, path, n, ctx.s.stall_read_bytes)
        settle([*npids, stack.archiver.pid])
        rss1 = sum(rss_bytes(p) for p in npids)
        fdn1 = sum(fd_count(p) for p in npids)
        a1 = rss_bytes(stack.archiver.pid)
        afd1 = fd_count(stack.archiver.pid)
        for s in socks:
            s.close()
        time.sleep(1.5)
        out["nginx"].append((rss1 - rss0) / n)
        out["nginx_fds"].append((fdn1 - fdn0) / n)
        out["archiver_behind_nginx"].append((a1 - a0) / n)
        out["archiver_fds_nginx"].append((afd1 - afd0) / n)
        print(f"    run {run}: per download: proxy {out['proxy'][-1] / 1024:.0f} KiB, archiver {out['archiver_behind_proxy'][-1] / 1024:.0f} KiB,"
              f" nginx {out['nginx'][-1] / 1024:.0f} KiB; fds proxy {out['proxy_fds'][-1]:.2f} archiver {out['archiver_fds'][-1]:.2f}"
              f" nginx {out['nginx_fds'][-1]:.2f}; fds left after close: proxy {out['proxy_fds_after'][-1]} archiver {out['archiver_fds_after'][-1]}",
              flush=True)
    what = f"{n} stalled downloads of the {size / MiB:,.0f} MiB archive"
    results.add("5. memory, stalled downloads", f"{what}: gitball-proxy RSS growth per download", "MiB/dl",
                summary(out["proxy"]), "nginx reverse proxy (workers)", summary(out["nginx"]), ("abs<", 0.1 * MiB), "lower")
    results.add("5. memory, stalled downloads", f"{what}: gitball-proxy RSS growth per download before parking", "MiB/dl",
                summary(out["proxy_before_parking"]), "nginx reverse proxy (workers)", summary(out["nginx"]), None, "lower",
                "informational: the first --park-after (10 s) of a stall, upstream still held; parked after "
                + ", ".join(f"{s:.1f}" for s in out["parked_after"]) + " s")
    results.add("5. memory, stalled downloads", f"{what}: gitball-archiver RSS growth per download", "MiB/dl",
                summary(out["archiver_behind_proxy"]), "same archiver behind nginx", summary(out["archiver_behind_nginx"]),
                ("abs<", 0.1 * MiB), "lower")
    results.add("5. memory, stalled downloads", f"{what}: gitball-proxy fds per download", "fds/dl",
                summary(out["proxy_fds"]), "nginx reverse proxy (workers)", summary(out["nginx_fds"]), None, "lower",
                f"1.5 s after the clients closed: {max(out['proxy_fds_after']):+d} fds vs before")
    results.add("5. memory, stalled downloads", f"{what}: gitball-archiver fds per download", "fds/dl",
                summary(out["archiver_fds"]), "same archiver behind nginx", summary(out["archiver_fds_nginx"]), None, "lower",
                f"1.5 s after the clients closed: {max(out['archiver_fds_after']):+d} fds vs before")


# ---------------------------------------------------------------- context

class Context:
    def __init__(self, args):
        self.args = args
        self.s = Settings(args.quick)
        if args.runs:
            self.s.runs = args.runs
        self.root = args.root
        # Cargo's target directory: $CARGO_TARGET_DIR when set, as cargo has it.
        target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(self.root, "target")
        self.archiver_bin = os.path.join(target, "release/gitball-archiver")
        self.proxy_bin = os.path.join(target, "release/gitball-proxy")
        # A peer: hyper's server and pooled client alone (proxy/examples/hyper_floor.rs).
        self.hyper_floor_bin = os.path.join(target, "release/examples/hyper_floor")
        self.work = args.workdir or tempfile.mkdtemp(prefix="gitball-bench-")
        os.makedirs(self.work, exist_ok=True)
        self.shm = tempfile.mkdtemp(prefix="gitball-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home, exist_ok=True)
        self.repos = os.path.join(self.work, "repos")
        self.procs = Processes({"GITBALL_TCP_CONGESTION": args.tcp_congestion} if args.tcp_congestion else None)
        self.inputs = {}

    def repo_path(self, owner, repo):
        return os.path.join(self.repos, owner, repo + ".git")


def prepare_inputs(ctx):
    s = ctx.s
    env = clean_env(ctx.home)
    keys_needed = 3 * 2 * s.runs + 2 * s.runs + 2
    specs = {
        "large": (lambda: gen_repo.source_like_files(1, s.large_bytes), dict(tags=keys_needed)),
        "huge": (lambda: gen_repo.incompressible_files(2, s.huge_bytes), dict(compression=0)),
        "small": (lambda: gen_repo.source_like_files(3, s.small_bytes, mean_file_bytes=2048), dict(extra_tags=("v1.0",))),
    }
    for name, (files, options) in specs.items():
        path = ctx.repo_path("bench", name)
        stamp = path + ".stamp"
        want = json.dumps({"quick": s.quick, "large": s.large_bytes, "huge": s.huge_bytes, "keys": keys_needed, "v": 1})
        if os.path.exists(stamp) and json.load(open(stamp)).get("want") == want:
            info = json.load(open(stamp))["info"]
            print(f"  reusing {path}", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            t0 = time.time()
            commit, tree, count, total = gen_repo.write_repository(path, files(), env=env, **options)
            info = {"commit": commit, "tree": tree, "files": count, "bytes": total, "seconds": round(time.time() - t0, 1)}
            with open(stamp, "w") as f:
                json.dump({"want": want, "info": info}, f)
            print(f"  generated bench/{name}: {count} files, {total / MiB:.1f} MiB, tree {tree} in {info['seconds']} s", flush=True)
        ctx.inputs[f"bench/{name}"] = info
    user = []
    for given in ctx.args.repo or []:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", os.path.basename(os.path.abspath(given).rstrip("/")))
        name = name[:-4] if name.endswith(".git") else name
        name = name.lstrip(".") or "repo"
        path = ctx.repo_path("user", name)
        if not os.path.exists(path):
            # Hard-linked or copied objects, not --shared: the archiver
            # refuses alternates outside --repos.
            subprocess.run(["git", "clone", "-q", "--bare", os.path.abspath(given), path], check=True, env=env)
        head, tree = gen_repo.add_key_commits(path, 3 * 2 * s.runs + 1, tag_prefix="gitball-bench-", env=env)
        files = subprocess.run(["git", "-C", path, "ls-tree", "-r", "--name-only", tree], check=True, capture_output=True, env=env).stdout.count(b"\n")
        ctx.inputs[f"user/{name}"] = {"source": os.path.abspath(given), "commit": head, "tree": tree, "files": files}
        user.append(name)
    return keys_needed, user


# ---------------------------------------------------------------- report

def machine_info(ctx):
    def run(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    commit = run("git", "-C", ctx.root, "rev-parse", "--short", "HEAD")
    dirty = run("git", "-C", ctx.root, "status", "--porcelain", "--untracked-files=no", "--", "archiver", "proxy", "Cargo.toml", "Cargo.lock")
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: nginx/", "")
    # Every stream here is paced (or not) by the host's congestion control:
    # BBR without the fq qdisc paces each socket with its own timers, which
    # on loopback costs more than the copy itself (BENCHMARKS.md).
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            congestion = f.read().strip()
    except OSError:
        congestion = "?"
    qdisc = (run("tc", "qdisc", "show", "dev", "lo").split("\n")[0].split(" ")[1:2] or ["?"])[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram": f"{mem / GiB:.1f} GiB",
        "kernel": platform.release(),
        "tcp": f"TCP congestion control {congestion}, {qdisc or '?'} qdisc on lo"
               + (f"; gitball started with --tcp-congestion {ctx.args.tcp_congestion}" if ctx.args.tcp_congestion else ""),
        "git": run("git", "--version").replace("git version ", ""),
        "nginx": nginx_v,
        "rustc": run("rustc", "--version"),
        "curl": run("curl", "--version").split("\n")[0].split(" (")[0],
        "wrk": run("wrk", "-v").split("\n")[0].split(" [")[0].replace("debian/", ""),
        "zstd": (re.findall(r"v[\d.]+", run("zstd", "--version")) or ["?"])[0],
        "gitball": commit + (" (with uncommitted changes to archiver/ or proxy/)" if dirty and dirty != "?" else ""),
        "python": platform.python_version(),
    }


def relative(row):
    """gitball's performance relative to the peer, higher = better."""
    if row["ratio"] is None or row["ratio"] <= 0:
        return None
    return row["ratio"] if row["better"] == "higher" else 1 / row["ratio"]


def goal_relative(row):
    if row["goal"] is None:
        return None
    kind, value = row["goal"]
    if kind == "ratio<=":
        return 1 / value
    if kind == "ratio>=":
        return value
    return None


def render_chart(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The bare hyper proxy is a peer of its own, not gitball: left out of the chart.
    speed_rows = [r for r in results.rows if r["unit"] in ("s", "GiB/s", "req/s") and relative(r) is not None
                  and "bare hyper proxy" not in r["what"]]
    ttfb_rows = [r for r in results.rows if r["unit"] == "ms"]
    mem_rows = [r for r in results.rows if r["unit"] == "MiB/dl"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 7.5), gridspec_kw={"width_ratios": [3.2, 1.6, 1.2]})

    def short(row):
        what = row["what"]
        what = re.sub(r"^(cold \S+) of (\S+), archiver direct: total time", r"\1 \2 (archiver)", what)
        what = re.sub(r"^(cold \S+) of (\S+), through the proxy: total time", r"\1 \2 (proxy)", what)
        what = re.sub(r"cache hit, one ([\d,]+) MiB stream, ", r"\1 MiB hit, ", what)
        what = re.sub(r", wrk .*?, ", ", ", what)
        what = re.sub(r"^[\d.]+ KiB cached tar.gz", "small tar.gz req/s", what)
        what = re.sub(r"(\d+) concurrent cold tar.gz requests for one key \(archiver direct\): wall time", r"\1 cold for 1 key", what)
        what = what.replace("archiver direct", "archiver").replace("through the proxy", "proxy")
        return f"{what}\nvs {row['peer_name']}"

    ax = axes[0]
    labels = [short(r) for r in speed_rows]
    xs = range(len(speed_rows))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [1.0] * len(speed_rows), width, label="peer (= 1)", color="#9aa5b1")
    values = [relative(r) for r in speed_rows]
    colors = ["#2f9e44" if r["met"] else ("#e03131" if r["met"] is False else "#1c7ed6") for r in speed_rows]
    bars = ax.bar([x + width / 2 for x in xs], values, width, label="gitball", color=colors)
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    for x, row in zip(xs, speed_rows):
        g = goal_relative(row)
        if g:
            ax.plot([x - 0.45, x + 0.45], [g, g], color="black", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("gitball speed relative to the peer (higher is better)")
    ax.set_title("speed vs peer (dashed: goal; green met, red missed, blue no goal)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    labels = [re.sub(r" of (\S+), (archiver direct|through the proxy): first byte",
                     lambda m: " " + m.group(1) + "\n" + ("archiver" if "archiver" in m.group(2) else "proxy"), r["what"]) for r in ttfb_rows]
    xs = range(len(ttfb_rows))
    ax.bar([x - width / 2 for x in xs], [r["peer"]["median"] * 1000 for r in ttfb_rows], width, label="git's own first byte", color="#9aa5b1")
    ax.bar([x + width / 2 for x in xs], [r["gitball"]["median"] * 1000 for r in ttfb_rows], width, label="gitball",
           color=["#2f9e44" if r["met"] else ("#e03131" if r["met"] is False else "#1c7ed6") for r in ttfb_rows])
    for x, r in zip(xs, ttfb_rows):
        ax.plot([x - 0.45, x + 0.45], [(r["peer"]["median"] + 0.005) * 1000] * 2, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time to first body byte, ms (lower is better)")
    ax.set_title("cold first byte (dashed: git + 5 ms)", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[2]
    names, vals, cols = [], [], []
    for r in mem_rows:
        who = "gitball-proxy" if "proxy RSS" in r["what"] else "gitball-archiver"
        names.append(who)
        vals.append(r["gitball"]["median"] / MiB)
        cols.append("#2f9e44" if r["met"] else "#e03131")
        if who == "gitball-proxy" and r["peer"]:
            names.append("nginx (rev. proxy)")
            vals.append(r["peer"]["median"] / MiB)
            cols.append("#9aa5b1")
    ax.bar(range(len(vals)), vals, color=cols)
    for i, v in enumerate(vals):
        ax.annotate(f"{v * 1024:.0f} KiB", (i, max(v, 0)), ha="center", va="bottom", fontsize=8)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("RSS growth per stalled download, MiB (goal < 0.5)")
    ax.set_title("memory per stalled download", fontsize=9)

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results):
    lines = ["| scenario | gitball | peer | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for r in results.rows:
        peer = f"{r['peer_name']}: {fmt_value(r['peer'], r['unit'])}" if r["peer_name"] else "—"
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "—"
        if r["unit"] == "ms" and r["peer"] is not None:
            ratio += f" ({(r['gitball']['median'] - r['peer']['median']) * 1000:+.1f} ms)"
        met = {True: "✅ yes", False: "❌ no", None: "—"}[r["met"]]
        what = r["what"] + (f" <br><sub>{r['note']}</sub>" if r["note"] else "")
        cells = [what, fmt_value(r["gitball"], r["unit"]), peer, ratio, fmt_goal(r["goal"], r["unit"]), met]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_report(ctx, results, meta, md_path, chart_path, chart_rel):
    s = ctx.s
    def size(n):
        return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n / 1024:,.1f} KiB"
    inputs = "\n".join(
        f"  - {name}: {info['text']}" if "text" in info else
        f"  - `{name}`: " + (f"{info['files']:,} files, {size(info['bytes'])}, tree `{info['tree']}`"
                           if "bytes" in info else f"{info['files']:,} files from `{info['source']}`, tree `{info['tree']}`")
        for name, info in ctx.inputs.items()
    )
    met = [r for r in results.rows if r["met"] is True]
    missed = [r for r in results.rows if r["met"] is False]
    m = meta["machine"]
    generated = f"""{BEGIN}

## Latest run

- **Date:** {meta['date']} ({meta['duration_s'] / 60:.1f} min{', **quick mode: smoke test, not figures**' if s.quick else ''})
- **Command:** `{meta['command']}`
- **Machine:** {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, Linux {m['kernel']}; loopback only ({m.get('tcp', 'TCP congestion control not recorded')})
- **Load before the run:** load average {meta['load_before']}{'; other builds running: ' + ', '.join(sorted(set(meta['foreign_before']))) if meta['foreign_before'] else '; no cargo/rustc running'}; after: {meta['load_after']}
- **Versions:** gitball {m['gitball']}, git {m['git']}, nginx {m['nginx']}, {m['rustc']}, {m['curl']}, {m['wrk']}, zstd {m['zstd']}
- **Runs:** median of {s.runs} (min–max in brackets); ratio = gitball ÷ peer (medians)
- **Inputs:**
{inputs}

{markdown_table(results)}

Goals met: {len(met)} of {len(met) + len(missed)}{' — missed: ' + '; '.join(r['what'] for r in missed) if missed else ''}.

![gitball vs peers]({chart_rel})

Raw samples: [`ops/bench/results.json`](ops/bench/results.json).

{END}"""
    if os.path.exists(md_path):
        text = open(md_path).read()
        if BEGIN in text and END in text:
            before = text.split(BEGIN)[0]
            after = text.split(END, 1)[1]
            text = before + generated + after
        else:
            text = text.rstrip() + "\n\n" + generated + "\n"
    else:
        text = "# Benchmarks\n\n" + generated + "\n"
    with open(md_path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 run each: a smoke test")
    parser.add_argument("--repo", action="append", help="also measure cold archives of this repository (repeatable)")
    parser.add_argument("--real-repo", help="a clone of git/git: also measure cold archives of it at v2.47.0"
                        " (scenario 9; default $GITBALL_BENCH_REAL_REPO; not modified)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, quick 1)")
    parser.add_argument("--workdir", help="work directory (kept; generated inputs are reused when they match)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--write", dest="write", action="store_true", default=None,
                        help="write BENCHMARKS.md and ops/bench/ results (default unless --quick)")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--command", default="ops/bench/run.sh")
    parser.add_argument("--tcp-congestion", metavar="NAME",
                        help="start both gitball tiers with --tcp-congestion NAME (the peers keep the host's)")
    parser.add_argument("--only", help="comma-separated scenarios to run (1-9, trace); the report is not written")
    args = parser.parse_args()
    write = (not args.quick) if args.write is None else args.write
    only = set(args.only.split(",")) if args.only else {"1", "2", "3", "4", "5", "6", "7", "8", "9"}
    if args.only:
        write = False
    if only == {"trace"}:  # a replayed trace: no inputs, no processes
        scenario_cache_trace(argparse.Namespace(root=args.root), Results())
        return

    ctx = Context(args)
    real_repo = scenario_realrepo.source_arg(args, clean_env(ctx.home)) if "9" in only else None
    started = time.time()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "load_before": loadavg(),
        "foreign_before": foreign_heavy_processes(),
    }
    print(f"work dir {ctx.work}, tmpfs {ctx.shm}; load {meta['load_before']}", flush=True)
    results = Results()

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        print("preparing inputs…", flush=True)
        keys_needed, user_repos = prepare_inputs(ctx) if only - {"9"} else (0, [])
        keys = [f"b{i:02d}" for i in range(keys_needed)]
        if "1" in only or "4" in only:
            with Stack(ctx, "cold") as stack:
                key_iter = iter(keys[1:])
                if "1" in only:
                    print("scenario 1: cold archives of bench/large", flush=True)
                    key_iter = scenario_cold(ctx, stack, results, "bench", "large", keys, ("tar.gz", "zip", "tar.zst"), "bench/large")
                    for name in user_repos:
                        print(f"scenario 1: cold archives of user/{name}", flush=True)
                        ukeys = [f"gitball-bench-{i:02d}" for i in range(3 * 2 * ctx.s.runs + 1)]
                        scenario_cold(ctx, stack, results, "user", name, ukeys, ("tar.gz", "zip", "tar.zst"), f"user/{name}", time_goal=False)
                if "4" in only:
                    print("scenario 4: concurrent cold requests for one key", flush=True)
                    scenario_concurrent(ctx, stack, results, key_iter)
        if "2" in only or "5" in only:
            with Stack(ctx, "stream") as stack:
                size = None
                if "2" in only:
                    print("scenario 2: cache-hit single stream", flush=True)
                    size = scenario_stream(ctx, stack, results)
                if "5" in only:
                    print("scenario 5: memory under stalled downloads", flush=True)
                    if size is None:
                        size = timed_get(stack.archiver_port, "/bench/huge/archive/main.tar")["bytes"]
                    scenario_memory(ctx, stack, results, size)
        if "3" in only:
            with Stack(ctx, "small") as stack:
                print("scenario 3: small cached archives under load", flush=True)
                scenario_small(ctx, stack, results)
        if "6" in only:
            from scenario_rush import scenario_rush
            print("scenario 6: release rush, with and without prewarm", flush=True)
            scenario_rush(ctx, None, results)
        if "7" in only:
            from scenario_crawler import scenario_crawler
            print("scenario 7: a crawler and 20 normal clients", flush=True)
            scenario_crawler(ctx, None, results)
        if "8" in only:
            print("scenario 8: 5,000 stalled downloads at a login shell's fd limit", flush=True)
            scenario_stalled.run(ctx, results, sys.modules[__name__])
        if "9" in only:
            if real_repo:
                print(f"scenario 9: cold archives of git/git at {scenario_realrepo.TAG}", flush=True)
                scenario_realrepo.run(ctx, results, sys.modules[__name__], real_repo)
            else:
                scenario_realrepo.not_given(ctx)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        ctx.procs.stop_all()
        raise SystemExit(130)
    finally:
        ctx.procs.stop_all()
        shutil.rmtree(ctx.shm, ignore_errors=True)
    meta["load_after"] = loadavg()
    meta["foreign_after"] = foreign_heavy_processes()
    meta["duration_s"] = time.time() - started
    meta["machine"] = machine_info(ctx)
    meta["inputs"] = ctx.inputs
    meta["settings"] = vars(ctx.s)

    out_dir = HERE if write else ctx.work
    md_path = os.path.join(ctx.root, "BENCHMARKS.md") if write else os.path.join(ctx.work, "BENCHMARKS.md")
    chart_path = os.path.join(out_dir, "benchmarks.png")
    chart_rel = "ops/bench/benchmarks.png" if write else "benchmarks.png"
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": results.rows}, f, indent=1, default=str)
    title = f"gitball vs peers — {meta['date']}, {meta['machine']['nproc']} CPUs, gitball {meta['machine']['gitball'].split()[0]}"
    if results.rows:
        render_chart(results, chart_path, title + (" (QUICK MODE)" if ctx.s.quick else ""))
        write_report(ctx, results, meta, md_path, chart_path, chart_rel)
    print(f"\n{markdown_table(results)}\n")
    print(f"wrote {md_path}, {chart_path}, {os.path.join(out_dir, 'results.json')}")
    if not args.workdir and not args.keep:
        shutil.rmtree(ctx.work, ignore_errors=True)
    else:
        print(f"kept {ctx.work}")


if __name__ == "__main__":
    main()
