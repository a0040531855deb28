#!/usr/bin/env python3
"""Load checks for splitgate beyond CPU per request (run by benches/load_checks.sh):

  weights   errors while the weight changes 100 times per second (and the config
            reloads 50 times) under wrk load
  idle      RSS with 10 000 idle keep-alive client connections, per connection
  slowloris wrk p99 alone, then with 500 slowloris connections trickling headers
  h2        h2load, h2c multiplexed (-c10 -m100), splitgate against nginx
  takeover  errors while the binary is replaced 5 times (`run --takeover`) under wrk load

Loopback only; every loop is bounded in count and time.
"""
import http.client, json, os, re, resource, signal, socket, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "benches", "peer")
BIN = os.environ.get("SPLITGATE", os.path.join(ROOT, "target", "release", "splitgate"))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def one_request(s, request):
    """Sends `request` on a keep-alive socket and reads the response head: a 200."""
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200"), data[:80]


def wait_up(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def start_splitgate(extra_server="", takeover=False):
    state = "/tmp/splitgate-loadcheck-state"
    if not takeover:
        subprocess.run(["rm", "-rf", state])
    text = open(os.path.join(PEER, "splitgate.toml")).read()
    text = text.replace("/tmp/splitgate-bench-state", state)
    text = text.replace("access_log = false", "access_log = false\n" + extra_server)
    path = "/tmp/splitgate-loadcheck.toml"
    open(path, "w").write(text)
    log = "/tmp/splitgate-loadcheck.log"
    p = subprocess.Popen(["taskset", "-c", "0", BIN, "run", "-c", path] + (["--takeover"] if takeover else []),
                         stdout=subprocess.DEVNULL, stderr=open(log, "a"))
    if takeover:
        # Serving once it logged so (the ports answer all along: the old process serves).
        for _ in range(200):
            if p.poll() is not None:
                raise SystemExit(f"takeover failed; see {log}")
            if open(log).read().count("splitgate serving") >= takeover:
                return p
            time.sleep(0.05)
        raise SystemExit(f"takeover did not finish; see {log}")
    wait_up(18084)
    wait_up(19901)
    return p


# A tokenless admin API takes changes only as JSON (no CSRF from a browser).
JSON = {"Content-Type": "application/json"}


def weights():
    p = start_splitgate()
    try:
        changes, refused, reloads, reloads_refused = 0, 0, 0, 0
        stop = time.time() + 10

        def mover():
            nonlocal changes, refused, reloads, reloads_refused
            conn = http.client.HTTPConnection("127.0.0.1", 19901)
            i = 0
            while time.time() < stop and changes < 1000:
                t0 = time.time()
                weight = (i * 37) % 101
                conn.request("PUT", "/admin/routes/bench/weight", json.dumps({"canary_weight": weight}), JSON)
                r = conn.getresponse()
                r.read()
                changes += 1
                refused += r.status != 200
                if i % 20 == 0 and reloads < 50:
                    conn.request("POST", "/admin/reload", "", JSON)
                    r = conn.getresponse()
                    r.read()
                    reloads += 1
                    reloads_refused += r.status != 200
                i += 1
                time.sleep(max(0.0, 0.01 - (time.time() - t0)))

        t = threading.Thread(target=mover)
        t.start()
        counts = wrk_counts(start_wrk(10))
        t.join()
        print(json.dumps(dict(check="weights", weight_changes=changes, changes_refused=refused, reloads=reloads,
                              reloads_refused=reloads_refused, rps=round(counts["requests"] / 10), **counts)))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()


def start_wrk(seconds):
    """wrk on CPU 1, 64 connections with random user IDs, for `seconds`."""
    return subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s",
                             os.path.join(PEER, "users.lua"), "http://127.0.0.1:18084/"],
                            stdout=subprocess.PIPE, text=True)


def wrk_counts(wrk):
    """Waits for `start_wrk`'s run: requests, non-2xx and socket errors."""
    out = wrk.communicate()[0]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return dict(requests=int(re.search(r"(\d+) requests in", out).group(1)),
                non2xx=int(bad.group(1)) if bad else 0, socket_errors=sock.group(1) if sock else "none")


def takeover(times=5, seconds=20):
    open("/tmp/splitgate-loadcheck.log", "w").close()
    p = start_splitgate()
    old = []
    try:
        wrk = start_wrk(seconds)
        for i in range(times):
            time.sleep(seconds / (times + 1))
            old.append(p)
            p = start_splitgate(takeover=i + 2)
        counts = wrk_counts(wrk)
        exits = [o.wait(timeout=30) for o in old]
        print(json.dumps(dict(check="takeover", replacements=times, old_exit_codes=exits, **counts)))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()


def upgrade(times=5, seconds=20):
    """`takeover`, as the systemd unit upgrades: SIGUSR2 to the serving process, which
    starts its successor itself; each successor's PID comes from the old one's log."""
    log = "/tmp/splitgate-loadcheck.log"
    open(log, "w").close()
    first = start_splitgate()
    pid = first.pid
    try:
        wrk = start_wrk(seconds)
        for i in range(times):
            time.sleep(seconds / (times + 1))
            os.kill(pid, signal.SIGUSR2)
            for _ in range(200):
                text = open(log).read()
                if text.count("a new splitgate took over") > i:
                    break
                time.sleep(0.05)
            else:
                raise SystemExit(f"upgrade {i + 1} did not finish; see {log}")
            pid = int(re.findall(r"SIGUSR2: started a successor to take over pid=(\d+)", text)[-1])
        counts = wrk_counts(wrk)
        first_exit = first.wait(timeout=30)
        print(json.dumps(dict(check="upgrade", replacements=times, first_exit_code=first_exit, **counts)))
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def idle(count=10_000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    p = start_splitgate("max_connections = 20000\nidle_timeout = \"10m\"")
    socks = []
    try:
        time.sleep(0.5)
        before = rss_kib(p.pid)
        request = b"GET / HTTP/1.1\r\nHost: bench\r\nX-User-Id: idle\r\n\r\n"
        # One request each, answered before the next connection opens: every connection
        # has served a request and sits idle, and none is still queued or in flight.
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", 18084))
            s.settimeout(5)
            one_request(s, request)
            socks.append(s)
        # splitgate releases a connection's buffers after 1 s idle; wait for that, and
        # for the allocator to give freed pages back.
        time.sleep(3)
        after = rss_kib(p.pid)
        print(json.dumps(dict(check="idle", connections=count, rss_before_kib=before, rss_after_kib=after,
                              bytes_per_connection=round((after - before) * 1024 / count))))
    finally:
        for s in socks:
            s.close()
        p.send_signal(signal.SIGTERM)
        p.wait()


def wrk_p99(seconds=5):
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s",
                          os.path.join(PEER, "users.lua"), "http://127.0.0.1:18084/"], capture_output=True, text=True).stdout
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return p99, reqs, int(bad.group(1)) if bad else 0


def slowloris(count=500):
    p = start_splitgate()
    socks = []
    try:
        base = wrk_p99()
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", 18084))
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n")
            socks.append(s)
        stop = time.time() + 6

        def trickle():
            while time.time() < stop:
                for s in socks:
                    try:
                        s.sendall(b"X-a: b\r\n")
                    except OSError:
                        pass
                time.sleep(1)

        t = threading.Thread(target=trickle)
        t.start()
        loaded = wrk_p99()
        t.join()
        print(json.dumps(dict(check="slowloris", slow_connections=count, p99_alone=base[0], requests_alone=base[1],
                              p99_with_slowloris=loaded[0], requests_with_slowloris=loaded[1],
                              non2xx=base[2] + loaded[2])))
    finally:
        for s in socks:
            s.close()
        p.send_signal(signal.SIGTERM)
        p.wait()


def h2():
    results = []
    nginx = subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", os.path.join(PEER, "proxy-nginx-h2c.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(18082)
        results.append(("nginx", h2load(18082)))
    finally:
        nginx.send_signal(signal.SIGTERM)
        nginx.wait()
    p = start_splitgate()
    try:
        results.append(("splitgate", h2load(18084)))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()
    for name, r in results:
        print(json.dumps(dict(check="h2", name=name, **r)))


def h2load(port):
    subprocess.run(["h2load", "-n", "20000", "-c", "10", "-m", "100", f"http://127.0.0.1:{port}/"],
                   capture_output=True)  # warm-up
    out = subprocess.run(["taskset", "-c", "1", "h2load", "-n", "200000", "-c", "10", "-m", "100",
                          "-H", "x-user-id: h2", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    return dict(rps=round(rps), done=int(m.group(2)), succeeded=int(m.group(3)), failed=int(m.group(4)),
                errored=int(m.group(5)))


if __name__ == "__main__":
    checks = sys.argv[1:] or ["weights", "idle", "slowloris", "h2", "takeover", "upgrade"]
    for check in checks:
        globals()[check]()
