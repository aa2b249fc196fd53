#!/usr/bin/env python3
"""The gateway under abuse (issue 11). Not a test: it prints figures.

Starts its own nisshi broker and a gateway (BIN, default target/debug/fleetflow) on loopback.
A normal client posts 100-record NDJSON batches on one keep-alive connection for SECONDS
(default 10), first alone, then while abusers send: 4 MiB bodies of `1\\n` lines, gzip bombs
(20 MiB of spaces in ~20 KiB), and slow clients that send half a request line and stall.
Prints the normal client's accepted records/s and p99 latency with and without abuse, and the
gateway's peak RSS (VmHWM). Usage: python3 bench/gateway_abuse.py; ONE_SHOT=1 sends only the one 4 MiB `1\n` request
the issue measured (BIN=an older build to compare).
"""
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target/debug/fleetflow"))
SECONDS = float(os.environ.get("SECONDS_EACH", "10"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"port {port} never opened")


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    return 0


def normal_client(port, seconds, stop_flag, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, accepted, n = [], 0, 0
    end = time.time() + seconds
    while time.time() < end:
        now = int(time.time() * 1000)
        body = "\n".join(
            json.dumps({"serverId": f"n{(n * 100 + i) % 5000}", "cpu": 1, "ram": 2, "ts": now}) for i in range(100)
        )
        n += 1
        t0 = time.perf_counter()
        conn.request("POST", "/v1/metrics", body)
        r = conn.getresponse()
        data = r.read()
        latencies.append(time.perf_counter() - t0)
        if r.status == 202:
            accepted += json.loads(data)["accepted"]
    stop_flag.set()
    latencies.sort()
    out["rate"] = accepted / seconds
    out["p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    out["requests"] = len(latencies)


def abuser(port, kind, stop_flag, counts):
    ones = b"1\n" * 2_000_000
    bomb = gzip.compress(b" " * (20 * 1024 * 1024))
    while not stop_flag.is_set():
        try:
            if kind == "slow":
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/met")
                s.settimeout(30)
                try:
                    outcome = "closed" if s.recv(1) == b"" else "answered"
                except OSError as e:
                    outcome = type(e).__name__
                counts[f"slow:{outcome}"] = counts.get(f"slow:{outcome}", 0) + 1
                s.close()
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                headers = {"content-encoding": "gzip"} if kind == "bomb" else {}
                conn.request("POST", "/v1/metrics", bomb if kind == "bomb" else ones, headers)
                r = conn.getresponse()
                r.read()
                counts[f"{kind}:{r.status}"] = counts.get(f"{kind}:{r.status}", 0) + 1
                conn.close()
        except OSError as e:
            counts[f"{kind}:{type(e).__name__}"] = counts.get(f"{kind}:{type(e).__name__}", 0) + 1


def main():
    work = tempfile.mkdtemp(prefix="gateway_abuse_")
    nisshi = subprocess.check_output(["bash", os.path.join(ROOT, "scripts/broker.sh"), "path"], text=True).strip()
    kport, gport = free_port(), free_port()
    url = f"tcp://127.0.0.1:{kport}"
    procs = []
    try:
        log = open(os.path.join(work, "broker.log"), "w")
        procs.append(subprocess.Popen([nisshi, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                       "--storage-engine", "memory://nisshi/"], cwd=work, stdout=log, stderr=log))
        wait_port(kport)
        env = dict(os.environ, FLEETFLOW_BROKERS=f"127.0.0.1:{kport}", FLEETFLOW_TOPIC="abuse")
        subprocess.check_call([BIN, "topic", "create", "--partitions", "4"], env=env, stdout=subprocess.DEVNULL)
        glog = open(os.path.join(work, "gateway.log"), "w")
        extra = [] if os.environ.get("ONE_SHOT") else ["--header-timeout", "2s"]
        gw = subprocess.Popen([BIN, "gateway", "--listen", f"127.0.0.1:{gport}"] + extra,
                              env=env, stdout=glog, stderr=glog)
        procs.append(gw)
        wait_port(gport)
        print(f"gateway pid {gw.pid}: RSS at start {vm(gw.pid, 'VmRSS')} MiB")
        if os.environ.get("ONE_SHOT"):
            # The measurement: one request of 4 MiB of `1\n` lines.
            conn = http.client.HTTPConnection("127.0.0.1", gport, timeout=300)
            conn.request("POST", "/v1/metrics", b"1\n" * 2_000_000)
            r = conn.getresponse()
            size = len(r.read())
            print(f"one 4 MiB body of `1\\n`: HTTP {r.status}, reply {size} bytes, "
                  f"gateway peak RSS {vm(gw.pid, 'VmHWM')} MiB")
            return

        calm = {}
        normal_client(gport, SECONDS, threading.Event(), calm)
        hwm_calm = vm(gw.pid, "VmHWM")

        stop, counts, threads = threading.Event(), {}, []
        for kind in ["ones", "ones", "bomb", "slow", "slow", "slow", "slow"]:
            t = threading.Thread(target=abuser, args=(gport, kind, stop, counts), daemon=True)
            t.start()
            threads.append(t)
        abused = {}
        normal_client(gport, SECONDS, stop, abused)
        for t in threads:
            t.join(timeout=40)
        hwm = vm(gw.pid, "VmHWM")

        print(f"normal client alone:       {calm['rate']:9.0f} records/s, p99 {calm['p99_ms']:7.1f} ms "
              f"({calm['requests']} requests); gateway peak RSS {hwm_calm} MiB")
        print(f"normal client under abuse: {abused['rate']:9.0f} records/s, p99 {abused['p99_ms']:7.1f} ms "
              f"({abused['requests']} requests); gateway peak RSS {hwm} MiB")
        print("abusive requests by outcome:", dict(sorted(counts.items())))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
