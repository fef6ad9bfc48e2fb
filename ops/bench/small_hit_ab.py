#!/usr/bin/env python3
"""Small cache hits through gitball-proxy builds against nginx's reverse proxy,
in one run: a release archiver holding the 15 KiB `bench/small`
`v1.0.tar.gz` as a hit, each proxy build given with --proxy NAME=BIN, and
nginx as the reverse proxy in front of the same archiver (bench.py's peer:
proxy_buffering off, 256k buffers, pooled upstream connections), all on
127.0.0.1. Modes:

  rounds  wrk -t2 -c64 on each front in turn, the order rotated each round;
          req/s, and user and kernel CPU per hit of the front (/proc)
  perfab  the same under `perf record -e cpu-clock`: kernel and user CPU
          per hit from the samples, and the kernel symbols per hit
  strace  `strace -f -c` of each front over wrk -t1 -c8: syscalls per hit
          by kind
  trace   `strace -f -tt` of each front over 6 keep-alive hits on one
          connection: the syscalls of a hit in order

    python3 ops/bench/small_hit_ab.py rounds --workdir DIR --proxy old=BIN --proxy new=BIN

DIR holds the generated inputs (repos/bench/small.git, made here if
missing, as callgrind_hit.py makes it). Needs wrk, nginx, curl; strace and
perf for their modes.
"""
import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from callgrind_hit import PATH, get_many, small_repo  # noqa: E402


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def cpu(pids):
    u = s = 0
    for pid in pids:
        for tdir in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tdir}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            u += int(fields[11]); s += int(fields[12])
    hz = os.sysconf("SC_CLK_TCK")
    return u / hz, s / hz


class Stack:
    def __init__(self, args, proxies):
        self.args = args
        self.proxies = proxies
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="pk-ab-", dir="/tmp")
        self.cache = tempfile.mkdtemp(prefix="pk-ab-cache-", dir="/dev/shm")

    def start(self, name, argv, **kw):
        log = open(os.path.join(self.dir, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def __enter__(self):
        repos = small_repo(self.args.workdir)
        env = bench.clean_env(os.path.join(self.args.workdir, "home"))
        self.aport = bench.free_port()
        self.archiver = self.start("archiver", [self.args.archiver, "--listen", f"127.0.0.1:{self.aport}", "--repos", repos,
                                                "--cache-dir", self.cache, "--cache-max-bytes", "1GiB",
                                                "--max-archive-bytes", "1GiB", "--shutdown-grace", "1"], env=env)
        routes = os.path.join(self.dir, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{self.aport}"\n')
        self.ports = {}
        self.front = {}
        for name, binary in self.proxies:
            port = bench.free_port()
            p = self.start(name, [binary, "--listen", f"127.0.0.1:{port}", "--routes", routes, "--shutdown-grace", "1"], env=env)
            self.ports[name] = port
            self.front[name] = (lambda p=p: [p.pid])
        prefix = os.path.join(self.dir, "nginx"); os.makedirs(prefix)
        rp = bench.free_port()
        # bench.py's peer, as the full run measures it (its other servers,
        # the sendfile one and default buffers, idle here).
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(bench.NGINX_CONF.format(
                prefix=prefix, docroot=prefix,
                user="user root root;" if os.geteuid() == 0 else "",
                static_port=bench.free_port(), archiver_port=self.aport,
                rp_port=rp, rp_default_port=bench.free_port(),
            ))
        self.nginx = self.start("nginx", ["nginx", "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"), "-e", os.path.join(prefix, "error.log")])
        self.ports["nginx"] = rp
        self.front["nginx"] = lambda: children(self.nginx.pid)
        bench.wait_healthy(self.aport)
        for name, _ in self.proxies:
            bench.wait_healthy(self.ports[name])
        time.sleep(0.5)
        subprocess.run(["curl", "-sSf", "-o", "/dev/null", f"http://127.0.0.1:{self.aport}{PATH}"], check=True)
        for name in self.ports:
            subprocess.run(["wrk", "-t1", "-c8", "-d1s", self.url(name)], check=True, capture_output=True)
        return self

    def url(self, name):
        return f"http://127.0.0.1:{self.ports[name]}{PATH}"

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGQUIT if p is self.nginx else signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill(); p.wait()
        shutil.rmtree(self.cache, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk(url, threads, conns, seconds):
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", url],
                         check=True, capture_output=True, text=True).stdout
    rps, errors = bench.parse_wrk(out)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, reqs, errors


def rounds(args, stack):
    names = [n for n, _ in stack.proxies] + ["nginx"]
    res = {n: [] for n in names}
    cpu_u = {n: [] for n in names}
    cpu_s = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            pids = stack.front[n]()
            u0, s0 = cpu(pids)
            rps, reqs, err = wrk(stack.url(n), 2, 64, args.seconds)
            u1, s1 = cpu(pids)
            res[n].append(rps)
            cpu_u[n].append((u1 - u0) / reqs * 1e6)
            cpu_s[n].append((s1 - s0) / reqs * 1e6)
            print(f"round {r} {n}: {rps:,.0f} req/s user {cpu_u[n][-1]:.1f} us kernel {cpu_s[n][-1]:.1f} us {err}", flush=True)
        loads.append(os.getloadavg()[0])
    print("load averages (1 min) after each round:", " ".join(f"{l:.2f}" for l in loads))
    for n in names:
        print(f"{n}: median {statistics.median(res[n]):,.0f} req/s range {min(res[n]):,.0f}-{max(res[n]):,.0f};"
              f" user/hit median {statistics.median(cpu_u[n]):.1f} us, kernel/hit median {statistics.median(cpu_s[n]):.1f} us;"
              f" ratio to nginx {statistics.median(res[n]) / statistics.median(res['nginx']):.3f}")
    # per-round ratios
    for n in names[:-1]:
        ratios = [a / b for a, b in zip(res[n], res["nginx"])]
        print(f"{n}/nginx per round: " + " ".join(f"{x:.3f}" for x in ratios) + f"  median {statistics.median(ratios):.3f}")


def parse_strace_c(text):
    counts = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$", line)
        if m and m.group(3) != "total":
            counts[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return counts


def strace_counts(args, stack):
    names = [n for n, _ in stack.proxies] + ["nginx"]
    for n in names:
        pids = stack.front[n]()
        out = os.path.join(stack.dir, f"strace-{n}.txt")
        argv = ["strace", "-f", "-c", "-o", out]
        for pid in pids:
            argv += ["-p", str(pid)]
        st = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        rps, reqs, err = wrk(stack.url(n), 1, 8, args.seconds)
        time.sleep(0.3)
        st.send_signal(signal.SIGINT); st.wait()
        counts = parse_strace_c(open(out).read())
        total = sum(c for c, _ in counts.values())
        print(f"== {n}: {reqs} requests, {total / reqs:.2f} syscalls per hit", flush=True)
        for k, (c, e) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
            if c / reqs >= 0.005:
                print(f"   {k:20s} {c / reqs:6.3f}/hit" + (f"  errors {e / reqs:.3f}/hit" if e else ""))


def trace(args, stack):
    for n in [n for n, _ in stack.proxies] + ["nginx"]:
        pids = stack.front[n]()
        out = os.path.join(stack.dir, f"trace-{n}.txt")
        argv = ["strace", "-f", "-tt", "-o", out, "-s", "40"]
        for pid in pids:
            argv += ["-p", str(pid)]
        st = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        get_many(stack.ports[n], 6)
        time.sleep(0.3)
        st.send_signal(signal.SIGINT); st.wait()
        print(f"==== {n}"); print(open(out).read())


def perf_split(path, reqs, hz):
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "dso,sym", "-n", "--stdio", "-g", "none"],
                         capture_output=True, text=True).stdout
    kern = user = 0
    syms = {}
    for line in out.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if not m:
            continue
        c = int(m.group(1))
        if m.group(3) == "k":
            kern += c
            syms[m.group(4).strip()] = c
        else:
            user += c
    us = 1e6 / hz / reqs
    return kern * us, user * us, {k: v * us for k, v in syms.items()}


def perfab(args, stack):
    names = [n for n, _ in stack.proxies] + ["nginx"]
    hz = 2000
    res = {n: [] for n in names}
    watch = ["_copy_to_iter", "_copy_from_iter", "__sys_recvfrom", "fdget", "_raw_spin_unlock_irqrestore", "finish_task_switch.isra.0"]
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            pids = stack.front[n]()
            out = os.path.join(stack.dir, f"perf-{n}.data")
            st = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(hz), "-o", out, "-p", ",".join(map(str, pids))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            rps, reqs, err = wrk(stack.url(n), 2, 64, args.seconds)
            st.send_signal(signal.SIGINT); st.wait()
            k, u, syms = perf_split(out, reqs, hz)
            res[n].append((k, u, syms, rps))
            print(f"round {r} {n}: {rps:,.0f} req/s kernel {k:.1f} us/hit user {u:.1f} us/hit " +
                  " ".join(f"{w}={syms.get(w, 0):.2f}" for w in watch[:3]), flush=True)
    print("load averages:", os.getloadavg())
    med = statistics.median
    a = names[0]
    tot = {}
    for n in (a, "nginx"):
        for x in res[n]:
            for k, v in x[2].items():
                tot.setdefault(k, {}).setdefault(n, []).append(v)
    rows = sorted(tot.items(), key=lambda kv: -(sum(kv[1].get(a, [0])) / len(res[a]) - sum(kv[1].get("nginx", [0])) / len(res["nginx"])))
    print(f"kernel symbols, mean us/hit: {a} vs nginx (largest excess first)")
    for k, v in rows[:25]:
        print(f"   {sum(v.get(a, [0])) / len(res[a]):6.2f} {sum(v.get('nginx', [0])) / len(res['nginx']):6.2f}  {k}")
    for n in names:
        ks = [x[0] for x in res[n]]; us = [x[1] for x in res[n]]
        print(f"{n}: kernel/hit median {med(ks):.1f} us ({min(ks):.1f}-{max(ks):.1f}), user/hit median {med(us):.1f} us ({min(us):.1f}-{max(us):.1f})")
        for w in watch:
            v = [x[2].get(w, 0) for x in res[n]]
            print(f"    {w:30s} median {med(v):.2f} us/hit ({min(v):.2f}-{max(v):.2f})")


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    release = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "release")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["rounds", "strace", "trace", "perfab"])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--archiver", default=os.path.join(release, "gitball-archiver"))
    ap.add_argument("--proxy", action="append", default=[], help="NAME=BIN, once per build")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    proxies = [tuple(p.split("=", 1)) for p in args.proxy] or [("proxy", os.path.join(release, "gitball-proxy"))]
    os.makedirs(args.workdir, exist_ok=True)
    with Stack(args, proxies) as stack:
        {"rounds": rounds, "strace": strace_counts, "trace": trace, "perfab": perfab}[args.mode](args, stack)


if __name__ == "__main__":
    main()
