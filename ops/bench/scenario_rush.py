"""Scenario 6, release rush: 1,000 clients ask for a just-tagged archive at
once, through the proxy, with and without a prewarm (docs/http.md#prewarm).

Each case gets a fresh archiver + proxy (an empty cache), so the archive is
cold for the case without prewarm: the first request starts the one
generation, the 999 others join it (all from 127.0.0.1, one client of the
crawler budget: joins are never limited). With prewarm, `POST
/bench/rush/prewarm/v1.0` is answered 202 at once and the rush comes once
the archive is cached. Measured: every client's time to last byte from the
moment the rush starts, whether each got a complete 200, and the number of
tar.gz generations (from the archiver's /metrics).

The clients are one asyncio loop (1,000 sockets in this process, whose soft
RLIMIT_NOFILE is raised to the hard limit first; the services inherit it).
"""

import asyncio
import os
import re
import resource
import time

import gen_repo
from bench import MiB, clean_env, free_port, http_get_small, summary, wait_healthy

CLIENTS = 1000
PREWARM_TOKEN = "bench-prewarm-token"


def rush_repository(ctx):
    """bench/rush: source-like files (a few MiB of tar.gz) tagged v1.0."""
    path = ctx.repo_path("bench", "rush")
    total = (2 if ctx.s.quick else 8) * MiB
    stamp = path + ".stamp"
    if not (os.path.exists(stamp) and open(stamp).read() == str(total)):
        import shutil
        shutil.rmtree(path, ignore_errors=True)
        gen_repo.write_repository(path, gen_repo.source_like_files(6, total), extra_tags=("v1.0",),
                                  env=clean_env(ctx.home))
        with open(stamp, "w") as f:
            f.write(str(total))
    return path


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class MiniStack:
    """An archiver and a proxy routing `*` to it, with extra flags for each;
    a fresh cache dir. Stopped (by pid) on exit."""

    def __init__(self, ctx, name, archiver_args=(), proxy_args=()):
        self.ctx = ctx
        self.dir = os.path.join(ctx.work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.cache = os.path.join(ctx.shm, name + "-cache")
        self.archiver_port = free_port()
        self.proxy_port = free_port()
        self.archiver_args = list(archiver_args)
        self.proxy_args = list(proxy_args)

    def __enter__(self):
        ctx = self.ctx
        env = clean_env(ctx.home)
        self.archiver = ctx.procs.start("archiver", [
            ctx.archiver_bin, "--listen", f"127.0.0.1:{self.archiver_port}", "--repos", ctx.repos,
            "--cache-dir", self.cache, "--shutdown-grace", "1", *self.archiver_args,
        ], os.path.join(self.dir, "archiver.log"), env)
        routes = os.path.join(self.dir, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{self.archiver_port}"\n')
        self.proxy = ctx.procs.start("proxy", [
            ctx.proxy_bin, "--listen", f"127.0.0.1:{self.proxy_port}", "--routes", routes, *self.proxy_args,
        ], os.path.join(self.dir, "proxy.log"), env)
        wait_healthy(self.archiver_port)
        wait_healthy(self.proxy_port)
        return self

    def __exit__(self, *exc):
        import shutil
        for proc in (self.proxy, self.archiver):
            self.ctx.procs.stop(proc)
        shutil.rmtree(self.cache, ignore_errors=True)

    def metric(self, name, **labels):
        """Sum of the archiver's series `name` whose labels include `labels`."""
        _, _, body = http_get_small(self.archiver_port, "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


async def _one(port, path, t0):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split()[1])
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        cache = re.search(r"(?im)^x-gitball-cache:\s*(\S+)", head)
        nbytes, tail = 0, b""
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            nbytes += len(data)
            tail = (tail + data[-5:])[-5:]
        complete = nbytes == int(length.group(1)) if length else tail == b"0\r\n\r\n"
        return status, cache.group(1) if cache else "?", complete, time.perf_counter() - t0
    finally:
        writer.close()


async def _rush(port, path, n):
    t0 = time.perf_counter()
    return await asyncio.gather(*(_one(port, path, t0) for _ in range(n)), return_exceptions=True)


def rush(port, path, n):
    answers = asyncio.run(_rush(port, path, n))
    ok = [a for a in answers if not isinstance(a, BaseException) and a[0] == 200 and a[2]]
    errors = [a for a in answers if isinstance(a, BaseException) or a[0] != 200 or not a[2]]
    caches = {}
    for a in ok:
        caches[a[1]] = caches.get(a[1], 0) + 1
    times = sorted(a[3] for a in ok)
    return {
        "served": len(ok),
        "failed": len(errors),
        "first_error": repr(errors[0]) if errors else None,
        "cache": caches,
        "last_byte": times[-1] if times else None,
        "median": times[len(times) // 2] if times else None,
    }


def wait_cached(port, path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, headers, _ = http_get_small(port, path, "HEAD")
        if status == 200 and headers.get("x-gitball-cache") == "hit":
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} was not cached after {timeout}s")


def scenario_rush(ctx, stack, results):
    """`stack` is unused: each case needs a fresh cache and a prewarm token."""
    rush_repository(ctx)
    fd_limit = raise_fd_limit()
    token_file = os.path.join(ctx.work, "prewarm.token")
    with open(token_file, "w") as f:
        f.write(PREWARM_TOKEN + "\n")
    path = "/bench/rush/archive/v1.0.tar.gz"
    cases = {"without prewarm": [], "with prewarm": []}
    for run in range(ctx.s.runs):
        for case in cases:
            flags = ["--prewarm-token-file", token_file]
            with MiniStack(ctx, f"rush-{run}-{case.split()[0]}", flags, flags) as mini:
                prewarm_s = None
                if case == "with prewarm":
                    t0 = time.perf_counter()
                    import socket
                    with socket.create_connection(("127.0.0.1", mini.proxy_port), timeout=30) as sock:
                        sock.sendall((f"POST /bench/rush/prewarm/v1.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      f"Authorization: Bearer {PREWARM_TOKEN}\r\nContent-Length: 0\r\n"
                                      "Connection: close\r\n\r\n").encode())
                        answer = sock.recv(65536).decode("latin-1")
                    prewarm_s = time.perf_counter() - t0
                    if " 202 " not in answer.split("\r\n")[0] + " ":
                        raise RuntimeError(f"prewarm: {answer[:200]}")
                    wait_cached(mini.proxy_port, path)
                outcome = rush(mini.proxy_port, path, CLIENTS)
                outcome["generations"] = mini.metric("gitball_archiver_generations_total", format="tar.gz")
                outcome["prewarm_202_s"] = prewarm_s
                cases[case].append(outcome)
                print(f"    run {run}, {case}: {outcome}", flush=True)
    last = {case: runs[-1] for case, runs in cases.items()}
    note = "; ".join(
        f"{case}: {o['served']}/{CLIENTS} served, {o['generations']:g} tar.gz generation(s), cache {o['cache']}"
        + (f", prewarm answered 202 in {o['prewarm_202_s'] * 1000:.0f} ms" if o["prewarm_202_s"] else "")
        for case, o in last.items()
    ) + f"; client soft RLIMIT_NOFILE {fd_limit}; loaded shared machine"
    if any(o["last_byte"] is None for runs in cases.values() for o in runs):
        raise RuntimeError(f"a rush served nobody: {last}")
    results.add("6. release rush", f"{CLIENTS:,} clients, just-tagged tar.gz through the proxy: time to last byte (slowest client)", "s",
                summary([o["last_byte"] for o in cases["with prewarm"]]), "without prewarm",
                summary([o["last_byte"] for o in cases["without prewarm"]]), None, "lower", note)
    results.add("6. release rush", f"{CLIENTS:,} clients, just-tagged tar.gz through the proxy: time to last byte (median client)", "s",
                summary([o["median"] for o in cases["with prewarm"]]), "without prewarm",
                summary([o["median"] for o in cases["without prewarm"]]), None, "lower", "")
