#!/usr/bin/env python3
"""The CPU one cold generation costs, for archiver builds side by side.

For each round, and each build in turn (the order rotated each round), a
release archiver alone is started on a fresh cache directory in /dev/shm
over the repositories of a work directory made by `run.sh --workdir DIR`
(with `--real-repo` for git/git); each archive asked for (`--get`, default
git/git's tar.gz and tar.zst and bench/large's tar.zst) is fetched once
with `curl` to /dev/null, cold (a fresh cache), and the CPU it cost is read
from /proc/PID/stat before and after: the archiver's own (utime + stime of
every thread, alive or gone) and its reaped children's (git). The machine
is shared, so CPU time, not wall time, is the measure; clock ticks are
10 ms, so take 5 rounds or more and read the medians.

    python3 ops/bench/cold_cpu_ab.py --workdir DIR --archiver old=BIN --archiver new=BIN \
        [--rounds 7] [--get git/git/archive/gitball-bench-00.tar.gz ...]

Prints one line per generation and, per build and archive, the medians
and ranges of the archiver's CPU, git's and their sum, and the wall time.
Everything listens on 127.0.0.1; the archivers are stopped by pid.
"""
import argparse, os, shutil, signal, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

DEFAULT_GETS = [
    "git/git/archive/gitball-bench-00.tar.gz",
    "git/git/archive/gitball-bench-00.tar.zst",
    "bench/large/archive/b01.tar.zst",
]


def measure(binary, args, round_, name):
    repos = os.path.join(args.workdir, "repos")
    env = bench.clean_env(os.path.join(args.workdir, "home"))
    cache = tempfile.mkdtemp(prefix="gitball-cold-cpu-", dir="/dev/shm")
    log_dir = tempfile.mkdtemp(prefix="gitball-cold-cpu-")
    port = bench.free_port()
    rows = {}
    with open(os.path.join(log_dir, "archiver.log"), "wb") as log:
        archiver = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--repos", repos,
                                     "--cache-dir", cache, "--cache-max-bytes", "8GiB",
                                     "--max-archive-bytes", "4GiB", "--shutdown-grace", "1"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        bench.wait_healthy(port)
        for get in args.get:
            # Opens the repository (and its shadow) before the measured request.
            repo = get.split("/archive/", 1)[0]
            bench.http_get_small(port, f"/{repo}/archive/no-such-ref-warm-up.tar")
            u0, s0, cu0, cs0 = bench.cpu_times(archiver.pid)
            got = bench.curl(f"http://127.0.0.1:{port}/{get}", "-H", "Accept-Encoding: identity")
            time.sleep(0.3)  # the zstd drop thread, the cache's bookkeeping
            u1, s1, cu1, cs1 = bench.cpu_times(archiver.pid)
            row = {"archiver": u1 - u0 + s1 - s0, "user": u1 - u0, "system": s1 - s0,
                   "git": cu1 - cu0 + cs1 - cs0, "wall": got["total"], "size": got["size"]}
            row["all"] = row["archiver"] + row["git"]
            rows[get] = row
            print(f"  round {round_} {name} {get}: {row['all']:.2f} CPU-s (archiver {row['archiver']:.2f}: "
                  f"user {row['user']:.2f}, system {row['system']:.2f}; git {row['git']:.2f}), "
                  f"wall {row['wall']:.3f} s, {row['size']} bytes; load {bench.loadavg()}", flush=True)
    finally:
        archiver.send_signal(signal.SIGTERM)
        archiver.wait(timeout=30)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--archiver", action="append", required=True, metavar="NAME=BIN")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--get", action="append", metavar="REPO/archive/KEY.FORMAT",
                        help="an archive path to generate cold (repeatable)")
    args = parser.parse_args()
    args.get = args.get or DEFAULT_GETS
    builds, rows = bench.alternated(
        args.archiver, args.rounds, lambda binary, round_, name: measure(binary, args, round_, name))

    def spread(values):
        return f"{statistics.median(values):.3f} ({min(values):.2f}–{max(values):.2f})"

    for get in args.get:
        print(get)
        for name, _ in builds:
            r = [x[get] for x in rows[name]]
            sizes = sorted({x["size"] for x in r})
            print(f"  {name}: CPU-s {spread([x['all'] for x in r])}: archiver {spread([x['archiver'] for x in r])} "
                  f"(user {spread([x['user'] for x in r])}, system {spread([x['system'] for x in r])}), "
                  f"git {spread([x['git'] for x in r])}; wall {spread([x['wall'] for x in r])} s; bytes {sizes}")


if __name__ == "__main__":
    main()
