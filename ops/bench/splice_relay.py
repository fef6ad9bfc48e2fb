#!/usr/bin/env python3
"""A bare HTTP relay for one large cached download at a time: what the
proxy's copy loop costs at the floor, and what `splice` would cost instead.

    python3 ops/bench/splice_relay.py MODE PORT UPSTREAM_PORT CHUNK COUNT

MODE is `copy` (recv_into + sendall with a CHUNK-byte buffer, as the proxy
reads its upstream in 64 KiB chunks) or `splice` (upstream socket -> pipe of
CHUNK bytes -> client socket). It accepts COUNT connections on
127.0.0.1:PORT one after another, forwards each request to the archiver on
127.0.0.1:UPSTREAM_PORT with `Connection: close`, relays the response
(which must have a Content-Length), and prints the rate and its own CPU
time per GiB. Example, with an archiver holding a 1 GiB hit:

    python3 ops/bench/splice_relay.py splice 29310 29301 1048576 3 &
    for i in 1 2 3; do curl -s -o /dev/null http://127.0.0.1:29310/bench/huge/archive/main.tar; done

Loopback only; no HTTP parsing beyond the response head's Content-Length.
"""
import fcntl
import os
import resource
import socket
import struct
import sys
import time

F_SETPIPE_SZ = 1031
# Every blocking call on a socket gives up after this (`splice` honours the
# socket's own timeouts, not Python's, which would make it non-blocking).
SOCKET_TIMEOUT_SECONDS = 60


def blocking_with_timeout(sock):
    sock.settimeout(None)
    limit = struct.pack("ll", SOCKET_TIMEOUT_SECONDS, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)


def relay(mode, client, upstream_port, chunk):
    request = b""
    while b"\r\n\r\n" not in request:
        data = client.recv(65536)
        if not data:
            return
        request += data
    upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
    blocking_with_timeout(upstream)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head_end = request.index(b"\r\n\r\n")
    upstream.sendall(request[:head_end] + b"\r\nConnection: close\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += upstream.recv(65536)
    head, rest = head.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    client.sendall(head + b"\r\n\r\n" + rest)
    left = length - len(rest)
    if mode == "splice":
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, F_SETPIPE_SZ, chunk)
        while left:
            moved = os.splice(upstream.fileno(), write_end, min(left, chunk))
            if moved == 0:
                break
            sent = 0
            while sent < moved:
                sent += os.splice(read_end, client.fileno(), moved - sent)
            left -= moved
        os.close(read_end)
        os.close(write_end)
    else:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while left:
            read = upstream.recv_into(buffer, min(left, chunk))
            if read == 0:
                break
            client.sendall(view[:read])
            left -= read
    after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time.time() - started
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    gib = length / 2**30
    print(
        f"{mode}, {chunk // 1024} KiB: {gib / seconds:.2f} GiB/s, "
        f"{cpu * 1000 / gib:.0f} ms CPU per GiB",
        flush=True,
    )
    upstream.close()


def main():
    mode, port, upstream_port, chunk, count = sys.argv[1:6]
    if mode not in ("copy", "splice"):
        sys.exit("MODE is copy or splice")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(8)
    listener.settimeout(120)
    for _ in range(int(count)):
        client, _ = listener.accept()
        blocking_with_timeout(client)
        with client:
            relay(mode, client, int(upstream_port), int(chunk))


if __name__ == "__main__":
    main()
