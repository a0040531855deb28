#!/usr/bin/env python3
"""HTTP/2 abuse against a running splitgate (h2c, prior knowledge):

  rapid reset         open and cancel streams as fast as possible (CVE-2023-44487)
  continuation flood  a HEADERS frame followed by endless CONTINUATION (CVE-2024-27316 style)
  empty data flood    endless zero-length DATA frames on one stream

Each must end in GOAWAY (or a closed connection) with the process's memory bounded.

usage: h2_abuse.py HOST:PORT PID
"""
import socket, struct, sys, time

import h2.config, h2.connection
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

GOAWAY = 0x7
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def connect(addr):
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


class Watch:
    """Reads frames as they come; remembers whether a GOAWAY arrived."""

    def __init__(self, sock):
        self.sock, self.buf, self.goaway, self.closed = sock, b"", None, False
        sock.setblocking(False)

    def poll(self):
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            kind = self.buf[3]
            payload = self.buf[9 : 9 + length]
            if kind == GOAWAY and self.goaway is None:
                self.goaway = struct.unpack(">I", payload[4:8])[0]
            self.buf = self.buf[9 + length :]
        return self.goaway is not None or self.closed

    def send(self, data):
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(2)
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False
        finally:
            self.sock.setblocking(False)


def headers(addr, path="/"):
    return [(":method", "GET"), (":scheme", "http"), (":authority", addr), (":path", path)]


def rapid_reset(addr, watch, conn):
    for _ in range(200):
        for _ in range(100):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers(addr), end_stream=True)
            conn.reset_stream(sid)
        if not watch.send(conn.data_to_send()) or watch.poll():
            return


def continuation_flood(addr, watch, conn):
    sid = conn.get_next_available_stream_id()
    block = conn.encoder.encode(headers(addr))
    first = HeadersFrame(sid, data=block)  # no END_HEADERS: the block goes on
    if not watch.send(first.serialize()):
        return
    filler = b"\x00" * 16_000
    for _ in range(2_000):  # up to ~32 MB of header block
        if not watch.send(ContinuationFrame(sid, data=filler).serialize()) or watch.poll():
            return


def empty_data_flood(addr, watch, conn):
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers(addr) + [("content-type", "text/plain")], end_stream=False)
    if not watch.send(conn.data_to_send()):
        return
    frame = DataFrame(sid, data=b"").serialize()
    for _ in range(500):
        if not watch.send(frame * 1000) or watch.poll():
            return


def main():
    addr, pid = sys.argv[1], int(sys.argv[2])
    failures = 0
    for name, attack in [("rapid reset", rapid_reset), ("continuation flood", continuation_flood),
                         ("empty data flood", empty_data_flood)]:
        before = rss_kib(pid)
        sock, conn = connect(addr)
        watch = Watch(sock)
        started = time.time()
        attack(addr, watch, conn)
        deadline = time.time() + 10
        while not watch.poll() and time.time() < deadline:
            time.sleep(0.05)
        grown = rss_kib(pid) - before
        ended = f"GOAWAY (error code {watch.goaway})" if watch.goaway is not None else ("closed" if watch.closed else "still open")
        ok = (watch.goaway is not None or watch.closed) and grown < 64 * 1024
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {ended} after {time.time() - started:.2f} s, RSS grew {grown} KiB")
        sock.close()
    print(f"h2 abuse: {3 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
