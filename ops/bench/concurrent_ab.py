#!/usr/bin/env python3
"""Benchmark 4 (30 concurrent cold requests for one key) with archiver
builds alternated in one period: what the 29 joiners cost the archiver.

For each round, and each build in turn (the order rotated each round), a
release archiver alone (no proxy or nginx) is started on a fresh cache
directory in /dev/shm over `bench/large` (the repository run.sh generates
in its --workdir); one cold tar.gz is fetched alone, then another key by
N `curl`s started together, both timed by bench.py's `timed_curls` (from
before the first start to after the last exit). The archiver's own CPU
(utime + stime of every thread, from /proc/PID/stat), its git's (the
reaped children's) and the clients' (this script's reaped children) are
read after each, and the archiver is stopped.

    python3 ops/bench/concurrent_ab.py --workdir DIR --archiver old=BIN --archiver new=BIN [--rounds 3]

Prints one line per measurement and, per build, the medians and ranges of
the archiver's CPU for one and for N, their difference, the clients' CPU
and the wall ratio N ÷ one; and the load average before and after.
"""
import argparse, os, resource, shutil, signal, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def own_and_children(pid):
    """(utime, stime of pid's threads, cutime + cstime), seconds."""
    u, s, cu, cs = bench.cpu_times(pid)
    return u, s, cu + cs


def serving_threads(pid):
    """CPU seconds (user + system) of the archiver's serving threads
    (named `gitball-archiver-N`, which the kernel cuts to the process's
    own name; the main thread is the one whose id is the pid)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, fields = f.read().rsplit(")", 1)
        except FileNotFoundError:
            continue
        if head.split("(", 1)[1] == "gitball-archive" and int(tid) != pid:
            fields = fields.split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def clients():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(binary, args, round_, name):
    repos = os.path.join(args.workdir, "repos")
    if not os.path.isdir(os.path.join(repos, "bench", "large.git")):
        sys.exit(f"{repos}/bench/large.git missing: run ops/bench/run.sh --only 4 --workdir {args.workdir} once")
    env = bench.clean_env(os.path.join(args.workdir, "home"))
    cache = tempfile.mkdtemp(prefix="gitball-concurrent-ab-", dir="/dev/shm")
    logs = tempfile.mkdtemp(prefix="gitball-concurrent-ab-")
    port = bench.free_port()
    with open(os.path.join(logs, "archiver.log"), "wb") as log:
        archiver = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--repos", repos,
                                     "--cache-dir", cache, "--cache-max-bytes", "8GiB",
                                     "--max-archive-bytes", "4GiB", "--shutdown-grace", "1"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        bench.wait_healthy(port)
        url = f"http://127.0.0.1:{port}/bench/large/archive/{{}}.tar.gz"
        u0, s0, g0, c0, t0 = *own_and_children(archiver.pid), clients(), serving_threads(archiver.pid)
        one, states, _ = bench.timed_curls(url.format("b01"), 1, os.path.join(logs, "one"))
        assert states == ["miss"], states
        time.sleep(0.2)  # the archiver reaps git
        u1, s1, g1, c1, t1 = *own_and_children(archiver.pid), clients(), serving_threads(archiver.pid)
        many, states, _ = bench.timed_curls(url.format("b02"), args.concurrent, os.path.join(logs, "many"))
        assert sorted(set(states)) == ["join", "miss"] and states.count("miss") == 1, states
        time.sleep(0.2)
        u2, s2, g2, c2, t2 = *own_and_children(archiver.pid), clients(), serving_threads(archiver.pid)
    finally:
        archiver.send_signal(signal.SIGTERM)
        archiver.wait(timeout=30)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    row = {"one": one, "many": many, "archiver_one": u1 - u0 + s1 - s0, "archiver_many": u2 - u1 + s2 - s1,
           "serving_one": t1 - t0, "serving_many": t2 - t1,
           "user_one": u1 - u0, "user_many": u2 - u1, "system_one": s1 - s0, "system_many": s2 - s1,
           "git_one": g1 - g0, "git_many": g2 - g1, "clients_one": c1 - c0, "clients_many": c2 - c1}
    print(f"  round {round_} {name}: one {one:.2f} s, {args.concurrent} {many:.2f} s ({many / one:.2f}x); "
          f"archiver CPU {row['archiver_one']:.2f} / {row['archiver_many']:.2f} s "
          f"(+{row['archiver_many'] - row['archiver_one']:.2f}; user +{row['user_many'] - row['user_one']:.2f}, "
          f"system +{row['system_many'] - row['system_one']:.2f}; serving threads {row['serving_one']:.2f} / {row['serving_many']:.2f}), git {row['git_one']:.2f} / {row['git_many']:.2f}, "
          f"clients {row['clients_one']:.2f} / {row['clients_many']:.2f}; load {bench.loadavg()}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--archiver", action="append", required=True, metavar="NAME=BIN")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=30)
    args = parser.parse_args()
    builds, rows = bench.alternated(
        args.archiver, args.rounds, lambda binary, round_, name: measure(binary, args, round_, name))

    def spread(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    for name, _ in builds:
        r = rows[name]
        print(f"{name}: archiver CPU one {spread([x['archiver_one'] for x in r])}, "
              f"{args.concurrent} {spread([x['archiver_many'] for x in r])}, "
              f"difference {spread([x['archiver_many'] - x['archiver_one'] for x in r])} "
              f"(user {spread([x['user_many'] - x['user_one'] for x in r])}, "
              f"system {spread([x['system_many'] - x['system_one'] for x in r])}); "
              f"serving threads one {spread([x['serving_one'] for x in r])}, {args.concurrent} {spread([x['serving_many'] for x in r])}; "
              f"clients {spread([x['clients_many'] for x in r])}; "
              f"wall ratio {spread([x['many'] / x['one'] for x in r])}")


if __name__ == "__main__":
    main()
