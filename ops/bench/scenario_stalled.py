"""Scenario 6: 5,000 stalled downloads through one proxy and one archiver.

The services are started as from a login shell: soft RLIMIT_NOFILE 1024,
hard limit this machine's, no flags beyond where to listen, what to serve
and where to cache (they raise their soft limit themselves and derive
--max-connections from it). 5,000 clients each ask for the huge cached
archive through the proxy, read the response head and 32 KiB of body with
a 16 KiB receive buffer, then stop reading. Measured while they are held:

- answered: clients that got `200` and 32 KiB within the deadline;
- RSS growth per stalled download of the proxy and of the archiver;
- small cached downloads through the same proxy meanwhile: latency p50/p99
  over fresh connections;
- after the clients close: the fds each process holds above its baseline.

The peer is nginx as the reverse proxy in front of the same archiver
(`proxy_buffering off`, nginx's default buffer sizes), with
worker_connections and worker_rlimit_nofile raised so that 5,000 clients
fit: the same clients, the same measurements.

- the kernel's TCP memory held per download (`/proc/net/sockstat`, just
  after the last client was fed, over the answered count), and its mean per
  socket along the path (`ss -tm`: the client's receive queue, the front's
  send queue toward it, the front's receive queue from the archiver, the
  archiver's send queue).

Kernel memory is the limit to watch: `net.ipv4.tcp_mem` is one pool for the
whole machine (2.2 GiB on the 23 GiB smoke-test machine), and once it is
exhausted the kernel resets connections ("TCP: out of memory" in dmesg),
which shows as unanswered clients. gitball bounds its side of each download
(docs/architecture.md, "Memory per slow download"); with Linux's autotuning
alone each stalled download parked 0.5-4 MiB. The clients stand for remote
ones: their 16 KiB receive buffer is what a client's buffer costs on a slow
link, and on loopback it is charged to the same pool (about 28 KiB each).
nginx is measured with exactly the same clients. The pool is shared with
anything else running on the machine, so run this scenario on a quiet one.

One run (5,000 connections per side is the measurement; repeating it
triples the scenario's time for little).
"""

import os
import re
import resource
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SCENARIO = "6. 5,000 stalled downloads"
LOGIN_SHELL_SOFT_NOFILE = 1024
STALLED = 5000
FED_BYTES = 32 * 1024
CLIENT_RECEIVE_BUFFER_BYTES = 16 * 1024
READER_THREADS = 32
# Every client must be answered and fed within this (from the first read).
ANSWER_DEADLINE_S = 120
SMALL_PROBES = 200
RELEASE_TIMEOUT_S = 30
FD_SLACK = 4
HUGE_PATH = "/bench/huge/archive/main.tar"
SMALL_PATH = "/bench/small/archive/v1.0.tar.gz"

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes auto;
# 5,000 clients: each holds a client and an upstream connection.
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    keepalive_requests 100000;
    upstream archiver {{
        server 127.0.0.1:{archiver_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
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


def raise_own_nofile():
    """The clients need 5,000 fds in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_clients(port, path, n):
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    clients = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RECEIVE_BUFFER_BYTES)
        sock.settimeout(30)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
        except OSError:
            sock.close()
            sock = None
        clients.append(sock)
    return clients


def feed(sock, deadline):
    """Reads the head and FED_BYTES of body; returns 'ok' or why not."""
    if sock is None:
        return "connect_failed"
    buf = bytearray()
    try:
        while b"\r\n\r\n" not in buf:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                return "closed"
            buf += data
        status = int(bytes(buf).split(b" ", 2)[1])
        if status != 200:
            return f"status_{status}"
        got = len(buf) - (buf.index(b"\r\n\r\n") + 4)
        while got < FED_BYTES:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(FED_BYTES - got)
            if not data:
                return "closed"
            got += len(data)
        return "ok"
    except socket.timeout:
        return "timeout"
    except OSError:
        return "error"


def probe_latencies(b, port, n):
    """Latencies of the probes that got 200, and how many did not (a
    reset counts: under 5,000 stalled downloads the kernel's TCP memory,
    tcp_mem, may run out and reset connections)."""
    samples, failed = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            status, _, _ = b.http_get_small(port, SMALL_PATH)
        except OSError:
            status = None
        if status == 200:
            samples.append(time.perf_counter() - t0)
        else:
            failed += 1
    return samples or [float("inf")], failed


def tcp_mem_pages():
    """The kernel's TCP memory in use, in pages (`/proc/net/sockstat`, `TCP:
    ... mem N`): the figure `net.ipv4.tcp_mem` bounds. Global, not per
    network namespace, so other work on the machine shows in it too."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t(\d+),tb\d+,f(\d+),w(\d+)")


def socket_memory(front_port, archiver_port):
    """Mean kernel bytes per socket (`ss -tmn`: rmem_alloc + wmem_queued +
    forward-allocated) of the four sockets a download crosses: the client's,
    the front's toward the client, the front's from the archiver, the
    archiver's. Returns {name: (sockets, mean bytes)}."""
    out = subprocess.run(["ss", "-tmnH", "state", "established"], capture_output=True, text=True).stdout
    groups = {"client rcv": [], "front to client": [], "front from archiver": [], "archiver to front": []}
    # Each socket is one line of addresses and one indented skmem line.
    for line in out.replace("\n\t", " ").splitlines():
        fields = line.split()
        match = SKMEM.search(line)
        if match is None or len(fields) < 4:
            continue
        local, peer = fields[2].rsplit(":", 1)[1], fields[3].rsplit(":", 1)[1]
        r, _t, f, w = (int(x) for x in match.groups())
        held = r + w + f
        if peer == str(front_port):
            groups["client rcv"].append(held)
        elif local == str(front_port):
            groups["front to client"].append(held)
        elif peer == str(archiver_port):
            groups["front from archiver"].append(held)
        elif local == str(archiver_port):
            groups["archiver to front"].append(held)
    return {k: (len(v), sum(v) / max(len(v), 1)) for k, v in groups.items()}


def percentile(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def wait_fds(b, pids, baseline, timeout):
    """Seconds until every pid is back within FD_SLACK of its baseline
    (None: not within timeout), and the fds above baseline at the end."""
    t0 = time.monotonic()
    while True:
        over = {p: b.fd_count(p) - baseline[p] for p in pids}
        if all(v <= FD_SLACK for v in over.values()):
            return time.monotonic() - t0, over
        if time.monotonic() - t0 > timeout:
            return None, over
        time.sleep(0.2)


def measure(b, label, port, archiver_port, rss_pids, fd_pids, parks=False):
    """One side: warm, baseline, 5,000 stalled clients, probes, release.
    With `parks` (gitball-proxy), memory is read once the proxy has parked
    every stalled download (released its upstream, after --park-after),
    and also before, as it is during the stall's first seconds."""
    b.curl(f"http://127.0.0.1:{port}{HUGE_PATH}")
    b.http_get_small(port, SMALL_PATH)
    b.settle(rss_pids)
    rss0 = {p: b.rss_bytes(p) for p in rss_pids}
    fd0 = {p: b.fd_count(p) for p in fd_pids}
    pages0 = tcp_mem_pages()
    peak = [pages0]
    sampling = threading.Event()

    def sample():
        while not sampling.wait(1.0):
            peak[0] = max(peak[0], tcp_mem_pages())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    clients = open_clients(port, HUGE_PATH, STALLED)
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    with ThreadPoolExecutor(READER_THREADS) as pool:
        outcomes = list(pool.map(lambda sock: feed(sock, deadline), clients))
    answered_s = time.monotonic() - t0
    # At once: past --client-idle-timeout (60 s) the front closes stalled
    # connections, and what they held is released.
    pages1 = tcp_mem_pages()
    sockets = socket_memory(port, archiver_port)
    sampling.set()
    sampler.join()
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    b.settle(rss_pids)
    rss1 = {p: b.rss_bytes(p) for p in rss_pids}
    fd1 = {p: b.fd_count(p) for p in fd_pids}
    before_parking = {"pages": pages1 - pages0, "sockets": sockets,
                      "rss": {p: rss1[p] - rss0[p] for p in rss_pids}}
    parked_s = None
    if parks:
        parked_s = b.wait_parked(port, counts.get("ok", 0))
        b.settle(rss_pids)
        pages1 = tcp_mem_pages()
        sockets = socket_memory(port, archiver_port)
        rss1 = {p: b.rss_bytes(p) for p in rss_pids}
        fd1 = {p: b.fd_count(p) for p in fd_pids}
    latencies, probes_failed = probe_latencies(b, port, SMALL_PROBES)
    for sock in clients:
        if sock is not None:
            sock.close()
    released_s, over = wait_fds(b, fd_pids, fd0, RELEASE_TIMEOUT_S)
    answered = counts.get("ok", 0)
    out = {
        "answered": answered,
        "outcomes": counts,
        "answered_s": answered_s,
        "rss_per_download": {p: (rss1[p] - rss0[p]) / max(answered, 1) for p in rss_pids},
        "fds_held": {p: fd1[p] - fd0[p] for p in fd_pids},
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "probes_failed": probes_failed,
        "released_s": released_s,
        "fds_over_after": over,
        "tcp_pages_per_download": (pages1 - pages0) / max(answered, 1),
        "tcp_pages_held": pages1 - pages0,
        "tcp_pages_peak": peak[0] - pages0,
        "tcp_pages_before": pages0,
        "sockets": sockets,
        "before_parking": before_parking,
        "parked_s": parked_s,
    }
    print(f"    {label}: answered {answered}/{STALLED} {counts} in {answered_s:.1f} s;"
          f" RSS/download " + ", ".join(f"{p} {v / 1024:.0f} KiB" for p, v in out["rss_per_download"].items()) +
          f"; small hits p50 {out['p50'] * 1000:.1f} ms p99 {out['p99'] * 1000:.1f} ms, {probes_failed} failed;"
          f" fds back to baseline: {'%.1f s' % released_s if released_s is not None else 'NO'} {over}", flush=True)
    print(f"    {label}: kernel TCP memory before {pages0} pages, held {pages1 - pages0} pages"
          f" ({(pages1 - pages0) * 4096 / 2**20:.0f} MiB; peak {peak[0] - pages0}),"
          f" {out['tcp_pages_per_download']:.1f} pages per answered download; per socket (count, mean KiB): " +
          ", ".join(f"{k} {n} {v / 1024:.0f}" for k, (n, v) in sockets.items()), flush=True)
    if parks:
        n = max(answered, 1)
        print(f"    {label}: parked after {parked_s if parked_s is None else round(parked_s, 1)} s; before parking:"
              f" kernel {before_parking['pages'] * 4 / n:.0f} KiB/download, RSS/download " +
              ", ".join(f"{p} {v / n / 1024:.0f} KiB" for p, v in before_parking["rss"].items()), flush=True)
    return out


def run(ctx, results, b):
    """`b` is the bench module (its helpers: processes, HTTP, /proc)."""
    hard = raise_own_nofile()
    if hard < 2 * STALLED + 1024:
        raise RuntimeError(f"the hard RLIMIT_NOFILE ({hard}) is too low for {STALLED} clients")
    work = os.path.join(ctx.work, "stalled")
    os.makedirs(work, exist_ok=True)
    cache = os.path.join(ctx.shm, "stalled-cache")
    env = b.clean_env(ctx.home)
    login_shell = ["prlimit", f"--nofile={LOGIN_SHELL_SOFT_NOFILE}:{hard}", "--"]
    archiver_port, proxy_port, nginx_port = b.free_port(), b.free_port(), b.free_port()
    archiver = ctx.procs.start("archiver", login_shell + [
        ctx.archiver_bin, "--listen", f"127.0.0.1:{archiver_port}", "--repos", ctx.repos,
        "--cache-dir", cache, "--cache-max-bytes", ctx.s.cache_max, "--max-archive-bytes", ctx.s.max_archive,
    ], os.path.join(work, "archiver.log"), env)
    routes = os.path.join(work, "routes.toml")
    with open(routes, "w") as f:
        f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{archiver_port}"\n')
    proxy = ctx.procs.start("proxy", login_shell + [
        ctx.proxy_bin, "--listen", f"127.0.0.1:{proxy_port}", "--routes", routes,
    ], os.path.join(work, "proxy.log"), env)
    prefix = os.path.join(work, "nginx")
    os.makedirs(prefix, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(prefix=prefix, user="user root root;" if os.geteuid() == 0 else "",
                                  archiver_port=archiver_port, port=nginx_port))
    nginx = ctx.procs.start("nginx", ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
                            os.path.join(prefix, "stderr.log"))
    try:
        b.wait_healthy(archiver_port)
        b.wait_healthy(proxy_port)
        b.wait_listening(nginx_port)
        gitball = measure(b, "gitball-proxy → archiver", proxy_port, archiver_port, [proxy.pid, archiver.pid], [proxy.pid, archiver.pid],
                          parks=True)
        workers = b.children(nginx.pid)
        npids = [nginx.pid, *workers]
        peer = measure(b, "nginx → archiver", nginx_port, archiver_port, [*npids, archiver.pid], [*npids, archiver.pid])
    finally:
        for proc in (nginx, proxy, archiver):
            ctx.procs.stop(proc, sig=b.signal.SIGQUIT if proc is nginx else b.signal.SIGTERM)
        b.shutil.rmtree(cache, ignore_errors=True)

    def one(value):
        return b.summary([value])

    nginx_rss = sum(peer["rss_per_download"][p] for p in npids)
    what = f"{STALLED:,} stalled downloads (head + 32 KiB, then no reads) at a login shell's fd limit, no flags"
    results.add(SCENARIO, f"{what}: not answered and fed within {ANSWER_DEADLINE_S} s", "",
                one(STALLED - gitball["answered"]), "nginx reverse proxy → same archiver",
                one(STALLED - peer["answered"]), ("abs<", 1), "lower",
                f"gitball outcomes {gitball['outcomes']}, nginx {peer['outcomes']}")
    results.add(SCENARIO, f"{what}: gitball-proxy RSS growth per download", "MiB/dl",
                one(gitball["rss_per_download"][proxy.pid]), "nginx reverse proxy (master + workers)",
                one(nginx_rss), ("abs<", 0.1 * b.MiB), "lower")
    results.add(SCENARIO, f"{what}: gitball-archiver RSS growth per download", "MiB/dl",
                one(gitball["rss_per_download"][archiver.pid]), "same archiver behind nginx",
                one(peer["rss_per_download"][archiver.pid]), ("abs<", 0.1 * b.MiB), "lower")
    page_kib = os.sysconf("SC_PAGE_SIZE") / 1024
    early = gitball["before_parking"]
    n = max(gitball["answered"], 1)
    results.add(SCENARIO, f"{what}: gitball-proxy RSS growth per download before parking", "MiB/dl",
                one(early["rss"][proxy.pid] / n), "nginx reverse proxy (master + workers)", one(nginx_rss), None, "lower",
                f"informational: the first --park-after (10 s) of a stall, upstream still held; kernel TCP memory then"
                f" {early['pages'] * page_kib / n:.0f} KiB per download; all parked after "
                + (f"{gitball['parked_s']:.1f} s" if gitball["parked_s"] is not None else "(not all parked)"))
    results.add(SCENARIO, f"{what}: kernel TCP memory held per download (/proc/net/sockstat, all sockets on the path)",
                "KiB/dl", one(round(gitball["tcp_pages_per_download"] * page_kib)), "nginx reverse proxy → same archiver",
                one(round(peer["tcp_pages_per_download"] * page_kib)), None, "lower",
                "per socket, mean KiB: gitball " + ", ".join(f"{k} {v / 1024:.0f}" for k, (_, v) in gitball["sockets"].items())
                + "; nginx " + ", ".join(f"{k} {v / 1024:.0f}" for k, (_, v) in peer["sockets"].items()))
    results.add(SCENARIO, f"small cached tar.gz through the same proxy meanwhile, fresh connections: p99 of {SMALL_PROBES}", "ms",
                one(gitball["p99"]), "through nginx meanwhile", one(peer["p99"]), ("abs<", 0.050), "lower",
                f"failed probes: gitball {gitball['probes_failed']}, nginx {peer['probes_failed']}")
    results.add(SCENARIO, f"small cached tar.gz through the same proxy meanwhile: p50 of {SMALL_PROBES}", "ms",
                one(gitball["p50"]), "through nginx meanwhile", one(peer["p50"]), None, "lower", "informational")
    over = max(gitball["fds_over_after"].values())
    peer_over = max(peer["fds_over_after"].values())
    results.add(SCENARIO, f"fds above baseline once the clients closed (waited up to {RELEASE_TIMEOUT_S} s; most of proxy, archiver)", "",
                one(over), "nginx and its archiver", one(peer_over), ("abs<", FD_SLACK + 1), "lower",
                f"gitball back in {gitball['released_s']:.1f} s" if gitball["released_s"] is not None else "gitball not back")
