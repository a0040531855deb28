#!/usr/bin/env python3
"""Fleet figures (report, not assert), on the local fleet of examples/fleet/run-local.sh
(3 etcd members, 3 splitgate replicas, loopback):

1. propagation of a weight change: PUT through edge-1, then poll every replica's admin API
   until all three show it; p50/p99 over CHANGES (default 200) changes, from the PUT sent
   and from its acknowledgement;
2. time from the first bad canary response to weight 0 on every replica, with a failing
   canary (APP_V2_STATUS=500) and traffic spread round-robin over the three replicas;
3. etcd write load per replica per second while idle (QUIET seconds), from etcd's own
   counters (puts, transactions, lease renewals, raft proposals).

Needs: etcd (apt-get install etcd-server), curl. Run: python3 benches/fleet.py
"""
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANGES = int(os.environ.get("CHANGES", "200"))
QUIET = float(os.environ.get("QUIET", "10"))
ADMINS = [("127.0.0.1", 9911), ("127.0.0.1", 9912), ("127.0.0.1", 9913)]
PROXIES = [("127.0.0.1", 8081), ("127.0.0.1", 8082), ("127.0.0.1", 8083)]


def start_fleet(env_extra):
    env = dict(os.environ, **env_extra)
    p = subprocess.Popen([os.path.join(ROOT, "examples/fleet/run-local.sh")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith("fleet up"):
            return p
    raise SystemExit("the fleet did not start")


def stop_fleet(p):
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=30)


class Admin:
    def __init__(self, addr):
        self.conn = http.client.HTTPConnection(*addr, timeout=5)

    def call(self, method, path, body=None):
        self.conn.request(method, path, body=body, headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def weight(self):
        return self.call("GET", "/admin/routes/app")[1]["canary_weight"]


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def wait_judge(admins):
    deadline = time.time() + 15
    while time.time() < deadline:
        if admins[0].call("GET", "/admin/fleet")[1].get("judge"):
            return
        time.sleep(0.1)
    raise SystemExit("no fleet judge")


def propagation():
    p = start_fleet({})
    try:
        admins = [Admin(a) for a in ADMINS]
        from_sent, from_ack = [], []
        for i in range(CHANGES):
            weight = 1 + i % 50
            sent = time.perf_counter()
            status, body = admins[0].call("PUT", "/admin/routes/app/weight",
                                          json.dumps({"canary_weight": weight}))
            acked = time.perf_counter()
            assert status == 200, body
            pending = set(range(3))
            while pending:
                for r in list(pending):
                    if admins[r].weight() == weight:
                        pending.discard(r)
            done = time.perf_counter()
            from_sent.append((done - sent) * 1000)
            from_ack.append((done - acked) * 1000)
        row = dict(measure="weight change reaches all 3 replicas", changes=CHANGES,
                   p50_ms_from_put=round(percentile(from_sent, 50), 2),
                   p99_ms_from_put=round(percentile(from_sent, 99), 2),
                   p50_ms_from_ack=round(percentile(from_ack, 50), 2),
                   p99_ms_from_ack=round(percentile(from_ack, 99), 2),
                   max_ms_from_put=round(max(from_sent), 2))
        print(json.dumps(row), flush=True)

        # etcd's own counters over a quiet period.
        def counters():
            text = subprocess.run(["curl", "-fs", "http://127.0.0.1:12379/metrics"],
                                  capture_output=True, text=True).stdout
            wanted = {"etcd_mvcc_put_total": 0.0, "etcd_mvcc_txn_total": 0.0,
                      "etcd_server_proposals_committed_total": 0.0,
                      "etcd_debugging_lease_renewed_total": 0.0}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in wanted:
                    wanted[name] = float(value)
            return wanted
        before = counters()
        time.sleep(QUIET)
        after = counters()
        row = {"measure": "etcd load per replica per second, idle",
               "seconds": QUIET}
        for name in before:
            row[name.replace("etcd_", "").replace("_total", "")] = round(
                (after[name] - before[name]) / QUIET / 3, 2)
        print(json.dumps(row), flush=True)
    finally:
        stop_fleet(p)


def time_to_revert():
    p = start_fleet({"APP_V2_STATUS": "500"})
    try:
        admins = [Admin(a) for a in ADMINS]
        wait_judge(admins)
        status, body = admins[0].call("PUT", "/admin/routes/app/weight", json.dumps({"canary_weight": 50}))
        assert status == 200, body
        while any(a.weight() != 50 for a in admins):
            time.sleep(0.01)
        proxies = [http.client.HTTPConnection(*addr, timeout=5) for addr in PROXIES]
        first_bad = None
        bad = 0
        i = 0
        while True:
            conn = proxies[i % 3]
            conn.request("GET", "/", headers={"x-user-id": f"user-{i}"})
            response = conn.getresponse()
            response.read()
            if response.status >= 500:
                bad += 1
                first_bad = first_bad or time.perf_counter()
            i += 1
            if first_bad and i % 3 == 0 and all(a.weight() == 0 for a in admins):
                break
            if first_bad and time.perf_counter() - first_bad > 30:
                raise SystemExit("not reverted within 30 s")
        done = time.perf_counter()
        who = admins[0].call("GET", "/admin/routes/app")[1]["slo"].get("detail", "")
        print(json.dumps(dict(measure="first bad canary response to weight 0 on all 3 replicas",
                              ms=round((done - first_bad) * 1000, 1), bad_responses=bad,
                              requests=i, tripped_by=who[:80])), flush=True)
    finally:
        stop_fleet(p)


if __name__ == "__main__":
    propagation()
    time_to_revert()
