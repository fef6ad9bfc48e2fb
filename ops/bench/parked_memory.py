#!/usr/bin/env python3
"""The proxy's memory per parked download, alone: one archiver, one proxy,
N downloads of the 1 GiB archive that read 32 KiB and stall, until all are
parked; prints the proxy's RSS growth per download. With --heaptrack the
proxy runs under heaptrack, and is killed once everything is parked, so
`heaptrack_print --print-leaks FILE` lists what a parked download holds.

    python3 ops/bench/parked_memory.py --workdir DIR [--target DIR] [-n 100] [--heaptrack]

DIR is a `run.sh --workdir` that already holds the generated inputs
(repos/bench/huge.git); binaries come from DIR/release of --target
(default: target). Everything listens on 127.0.0.1.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import fd_count, free_port, metric_value, open_stalled, rss_bytes, wait_healthy  # noqa: E402

PATH = "/bench/huge/archive/main.tar"


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--target", default=os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")))
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--heaptrack", action="store_true")
    args = parser.parse_args()
    release = os.path.join(args.target, "release")
    scratch = tempfile.mkdtemp(prefix="gitball-parked-")
    cache = tempfile.mkdtemp(prefix="gitball-parked-cache-", dir="/dev/shm")
    archiver_port, proxy_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([
            os.path.join(release, "gitball-archiver"), "--listen", f"127.0.0.1:{archiver_port}",
            "--repos", os.path.join(args.workdir, "repos"), "--cache-dir", cache,
            "--cache-max-bytes", "4GiB", "--max-archive-bytes", "3GiB",
        ], stderr=open(os.path.join(scratch, "archiver.log"), "w")))
        routes = os.path.join(scratch, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'[[route]]\nrepos = "*"\nprimary = "http://127.0.0.1:{archiver_port}"\n')
        proxy_bin = os.path.join(release, "gitball-proxy")
        argv = [proxy_bin, "--listen", f"127.0.0.1:{proxy_port}", "--routes", routes]
        if args.heaptrack:
            argv = ["heaptrack", "-o", os.path.join(scratch, "proxy"), *argv]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(scratch, "proxy.log"), "w")))
        wait_healthy(archiver_port, timeout=30)
        wait_healthy(proxy_port, timeout=30)
        proxy_pid = procs[-1].pid
        if args.heaptrack:  # heaptrack runs the proxy as its child
            proxy_pid = int(subprocess.check_output(["pgrep", "-n", "-f", f"^{proxy_bin} "]).split()[0])
        # Generates the archive (once) and warms the proxy's pool.
        subprocess.run(["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{proxy_port}{PATH}"], check=True)
        time.sleep(0.5)
        before = rss_bytes(proxy_pid)
        socks = open_stalled(proxy_port, PATH, args.n, 32 * 1024)
        deadline = time.time() + 60
        while (metric_value(proxy_port, "gitball_proxy_parked_downloads") or 0) < args.n:
            if time.time() > deadline:
                raise RuntimeError("the downloads did not all park within 60 s")
            time.sleep(0.5)
        time.sleep(2)
        after = rss_bytes(proxy_pid)
        print(f"{args.n} parked: proxy RSS growth {(after - before) / args.n / 1024:.0f} KiB per download;"
              f" proxy fds {fd_count(proxy_pid)}, archiver fds {fd_count(procs[0].pid)}", flush=True)
        if args.heaptrack:
            os.kill(proxy_pid, signal.SIGKILL)
            procs[-1].wait(timeout=60)
            kept = os.path.join(args.workdir, "parked-proxy.heaptrack.zst")
            for name in os.listdir(scratch):
                if name.startswith("proxy.") and name.endswith((".zst", ".gz")):
                    shutil.move(os.path.join(scratch, name), kept)
                    print(f"heaptrack data: {kept} (heaptrack_print --print-leaks 1 -f {kept})")
        for s in socks:
            s.close()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
