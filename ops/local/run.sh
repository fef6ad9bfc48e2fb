#!/usr/bin/env bash
# Start a local gitball cluster for trying routing and failover by hand:
# 3 archivers on 127.0.0.1:9101-9103 over one repositories directory, and
# 1 proxy on 127.0.0.1:8080 routing every repository to them
# (ops/local/routes.toml: primary 9101, replicas 9102 and 9103).
#
#   ops/local/run.sh [--no-build] [--repos DIR]
#
#   --no-build   use the binaries already in target/release (or in
#                $GITBALL_LOCAL_BIN_DIR) instead of `cargo build --release`
#   --repos DIR  serve DIR/{owner}/{repo}.git; default: a generated demo
#                repository demo/hello (tags v1.0.0 and v1.1.0, branch feature/x)
#
# Logs, pid files, caches and a control script live in a fresh temporary run
# directory, printed at start. Ctrl-C stops every process this script started
# (by pid) and removes the caches; the logs stay. See ops/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
archiver_ports=(9101 9102 9103)
proxy_port=8080
build=1
repos=
bin_dir=${GITBALL_LOCAL_BIN_DIR:-$root/target/release}

while [ $# -gt 0 ]; do
    case $1 in
        --no-build) build=0 ;;
        --repos) repos=${2:?--repos needs a directory}; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# Settings come from the flags below only: drop GITBALL_* from the caller's
# environment so a stray GITBALL_TOKEN_FILE does not change the experiment.
for variable in $(compgen -v GITBALL_ || true); do
    unset "$variable"
done

for port in "${archiver_ports[@]}" "$proxy_port"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "run.sh: 127.0.0.1:$port is already in use; stop what listens there first" >&2
        exit 1
    fi
done

if [ "$build" = 1 ]; then
    echo "building release binaries (cargo build --release)…"
    (cd "$root" && cargo build --release -p gitball-archiver -p gitball-proxy)
fi
for binary in gitball-archiver gitball-proxy; do
    if [ ! -x "$bin_dir/$binary" ]; then
        echo "run.sh: $bin_dir/$binary not found; build it or drop --no-build" >&2
        exit 1
    fi
done

run=$(mktemp -d "${TMPDIR:-/tmp}/gitball-local.XXXXXX")

if [ -z "$repos" ]; then
    repos=$run/repos
    work=$run/demo-work
    git_quiet() {
        git -c init.defaultBranch=main -c user.name=gitball -c user.email=gitball@example.invalid \
            -c commit.gpgsign=false -c tag.gpgsign=false "$@" >/dev/null
    }
    git_quiet init "$work"
    mkdir -p "$work/src"
    printf 'hello from gitball\n' > "$work/README.md"
    printf 'fn main() { println!("hello"); }\n' > "$work/src/main.rs"
    git_quiet -C "$work" add -A
    git_quiet -C "$work" commit -m "first"
    git_quiet -C "$work" tag -a v1.0.0 -m v1.0.0
    # Some bulk, so a cold archive takes a moment and a download can be stopped midway.
    head -c 8388608 /dev/urandom > "$work/blob.bin"
    git_quiet -C "$work" add -A
    git_quiet -C "$work" commit -m "second"
    git_quiet -C "$work" tag -a v1.1.0 -m v1.1.0
    git_quiet -C "$work" branch feature/x
    mkdir -p "$repos/demo"
    git_quiet clone --quiet --bare "$work" "$repos/demo/hello.git"
    rm -rf "$work"
fi
repos=$(cd "$repos" && pwd)
cp "$here/routes.toml" "$run/routes.toml"

# The control script: start/stop/status of each process by its pid file.
# run.sh uses it too, so what you type by hand is exactly what it does.
cat > "$run/ctl" <<CTL
#!/usr/bin/env bash
# Control the local gitball cluster in $run.
#   ctl status | start NAME | stop NAME | reload      NAME: 9101 9102 9103 proxy all
set -uo pipefail
run=$run
bin_dir=$bin_dir
repos=$repos
archiver_ports=(${archiver_ports[*]})
proxy_port=$proxy_port
CTL
cat >> "$run/ctl" <<'CTL'

pid_of() {  # the pid in NAME's pid file, if that process is still ours
    local file=$run/$1.pid pid
    [ -f "$file" ] || return 1
    pid=$(cat "$file")
    if alive "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "gitball-"; then
        echo "$pid"
        return 0
    fi
    rm -f "$file"
    return 1
}

alive() {  # PID is running (a zombie waiting for init to reap it is not)
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

healthy() {
    curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$1/healthz" 2>/dev/null
}

wait_healthy() {  # NAME PORT
    local attempt
    for attempt in $(seq 100); do
        healthy "$2" && return 0
        if ! pid_of "$1" >/dev/null; then
            echo "ctl: $1 exited; last lines of $run/$1.log:" >&2
            tail -n 20 "$run/$1.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "ctl: $1 not healthy on port $2 after 10 s; see $run/$1.log" >&2
    return 1
}

start() {
    local name=$1
    if pid_of "$name" >/dev/null; then
        echo "ctl: $name is already running (pid $(pid_of "$name"))"
        return 0
    fi
    if [ "$name" = proxy ]; then
        GITBALL_SHUTDOWN_GRACE=5 GITBALL_LOG_FORMAT=text \
            "$bin_dir/gitball-proxy" --listen "127.0.0.1:$proxy_port" \
            --routes "$run/routes.toml" >> "$run/proxy.log" 2>&1 &
        echo $! > "$run/proxy.pid"
        wait_healthy proxy "$proxy_port" || return 1
    else
        "$bin_dir/gitball-archiver" --listen "127.0.0.1:$name" --repos "$repos" \
            --cache-dir "$run/cache-$name" --cache-max-bytes 256MiB \
            --shutdown-grace 5 --log-format text >> "$run/$name.log" 2>&1 &
        echo $! > "$run/$name.pid"
        wait_healthy "$name" "$name" || return 1
    fi
    echo "ctl: started $name (pid $(cat "$run/$name.pid"))"
}

stop() {
    local name=$1 pid attempt
    pid=$(pid_of "$name") || { echo "ctl: $name is not running"; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for attempt in $(seq 80); do  # the processes drain for up to 5 s
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        echo "ctl: $name (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$run/$name.pid"
    echo "ctl: stopped $name (pid $pid)"
}

names() {
    if [ "$1" = all ]; then
        echo "${archiver_ports[@]} proxy"
    else
        case " ${archiver_ports[*]} proxy " in
            *" $1 "*) echo "$1" ;;
            *) echo "ctl: unknown name $1 (use ${archiver_ports[*]} proxy all)" >&2; exit 2 ;;
        esac
    fi
}

case ${1:-status} in
    start)
        status=0
        for name in $(names "${2:?start NAME}"); do start "$name" || status=1; done
        exit $status ;;
    stop)
        # Proxy first, so it does not count the archivers' exit as failures.
        for name in $(names "${2:?stop NAME}" | tr ' ' '\n' | sort -r); do stop "$name"; done ;;
    reload)
        pid=$(pid_of proxy) || { echo "ctl: proxy is not running" >&2; exit 1; }
        kill -HUP "$pid" && echo "ctl: proxy re-reads $run/routes.toml (see $run/proxy.log)" ;;
    status)
        for name in "${archiver_ports[@]}" proxy; do
            port=$name; [ "$name" = proxy ] && port=$proxy_port
            if pid=$(pid_of "$name"); then
                if healthy "$port"; then state=healthy; else state="not answering"; fi
                printf '%-6s pid %-8s 127.0.0.1:%s %s\n' "$name" "$pid" "$port" "$state"
            else
                printf '%-6s stopped\n' "$name"
            fi
        done ;;
    *) sed -n '2,3p' "$0"; exit 2 ;;
esac
CTL
chmod +x "$run/ctl"

cleanup() {
    trap - INT TERM EXIT
    echo
    "$run/ctl" stop all
    rm -rf "$run"/cache-*
    echo "logs kept in $run"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

"$run/ctl" start all

cat <<INFO

gitball local cluster is up.   run dir: $run
  proxy      http://127.0.0.1:$proxy_port          log: $run/proxy.log
  archivers  http://127.0.0.1:9101 (primary), :9102, :9103 (replicas)
             logs: $run/9101.log …  caches: $run/cache-9101 …
  repos      $repos

Try:
  curl -sS -D- -o /dev/null http://127.0.0.1:$proxy_port/demo/hello/archive/v1.0.0.tar.gz
  curl -sS http://127.0.0.1:$proxy_port/demo/hello/archive/v1.1.0.zip | wc -c
  curl -sS http://127.0.0.1:$proxy_port/metrics | grep -E 'upstream_attempts|failovers|ejected'

Failover by hand (another terminal):
  $run/ctl status
  $run/ctl stop 9102        # stop a replica: requests move to the next candidate
  $run/ctl start 9102
  \$EDITOR $run/routes.toml; $run/ctl reload    # SIGHUP: re-read the routes

Ctrl-C stops everything.
INFO

# Stay in the foreground until Ctrl-C (processes the user restarts through
# ctl are not our children, so poll instead of `wait`).
while true; do
    sleep 1
done
