#!/usr/bin/env python3
"""Run the real nginx with gitball.conf in front of a stub upstream and check
what the front promises, in about a second:

- archive URLs (both shapes, GET and HEAD) reach the upstream with the URI
  untouched, over HTTP/1.1 keep-alive connections that are reused;
- X-Request-Id: a sane caller id is forwarded, a missing or unsafe one is
  replaced by nginx's 32-hex $request_id;
- the body streams: the first chunk reaches the client while the upstream is
  still producing, and a client that stops reading stops the upstream after
  a few MiB of socket buffers (proxy_buffering off, no temp file);
- other methods get a JSON 405 with Allow, /metrics is 403, other paths 404,
  an owner named "metrics" is still an archive URL, a 12 KiB header passes
  (so gitball, not nginx, enforces its header limits), and an upstream that
  drops the connection gives a JSON 502;
- the cap per client (limit_conn, lowered to 2 by render-test-conf.sh here): a
  client holding 2 downloads gets the JSON 429 with Retry-After on its
  next one, keyed as gitball keys it (an IPv6 client is its /64, however
  it picks addresses in it), while another client is served.

The end-to-end test with the real proxy and archiver lives in tests/; this
checks the nginx layer alone, with nothing but python3 and nginx.

Usage: smoke-test.py [--nginx PATH]    (exit status 1 on the first failure)
"""

import argparse
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
STREAM_PAUSE_SECONDS = 1.0
# Backpressure check: a client that stops reading must stop the upstream
# after roughly the socket buffers on the way, far below the body's size.
BIG_BODY_BYTES = 256 * 1024 * 1024
BIG_CHUNK_BYTES = 64 * 1024
STALLED_UPSTREAM_LIMIT_BYTES = 96 * 1024 * 1024
big_body_written = [0]
# Downloads held open by the upstream (path containing /held) until set.
release_held = threading.Event()


class StubUpstream(http.server.BaseHTTPRequestHandler):
    """Plays gitball-proxy: records each request, answers by path."""

    protocol_version = "HTTP/1.1"
    seen = []  # (method, path, headers dict, client port)

    def log_message(self, *args):
        pass

    def record(self):
        headers = {name.lower(): value for name, value in self.headers.items()}
        StubUpstream.seen.append((self.command, self.path, headers, self.client_address[1],
                                  self.request_version))

    def do_POST(self):
        # A prewarm: the proxy would check the token and answer 202.
        self.record()
        body = b'{"status":"accepted"}\n'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.record()
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.record()
        if self.path.endswith("/drop.zip"):
            # Close without a response: nginx must answer 502 itself.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.path.endswith("/big.tar"):
            # A large archive; counts what the upstream managed to write.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(BIG_BODY_BYTES))
            self.end_headers()
            chunk = b"\0" * BIG_CHUNK_BYTES
            try:
                for _ in range(BIG_BODY_BYTES // BIG_CHUNK_BYTES):
                    self.wfile.write(chunk)
                    big_body_written[0] += len(chunk)
            except OSError:
                self.close_connection = True
            return
        if "/held" in self.path:
            # A download under way: the head, then the body once released.
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.flush()
            release_held.wait(10)
            self.wfile.write(b"done")
            return
        if "/slow" in self.path:
            # A generation in progress: chunked, with a pause mid-body.
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.write_chunk(b"first-chunk")
            time.sleep(STREAM_PAUSE_SECONDS)
            self.write_chunk(b"second-chunk")
            self.write_chunk(b"")
            return
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nginx did not listen on {port} within {timeout} s")


class Front:
    def __init__(self, port):
        self.port = port

    def request(self, method, path, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response, body


def check(condition, message):
    if not condition:
        raise AssertionError(message)
    print(f"  ok  {message}")


def check_cap_per_client(front):
    """limit_conn at 2 (the rendered config): per client, keyed as gitball
    keys it. X-Test-Client-Address names the client (realip, test only)."""
    def held_download(address):
        client = socket.create_connection(("127.0.0.1", front.port), timeout=10)
        client.sendall(b"GET /acme/widget/archive/held.tar.gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"X-Test-Client-Address: " + address.encode() + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                break
            head += chunk
        check(head.startswith(b"HTTP/1.1 200"), f"a download from {address} within its cap runs")
        return client

    def status_from(address):
        response, body = front.request("GET", "/acme/widget/zip/main",
                                       {"X-Test-Client-Address": address})
        return response, body

    release_held.clear()
    cases = [
        # Two downloads from one /64, the third from another address of it.
        (["2001:db8:1:2::a", "2001:db8:1:2:0:0:0:b"], "2001:db8:1:2:ffff:1:2:3",
         "2001:db8:1:3::a"),
        # A /64 nginx writes with "::" inside it.
        (["2001:db8::1", "2001:db8::5:6:7:8"], "2001:db8::ffff:1", "2001:db8:0:1::1"),
        # IPv4: the address.
        (["192.0.2.7", "192.0.2.7"], "192.0.2.7", "192.0.2.8"),
    ]
    for holders, same, other in cases:
        held = [held_download(address) for address in holders]
        response, body = status_from(same)
        check(response.status == 429 and json.loads(body)["error"] == "too_many_connections"
              and response.getheader("Retry-After") == "5"
              and response.getheader("Content-Type") == "application/json",
              f"{same}, of the client holding {holders}, gets the JSON 429 with Retry-After: 5")
        response, _ = status_from(other)
        check(response.status == 200, f"{other}, another client, is served meanwhile")
        release_held.set()
        for client in held:
            while client.recv(4096):
                pass
            client.close()
        release_held.clear()
    # nginx counts a request until it is finalized, just after the last byte.
    deadline = time.monotonic() + 5
    while status_from(cases[0][1])[0].status != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    check(status_from(cases[0][1])[0].status == 200,
          "the client is served again once its downloads ended")


def run_checks(front):
    seen = StubUpstream.seen

    # The directives ops/README.md and the README promise, stated at server level
    # (the behaviour they cause is checked below).
    config = (HERE / "gitball.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;",
                      "proxy_http_version 1.1;", "proxy_max_temp_file_size 0;"):
        check(re.search(rf"^\s*{re.escape(directive)}", config, re.M) is not None,
              f"gitball.conf sets {directive}")

    # Both URL shapes reach the upstream, URI untouched (%2F stays encoded).
    for path in ("/acme/widget/archive/v1.2.3.tar.gz",
                 "/acme/widget/tar.gz/feature%2Fx?path=sub/dir",
                 "/acme/widget/archive/v1.2.3.tar.zst.sha256",
                 "/metrics/widget/zip/main"):
        response, body = front.request("GET", path)
        check(response.status == 200 and json.loads(body)["path"] == path,
              f"GET {path} is proxied with its URI unchanged")
    method, _, headers, _, version = seen[-1]
    check(version == "HTTP/1.1" and headers.get("connection", "") in ("", "keep-alive"),
          "upstream requests are HTTP/1.1 without Connection: close")
    check(re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", "")) is not None,
          "a missing X-Request-Id becomes nginx's 32-hex $request_id")
    ports = {client_port for *_, client_port, _ in seen}
    check(len(ports) < len(seen), f"upstream keep-alive connections are reused "
                                  f"({len(seen)} requests on {len(ports)} connections)")

    front.request("GET", "/acme/widget/zip/main", {"X-Request-Id": "lb-7f3a.42"})
    check(seen[-1][2].get("x-request-id") == "lb-7f3a.42",
          "a caller's X-Request-Id is forwarded as is")
    front.request("GET", "/acme/widget/zip/main", {"X-Request-Id": 'x" forged=1'})
    check(re.fullmatch(r"[0-9a-f]{32}", seen[-1][2].get("x-request-id", "")) is not None,
          "an unsafe X-Request-Id is replaced")
    front.request("GET", "/acme/widget/zip/main", {"X-Request-Id": "trace:abc"})
    check(re.fullmatch(r"[0-9a-f]{32}", seen[-1][2].get("x-request-id", "")) is not None,
          "an X-Request-Id gitball would not keep (a colon) is replaced, so both logs agree")

    response, _ = front.request("HEAD", "/acme/widget/archive/main.zip")
    check(response.status == 200 and seen[-1][0] == "HEAD", "HEAD is proxied as HEAD")

    response, _ = front.request("GET", "/acme/widget/zip/main", {"X-Big": "b" * 12 * 1024})
    check(response.status == 200, "a 12 KiB header passes to gitball (it enforces 431 itself)")
    response, _ = front.request("GET", "/acme/widget/zip/main", {"X-Big": "b" * 30 * 1024})
    check(response.status == 200 and seen[-1][2].get("x-big", "").startswith("b"),
          "a 30 KiB header passes to gitball too (its limit is 32 KiB of head)")

    # An HTTP/1.0 client: nginx speaks HTTP/1.1 to the proxy, and says the
    # client wants the archive with its length; an HTTP/1.1 client does not.
    client = socket.create_connection(("127.0.0.1", front.port))
    client.sendall(b"GET /acme/widget/archive/old.tar HTTP/1.0\r\nHost: x\r\n\r\n")
    while client.recv(65536):
        pass
    client.close()
    check(seen[-1][1] == "/acme/widget/archive/old.tar"
          and seen[-1][2].get("x-gitball-want-length") == "1",
          "an HTTP/1.0 client's request asks the proxy for the archive with its length")
    front.request("GET", "/acme/widget/archive/new.tar")
    check("x-gitball-want-length" not in seen[-1][2],
          "an HTTP/1.1 client's request does not")

    # The operator's prewarm hook goes through the front.
    response, _ = front.request("POST", "/acme/widget/prewarm/v1.0",
                                {"Authorization": "Bearer t", "Content-Length": "0"})
    check(response.status == 202 and seen[-1][0] == "POST"
          and seen[-1][1] == "/acme/widget/prewarm/v1.0"
          and seen[-1][2].get("authorization") == "Bearer t",
          "a prewarm POST is proxied with its bearer token")

    # Streaming: the first chunk arrives while the upstream is still pausing.
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    started = time.monotonic()
    connection.request("GET", "/acme/widget/archive/slow.tar.gz")
    response = connection.getresponse()
    first = response.read(len(b"first-chunk"))
    first_at = time.monotonic() - started
    rest = response.read()
    connection.close()
    check(first == b"first-chunk" and rest == b"second-chunk"
          and first_at < STREAM_PAUSE_SECONDS / 2,
          f"the body streams unbuffered (first bytes after {first_at * 1000:.0f} ms, "
          f"upstream paused {STREAM_PAUSE_SECONDS * 1000:.0f} ms)")

    # Backpressure: the client reads a little, then stalls.
    client = socket.create_connection(("127.0.0.1", front.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.sendall(b"GET /acme/widget/archive/big.tar HTTP/1.1\r\nHost: x\r\n\r\n")
    client.recv(16 * 1024)
    time.sleep(1.0)
    written = big_body_written[0]
    client.close()
    check(written < STALLED_UPSTREAM_LIMIT_BYTES,
          f"a stalled client stalls the upstream: it wrote {written / 2**20:.0f} MiB of "
          f"{BIG_BODY_BYTES / 2**20:.0f} MiB (proxy_buffering off, no temp file)")

    count = len(seen)
    for method in ("POST", "PUT", "DELETE"):
        response, body = front.request(method, "/acme/widget/archive/main.zip")
        check(response.status == 405 and json.loads(body)["error"] == "method_not_allowed"
              and response.getheader("Allow") == "GET, HEAD",
              f"{method} gets a JSON 405 with Allow: GET, HEAD")
    response, body = front.request("GET", "/metrics")
    check(response.status == 403 and json.loads(body)["error"] == "forbidden",
          "/metrics is refused from outside")
    for path in ("/", "/acme", "/acme/widget", "/acme/widget/blob/main/README",
                 "/acme/widget/zip"):
        response, body = front.request("GET", path)
        check(response.status == 404 and json.loads(body)["error"] == "not_found",
              f"GET {path} is a JSON 404 from nginx")
    check(len(seen) == count, "none of the refused requests reached the upstream")

    response, _ = front.request("GET", "/healthz")
    check(response.status == 200 and seen[-1][1] == "/healthz", "/healthz is proxied")

    response, body = front.request("GET", "/acme/widget/archive/drop.zip")
    check(response.status == 502 and json.loads(body)["error"] == "bad_gateway"
          and response.getheader("Content-Type") == "application/json",
          "an upstream that drops the connection gives a JSON 502")

    check_cap_per_client(front)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = parser.parse_args()

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubUpstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()

    prefix = tempfile.mkdtemp(prefix="gitball-nginx-")
    port = free_port()
    config = subprocess.run(
        ["sh", str(HERE / "render-test-conf.sh"), prefix, str(port),
         str(upstream.server_address[1]), "2"],
        check=True, capture_output=True, text=True).stdout.strip()
    nginx = subprocess.Popen(
        [args.nginx, "-p", prefix, "-c", config, "-e", f"{prefix}/logs/error.log",
         "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    failed = False
    try:
        wait_for_port(port, nginx)
        print(f"nginx {port} -> stub upstream {upstream.server_address[1]} (prefix {prefix})")
        run_checks(Front(port))
    except (AssertionError, RuntimeError, OSError, ValueError) as error:
        failed = True
        print(f"smoke-test: FAIL: {error}", file=sys.stderr)
        log = pathlib.Path(prefix, "logs", "error.log")
        if log.exists():
            print("--- nginx error.log (last lines) ---", file=sys.stderr)
            print("\n".join(log.read_text().splitlines()[-20:]), file=sys.stderr)
    finally:
        # Fast shutdown of the nginx we started, by its pid.
        if nginx.poll() is None:
            nginx.send_signal(signal.SIGTERM)
        try:
            nginx.wait(timeout=5)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
        upstream.shutdown()
        upstream.server_close()
        if not failed:
            shutil.rmtree(prefix, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
