#!/usr/bin/env python3
"""Memory per idle keep-alive connection: NGINX, HAProxy and splitgate in one run.

For each proxy, plain, TLS and h2c, and N in NS (default 1000,9000): start the proxy
fresh, read its RSS (whole process tree), open N connections that each send one
request, read the response and stay open, wait WAIT seconds (splitgate releases an
idle connection's buffers after 1 s, and its workers return free pages every 5 s), read the RSS again; print one JSON line with
KiB per connection. Needs nginx, haproxy, openssl and the upstream nginx of
benches/peer/upstream-nginx.conf on 19001/19002 (benches/idle.sh starts it).

  python3 benches/idle.py            SPLITGATE=path NS=1000 MODES=plain PROXIES=splitgate
"""
import json, os, resource, signal, socket, ssl, subprocess, sys, time

from load_checks import BIN, PEER, one_request, rss_kib, wait_up
# HAProxy needs two file descriptors per client connection (maxconn 9950 here); where
# the open-files limit allows, run NS=1000,10000.
NS = [int(n) for n in os.environ.get("NS", "1000,9000").split(",") if n]
MODES = os.environ.get("MODES", "plain,tls,h2c").split(",")
PROXIES = os.environ.get("PROXIES", "nginx,haproxy,splitgate").split(",")
WAIT = float(os.environ.get("WAIT", "7"))
W = "/tmp/splitgate-idle-bench"
PLAIN = {"nginx": 18080, "haproxy": 18081, "splitgate": 18084}
TLS = {"nginx": 18443, "haproxy": 18444, "splitgate": 18445}
# h2c by prior knowledge (splitgate tells it from HTTP/1.1 on its one port).
H2C = {"nginx": 18480, "haproxy": 18481, "splitgate": 18084}


def certificate():
    os.makedirs(W, exist_ok=True)
    cert, key = f"{W}/cert.pem", f"{W}/key.pem"
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        with open(f"{W}/combined.pem", "w") as out:
            out.write(open(cert).read() + open(key).read())
    return cert, key


def config(name, cert, key):
    """The peer config of benches/peer with room for the connections and a TLS listener."""
    if name == "nginx":
        text = open(f"{PEER}/proxy-nginx.conf").read()
        text = text.replace("worker_connections 4096;", "worker_connections 30000;")
        text = text.replace("    listen 127.0.0.1:18080;",
                            f"    listen 127.0.0.1:18080;\n    listen 127.0.0.1:18443 ssl;\n"
                            f"    listen 127.0.0.1:18480 http2;\n"
                            f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    keepalive_timeout 10m;\n"
                            f"    http2_idle_timeout 10m;")
        path = f"{W}/nginx.conf"
        argv = ["nginx", "-c", path]
    elif name == "haproxy":
        text = open(f"{PEER}/proxy-haproxy.cfg").read()
        text = text.replace("maxconn 8192", "maxconn 9950")
        text = text.replace("timeout client 30s", "timeout client 10m\n  timeout http-keep-alive 10m")
        text = text.replace("  bind 127.0.0.1:18081", f"  bind 127.0.0.1:18081\n  bind 127.0.0.1:18444 ssl crt {W}/combined.pem\n  bind 127.0.0.1:18481 proto h2")
        path = f"{W}/haproxy.cfg"
        argv = ["haproxy", "-f", path]
    else:
        text = open(f"{PEER}/splitgate.toml").read()
        text = text.replace("/tmp/splitgate-bench-state", f"{W}/state")
        text = text.replace("access_log = false", "access_log = false\nmax_connections = 30000\nidle_timeout = \"10m\"")
        text = text.replace("[admin]", f"[server.tls]\nlisten = \"127.0.0.1:18445\"\ncerts = [{{ cert = \"{cert}\", key = \"{key}\" }}]\n\n[admin]")
        path = f"{W}/splitgate.toml"
        subprocess.run(["rm", "-rf", f"{W}/state"])
        argv = [BIN, "run", "-c", path]
    open(path, "w").write(text)
    return argv


def tree_rss_kib(pid):
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for process in [pid] + [int(child) for child in children]:
        try:
            total += rss_kib(process)
        except FileNotFoundError:
            pass
    return total


def h2_request(s):
    """One GET over h2c prior knowledge, answered completely; the connection stays open."""
    import h2.config, h2.connection, h2.events
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                          (":authority", "bench"), ("x-user-id", "idle")], end_stream=True)
    s.sendall(conn.data_to_send())
    status = None
    while True:
        data = s.recv(65536)
        assert data, "closed before the response"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers).get(b":status")
            if isinstance(event, h2.events.StreamEnded):
                s.sendall(conn.data_to_send())
                assert status == b"200", status
                return
        s.sendall(conn.data_to_send())


def measure(name, mode, n, cert, key):
    argv = config(name, cert, key)
    p = subprocess.Popen(["taskset", "-c", "0"] + argv, stdout=subprocess.DEVNULL,
                         stderr=open(f"{W}/{name}.log", "a"), start_new_session=True)
    socks = []
    try:
        port = {"plain": PLAIN, "tls": TLS, "h2c": H2C}[mode][name]
        wait_up(port)
        time.sleep(0.5)
        before = tree_rss_kib(p.pid)
        context = ssl.create_default_context(cafile=cert) if mode == "tls" else None
        request = b"GET / HTTP/1.1\r\nHost: bench\r\nX-User-Id: idle\r\n\r\n"
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            if context:
                s = context.wrap_socket(s, server_hostname="localhost")
            s.settimeout(10)
            if mode == "h2c":
                h2_request(s)
            else:
                one_request(s, request)
            socks.append(s)
        time.sleep(WAIT)
        after = tree_rss_kib(p.pid)
        row = dict(proxy=name, mode=mode, connections=n, rss_before_kib=before, rss_after_kib=after,
                   kib_per_connection=round((after - before) / n, 2))
        print(json.dumps(row), flush=True)
        return row
    finally:
        for s in socks:
            s.close()
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        time.sleep(0.5)


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(NS) + 100 > hard:
        raise SystemExit(f"the open-files limit ({hard}) is below {max(NS)} connections")
    cert, key = certificate()
    rows = [measure(name, mode, n, cert, key) for n in NS for mode in MODES for name in PROXIES]
    print("| proxy | mode | " + " | ".join(f"KiB/conn at {n}" for n in NS) + " |")
    print("|---|---|" + "---|" * len(NS))
    for mode in MODES:
        for name in PROXIES:
            cells = [next(r["kib_per_connection"] for r in rows if (r["proxy"], r["mode"], r["connections"]) == (name, mode, n)) for n in NS]
            print(f"| {name} | {mode} | " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
