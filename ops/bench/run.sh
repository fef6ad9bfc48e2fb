#!/usr/bin/env bash
# gitball benchmarks: gitball and its peers (git archive, nginx) in one run.
#
#   ops/bench/run.sh [--quick] [--repo PATH]... [--real-repo PATH] [--runs N]
#                    [--no-build] [--workdir DIR] [--keep] [--write | --no-write]
#                    [--only 1,2,...] [--tcp-congestion NAME]
#
#   --quick       small inputs, 1 run each, 2 s load runs: a smoke test
#                 (writes its report into the work directory, not BENCHMARKS.md)
#   --repo PATH   also measure cold archives of this git repository (a local
#                 bare clone is made in the work directory; PATH is not modified)
#   --real-repo PATH  a clone of git/git (default: $GITBALL_BENCH_REAL_REPO):
#                 scenario 9 measures cold archives of it at the tag v2.47.0
#                 against git archive, and checks its zip entry by entry
#                 against git's. A bare clone with hard-linked objects is
#                 made in the work directory; PATH is not modified, the
#                 network is not used. Without it, scenario 9 is skipped.
#   --runs N      runs per measurement (default 3; the median is reported)
#   --no-build    use target/release as it is instead of `cargo build --release`
#                 (the target directory is $CARGO_TARGET_DIR when set, as for cargo)
#   --workdir DIR keep inputs and logs in DIR; inputs generated there earlier
#                 with the same settings are reused
#   --keep        keep the temporary work directory (logs, nginx configs)
#   --write       write BENCHMARKS.md, ops/bench/benchmarks.png and
#                 ops/bench/results.json (the default without --quick)
#   --only LIST   run only these scenarios (1-9, trace); never writes the report.
#                 `trace` replays the cache-policy trace (no processes; also
#                 `python3 ops/bench/scenario_cache_trace.py`)
#   --tcp-congestion NAME  start both gitball tiers with --tcp-congestion NAME
#                 (docs/archiver.md, "TCP congestion control"); nginx and git
#                 keep the host's. The report's Machine line says so.
#
# Needs: git, curl, nginx, wrk, zstd, python3 with matplotlib (Debian:
# apt-get install nginx wrk zstd curl python3-matplotlib). Everything
# listens on 127.0.0.1; load runs are bounded in time; processes started
# here are stopped by pid. A full run takes about 8-15 minutes on 2 cores.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=1
for arg in "$@"; do
    case $arg in
        --no-build) build=0 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    esac
done
args=()
for arg in "$@"; do
    [ "$arg" = --no-build ] || args+=("$arg")
done

missing=
for tool in git curl nginx wrk zstd; do
    command -v "$tool" >/dev/null || missing="$missing $tool"
done
python=
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import matplotlib' 2>/dev/null; then
        python=$candidate
        break
    fi
done
[ -n "$python" ] || missing="$missing python3-matplotlib"
if [ -n "$missing" ]; then
    echo "run.sh: missing:$missing (Debian: apt-get install --no-install-recommends nginx wrk zstd curl python3-matplotlib)" >&2
    exit 1
fi

if [ "$build" = 1 ]; then
    echo "building release binaries…"
    # Two builds: an example brings its package's dev-dependencies (tokio's
    # test-util among them), and features settle once per build, so one
    # build would give the measured binaries those too.
    (cd "$root" && cargo build --release -p gitball-archiver -p gitball-proxy)
    (cd "$root" && cargo build --release -p gitball-proxy --example hyper_floor)
fi
target=${CARGO_TARGET_DIR:-$root/target}
for binary in gitball-archiver gitball-proxy examples/hyper_floor; do
    [ -x "$target/release/$binary" ] || { echo "run.sh: $target/release/$binary missing (drop --no-build)" >&2; exit 1; }
done

# The report records the exact command.
command="ops/bench/run.sh${*:+ $*}"
exec "$python" "$here/bench.py" --root "$root" --command "$command" ${args[@]+"${args[@]}"}
