"""Scenario 7, crawler: one client walks 500 distinct cold archives while 20
normal clients download cached ones, through the proxy
(docs/archiver.md#crawler-budget).

bench/crawl has 500 directories; `main.tar.gz?path=dNNN` is a distinct cold
archive for each. The crawler walks them one after the other and ignores
`429` (the worst case: it just moves on); the 20 normal clients each fetch
a small cached zip in a loop, on a fresh connection per request. Identities
come from `X-Forwarded-For` through a proxy with `--trusted-proxies
127.0.0.1/32` (nginx in front). Three phases of equal length, each on a
stack started for it:

- no crawler: the normal clients alone (the baseline);
- crawler, budget off (`--client-cold-rate 0`): every step is a generation;
- crawler, default budget (`60/min`, burst `60`): the crawler gets the burst
  and then one a second; the rest is `429`.

Measured: the normal clients' latency (p50, p99) in each phase, and the
crawler's generations (200s) and refusals (429s) against its budget.
"""

import os
import shutil
import statistics
import threading
import time

import gen_repo
from bench import clean_env, http_get_small, summary
from scenario_rush import MiniStack

KEYS = 500
NORMAL = 20
CRAWLER = "203.0.113.7"


def crawl_repository(ctx):
    path = ctx.repo_path("bench", "crawl")
    stamp = path + ".stamp"
    if not os.path.exists(stamp):
        shutil.rmtree(path, ignore_errors=True)
        files = gen_repo.source_like_files(7, KEYS * 6 * 1024, mean_file_bytes=6 * 1024)
        # One directory per file: `?path=dNNN` names a distinct archive.
        renamed = ((f"d{index:03d}/{os.path.basename(name)}", data)
                   for index, (name, data) in zip(range(KEYS), files))
        gen_repo.write_repository(path, renamed, env=clean_env(ctx.home))
        open(stamp, "w").close()
    return path


def get_as(port, path, client):
    """GET with X-Forwarded-For (fresh connection); returns (status, seconds)."""
    import socket
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {client}\r\n"
                      "Connection: close\r\n\r\n").encode())
        data = bytearray()
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, time.perf_counter() - t0


def normal_path(index):
    return f"/bench/crawl/archive/main.zip?path=d{index:03d}"


def phase(port, seconds, crawl):
    stop = time.time() + seconds
    latencies, errors = [], []
    lock = threading.Lock()

    def normal(index):
        mine = []
        while time.time() < stop:
            status, took = get_as(port, normal_path(index), f"198.51.100.{index + 1}")
            if status != 200:
                errors.append(status)
            mine.append(took)
        with lock:
            latencies.extend(mine)

    crawler = {"200": 0, "429": 0, "other": 0, "steps": 0}

    def walk():
        for index in range(KEYS):
            if time.time() >= stop:
                break
            status, _ = get_as(port, f"/bench/crawl/archive/main.tar.gz?path=d{index:03d}", CRAWLER)
            crawler["steps"] += 1
            key = str(status) if str(status) in crawler else "other"
            crawler[key] += 1

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(NORMAL)]
    if crawl:
        threads.append(threading.Thread(target=walk))
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.time() - started
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"requests": len(latencies), "errors": len(errors), "p50": p(0.50), "p99": p(0.99),
            "mean": statistics.mean(latencies), "crawler": crawler if crawl else None, "seconds": elapsed}


def warm(port):
    for index in range(NORMAL):
        status, _, _ = http_get_small(port, normal_path(index))
        if status != 200:
            raise RuntimeError(f"warming {normal_path(index)}: {status}")


def scenario_crawler(ctx, stack, results):
    """`stack` is unused: each phase needs its own budget flags."""
    crawl_repository(ctx)
    seconds = 8 if ctx.s.quick else 20
    trusted = ["--trusted-proxies", "127.0.0.1/32"]
    phases = {}
    with MiniStack(ctx, "crawler-off", ["--client-cold-rate", "0"], trusted) as mini:
        warm(mini.proxy_port)
        phases["no crawler"] = phase(mini.proxy_port, seconds, crawl=False)
        phases["crawler, budget off"] = phase(mini.proxy_port, seconds, crawl=True)
    with MiniStack(ctx, "crawler-on", [], trusted) as mini:
        warm(mini.proxy_port)
        phases["crawler, default budget"] = phase(mini.proxy_port, seconds, crawl=True)
        rejected = mini.metric("gitball_archiver_budget_rejected_total")
    for name, outcome in phases.items():
        print(f"    {name}: {outcome}", flush=True)
    base = phases["no crawler"]
    off = phases["crawler, budget off"]
    on = phases["crawler, default budget"]
    allowed = 60 + seconds  # burst + 1/s over the phase
    loaded = "; loaded shared machine (2 CPUs, other builds running): compare within this run only"
    for q in ("p50", "p99"):
        results.add("7. crawler", f"{NORMAL} normal clients' cached zip {q} while a crawler walks {KEYS} cold archives (default budget)", "ms",
                    summary([on[q]]), "no crawler", summary([base[q]]), None, "lower",
                    f"{on['requests']} requests in {seconds} s vs {base['requests']}" + (loaded if q == "p99" else ""))
        results.add("7. crawler", f"{NORMAL} normal clients' cached zip {q} while a crawler walks {KEYS} cold archives (budget off)", "ms",
                    summary([off[q]]), "no crawler", summary([base[q]]), None, "lower",
                    f"{off['requests']} requests in {seconds} s vs {base['requests']}")
    results.add("7. crawler", f"crawler's cold generations in {seconds} s (default budget: burst 60 + 1/s)", "",
                summary([on["crawler"]["200"]]), "budget off", summary([off["crawler"]["200"]]), ("abs<", allowed + 1), "lower",
                f"default budget: {on['crawler']['200']} generated, {on['crawler']['429']} refused with 429 "
                f"(archiver counted {rejected:g}), at most {allowed} allowed; budget off: {off['crawler']['200']} of "
                f"{off['crawler']['steps']} steps generated")
