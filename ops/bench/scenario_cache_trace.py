#!/usr/bin/env python3
"""Cache policy under a scan: replays a deterministic trace against the
archiver cache's replacement policy and the byte-weighted LRU it replaced.

Runs `cargo run --release -p gitball-archiver --example cache_trace -- --json`
(the real policy code, `archiver/src/cache/policy.rs`; no processes, no
files: sizes only) and prints the popular keys' hit ratios as a markdown
table. The trace is seeded: figures are the same on every machine, so they
are kept in the prose of BENCHMARKS.md ("Cache policy under a scan"), not in
its generated section.

    python3 ops/bench/scenario_cache_trace.py        # or: ops/bench/run.sh --only trace
    python3 ops/bench/scenario_cache_trace.py --dev  # debug build: same figures, no release build
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

PHASES = ("before", "scan", "after", "total")


def replay(root=ROOT, release=True):
    """The example's rows: trace, policy, popular_hit_ratio by phase,
    generated_bytes, failed_generations."""
    profile = ["--release"] if release else []
    out = subprocess.run(
        ["cargo", "run", *profile, "--quiet", "-p", "gitball-archiver", "--example", "cache_trace", "--", "--json"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def table(rows):
    lines = [
        "| trace | policy | popular hit ratio: before scan | during scan | after scan | whole trace | GiB generated | generations failed (too large) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = row["popular_hit_ratio"]
        cells = [f"{100 * ratios[p]:.1f} %" if p in ratios else "–" for p in PHASES]
        lines.append(f"| {row['trace']} | {row['policy']} | {' | '.join(cells)} | {row['generated_bytes'] / 2**30:.1f} | {row['failed_generations']} |")
    return "\n".join(lines)


def scenario_cache_trace(ctx, results):
    """bench.py's hook (`--only trace`): prints the table; adds one row per
    trace (new policy vs LRU, whole-trace popular hit ratio) to `results`."""
    rows = replay(ctx.root)
    print(table(rows), flush=True)
    by_trace = {}
    for row in rows:
        by_trace.setdefault(row["trace"], []).append(row)
    for trace, (old, new) in by_trace.items():
        def as_summary(row):
            value = 100 * row["popular_hit_ratio"]["total"]
            return {"median": value, "min": value, "max": value, "samples": [value]}
        results.add("trace", f"popular hit ratio, {trace} trace (%)", "%", as_summary(new), "old LRU",
                    as_summary(old), better="higher", note="replayed trace, deterministic")
    return rows


def main(root=ROOT):
    print(table(replay(root, release="--dev" not in sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
