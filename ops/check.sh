#!/usr/bin/env bash
# CI step for ops/: check every piece of deployment material with the real
# tools, in a few seconds. Installs nothing; needs (Debian packages)
#   nginx  prometheus (promtool)  systemd (systemd-analyze)  python3
# Run from anywhere (it works from the repository root). Prints one line per
# check and the output of each failing one; exits 1 if any failed.
#
# When target/release/gitball-{archiver,proxy} exist, the env files are also
# checked against the variables the binaries' --help declares.
set -uo pipefail

cd "$(dirname "$0")/.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gitball-ops-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

failures=()
run_check() {  # NAME COMMAND…
    local name=$1 output
    shift
    if output=$("$@" 2>&1); then
        printf '  ok    %s\n' "$name"
    else
        printf '  FAIL  %s\n' "$name"
        printf '%s\n' "$output" | sed 's/^/        /'
        failures+=("$name")
    fi
}

# For the checks that a checker fails when it should: COMMAND must fail, and
# its output must contain TEXT.
fails_naming() {  # TEXT COMMAND…
    local text=$1 output
    shift
    if output=$("$@" 2>&1); then
        echo "passed, where it should have failed naming: $text"
        return 1
    fi
    printf '%s\n' "$output" | grep -qF -- "$text" || {
        printf '%s\n' "$output"
        return 1
    }
}

missing=()
for tool in systemd-analyze systemd-sysusers nginx promtool python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "ops/check.sh: missing ${missing[*]}." >&2
    echo "  Install: apt-get install -y --no-install-recommends nginx prometheus systemd python3" >&2
    exit 1
fi

# ---------------------------------------------------------------- systemd

# `systemd-analyze verify` resolves each Exec*= binary and every unit the
# services depend on. Verify inside a throwaway root that holds the distro's
# units, ours in /etc/systemd/system, and a stub executable at each
# Exec*= path, so neither the gitball binaries nor /usr/local/bin need to
# exist on the CI machine. Any output (an unknown directive, a bad value) is
# a failure: verify exits 0 on those.
units=(gitball-archiver.service gitball-proxy.service var-cache-gitball.mount)
prepare_systemd_root() {
    local root=$tmp/root source path
    mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/etc/sysusers.d"
    source=/usr/lib/systemd/system
    [ -d "$source" ] || source=/lib/systemd/system
    cp -a "$source" "$root/usr/lib/systemd/" || return 1
    for unit in "${units[@]}"; do
        cp "ops/systemd/$unit" "$root/etc/systemd/system/" || return 1
    done
    cp ops/systemd/gitball.sysusers.conf "$root/etc/sysusers.d/gitball.conf"
    sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' ops/systemd/*.service | sort -u |
        while read -r path; do
            mkdir -p "$root$(dirname "$path")"
            printf '#!/bin/sh\nexit 0\n' > "$root$path"
            chmod 0755 "$root$path"
        done
}

verify_units() {
    local output
    output=$(systemd-analyze verify --man=no --root="$tmp/root" "${units[@]}" 2>&1) || {
        printf '%s\n' "$output"
        return 1
    }
    if [ -n "$output" ]; then
        printf '%s\n' "$output"
        return 1
    fi
}

# Exposure as scored by `systemd-analyze security` (0 = locked down, 10 =
# unconfined); both services score 1.5 today. --threshold counts tenths.
security_units() {
    local unit status=0 score
    for unit in gitball-archiver.service gitball-proxy.service; do
        score=$(systemd-analyze security --offline=yes --root="$tmp/root" --threshold=25 "$unit" 2>&1) ||
            status=1
        printf '%s\n' "$score" | grep -F 'Overall exposure' || printf '%s\n' "$score"
    done
    return $status
}

echo "systemd"
run_check "prepare a scratch root for systemd-analyze" prepare_systemd_root
run_check "systemd-analyze verify ${units[*]}" verify_units
run_check "systemd-analyze security: exposure <= 2.5" security_units
run_check "systemd-sysusers --dry-run gitball.sysusers.conf" \
    systemd-sysusers --root="$tmp/root" --dry-run
help_args=()
for binary in archiver proxy; do
    if [ -x "target/release/gitball-$binary" ]; then
        target/release/gitball-$binary --help > "$tmp/$binary.help" 2>&1 &&
            help_args+=("--$binary-help" "$tmp/$binary.help")
    fi
done
run_check "units, tmpfs mount and env files agree${help_args:+ (env checked against --help)}" \
    python3 ops/check-units.py "${help_args[@]}"

# The checker must also fail when it should: a stop timeout above the grace
# but within the 5 s the archiver's generations get to stop after it.
units_catch_short_stop() {
    cp -r ops/systemd "$tmp/short-stop"
    sed -i 's/^TimeoutStopSec=.*/TimeoutStopSec=33s/' "$tmp/short-stop/gitball-archiver.service"
    fails_naming 'gitball-archiver.service: TimeoutStopSec=33s must exceed 35 s' \
        python3 ops/check-units.py "$tmp/short-stop"
}
run_check "check-units.py fails on a stop timeout within the generations' stop" units_catch_short_stop

# And on a proxy behind nginx on its host that does not trust nginx's
# X-Forwarded-For: every client would be one to the crawler budget.
units_catch_untrusted_front() {
    cp -r ops/systemd "$tmp/untrusted-front"
    sed -i '/^GITBALL_TRUSTED_PROXIES=/d' "$tmp/untrusted-front/gitball-proxy.env"
    fails_naming 'GITBALL_TRUSTED_PROXIES does not hold 127.0.0.1' \
        python3 ops/check-units.py "$tmp/untrusted-front"
}
run_check "check-units.py fails on a proxy that ignores its nginx's X-Forwarded-For" units_catch_untrusted_front

# ---------------------------------------------------------------- nginx

nginx_test() {
    ops/nginx/render-test-conf.sh "$tmp/nginx" 18080 18081 >/dev/null &&
        nginx -t -p "$tmp/nginx" -c "$tmp/nginx/conf/nginx.conf" -e "$tmp/nginx/logs/error.log"
}

echo "nginx"
run_check "nginx -t on the rendered test config (gitball.conf inside nginx-test.conf.template)" nginx_test
run_check "nginx in front of a stub upstream (ops/nginx/smoke-test.py)" python3 ops/nginx/smoke-test.py

# ---------------------------------------------------------------- prometheus

echo "prometheus"
run_check "promtool check rules gitball-rules.yml" promtool check rules ops/prometheus/gitball-rules.yml
run_check "promtool test rules gitball-rules.test.yml" promtool test rules ops/prometheus/gitball-rules.test.yml
run_check "promtool check config prometheus.yml" promtool check config ops/prometheus/prometheus.yml
run_check "promtool check metrics < testdata/sample-metrics.txt" \
    sh -c 'promtool check metrics < ops/testdata/sample-metrics.txt'

# ---------------------------------------------------------------- queries

# The checker must also fail when it should: drop the proxy's families from
# the sample and expect it to name them.
queries_catch_missing() {
    sed '/^# gitball-proxy/,$d' ops/testdata/sample-metrics.txt > "$tmp/archiver-only.txt"
    fails_naming 'gitball_proxy_requests_total: not in any scrape' \
        python3 ops/check-queries.py "$tmp/archiver-only.txt"
}

# The sample is written from docs/observability.md: it names every family
# the docs do (newcomer review: five were missing).
sample_has_every_documented_family() {
    python3 - docs/observability.md ops/testdata/sample-metrics.txt <<'PY'
import re
import sys

docs = open(sys.argv[1]).read()
sample = open(sys.argv[2]).read()
documented = set(re.findall(r"^\| `((?:gitball|process)_[a-z_]+)` \|", docs, re.M))
documented |= set(re.findall(r"`(process_[a-z_]+)`", docs))
present = set(re.findall(r"^# TYPE (\S+) ", sample, re.M))
missing = sorted(documented - present)
if missing:
    sys.exit("documented, not in the sample: " + ", ".join(missing))
PY
}

echo "dashboard and alert queries"
run_check "testdata/sample-metrics.txt has every family docs/observability.md names" \
    sample_has_every_documented_family
run_check "check-queries.py --self-test" python3 ops/check-queries.py --self-test
run_check "every dashboard/alert series is in testdata/sample-metrics.txt (and parses)" \
    python3 ops/check-queries.py --promtool promtool ops/testdata/sample-metrics.txt
run_check "check-queries.py fails on a scrape missing series" queries_catch_missing

# ---------------------------------------------------------------- local example

check_routes() {
    python3 - ops/local/routes.toml ops/systemd/routes.example.toml <<'PY'
import sys, tomllib, urllib.parse
status = 0
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        table = tomllib.load(handle)
    routes = table.get("route")
    problems = [] if set(table) == {"route"} and isinstance(routes, list) and routes else ["needs [[route]] tables only"]
    for number, route in enumerate(routes or [], 1):
        unknown = set(route) - {"repos", "primary", "replicas", "private"}
        if unknown:
            problems.append(f"route {number}: unknown keys {sorted(unknown)}")
        if not isinstance(route.get("repos"), str):
            problems.append(f"route {number}: repos must be a glob string")
        for url in [route.get("primary")] + list(route.get("replicas", [])):
            parsed = urllib.parse.urlparse(url if isinstance(url, str) else "")
            if parsed.scheme != "http" or not parsed.port:
                problems.append(f"route {number}: {url!r} is not http://host:port")
        if not isinstance(route.get("private", False), bool):
            problems.append(f"route {number}: private must be true or false")
    for problem in problems:
        print(f"{path}: {problem}")
        status = 1
sys.exit(status)
PY
}

echo "local example"
run_check "routes files are valid docs/proxy.md TOML" check_routes
run_check "bash -n ops/local/run.sh, ops/fleet/run.sh, sh -n ops/nginx/render-test-conf.sh ops/hooks/post-receive-prewarm" \
    sh -c 'bash -n ops/local/run.sh && bash -n ops/fleet/run.sh && sh -n ops/nginx/render-test-conf.sh && sh -n ops/hooks/post-receive-prewarm && bash -n ops/check.sh'

echo
if [ ${#failures[@]} -gt 0 ]; then
    echo "ops/check.sh: ${#failures[@]} check(s) failed:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "ops/check.sh: all checks passed"
