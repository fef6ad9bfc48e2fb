#!/usr/bin/env python3
"""Where the cores sit idle during one cold generation.

Starts a release archiver over a work directory's inputs (made by
`run.sh --workdir DIR`) with a fresh cache on tmpfs, records every context
switch on the machine (`perf sched record -a`) while `curl` fetches one cold
archive, stops the archiver, and then splits the generation's time: the CPU
of git, zstd's workers, the writer and the rest of the archiver (reading
git's pipe, serving the client), and every interval in which a core ran the
idle task, by what the generation's threads were doing then
(BENCHMARKS.md, "Where a cold tar.zst's 2 cores sit idle").

    python3 ops/bench/cold_idle.py --workdir DIR [--key b01] [--format tar.zst]

Needs perf (Debian: linux-perf) and the right to trace scheduler events
(root, or kernel.perf_event_paranoid <= -1). Everything listens on
127.0.0.1; the processes it starts are stopped by pid.
"""
import argparse
import collections
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_quiet(limit, fraction=0.93):
    """Waits (at most `limit` s) for a second in which the host was at least
    `fraction` idle: other work on the machine shows up as our idle's
    absence, and as time."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)
    deadline = time.time() + limit
    while True:
        a = sample()
        time.sleep(1.0)
        b = sample()
        idle = (b[0] - a[0]) / max(1, b[1] - a[1])
        if idle >= fraction or time.time() > deadline:
            return idle


def record(args, trace):
    """One cold request under `perf sched record -a`; returns the archiver's pid."""
    cache = tempfile.mkdtemp(prefix="gitball-idle-", dir="/dev/shm")
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": os.path.join(args.workdir, "home"), "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1"}
    log = open(os.path.join(tempfile.gettempdir(), "gitball-idle-archiver.log"), "w")
    archiver = subprocess.Popen([args.archiver, "--listen", f"127.0.0.1:{port}",
                                 "--repos", os.path.join(args.workdir, "repos"), "--cache-dir", cache,
                                 "--cache-max-bytes", "8GiB", "--max-archive-bytes", "4GiB",
                                 "--shutdown-grace", "1"], stdout=log, stderr=log, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 15
        while get_status(f"{base}/healthz") != 200:
            if time.time() > deadline or archiver.poll() is not None:
                raise RuntimeError("the archiver did not become healthy (see its log)")
            time.sleep(0.05)
        get_status(f"{base}/{args.repo}/archive/no-such-ref-warmup.tar")  # opens the repository
        idle = wait_quiet(args.quiet)
        out = subprocess.run(["perf", "sched", "record", "-a", "-o", trace, "--",
                              "curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{time_total}",
                              f"{base}/{args.repo}/archive/{args.key}.{args.format}"],
                             capture_output=True, text=True, check=True).stdout
        if "x-gitball-cache: miss" not in out.lower():
            raise RuntimeError(f"not a cold generation:\n{out}")
        print(f"cold {args.format} of {args.repo} at {args.key}: {out.rsplit(chr(10), 1)[-1]} s"
              f" (host {idle:.0%} idle the second before)")
        return archiver.pid
    finally:
        archiver.terminate()
        archiver.wait()
        shutil.rmtree(cache, ignore_errors=True)


EVENT = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)$")
FIELD = re.compile(r"(\w+)=(\S+)")


def analyse(trace, archiver):
    text = subprocess.run(["perf", "script", "-i", trace, "-F", "comm,pid,tid,cpu,time,event,trace"],
                          capture_output=True, text=True, check=True).stdout
    events, ours, parent, comm = [], set(), {}, {}
    for line in text.splitlines():
        m = EVENT.match(line)
        if not m:
            continue
        _, pid, tid, cpu, t, event, rest = m.groups()
        if int(pid) == archiver:
            ours.add(int(tid))
        events.append((float(t), int(cpu), event.rsplit(":", 1)[-1], int(tid), dict(FIELD.findall(rest))))
    for _, _, event, tid, d in events:
        if event == "sched_wakeup_new" and tid in ours:  # threads and children, in time order
            ours.add(int(d["pid"]))
            parent[int(d["pid"])] = tid
        if event == "sched_switch":
            comm[int(d["prev_pid"])] = d["prev_comm"]
            comm[int(d["next_pid"])] = d["next_comm"]

    def role(x):
        if x not in ours:
            return "other"
        name = comm.get(x, "")
        if name == "git":
            return "git"
        if name == "gitball-writer":  # zstd's workers inherit the writer's name
            return "zstd" if comm.get(parent.get(x)) == "gitball-writer" else "writer"
        if name in ("gitball-gzip", "gitball-zip"):
            return name[8:]
        return "serve"

    git = [x for x in ours if role(x) == "git"]
    if not git:
        raise RuntimeError("no git child of the archiver in the trace")
    spans = [t for t, _, e, _, d in events if e == "sched_switch"
             and (int(d["next_pid"]) in git or int(d["prev_pid"]) in git)]
    g0, g1 = min(spans), max(spans)
    compressing = [t for t, _, e, _, d in events if e == "sched_switch" and t > g0
                   and role(int(d["next_pid"])) in ("zstd", "gzip", "zip")]
    c0 = min(compressing) if compressing else g1
    end = max(t for t, *_ in events)
    state, where, running = {}, {}, {}
    cpus = sorted({cpu for _, cpu, *_ in events})
    runtime, idle, with_git = collections.Counter(), collections.Counter(), collections.Counter()

    def why(cpu):
        queued = [x for x in ours if state.get(x) == "R"]
        if any(where.get(x) == cpu for x in queued):
            return "a thread woken onto this core, not yet on it"
        if queued:
            return "runnable, queued on a busy core: " + "+".join(sorted({role(x) for x in queued}))
        busy = sorted(role(x) for x in ours if state.get(x) == "X")
        if set(busy) <= {"git", "serve"} and busy:
            return "only git or the pipe reader runs: compression waits for input"
        return "running: " + (",".join(busy) or "nothing of the generation")

    last = None
    for t, cpu, event, tid, d in events:
        if last is not None and last >= g0:
            phase = "1 before compression starts" if last < c0 else "2 while git runs" if last < g1 else "3 after git exits"
            for c in cpus:
                x = running.get(c, 0)
                runtime[(phase, "idle" if x == 0 else role(x))] += t - last
                if x == 0:
                    idle[(phase, why(c))] += t - last
                    g = state.get(git[0])
                    with_git[(phase, "git runs" if g == "X" else "git waits for a core" if g == "R"
                              else "git asleep (a full pipe)")] += t - last
        last = t
        if event == "sched_switch":
            p, n = int(d["prev_pid"]), int(d["next_pid"])
            state[p] = "R" if d["prev_state"].startswith("R") and p != 0 else "S"
            where[p] = cpu
            state[n], where[n], running[cpu] = "X", cpu, n
        elif event == "sched_migrate_task":
            where[int(d["pid"])] = int(d["dest_cpu"])
        elif event in ("sched_waking", "sched_wakeup_new"):
            x = int(d["pid"])
            if state.get(x) != "X":
                state[x], where[x] = "R", int(d.get("target_cpu", -1))
    print(f"git ran from {0:.3f} to {g1 - g0:.3f} s (compression from {(c0 - g0) * 1000:.0f} ms);"
          f" {(end - g1) * 1000:.0f} ms after its exit; {len(cpus)} cores")
    for phase in sorted({p for p, _ in runtime}):
        wall = sum(v for (p, _), v in runtime.items() if p == phase) / len(cpus)
        parts = ", ".join(f"{r} {v:.3f}" for (p, r), v in runtime.most_common() if p == phase)
        print(f"\n{phase[2:]}: {wall:.3f} s of wall; CPU-s: {parts}")
        for (p, k), v in idle.most_common():
            if p == phase and v >= 0.0005:
                print(f"    idle {v:.3f}  {k}")
        print("    idle by git's state: " + ", ".join(f"{k} {v:.3f}" for (p, k), v in with_git.most_common() if p == phase))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a work directory run.sh generated the inputs in")
    parser.add_argument("--archiver", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                           "release", "gitball-archiver"))
    parser.add_argument("--repo", default="bench/large")
    parser.add_argument("--key", default="b01", help="a tag of the repository")
    parser.add_argument("--format", default="tar.zst", choices=["tar.zst", "tar.gz", "zip", "tar"])
    parser.add_argument("--quiet", type=float, default=60, help="wait at most this long for a quiet host")
    parser.add_argument("--trace", help="keep the perf trace here (default: a temporary file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or os.path.join(tmp, "sched.data")
        archiver = record(args, trace)
        analyse(trace, archiver)


if __name__ == "__main__":
    sys.exit(main())
