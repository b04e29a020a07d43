#!/usr/bin/env python3
"""Helpers for tests/bench/run.sh (standard library only).

  ports N                       N distinct free loopback TCP ports
  wait-ready URL SECONDS        until URL answers 200
  pkcsreq SCEP_URL OUT SIZE     record a real scepclient PKCSReq body of about SIZE bytes
  long-target PATH DER          a PKIOperation GET request-target carrying DER as iOS sends it
  preflight NAME URL TARGET...  one request of each kind must get 200
  h2sum OUT LOG                 summarise an h2load run (its output and its --log-file)
  idle ...                      hold N idle TLS connections and read the proxy's memory
  enrol ...                     N scepclient enrolments, P at a time (and which CA issued them)
  report DIR                    results.md and results.json from DIR/runs
"""

import argparse
import asyncio
import base64
import concurrent.futures
import http.client
import http.server
import json
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

WORKLOADS = [
    ("getcacaps", "(a) GetCACaps, keep-alive"),
    ("getcacaps_cached", "(a') GetCACaps, keep-alive, cache on (gateway cache_ttl 60s, nginx proxy_cache)"),
    ("long_get", "(b) GET PKIOperation, 62 KiB request-target"),
    ("post", "(c) POST PKIOperation, 3.8 KB body"),
    ("new_tls", "(d) new TLS connection per request"),
    ("h2", "(e) HTTP/2 GetCACaps (h2load)"),
    ("enrol", "(g) real enrolments (scepclient)"),
]
TARGETS = ["gateway", "nginx", "haproxy", "direct"]
SEVERAL_TARGETS = [
    ("gateway", "gateway, both as [[upstream.server]]"),
    ("nginx_random", "nginx, upstream with `random`"),
    ("nginx_iphash", "nginx, upstream with `ip_hash`"),
]


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def insecure_context():
    # The load generators trust nothing in particular, like wrk and h2load: the proxies' own
    # verification of the stand-in is what the set-up checks.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def cmd_ports(a):
    socks = []
    for _ in range(a.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_wait_ready(a):
    deadline = time.monotonic() + a.seconds
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(a.url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - any failure means not ready yet
            last = e
        time.sleep(0.2)
    sys.exit(f"{a.url} not ready after {a.seconds} s: {last}")


def cmd_pkcsreq(a):
    """A real PKCSReq as scepclient sends it, so the gateway's SCEP inspection reads a genuine
    message. An Intune challenge is a long opaque blob; its length sets the body size here."""
    upstream = a.scep_url.rstrip("/")
    recorded = {}

    class Recorder(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def forward(self, body=None):
            query = urllib.parse.urlsplit(self.path).query
            req = urllib.request.Request(f"{upstream}?{query}", data=body, method=self.command)
            if body is not None:
                recorded["body"] = body
                req.add_header("Content-Type", self.headers.get("Content-Type", "application/x-pki-message"))
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    status, ctype, data = r.status, r.headers.get("Content-Type", ""), r.read()
            except urllib.error.HTTPError as e:
                status, ctype, data = e.code, e.headers.get("Content-Type", ""), e.read()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.forward()

        def do_POST(self):
            self.forward(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/scep"

    def record(challenge_len, n):
        recorded.clear()
        with tempfile.TemporaryDirectory() as d:
            # The wrong challenge makes the CA refuse, which is fine: only the request is kept.
            subprocess.run(
                ["scepclient", "-server-url", url, "-challenge", "c" * challenge_len,
                 "-private-key", "k.key", "-certificate", "k.pem", "-cn", f"bench-recorded-{n}"],
                cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        if "body" not in recorded:
            sys.exit("pkcsreq: scepclient sent no PKIOperation")
        return len(recorded["body"])

    length = 16
    size = record(length, 1)
    for n in range(2, 6):
        if abs(size - a.size) <= 16:
            break
        length = max(1, length + a.size - size)
        size = record(length, n)
    server.shutdown()
    with open(a.out, "wb") as f:
        f.write(recorded["body"])
    print(size)


def cmd_long_target(a):
    # Standard base64 with `+` and `/` left raw, as iOS sends it (the peers and the stand-in pass
    # the query through unchanged either way).
    with open(a.der, "rb") as f:
        der = f.read()
    print(f"{a.path}?operation=PKIOperation&message={base64.b64encode(der).decode()}")


def cmd_preflight(a):
    u = urllib.parse.urlsplit(a.url)
    with open(a.body, "rb") as f:
        body = f.read()
    checks = [
        ("GET", f"{u.path}?operation=GetCACaps", None, {}),
        ("GET", a.long_target, None, {}),
        ("POST", f"{u.path}?operation=PKIOperation", body, {"Content-Type": "application/x-pki-message"}),
    ]
    bad = []
    for method, target, data, headers in checks:
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=insecure_context(), timeout=10)
        try:
            conn.request(method, target, body=data, headers=headers)
            r = conn.getresponse()
            text = r.read()[:200]
            if r.status != 200:
                bad.append(f"{method} {target[:60]}: {r.status} {text!r}")
        except Exception as e:  # noqa: BLE001
            bad.append(f"{method} {target[:60]}: {e}")
        finally:
            conn.close()
    if bad:
        sys.exit(f"preflight {a.name}: " + "; ".join(bad))


def cmd_h2sum(a):
    with open(a.out) as f:
        text = f.read()
    res = {"tool": "h2load"}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if m:
        res["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        total, started, done, ok, failed, errored, timeout = map(int, m.groups())
        res.update(done=done, succeeded=ok, failed=failed, errored=errored, timeout=timeout)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        res["non2xx"] = sum(map(int, m.groups()[1:]))
    m = re.search(r"Application protocol: (\S+)", text)
    res["protocol"] = m.group(1) if m else None
    lat = []
    try:
        with open(a.log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
        os.unlink(a.log)
    except OSError:
        pass
    lat.sort()
    if lat:
        res["p50_us"] = percentile(lat, 50)
        res["p99_us"] = percentile(lat, 99)
    res["errors"] = res.get("failed", 0) + res.get("errored", 0) + res.get("timeout", 0)
    if res.get("protocol") != "h2":
        res["errors"] = max(res["errors"], 1)
        res["note"] = f"negotiated {res.get('protocol')}, not h2"
    if "rps" not in res:
        res["errors"] = max(res["errors"], 1)
        res["note"] = "h2load printed no summary"
    json.dump(res, sys.stdout)
    print()


def cmd_idle(a):
    # asyncio gives every TLS connection a 256 KiB read buffer; at 10,000 connections that is
    # 2.5 GB of load generator competing with the proxies for the machine.
    try:
        import asyncio.sslproto as sslproto

        sslproto.SSLProtocol.max_size = 32 * 1024
    except (ImportError, AttributeError):
        pass
    pids = [int(p) for p in a.pids.split(",") if p]
    request = (f"GET {a.path}?operation=GetCACaps HTTP/1.1\r\nHost: {a.sni}\r\n\r\n").encode()

    async def main():
        ctx = insecure_context()
        ctx.set_alpn_protocols(["http/1.1"])
        time.sleep(a.settle)
        before = rss_kib(pids)
        sem = asyncio.Semaphore(a.concurrency)
        conns, errors = [], {}

        async def one():
            async with sem:
                try:
                    r, w = await asyncio.wait_for(
                        asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni), 30)
                    conns.append((r, w))
                    if a.request:
                        w.write(request)
                        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
                        status = int(head.split(b" ", 2)[1])
                        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                        await r.readexactly(int(m.group(1)) if m else 0)
                        if status != 200:
                            errors[f"status {status}"] = errors.get(f"status {status}", 0) + 1
                except Exception as e:  # noqa: BLE001 - counted and reported
                    name = type(e).__name__
                    errors[name] = errors.get(name, 0) + 1

        t0 = time.monotonic()
        deadline = a.n / 200 + 60
        try:
            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(a.n))), deadline)
        except asyncio.TimeoutError:
            errors["not opened within the deadline"] = a.n - len(conns)
        open_s = time.monotonic() - t0
        await asyncio.sleep(a.settle)
        holding = rss_kib(pids)
        alive = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
        for _, w in conns:
            w.transport.abort()
        await asyncio.sleep(0)
        time.sleep(a.settle)
        after = rss_kib(pids)
        return {
            "tool": "idle", "n": a.n, "opened": len(conns), "alive": alive, "errors": errors,
            "open_seconds": round(open_s, 2), "rss_before_kib": before, "rss_holding_kib": holding,
            "rss_after_kib": after,
        }

    json.dump(asyncio.run(main()), sys.stdout)
    print()


def cmd_enrol(a):
    env = dict(os.environ, SSL_CERT_FILE=a.root)
    os.makedirs(a.workdir, exist_ok=True)

    started = time.monotonic()

    def one(i):
        if time.monotonic() - started > a.max_seconds:
            return False, 0, [f"not started: the run's {a.max_seconds:.0f} s were over"]
        d = tempfile.mkdtemp(prefix=f"{a.prefix}-{i}-", dir=a.workdir)
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                ["scepclient", "-server-url", a.url, "-challenge", a.challenge,
                 "-private-key", "k.key", "-certificate", "k.pem", "-cn", f"{a.prefix}-{i}"],
                cwd=d, env=env, capture_output=True, text=True, timeout=120, check=False)
            cert = os.path.join(d, "k.pem")
            ok = p.returncode == 0 and os.path.exists(cert) and os.path.getsize(cert) > 0
            # scepclient prints the CA's verdict on stdout and its request log on stderr.
            why = (p.stdout.strip() or p.stderr.strip()).splitlines()[-1:]
            tail = [] if ok else [f"exit {p.returncode}: " + " ".join(why)]
        except (subprocess.TimeoutExpired, OSError) as e:
            ok, tail = False, [str(e)]
        return ok, time.monotonic() - t0, tail

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(one, range(a.n)))
    wall = time.monotonic() - t0
    times = sorted(t for ok, t, _ in results if ok)
    okn = len(times)
    res = {
        "tool": "enrol", "n": a.n, "ok": okn, "errors": a.n - okn, "seconds": round(wall, 3),
        "rps": okn / wall if wall > 0 else 0,
        "p50_us": int(percentile(times, 50) * 1e6) if times else None,
        "p99_us": int(percentile(times, 99) * 1e6) if times else None,
        "failures": sorted({" ".join(tail) for ok, _, tail in results if not ok})[:3],
    }
    if a.depot:
        # A CA's depot holds one <common name>.<serial>.pem per certificate it issued.
        res["issued"] = {}
        for spec in a.depot:
            name, path = spec.split("=", 1)
            res["issued"][name] = sum(1 for f in os.listdir(path)
                                      if f.startswith(a.prefix + "-") and f.endswith(".pem"))
    json.dump(res, sys.stdout)
    print()


# ---- report ---------------------------------------------------------------------------------


def load_runs(d):
    runs = {}
    for name in sorted(os.listdir(d)):
        m = re.fullmatch(r"(\w+)\.(\w+)\.(\d+)\.out", name)
        if not m:
            continue
        w, t, r = m.group(1), m.group(2), int(m.group(3))
        with open(os.path.join(d, name), errors="replace") as f:
            text = f.read()
        res = None
        for line in text.splitlines():
            if line.startswith("BENCHJSON "):
                j = json.loads(line[len("BENCHJSON "):])
                secs = j["duration_us"] / 1e6
                res = {
                    "tool": "wrk", "rps": j["requests"] / secs if secs else 0,
                    "requests": j["requests"], "p50_us": j["p50_us"], "p99_us": j["p99_us"],
                    "non2xx": j["status"], "socket_errors": j["connect"] + j["read"] + j["write"] + j["timeout"],
                }
                res["errors"] = res["non2xx"] + res["socket_errors"]
            elif line.startswith("{"):
                res = json.loads(line)
        if res is None:
            res = {"tool": "?", "errors": 1, "note": "no result: " + (text.strip().splitlines() or ["empty output"])[-1][:200]}
        rss = os.path.join(d, f"{w}.{t}.{r}.rss")
        if os.path.exists(rss):
            with open(rss) as f:
                v = f.read().strip()
            res["rss_peak_kib"] = int(v) if v else None
        cpu = os.path.join(d, f"{w}.{t}.{r}.cpu")
        requests = res.get("requests", res.get("done"))
        if os.path.exists(cpu) and requests:
            with open(cpu) as f:
                v = [int(x) for x in f.read().split()]
            if len(v) == 9:
                u0, s0, su0, ss0, u1, s1, su1, ss1, hz = v
                per = 1e6 / hz / requests
                res["cpu_user_us"] = (u1 - u0) * per
                res["cpu_sys_us"] = (s1 - s0) * per
                res["standin_cpu_us"] = (su1 - su0 + ss1 - ss0) * per
        runs.setdefault(w, {}).setdefault(t, []).append(res)
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_rate(v):
    if v is None:
        return "n/a"
    return f"{v / 1000:.1f}k" if v >= 1000 else (f"{v:.0f}" if v >= 100 else f"{v:.2f}")


def fmt_ms(us):
    if us is None:
        return "n/a"
    ms = us / 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}"


def several_report(md, meta, runs):
    """The enrolments over two NDES hosts: per target, summed over the rounds."""
    md.append("")
    md.append(f"(h) Real enrolments over two NDES hosts, each a scepserver with a CA of its own behind its own "
              f"TLS front: {meta.get('several', '?')} per target and round, {meta.get('several_parallel', '?')} "
              "at a time, all from 127.0.0.1. Summed over the rounds; issued: certificates in each CA's depot "
              "for this run's names.")
    md.append("")
    md.append("| target | enrolments | succeeded | failed | successes/s | issued by ndes01 / ndes02 | failures, in the CA's words |")
    md.append("|---|---|---|---|---|---|---|")
    per = {}
    for t, label in SEVERAL_TARGETS:
        rs = runs.get(t)
        if not rs:
            continue
        v = {
            "n": sum(r.get("n", 0) for r in rs),
            "ok": sum(r.get("ok", 0) for r in rs),
            "seconds": sum(r.get("seconds", 0) for r in rs),
            "issued": {},
            "failures": sorted({f for r in rs for f in r.get("failures", [])} | {r["note"] for r in rs if r.get("note")}),
        }
        for r in rs:
            for k, c in (r.get("issued") or {}).items():
                v["issued"][k] = v["issued"].get(k, 0) + c
        v["failed"] = v["n"] - v["ok"]
        v["rps"] = v["ok"] / v["seconds"] if v["seconds"] else None
        per[t] = v
        issued = " / ".join(str(v["issued"].get(h, "n/a")) for h in ("ndes01", "ndes02"))
        # scepclient's verdict ends with the CA's own words, after "msg: ".
        why = "; ".join(f.rsplit("msg: ", 1)[-1][:160] for f in v["failures"][:2]) or "–"
        md.append(f"| {label} | {v['n']} | {v['ok']} | {v['failed']} | {fmt_rate(v['rps'])} | {issued} | {why} |")
    md.append("")
    md.append("A PKIOperation is encrypted to the CA certificate its client got from GetCACert, and only that "
              "NDES host can open it. `ip_hash` keeps each client address on one host: here every client comes "
              "from 127.0.0.1, so all went to one host and the other stayed idle. It holds only while a client "
              "keeps one address and every balancer agrees on the hash: a phone behind carrier NAT can leave from "
              "another address between GetCACert and PKIOperation, and balancer replicas that disagree on which "
              "host is up send one client to both; then it fails as `random` does.")
    return per


def cmd_report(a):
    d = a.dir
    runs = load_runs(os.path.join(d, "runs"))
    meta = {}
    if os.path.exists(os.path.join(d, "meta.txt")):
        with open(os.path.join(d, "meta.txt")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v
    out = {"meta": meta, "workloads": {}, "idle": {}}
    md = ["# ndes-gateway side-by-side benchmark", ""]
    md.append(
        f"{meta.get('date', '')}, {meta.get('cpus', '?')} CPUs, kernel {meta.get('kernel', '?')}; "
        f"{meta.get('rounds', '?')} interleaved round(s), medians; wrk -t{meta.get('threads', '?')} "
        f"-c{meta.get('connections', '?')} -d{meta.get('duration', '?')}s (-t{meta.get('tls_threads', '?')} for (d)); "
        f"h2load -c{meta.get('connections', '?')} -m4 -D{meta.get('duration', '?')}; "
        f"{meta.get('enrol', '?')} enrolments {meta.get('enrol_parallel', '?')} at a time; "
        f"{meta.get('idle', '?')} idle connections. Total time {meta.get('elapsed', '?')}; "
        f"load average {meta.get('load', '?')}.")
    md.append("")
    md.append(f"Versions: {meta.get('versions', '')}.")
    md.append("")
    md.append("Memory: peak VmRSS sampled during the run (nginx: its workers; the stand-in's own memory "
              "is not counted for the proxies; for (g) the gateway is the instance whose upstream is the real SCEP path). Errors: non-2xx answers plus socket errors and timeouts, "
              "summed over the rounds. Ratios compare the median rate.")
    md.append("")
    md.append("| workload | target | rate (/s) | p50 ms | p99 ms | errors | peak RSS MiB | vs nginx | vs direct | rounds (/s) |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for w, label in WORKLOADS:
        if w not in runs:
            continue
        per = {}
        for t in TARGETS:
            rs = runs[w].get(t)
            if not rs:
                continue
            per[t] = {
                "rate": med([r.get("rps") for r in rs]),
                "p50_us": med([r.get("p50_us") for r in rs]),
                "p99_us": med([r.get("p99_us") for r in rs]),
                "errors": sum(r.get("errors", 0) for r in rs),
                "non2xx": sum(r.get("non2xx", 0) or 0 for r in rs),
                "rss_peak_kib": med([r.get("rss_peak_kib") for r in rs]),
                "rounds": [r.get("rps") for r in rs],
                "cpu_user_us": med([r.get("cpu_user_us") for r in rs]),
                "cpu_sys_us": med([r.get("cpu_sys_us") for r in rs]),
                "standin_cpu_us": med([r.get("standin_cpu_us") for r in rs]),
                "notes": sorted({r["note"] for r in rs if r.get("note")}
                                | {f for r in rs for f in r.get("failures", [])}),
            }
        for t, v in per.items():
            v["vs_nginx"] = ratio(v["rate"], per.get("nginx", {}).get("rate"))
            v["vs_direct"] = ratio(v["rate"], per.get("direct", {}).get("rate"))
            rounds = " / ".join(fmt_rate(x) for x in v["rounds"])
            errs = str(v["errors"]) + (" (" + "; ".join(v["notes"]) + ")" if v["notes"] else "")
            md.append(f"| {label} | {t} | {fmt_rate(v['rate'])} | {fmt_ms(v['p50_us'])} | {fmt_ms(v['p99_us'])} | "
                      f"{errs} | {fmt_mib(v['rss_peak_kib'])} | {fmt_ratio(v['vs_nginx'])} | {fmt_ratio(v['vs_direct'])} | {rounds} |")
        out["workloads"][w] = {"label": label, "targets": per, "runs": runs[w]}
    cpu_rows = []
    for w, label in WORKLOADS:
        for t, v in out["workloads"].get(w, {}).get("targets", {}).items():
            if v.get("cpu_user_us") is None:
                continue
            user, sys_ = v["cpu_user_us"], v["cpu_sys_us"]
            # For direct the target is the stand-in: one figure, in the stand-in column.
            own = "– | – | –" if t == "direct" else f"{user + sys_:.0f} | {user:.0f} | {sys_:.0f}"
            cpu_rows.append(f"| {label} | {t} | {own} | {v['standin_cpu_us']:.0f} |")
    if cpu_rows:
        md.append("")
        md.append("CPU time per request (microseconds, medians; from /proc, user and system time of the "
                  "target's processes and of the stand-in during each run; the load generator shares the "
                  "machine and is not counted). On a machine this size the request rate follows the sum.")
        md.append("")
        md.append("| workload | target | proxy | user | system | stand-in |")
        md.append("|---|---|---|---|---|---|")
        md.extend(cpu_rows)
    if "several" in runs:
        out["several"] = several_report(md, meta, runs["several"])
    if "idle" in runs:
        md.append("")
        md.append(f"(f) {meta.get('idle', '?')} idle TLS connections, one GetCACaps each, then held; each round "
                  "against a freshly started proxy: VmRSS (nginx: its workers) before opening them, while holding "
                  "them, and after closing them.")
        md.append("")
        md.append("| target | held | errors | open time s | RSS before MiB | RSS holding MiB | KiB per connection | vs nginx | RSS after close MiB | rounds, holding MiB |")
        md.append("|---|---|---|---|---|---|---|---|---|---|")
        per = {}
        for t in TARGETS:
            rs = runs["idle"].get(t)
            if not rs:
                continue
            v = {
                "held": med([r.get("alive") for r in rs]),
                "n": rs[0].get("n"),
                "errors": {},
                "open_seconds": med([r.get("open_seconds") for r in rs]),
                "rss_before_kib": med([r.get("rss_before_kib") for r in rs]),
                "rss_holding_kib": med([r.get("rss_holding_kib") for r in rs]),
                "rss_after_kib": med([r.get("rss_after_kib") for r in rs]),
                "rounds_holding_kib": [r.get("rss_holding_kib") for r in rs],
                "kib_per_conn": med([(r["rss_holding_kib"] - r["rss_before_kib"]) / r["alive"]
                                     for r in rs if r.get("alive")]),
            }
            for r in rs:
                for k, c in (r.get("errors") or {}).items():
                    v["errors"][k] = v["errors"].get(k, 0) + c
                if r.get("note"):
                    v["errors"][r["note"]] = v["errors"].get(r["note"], 0) + 1
            per[t] = v
        for t, v in per.items():
            v["vs_nginx"] = ratio(v["kib_per_conn"], per.get("nginx", {}).get("kib_per_conn"))
            errs = ", ".join(f"{k}: {c}" for k, c in v["errors"].items()) or "0"
            held = "n/a" if v["held"] is None else f"{v['held']:.0f}/{v['n']}"
            kpc = "n/a" if v["kib_per_conn"] is None else f"{v['kib_per_conn']:.1f}"
            md.append(f"| {t} | {held} | {errs} | {v['open_seconds']} | {fmt_mib(v['rss_before_kib'])} | "
                      f"{fmt_mib(v['rss_holding_kib'])} | {kpc} | {fmt_ratio(v['vs_nginx'])} | {fmt_mib(v['rss_after_kib'])} | "
                      + " / ".join(fmt_mib(x) for x in v["rounds_holding_kib"]) + " |")
        out["idle"] = {"targets": per, "runs": runs["idle"]}
    snapshots = sorted(n for n in os.listdir(d) if re.fullmatch(r"gateway-metrics\.\d+\.txt", n))
    if snapshots:
        counters = {}
        for n in snapshots:
            with open(os.path.join(d, n)) as f:
                for line in f:
                    m = re.match(r"(ndes_gateway_(?:rejected_total|upstream_errors_total|connections_refused_total|"
                                 r"tls_handshake_failures_total|requests_total))(\{[^}]*\})?\s+(\S+)", line)
                    if m and float(m.group(3)) > 0:
                        key = m.group(1) + (m.group(2) or "")
                        counters[key] = counters.get(key, 0) + float(m.group(3))
        out["gateway_counters"] = counters
        odd = {k: v for k, v in counters.items()
               if not k.startswith("ndes_gateway_requests_total") or 'status="200"' not in k}
        md.append("")
        md.append("The gateway's own counters (the throughput instance, over all its restarts), other than 200 answers: "
                  + (", ".join(f"`{k}` {v:.0f}" for k, v in sorted(odd.items())) or "none") + ".")
    # scepserver.log, and scepserver-ndes01.log and -ndes02.log for the two NDES hosts.
    ca_logs = sorted(n for n in os.listdir(d) if re.fullmatch(r"scepserver(-\w+)?\.log", n))
    if ca_logs:
        refusals = {}
        for name in ca_logs:
            with open(os.path.join(d, name), errors="replace") as f:
                for line in f:
                    m = re.search(r'msg="failed to sign CSR" err="([^"]*)"', line)
                    # The recorded POST body is made with a wrong challenge on purpose.
                    if m and m.group(1) != "invalid challenge":
                        reason = m.group(1).replace(os.path.abspath(d) + "/", "")
                        refusals[reason] = refusals.get(reason, 0) + 1
        out["ca_refusals"] = refusals
        if refusals:
            md.append("")
            md.append("The CA (scepserver) itself failed to sign: "
                      + ", ".join(f"{c} x `{r}`" for r, c in sorted(refusals.items())) + ".")
    text = "\n".join(md) + "\n"
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    sys.stdout.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ports")
    s.add_argument("n", type=int)
    s.set_defaults(f=cmd_ports)
    s = sub.add_parser("wait-ready")
    s.add_argument("url")
    s.add_argument("seconds", type=float)
    s.set_defaults(f=cmd_wait_ready)
    s = sub.add_parser("pkcsreq")
    s.add_argument("scep_url")
    s.add_argument("out")
    s.add_argument("size", type=int)
    s.set_defaults(f=cmd_pkcsreq)
    s = sub.add_parser("long-target")
    s.add_argument("path")
    s.add_argument("der")
    s.set_defaults(f=cmd_long_target)
    s = sub.add_parser("preflight")
    s.add_argument("name")
    s.add_argument("url")
    s.add_argument("long_target")
    s.add_argument("body")
    s.set_defaults(f=cmd_preflight)
    s = sub.add_parser("h2sum")
    s.add_argument("out")
    s.add_argument("log")
    s.set_defaults(f=cmd_h2sum)
    s = sub.add_parser("idle")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--sni", default="localhost")
    s.add_argument("--path", required=True)
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--concurrency", type=int, default=64)
    s.add_argument("--request", type=int, default=1)
    s.add_argument("--settle", type=float, default=2.0)
    s.add_argument("--pids", required=True)
    s.set_defaults(f=cmd_idle)
    s = sub.add_parser("enrol")
    s.add_argument("--url", required=True)
    s.add_argument("--n", type=int, default=40)
    s.add_argument("--parallel", type=int, default=4)
    s.add_argument("--root", required=True)
    s.add_argument("--challenge", default="secret")
    s.add_argument("--workdir", required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--depot", action="append", default=[], metavar="NAME=DIR",
                   help="a CA's depot: count the certificates it issued to this run")
    s.add_argument("--max-seconds", type=float, default=600,
                   help="start no enrolment after this many seconds")
    s.set_defaults(f=cmd_enrol)
    s = sub.add_parser("report")
    s.add_argument("dir")
    s.set_defaults(f=cmd_report)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
