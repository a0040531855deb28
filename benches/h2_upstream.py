#!/usr/bin/env python3
"""HTTP/2 to upstreams, side by side: proxy CPU microseconds per request, interleaved.

usage: h2_upstream.py [--rounds R] [--seconds S] [--streams M] NAME=CLIENT=PORT=COMMAND ...

CLIENT is `h2load` (h2c prior knowledge: 16 connections, M streams each, default 10) or `wrk`
(HTTP/1.1: 64 keep-alive connections). The proxy under test is pinned to CPU 0; the
client and the upstream nginx (h2c on :19011, HTTP/1.1 on :19001) share CPU 1. Each
round runs every candidate once, so drift hits all alike. Prints one JSON line per
candidate: medians of CPU us/request, requests/s, and failures.
"""
import argparse, json, os, re, socket, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peer"))
from compare import measured  # noqa: E402


# Streams at a time per h2load connection (--streams): 1 makes every request end with the
# connection waiting, the case that frees and takes back its buffers each time.
STREAMS = 10


def h2load(port, seconds):
    out = subprocess.run(["taskset", "-c", "1", "h2load", "-c16", f"-m{STREAMS}", "-t1", f"-D{seconds}",
                          "--warm-up-time=1", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m:
        raise SystemExit(f"h2load on :{port} printed no summary:\n{out}")
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    not_2xx = sum(int(g) for g in status.groups()[1:]) if status else 0
    # failed: streams h2load saw fail or error, and answers other than 2xx.
    return dict(reqs=int(m.group(3)), failed=int(m.group(5)) + int(m.group(6)) + not_2xx)


def wrk(port, seconds):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return dict(reqs=reqs, failed=failed)


CLIENTS = {"h2load": h2load, "wrk": wrk}


def listening(port):
    """Whether something accepts on `port` within 10 s (then a moment to settle): an
    h2c-only proxy answers no HTTP/1.1 probe."""
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.3)
            return True
        except OSError:
            time.sleep(0.1)
    return False


def one(name, client, port, cmd, seconds):
    load = lambda secs: CLIENTS[client](port, secs)
    return measured(name, cmd, lambda: listening(port), load, seconds, f"/tmp/h2b-{name}.log")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--streams", type=int, default=STREAMS, help="h2load streams per connection")
    ap.add_argument("candidates", nargs="+")
    a = ap.parse_args()
    global STREAMS
    STREAMS = a.streams
    cands = [c.split("=", 3) for c in a.candidates]
    runs = {n: [] for n, _, _, _ in cands}
    for _ in range(a.rounds):
        for n, client, port, cmd in cands:
            runs[n].append(one(n, client, int(port), cmd, a.seconds))
    for n, rs in runs.items():
        med = lambda k: round(statistics.median(r[k] for r in rs), 2)
        print(json.dumps(dict(name=n, cpu_us_per_req=med("cpu_us"), cpu_us_all=[round(r["cpu_us"], 1) for r in rs],
                              rps=round(med("rps")), rss_kib=med("rss"), failed=sum(r["failed"] for r in rs))))


if __name__ == "__main__":
    main()
