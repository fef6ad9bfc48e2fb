#!/bin/sh
# Render a self-contained nginx config for tests from gitball.conf.
#
#   ops/nginx/render-test-conf.sh PREFIX LISTEN_PORT UPSTREAM_PORT [LIMIT_CONN]
#
# Writes PREFIX/conf/nginx.conf and PREFIX/conf/gitball.conf (gitball.conf with
# its "test:" lines rewritten: listen 127.0.0.1:LISTEN_PORT, upstream
# 127.0.0.1:UPSTREAM_PORT, access log into the prefix, IPv6 listen dropped,
# and the cap per client set to LIMIT_CONN if given, so a test can reach it:
# the smoke test's 2; tests that open many connections from one address keep
# the shipped cap)
# and creates PREFIX/logs and PREFIX/tmp. Then, for example:
#
#   nginx -t -p PREFIX -c PREFIX/conf/nginx.conf -e PREFIX/logs/error.log
#   nginx    -p PREFIX -c PREFIX/conf/nginx.conf -e PREFIX/logs/error.log -g 'daemon off;'
set -eu

if [ $# -ne 3 ] && [ $# -ne 4 ]; then
    echo "usage: $0 PREFIX LISTEN_PORT UPSTREAM_PORT [LIMIT_CONN]" >&2
    exit 2
fi
prefix=$1 listen_port=$2 upstream_port=$3 limit_conn=${4:-}
for port in "$listen_port" "$upstream_port"; do
    case $port in
        '' | *[!0-9]*) echo "$0: not a port: $port" >&2; exit 2 ;;
    esac
done
case $limit_conn in
    '') limit='\2' ;;
    *[!0-9]*) echo "$0: not a connection count: $limit_conn" >&2; exit 2 ;;
    *) limit=$limit_conn ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp"
prefix=$(cd "$prefix" && pwd)
# nginx started as root runs its workers as nobody; they must reach the prefix.
chmod 0755 "$prefix"

sed -e "s|^\( *\)listen [^;]*;\( *# test: listen\)\$|\1listen 127.0.0.1:$listen_port;\2|" \
    -e "s|^\( *\)server 127\.0\.0\.1:[0-9]*;\( *# test: upstream\)\$|\1server 127.0.0.1:$upstream_port;\2|" \
    -e "s|^\( *\)access_log [^ ]* gitball;\( *# test: access_log\)\$|\1access_log $prefix/logs/gitball.access.log gitball;\2|" \
    -e "s|^\( *\)limit_conn gitball_per_client \([0-9]*\);\( *# test: limit_conn\)\$|\1limit_conn gitball_per_client $limit;\3|" \
    -e "/# test: drop\$/d" \
    "$here/gitball.conf" > "$prefix/conf/gitball.conf"

# Every tagged line must have been rewritten (or dropped): a silent miss would
# test against the production ports.
expected=4
rewritten=$(grep -c -e "listen 127.0.0.1:$listen_port; *# test: listen\$" \
    -e "server 127.0.0.1:$upstream_port; *# test: upstream\$" \
    -e "access_log $prefix/logs/gitball.access.log gitball; *# test: access_log\$" \
    -e "limit_conn gitball_per_client ${limit_conn:-[0-9]*}; *# test: limit_conn\$" \
    "$prefix/conf/gitball.conf" || true)
tagged=$(grep -c "# test: " "$prefix/conf/gitball.conf" || true)
if [ "$rewritten" -ne "$expected" ] || [ "$tagged" -ne "$expected" ]; then
    echo "$0: gitball.conf's '# test:' lines changed; update this script" >&2
    exit 1
fi

sed -e "s|@ERROR_LOG@|$prefix/logs/error.log|" \
    "$here/nginx-test.conf.template" > "$prefix/conf/nginx.conf"
echo "$prefix/conf/nginx.conf"
