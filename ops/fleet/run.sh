#!/usr/bin/env bash
# The fleet under faults (ops/fleet/README.md): builds the binaries, then
# runs tests/fleet.rs, which starts two proxies, three file servers and a
# Prometheus in network namespaces, injects nine faults in order and prints
# a table of what clients saw and what the metrics and alerts said.
#
# Needs root (network namespaces, iptables, a tmpfs mount) and the Debian
# packages iptables, iproute2, prometheus, git, gzip, zstd.
# Exits non-zero when any scenario failed. Whatever the outcome, namespaces
# and mounts named gbf-* / gitball-fleet are removed (the test's Drop guards
# do it; this trap catches a test killed before they ran).
set -euo pipefail
cd "$(dirname "$0")/../.."

prefix=gbf
cleanup() {
    # Processes in the fleet's namespaces, then the mounts, then the namespaces.
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -CONT "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    # A killed run's tmpfs (…/gitball-e2e-XXXX/hosts/fs1/cache) and sandbox.
    awk '$1 == "gitball-fleet" {print $2}' /proc/mounts | while read -r mountpoint; do
        umount "$mountpoint" 2>/dev/null || umount -l "$mountpoint" || true
        case $mountpoint in
            */gitball-e2e-*/hosts/*/cache) rm -rf "${mountpoint%/hosts/*}" ;;
        esac
    done
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}-" || true); do
        ip netns del "$ns" || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup

if [ "$(id -u)" -ne 0 ]; then
    echo "ops/fleet/run.sh: needs root (network namespaces, iptables, tmpfs)" >&2
    exit 1
fi

cargo build --workspace --locked
# One test process; --nocapture shows the table as it is printed.
cargo test -p gitball-e2e --test fleet --locked -- --nocapture --test-threads=1
