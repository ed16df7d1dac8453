#!/usr/bin/env python3
"""Load harness of identity-binding-proxy: runs the system as separate processes (kube and
Entra emulators, a static host for the issuer documents, the proxy in `serve` mode) next to an
nginx answering a static JSON of the same size, drives both with wrk and h2load, and writes
target/bench/results.json and target/bench/results.svg. Python 3 standard library only.

Started by benches/load/run.sh, which builds the release binary and installs the tools.
Servers are pinned to core 0, emulators and load generators to core 1. Numbers from one run
are comparable with each other (ours / nginx), not across machines or runs.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "target", "bench")
WORK = os.path.join(OUT, "work")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SCOPE = "https://vault.azure.net/.default"
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(core):
    """taskset prefix: servers on core 0, everything else on core 1 (core 0 on one core)."""
    return ["taskset", "-c", str(min(core, (os.cpu_count() or 1) - 1))]


class Procs:
    """Every process this harness started, stopped by pid at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, env=None, **kw):
        logf = open(os.path.join(WORK, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def http_post_json(url, value):
    req = urllib.request.Request(url, data=json.dumps(value).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pids):
    """User + system CPU time of processes, in seconds (from /proc/<pid>/stat)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / hz


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def with_cpu(pids, run):
    """Runs `run()` and adds the servers' CPU time per request and their utilisation: when the
    load generator, not the server, is the bottleneck (full handshakes), CPU per request is the
    fair comparison."""
    c0, t0 = cpu_seconds(pids), time.monotonic()
    r = run()
    cpu, wall = cpu_seconds(pids) - c0, time.monotonic() - t0
    done = r.get("succeeded", r.get("requests", 0))
    r["cpu_us_per_req"] = cpu / done * 1e6 if done else 0.0
    r["cpu_util"] = cpu / wall if wall else 0.0
    return r


def metric(admin, name, labels=""):
    """Sum of the samples of one Prometheus metric whose labels contain `labels`."""
    _, body = http_get(f"http://127.0.0.1:{admin}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def form(client_id, scope, token):
    return urllib.parse.urlencode([
        ("grant_type", "client_credentials"), ("client_id", client_id), ("scope", scope),
        ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", token),
        ("client_info", "1"),
    ])


class TlsClient:
    """HTTP/1.1 keep-alive over TLS to 127.0.0.1 with a chosen SNI name (certs not verified:
    the load tools do not verify either)."""

    def __init__(self, port, sni):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.port, self.sni, self.ctx = port, sni, ctx
        self.conn = None

    def _connect(self):
        conn = http.client.HTTPSConnection(self.sni, self.port, context=self.ctx, timeout=30)
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        conn.sock = self.ctx.wrap_socket(sock, server_hostname=self.sni)
        return conn

    def post(self, path, body):
        for attempt in range(2):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request("POST", path, body=body, headers={
                    "content-type": "application/x-www-form-urlencoded"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")


# ---------------------------------------------------------------- load generators

WRK_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"status_errors\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
'''


def lua_static(path, body, close=False):
    extra = 'wrk.headers["Connection"] = "close"\n' if close else ""
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\n'
            'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
            f'{extra}wrk.body = [==[{body}]==]\n' + WRK_DONE)


def lua_rotating(path, bodies_file):
    """Round-robin over one form body per line of `bodies_file`."""
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\n'
            'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
            f'local bodies = {{}}\nfor line in io.lines("{bodies_file}") do bodies[#bodies + 1] = line end\n'
            'local i = 0\n'
            'init = function(args) i = math.random(#bodies) end\n'
            'request = function()\n  i = i % #bodies + 1\n'
            '  return wrk.format(nil, nil, nil, bodies[i])\nend\n' + WRK_DONE)


def lua_distinct_scopes(path, prefix, suffix, run_id, limit):
    """A new scope (cache key) per request, up to `limit` per thread, then repeats the last."""
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\n'
            'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
            'local n = 0\n'
            'request = function()\n'
            f'  if n < {limit} then n = n + 1 end\n'
            f'  local body = [==[{prefix}]==] .. "https%3A%2F%2Fr{run_id}-" .. n .. ".example%2F.default" .. [==[{suffix}]==]\n'
            '  return wrk.format(nil, nil, nil, body)\nend\n' + WRK_DONE)


def run_wrk(name, url, script, duration, conns, timeout=None):
    lua = os.path.join(WORK, f"{name}.lua")
    with open(lua, "w") as f:
        f.write(script)
    argv = pin(1) + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s",
                     "--latency", "-s", lua, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or duration + 60)
    with open(os.path.join(WORK, f"{name}.wrk.txt"), "w") as f:
        f.write(out.stdout + out.stderr)
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if not m:
        raise SystemExit(f"wrk {name} failed:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def proxy_miss_overheads(log_file, skip=0):
    """Sorted (latency_us - upstream_us) of the cache misses in a proxy's JSON request log,
    after the first `skip` of them."""
    out = []
    with open(log_file) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            fields = record.get("fields", record)  # flattened or nested JSON events
            if fields.get("message") == "token request" and fields.get("cache") == "miss":
                out.append(fields["latency_us"] - fields["upstream_us"])
    return sorted(out[skip:])


def percentile(sorted_values, p):
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run_h2load(name, url, body_file, extra, timeout=120):
    """h2load against url: POSTs of body_file, or GETs when body_file is None."""
    logf = os.path.join(WORK, f"{name}.h2load.log")
    post = (["-d", body_file, "-H", "content-type: application/x-www-form-urlencoded"]
            if body_file else [])
    argv = pin(1) + ["h2load"] + post + [f"--log-file={logf}"] + extra + [url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    with open(os.path.join(WORK, f"{name}.h2load.txt"), "w") as f:
        f.write(out.stdout + out.stderr)
    rows = []
    with open(logf) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    ok = [r for r in rows if 200 <= r[1] < 300]
    lat = sorted(r[2] for r in ok)
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out.stdout)
    res = {
        "requests": len(rows), "succeeded": len(ok), "failed": len(rows) - len(ok),
        "rps": float(m.group(3)) if m else 0.0,
        "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
        "p999_us": percentile(lat, 99.9), "max_us": lat[-1] if lat else 0,
    }
    if rows:
        first = min(r[0] for r in rows)
        last = max(r[0] + r[2] for r in rows)
        res["span_us"] = last - first
        if res["rps"] == 0.0 and res["span_us"]:
            res["rps"] = len(ok) / (res["span_us"] / 1e6)
    return res


# ---------------------------------------------------------------- the system under test

RBAC = """apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: use-bench-identity
rules:
  - apiGroups: ["cid.wi.aks.azure.com"]
    resources: ["{client_id}"]
    verbs: ["use-managed-identity"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: bench-uses-bench-identity
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: use-bench-identity
subjects:
  - kind: ServiceAccount
    name: demo
    namespace: demo
  - kind: Group
    name: system:serviceaccounts:load
"""

NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    http2_max_concurrent_streams 128;
    server {{
        listen 127.0.0.1:{port} ssl {http2_listen};
        {http2_directive}
        server_name {sni};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


class System:
    def __init__(self, args, procs):
        self.args, self.procs = args, procs
        self.bin = os.path.abspath(args.bin)
        self.sni = args.sni
        self.tenant = str(uuid.uuid4())
        self.client_id = str(uuid.uuid4())
        self.ports = {k: free_port() for k in ("kube", "entra", "docs", "proxy", "admin", "nginx",
                                               "entra_tls", "entra_shim", "relay", "peer")}
        self.proxy = None
        self.peer = None

    def run(self, *argv):
        return subprocess.run([self.bin, *argv], check=True, capture_output=True, text=True).stdout

    def setup(self):
        p = self.ports
        self.cert, self.key = os.path.join(WORK, "tls.crt"), os.path.join(WORK, "tls.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", self.key, "-out",
                        self.cert, "-days", "2", "-subj", f"/CN={self.sni}", "-addext",
                        f"subjectAltName=DNS:{self.sni}"], check=True, capture_output=True)
        log(f"ECDSA P-256 certificate for {self.sni}")
        rbac = os.path.join(WORK, "rbac.yaml")
        with open(rbac, "w") as f:
            f.write(RBAC.format(client_id=self.client_id))
        self.procs.start("kube", pin(1) + [self.bin, "emulate", "kube", "--listen",
                         f"127.0.0.1:{p['kube']}", "--state-dir", os.path.join(WORK, "kube"),
                         "--rbac", rbac])
        wait_port(p["kube"])
        log(f"kube emulator on 127.0.0.1:{p['kube']}")
        self.run("issuer", "keygen", "--out", os.path.join(WORK, "issuer.key"))
        self.bindings = os.path.join(WORK, "bindings.yaml")
        with open(self.bindings, "w") as f:
            f.write(f"bindings:\n  - clientId: {self.client_id}\n    tenantId: {self.tenant}\n")
        self.issuer_url = f"http://127.0.0.1:{p['docs']}/{{tenant}}/{{client_id}}"
        docs = os.path.join(WORK, "issuer-docs")
        self.run("issuer", "publish", "--out", docs, "--public-key",
                 os.path.join(WORK, "issuer.pub"), "--bindings", self.bindings,
                 "--issuer-url", self.issuer_url)
        self.procs.start("issuer-docs", pin(1) + [sys.executable, "-m", "http.server",
                         str(p["docs"]), "--bind", "127.0.0.1", "--directory", docs])
        wait_port(p["docs"])
        log(f"issuer documents on http://127.0.0.1:{p['docs']} (python3 -m http.server)")
        issuer = f"http://127.0.0.1:{p['docs']}/{self.tenant}/{self.client_id}"
        self.procs.start("entra", pin(1) + [self.bin, "emulate", "entra", "--listen",
                         f"127.0.0.1:{p['entra']}", "--fic",
                         f"client_id={self.client_id},issuer={issuer},subject={self.client_id},"
                         "audience=api://AzureADTokenExchange", "--latency-ms", "0",
                         # As Entra does: the issuer documents are not fetched per exchange.
                         "--issuer-metadata-ttl-secs", "300"])
        wait_port(p["entra"])
        log(f"Entra emulator on 127.0.0.1:{p['entra']}")
        self.token = self.mint("demo", "demo")

    def mint(self, namespace, sa):
        return self.run("dev", "token", "--state-dir", WORK, "--namespace", namespace,
                        "--service-account", sa, "--expires-in", "7200").strip()

    def entra(self, path):
        return f"http://127.0.0.1:{self.ports['entra']}/_emulator/{path}"

    def entra_stats(self):
        return json.loads(http_get(self.entra("stats"))[1])

    def set_entra_latency(self, ms):
        http_post_json(self.entra("config"), {"latency_ms": ms})

    def start_proxy(self, log_level="info", name="proxy", extra=()):
        """Starts `serve`; returns the milliseconds from process start to /readyz = 200.
        `info` is `serve`'s default (one JSON line per request): what users run."""
        p = self.ports
        env = dict(os.environ, RUST_LOG=log_level)
        argv = pin(0) + [
            self.bin, "serve", "--kubeconfig", os.path.join(WORK, "kube", "kubeconfig"),
            "--tls", f"{self.sni}={self.cert},{self.key}",
            "--issuer-key", os.path.join(WORK, "issuer.key"), "--issuer-url", self.issuer_url,
            "--bindings", self.bindings, "--authority-host", f"http://127.0.0.1:{p['entra']}",
            "--listen", f"127.0.0.1:{p['proxy']}", "--admin-listen", f"127.0.0.1:{p['admin']}",
            "--worker-threads", "1", "--log-format", "json",
            # Room for scenario (h)'s distinct entries without eviction.
            "--cache-capacity", str(self.args.entries * 2 + 10_000),
            # (f) and (h) send one caller's requests for one identity with a new scope each:
            # exactly what the per-caller budget and the per-identity entry bound refuse in
            # production. Lifted here so those scenarios measure the miss path and memory.
            "--caller-miss-budget", "1000000000",
            "--cache-max-keys-per-identity", str(self.args.entries * 2 + 10_000),
            *extra,
        ]
        started = time.monotonic()
        self.proxy = self.procs.start(name, argv, env=env)
        url = f"http://127.0.0.1:{p['admin']}/readyz"
        while True:
            if self.proxy.poll() is not None:
                raise SystemExit(f"the proxy exited ({self.proxy.returncode}); see {WORK}/proxy.log")
            try:
                if http_get(url, timeout=0.5)[0] == 200:
                    return (time.monotonic() - started) * 1000
            except OSError:
                pass
            if time.monotonic() - started > 30:
                raise SystemExit("the proxy was not ready within 30 s")
            time.sleep(0.002)

    def stop_proxy(self):
        self.procs.stop(self.proxy, signal.SIGINT)  # no shutdown delay
        self.proxy = None

    def start_nginx(self, body):
        d = os.path.join(WORK, "nginx")
        os.makedirs(d, exist_ok=True)
        new_syntax = nginx_version() >= (1, 25, 1)
        conf = NGINX_CONF.format(
            dir=d, port=self.ports["nginx"], sni=self.sni, cert=self.cert, key=self.key,
            body=body, http2_listen="" if new_syntax else "http2",
            http2_directive="http2 on;" if new_syntax else "")
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.nginx = self.procs.start("nginx", pin(0) + ["nginx", "-p", d, "-c", path])
        wait_port(self.ports["nginx"])


# ---------------------------------------------------------------- the peer

PEER_AUTHORITY = "login.microsoftonline.com"

# The TLS front of the Entra emulator for the peer (MSAL needs an https authority): our CA's
# certificate for the public authority's name, reached through PeerRelay. MSAL asks a host it
# trusts only for its tenant's OpenID configuration; the emulator answers that, and its token
# endpoint (the emulator's own plain-HTTP URL) is then called directly.
NGINX_ENTRA_TLS_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {host};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{shim};
        }}
    }}
}}
"""

def start_entra_shim(port, entra_port, authority):
    """Between the TLS front and the Entra emulator: answers instance discovery as Entra does
    for its own host, and the tenant's OpenID configuration names the public authority instead
    of the emulator's own URL, so the token requests also come through the front."""
    import http.server
    entra = f"http://127.0.0.1:{entra_port}"

    class Shim(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def forward(self, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", entra_port, timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "connection")}
            if body is not None:
                headers["content-length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            conn.close()
            if "/openid-configuration" in self.path:
                data = data.replace(entra.encode(), f"https://{authority}".encode())
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/common/discovery/instance"):
                return self.instance_discovery()
            self.forward()

        def instance_discovery(self):
            # What Entra answers for its own host: the host is its own alias, and where the
            # tenant's OpenID configuration is (MSAL caches tokens per resolved host).
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            endpoint = query.get("authorization_endpoint", [""])[0]
            tenant = urllib.parse.urlsplit(endpoint).path.strip("/").split("/")[0] or "common"
            data = json.dumps({
                "tenant_discovery_endpoint":
                    f"https://{authority}/{tenant}/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": authority, "preferred_cache": authority,
                              "aliases": [authority]}],
            }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json; charset=utf-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.forward(self.rfile.read(int(self.headers.get("content-length", "0"))))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Shim)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class PeerRelay(threading.Thread):
    """An HTTP CONNECT proxy (HTTPS_PROXY of the peer) that takes CONNECTs to the public
    authority to the emulator's TLS front on loopback and refuses every other host: nothing
    leaves the machine."""

    def __init__(self, port, authority, front_port):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.allowed = f"{authority}:443"
        self.front_port = front_port
        self.connects = 0

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = conn.recv(4096)
                if not chunk:
                    return conn.close()
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] != "CONNECT" or line[1] != self.allowed:
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                return conn.close()
            self.connects += 1
            upstream = socket.create_connection(("127.0.0.1", self.front_port))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()
        except OSError:
            conn.close()


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def issuer_assertion(sysm, lifetime_secs=7000):
    """A client assertion for the bench identity, as our proxy would sign it (issuer key,
    published kid): what a pod's projected token is to Entra in classic workload identity."""
    jwks_file = os.path.join(WORK, "issuer-docs", sysm.tenant, sysm.client_id, "openid", "v1", "jwks")
    with open(jwks_file) as f:
        kid = json.load(f)["keys"][0]["kid"]
    key = rsa_key(os.path.join(WORK, "issuer.key"))
    now = int(time.time())
    header = {"alg": "RS256", "kid": kid, "typ": "JWT"}
    claims = {"iss": f"http://127.0.0.1:{sysm.ports['docs']}/{sysm.tenant}/{sysm.client_id}",
              "sub": sysm.client_id, "aud": "api://AzureADTokenExchange", "iat": now,
              "nbf": now, "exp": now + lifetime_secs, "jti": str(uuid.uuid4())}
    enc = lambda v: b64url(json.dumps(v, separators=(",", ":")).encode())
    signing_input = enc(header) + b"." + enc(claims)
    return (signing_input + b"." + b64url(rs256(key, signing_input))).decode()


def start_entra_front(sysm):
    """The Entra emulator as the public authority over HTTPS, for clients that need one (the
    peer, the SDK in classic workload identity): a CA, the TLS front (nginx) with the CA's
    certificate for the authority's name, the shim, and the CONNECT relay that is their
    HTTPS_PROXY. Started once; returns the CA certificate's path."""
    if getattr(sysm, "front_ca", None):
        return sysm.front_ca
    p = sysm.ports
    d = os.path.join(WORK, "peer")
    os.makedirs(d, exist_ok=True)
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.crt")
    key, csr, cert = (os.path.join(d, n) for n in ("front.key", "front.csr", "front.crt"))
    ext = os.path.join(d, "front.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{PEER_AUTHORITY}\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    for argv in (
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench peer CA"],
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", f"/CN={PEER_AUTHORITY}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(argv, check=True, capture_output=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_ENTRA_TLS_CONF.format(dir=d, port=p["entra_tls"], host=PEER_AUTHORITY,
                                            cert=cert, key=key, shim=p["entra_shim"]))
    sysm.entra_shim = start_entra_shim(p["entra_shim"], p["entra"], PEER_AUTHORITY)
    sysm.procs.start("entra-tls", pin(1) + ["nginx", "-p", d, "-c", conf])
    wait_port(p["entra_tls"])
    relay = PeerRelay(p["relay"], PEER_AUTHORITY, p["entra_tls"])
    relay.start()
    sysm.peer_relay = relay
    sysm.front_ca = ca
    return ca


def start_peer(sysm, peer_bin):
    """The workload identity project's token proxy (pinned to core 0 like ours) against the
    same Entra emulator, through a TLS front and a CONNECT relay; returns its base URL."""
    p = sysm.ports
    d = os.path.join(WORK, "peer")
    ca = start_entra_front(sysm)
    token_file = os.path.join(d, "token")
    with open(token_file, "w") as f:
        f.write(issuer_assertion(sysm))
    env = dict(os.environ, AZURE_CLIENT_ID=sysm.client_id, AZURE_TENANT_ID=sysm.tenant,
               AZURE_FEDERATED_TOKEN_FILE=token_file,
               AZURE_AUTHORITY_HOST=f"https://{PEER_AUTHORITY}/", SSL_CERT_FILE=ca,
               HTTPS_PROXY=f"http://127.0.0.1:{p['relay']}", NO_PROXY="127.0.0.1,localhost",
               GOMAXPROCS="1")
    sysm.peer = sysm.procs.start("peer", pin(0) + [peer_bin, "--proxy-port", str(p["peer"])],
                                 env=env)
    wait_port(p["peer"])
    return f"http://127.0.0.1:{p['peer']}"


def lua_get(path):
    return f'wrk.method = "GET"\nwrk.path = "{path}"\n' + WRK_DONE


def peer_scenarios(sysm, S, peer_url, D, conns, rate):
    """(j) the peer: cache-hit throughput and CPU per request, p99 at the rate of (d), and
    Entra calls for 1000 concurrent requests for one cold resource."""
    resource = SCOPE[: -len("/.default")]
    path = f"/metadata/identity/oauth2/token?resource={urllib.parse.quote(resource, safe='')}" \
           f"&client_id={sysm.client_id}"
    status, resp = http_get(peer_url + path, timeout=30)
    if status != 200 or "access_token" not in json.loads(resp):
        raise SystemExit(f"the peer refused the warm-up request: {status} {resp[:300]!r}")
    j = {"response_bytes": len(resp), "pid": sysm.peer.pid}
    log(f"(j) peer: cache hit, HTTP/1.1 keep-alive (plain HTTP), {conns} connections, {D}s")
    j["a_h1_keepalive"] = with_cpu([sysm.peer.pid], lambda: run_wrk(
        "j-a-peer", peer_url + path, lua_get(path), D, conns))
    log_rate(j["a_h1_keepalive"])
    log(f"(j) peer: {rate} req/s (the rate of (d)), HTTP/1.1, {D}s")
    j["d_latency"] = run_h2load("j-d-peer", peer_url + path, None,
                                ["--h1", "-c", "8", "-t", "1", "--rps", str(max(1, rate // 8)),
                                 "-D", str(D)])
    r = j["d_latency"]
    log(f"    p50 {r['p50_us']} us  p99 {r['p99_us']} us  p99.9 {r['p999_us']} us")
    sysm.set_entra_latency(100)
    cold = f"https://fanin-peer-{uuid.uuid4().hex[:8]}.example"
    cold_path = f"/metadata/identity/oauth2/token?resource={urllib.parse.quote(cold, safe='')}" \
                f"&client_id={sysm.client_id}"
    before = sysm.entra_stats()["tokens_issued"]
    log("(j) peer: 1000 concurrent requests for one uncached resource (1000 connections)")
    e = run_h2load("j-e-peer", peer_url + cold_path, None,
                   ["--h1", "-n", "1000", "-c", "1000", "-t", "1"])
    time.sleep(0.5)
    e["entra_calls"] = sysm.entra_stats()["tokens_issued"] - before
    sysm.set_entra_latency(0)
    j["e_cold_fanin"] = e
    log(f"    {e['succeeded']}/1000 ok, Entra calls {e['entra_calls']}")
    S["j_peer"] = j


# ---------------------------------------------------------------- (k) what a node saves

SAVINGS_PS = (1, 10, 100)
SAVINGS_LIFETIME = 60   # seconds: the compressed token lifetime (a 1 h token's clock / 60)
SAVINGS_WARM = 2        # seconds after every pod has its first token before the window opens
SAVINGS_START_TIMEOUT = 90  # seconds for every pod to have its first token


def pod_rss_mib(pods):
    total = 0
    for p in pods:
        try:
            total += rss_kib(p.pid)
        except OSError:
            pass
    return total / 1024


def patient(read):
    """`read()`, tried for up to ~30 s: while a hundred interpreters start, the emulator's or
    the proxy's admin port may answer later than http_get's 2 s."""
    for attempt in range(10):
        try:
            return read()
        except OSError:
            if attempt == 9:
                raise
            time.sleep(1.0)


def savings_phase(sysm, mode, n, env_of, window, python):
    """n pods (Python SDK processes) of `mode` asking get_token once a second. The window opens
    once every pod has its first token (n first calls seen by Entra, or by the proxy) and lasts
    `window` seconds; Entra's calls are counted by the emulator when it opens and closes."""
    admin = sysm.ports["admin"]
    script = os.path.join(ROOT, "benches", "load", "savings_pod.py")
    stagger = min(10.0, 0.05 * n)  # 100 interpreters started over 5 s, not at once
    served = lambda: patient(lambda: metric(admin, "identity_binding_proxy_requests_total")
                             if mode == "proxy" else 0)
    issued = lambda: patient(lambda: sysm.entra_stats()["tokens_issued"])
    t0 = time.time()
    # A hard cap for every pod, whatever happens to this harness.
    cap = t0 + stagger + SAVINGS_START_TIMEOUT + window + 30
    issued0, served0 = issued(), served()
    pods, logs = [], []
    try:
        for i in range(n):
            time.sleep(max(0.0, t0 + stagger * i / n - time.time()))
            logs.append(open(os.path.join(WORK, f"k-{mode}-{n}-{i}.log"), "wb"))
            pods.append(subprocess.Popen(
                [python, script, mode, SCOPE, f"{cap:.3f}"], env=env_of(i),
                stdout=subprocess.PIPE, stderr=logs[-1], start_new_session=True))
        # Every pod's first get_token is a call: to Entra (direct) or to the proxy.
        first = (lambda: issued() - issued0) if mode == "direct" else (lambda: served() - served0)
        while first() < n:
            if time.time() - t0 > stagger + SAVINGS_START_TIMEOUT:
                log(f"    only {first():.0f} of {n} pods had a token after "
                    f"{SAVINGS_START_TIMEOUT} s; the window opens anyway")
                break
            if all(p.poll() is not None for p in pods):
                break
            time.sleep(0.2)
        started = time.time() - t0
        time.sleep(SAVINGS_WARM)
        opened = time.time()
        issued1, served1 = issued(), served()
        time.sleep(window / 2)
        rss_mib = pod_rss_mib(pods)
        time.sleep(max(0.0, opened + window - time.time()))
        closed = time.time()
        issued2, served2 = issued(), served()
    finally:
        for pod in pods:
            if pod.poll() is None:
                try:
                    os.killpg(pod.pid, signal.SIGTERM)  # the pod prints its summary and exits
                except OSError:
                    pass
    ok = failed = 0
    errors, expires = [], []
    for pod in pods:
        try:
            out, _ = pod.communicate(timeout=20)
            line = out.decode().strip().splitlines()[-1] if out.strip() else ""
            r = json.loads(line) if line else {"ok": 0, "failed": 1,
                                               "error": f"exit {pod.returncode}, no summary"}
        except subprocess.TimeoutExpired:
            os.killpg(pod.pid, signal.SIGKILL)
            pod.wait()
            r = {"ok": 0, "failed": 1, "error": "still running 20 s after SIGTERM (killed)"}
        ok += r["ok"]
        failed += r["failed"]
        if r.get("error"):
            errors.append(r["error"])
        if r.get("first_expires_in") is not None:
            expires.append(r["first_expires_in"])
    for f in logs:
        f.close()
    span = closed - opened
    calls = issued2 - issued1
    res = {
        "pods": n, "mode": mode, "window_s": round(span, 1), "stagger_s": stagger,
        "all_started_s": round(started, 1),
        "entra_calls_total": issued2 - issued0, "entra_calls_window": calls,
        # One token lifetime of the compressed clock is one hour of a 1 h token's clock.
        "entra_calls_per_compressed_hour": round(calls * SAVINGS_LIFETIME / span, 1),
        "get_token_ok": ok, "get_token_failed": failed,
        "pods_without_summary_or_failed": sum(1 for p in pods if p.returncode not in (0, -15)),
        "first_errors": errors[:3], "pods_rss_mib_mid_window": round(rss_mib),
        "first_token_expires_in_s": [min(expires), max(expires)] if expires else None,
    }
    if mode == "proxy":
        res["proxy_requests_window"] = int(served2 - served1)
    return res


def savings_scenario(sysm, S, args, quick):
    """(k) P pods on one node using one identity and scope: Entra calls with classic workload
    identity (each pod's SDK calls Entra itself) against the same SDK through our proxy, over a
    compressed token lifetime (a shorter window in a quick run)."""
    window = 30 if quick else SAVINGS_LIFETIME
    python = args.sdk_python
    ps = [int(n) for n in args.savings_pods.split(",")]
    p = sysm.ports
    ca = start_entra_front(sysm)
    http_post_json(sysm.entra("config"), {"token_lifetime_secs": SAVINGS_LIFETIME,
                                          "latency_ms": 0})
    d = os.path.join(WORK, "savings")
    os.makedirs(d, exist_ok=True)
    most = max(ps)
    log(f"(k) minting SA tokens of {most} service accounts and {most} pod assertions")
    sa_tokens = mint_many(sysm, most, most)
    sa_files, assertion_files = [], []
    for i in range(most):
        for files, name, value in ((sa_files, f"sa-{i}.jwt", sa_tokens[i]),
                                   (assertion_files, f"assertion-{i}.jwt", issuer_assertion(sysm))):
            path = os.path.join(d, name)
            with open(path, "w") as f:
                f.write(value)
            files.append(path)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AZURE_", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"))}
    base.update(AZURE_CLIENT_ID=sysm.client_id, AZURE_TENANT_ID=sysm.tenant,
                AZURE_AUTHORITY_HOST=f"https://{PEER_AUTHORITY}/", PYTHONDONTWRITEBYTECODE="1")

    def direct_env(i):
        # requests (under azure-core) trusts REQUESTS_CA_BUNDLE (else certifi), not SSL_CERT_FILE.
        return dict(base, AZURE_FEDERATED_TOKEN_FILE=assertion_files[i],
                    HTTPS_PROXY=f"http://127.0.0.1:{p['relay']}", NO_PROXY="127.0.0.1,localhost",
                    REQUESTS_CA_BUNDLE=ca, SSL_CERT_FILE=ca)

    def proxy_env(i):
        return dict(base, AZURE_FEDERATED_TOKEN_FILE=sa_files[i],
                    AZURE_KUBERNETES_TOKEN_PROXY=f"https://127.0.0.1:{p['proxy']}",
                    AZURE_KUBERNETES_SNI_NAME=sysm.sni, AZURE_KUBERNETES_CA_FILE=sysm.cert)

    k = {"token_lifetime_s": SAVINGS_LIFETIME, "window_s": window, "get_token_every_s": 1,
         "proxy_cache_min_remaining_s": round(300 * SAVINGS_LIFETIME / 3600),
         "sdk": sdk_versions(python), "uptime_before": uptime(), "rows": []}
    for n in ps:
        log(f"(k) {n} pod(s), classic workload identity (each SDK calls Entra), {window}s window")
        r = savings_phase(sysm, "direct", n, direct_env, window, python)
        log(f"    Entra calls in the window {r['entra_calls_window']} "
            f"({r['entra_calls_per_compressed_hour']}/compressed h); get_token ok "
            f"{r['get_token_ok']} failed {r['get_token_failed']}; pods {r['pods_rss_mib_mid_window']} MiB")
        k["rows"].append(r)
        # A fresh proxy per P: nothing cached from the previous phase. Its "hour" is scaled as
        # the token's: 300 s of a 1 h token's minimum remaining lifetime are 5 s of 60 s.
        if sysm.proxy is not None:
            sysm.stop_proxy()
        sysm.start_proxy(name=f"proxy-k-{n}", extra=[
            "--cache-min-remaining-secs", str(k["proxy_cache_min_remaining_s"])])
        log(f"(k) {n} pod(s) through the proxy, {window}s window")
        r = savings_phase(sysm, "proxy", n, proxy_env, window, python)
        log(f"    Entra calls in the window {r['entra_calls_window']} "
            f"({r['entra_calls_per_compressed_hour']}/compressed h); proxy requests "
            f"{r['proxy_requests_window']}; get_token ok {r['get_token_ok']} failed "
            f"{r['get_token_failed']}; pods {r['pods_rss_mib_mid_window']} MiB")
        k["rows"].append(r)
    sysm.stop_proxy()
    k["uptime_after"] = uptime()
    http_post_json(sysm.entra("config"), {"token_lifetime_secs": 3599})
    S["k_savings"] = k


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def sdk_versions(python):
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(' '.join("
                          "f'{p}=={m.version(p)}' for p in ('azure-identity', 'azure-core', "
                          "'msal', 'requests')))"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()[-300:]


# ---------------------------------------------------------------- scenarios

# Pairs of (ours, nginx) runs for the ratios of (a), (b) and (d), the first pair included: one
# pair's ratio moves by up to 10 % from run to run on a shared machine (p99 by more).
RATIO_PAIRS = 3


def ratio_pairs(scenario, servers, label, run, metric="rps"):
    """Runs RATIO_PAIRS - 1 more (ours, nginx) pairs after the scenario's first, alternating
    which server goes first, and keeps each pair's `metric` and ratio in `scenario["pairs"]`."""
    pairs = [(scenario["ours"][metric], scenario["nginx"][metric])]
    for i in range(1, RATIO_PAIRS):
        got = {}
        for name, url in (servers if i % 2 == 0 else list(reversed(servers))):
            log(f"{label} pair {i + 1} of {RATIO_PAIRS}: {name}")
            got[name] = run(name, url, i)[metric]
        pairs.append((got["ours"], got["nginx"]))
    scenario["pairs"] = [{"ours": o, "nginx": n, "ratio": ratio(o, n)} for o, n in pairs]
    ratios = [p["ratio"] for p in scenario["pairs"]]
    scenario["median_ratio"] = statistics.median(ratios)
    log(f"    ours/nginx per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"median {scenario['median_ratio']:.3f}")


def log_rate(r):
    log(f"    {r['rps']:.0f} req/s, server CPU {r['cpu_us_per_req']:.1f} us/request "
        f"({r['cpu_util'] * 100:.0f} % of a core)")


def hold(sysm, ours_url, nginx_url, path, body):
    """Keeps the system up, with the load script written out, until interrupted."""
    lua = os.path.join(WORK, "hold.lua")
    with open(lua, "w") as f:
        f.write(lua_static(path, body))
    log(f"holding: proxy pid {sysm.proxy.pid}, load script {lua}")
    log(f"    e.g. taskset -c 1 wrk -t1 -c32 -d10s -s {lua} {ours_url}")
    log(f"    nginx: {nginx_url}; Ctrl-C to stop")
    while True:
        time.sleep(3600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--sni", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peer", help="the workload identity token proxy binary (cmd/proxy)")
    ap.add_argument("--hold", action="store_true",
                    help="after (a), keep every server up for profiling until interrupted")
    ap.add_argument("--sdk-python",
                    help="a python with azure-identity: runs (k), what a node saves")
    ap.add_argument("--savings", action="store_true", help="run only (k), what a node saves")
    ap.add_argument("--savings-pods", default=",".join(map(str, SAVINGS_PS)),
                    help="(k)'s pod counts, comma-separated")
    args = ap.parse_args()
    quick = args.quick
    D = 3 if quick else 10                   # seconds per throughput run
    args.entries = 20_000 if quick else 100_000
    n_tokens = 2_000 if quick else 10_000
    conns = 32

    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    procs = Procs()
    # SIGTERM or a closed terminal stops every server too, as Ctrl-C does (a background job
    # ignores SIGINT, so `--hold` started with `&` is stopped with `kill`).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    results = {"quick": quick, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), "scenarios": {}}
    S = results["scenarios"]
    if args.savings:
        if not args.sdk_python:
            raise SystemExit("--savings needs --sdk-python")
        try:
            sysm = System(args, procs)
            sysm.setup()
            savings_scenario(sysm, S, args, quick)
        finally:
            procs.stop_all()
        report_savings(results)
        return
    try:
        sysm = System(args, procs)
        sysm.setup()

        # (i) start-up, three times; the last instance stays up.
        times = []
        for i in range(3):
            times.append(sysm.start_proxy())
            if i < 2:
                sysm.stop_proxy()
        S["i_startup"] = {"ms_runs": [round(t, 1) for t in times],
                          "ms_median": round(statistics.median(times), 1)}
        log(f"(i) start-up to /readyz: {S['i_startup']['ms_runs']} ms")
        time.sleep(1.0)
        idle_rss = rss_kib(sysm.proxy.pid)
        log(f"(h) idle RSS {idle_rss} KiB")

        p = sysm.ports
        path = f"/{sysm.tenant}/oauth2/v2.0/token"
        body = form(sysm.client_id, SCOPE, sysm.token)
        body_file = os.path.join(WORK, "body.form")
        with open(body_file, "w") as f:
            f.write(body)
        client = TlsClient(p["proxy"], sysm.sni)
        status, resp = client.post(path, body)
        if status != 200:
            raise SystemExit(f"the proxy refused the load request: {status} {resp[:300]!r}")
        token_len = len(json.loads(resp)["access_token"])
        # nginx answers a static JSON of the same length as our answer.
        pad = len(resp) - len(b'{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,'
                              b'"refresh_in":1799,"access_token":""}')
        static = ('{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,'
                  '"refresh_in":1799,"access_token":"' + "x" * max(pad, 0) + '"}')
        sysm.start_nginx(static)
        log(f"nginx on 127.0.0.1:{p['nginx']}: static JSON of {len(static)} bytes "
            f"(ours {len(resp)} bytes; emulator access token {token_len} bytes)")
        ours_url = f"https://{sysm.sni}:{p['proxy']}{path}"
        nginx_url = f"https://{sysm.sni}:{p['nginx']}{path}"
        servers = [("ours", ours_url), ("nginx", nginx_url)]
        pids = {"ours": [sysm.proxy.pid], "nginx": children(sysm.nginx.pid)}

        # (a) cache hit, HTTP/1.1 keep-alive, one SA token.
        S["a_h1_keepalive"] = {}
        for name, url in servers:
            log(f"(a) HTTP/1.1 keep-alive, {conns} connections, {D}s: {name}")
            S["a_h1_keepalive"][name] = with_cpu(pids[name], lambda: run_wrk(
                f"a-{name}", url, lua_static(path, body), D, conns))
            log_rate(S["a_h1_keepalive"][name])
        ratio_pairs(S["a_h1_keepalive"], servers, "(a)", lambda name, url, i: with_cpu(
            pids[name], lambda: run_wrk(f"a-{name}-{i}", url, lua_static(path, body), D, conns)))
        if args.hold:
            hold(sysm, ours_url, nginx_url, path, body)

        # (b) cache hit over h2: 4 connections x 32 streams.
        S["b_h2"] = {}
        for name, url in servers:
            log(f"(b) h2, 4 connections x 32 streams, {D}s: {name}")
            S["b_h2"][name] = with_cpu(pids[name], lambda: run_h2load(
                f"b-{name}", url, body_file, ["-c", "4", "-m", "32", "-t", "1", "-D", str(D)]))
            log_rate(S["b_h2"][name])
        ratio_pairs(S["b_h2"], servers, "(b)", lambda name, url, i: with_cpu(
            pids[name], lambda: run_h2load(f"b-{name}-{i}", url, body_file,
                                           ["-c", "4", "-m", "32", "-t", "1", "-D", str(D)])))

        # (c) a new TLS connection (full TLS 1.3 handshake) per request.
        S["c_new_conn"] = {}
        for name, url in servers:
            log(f"(c) new TLS connection per request, {conns} connections, {D}s: {name}")
            S["c_new_conn"][name] = with_cpu(pids[name], lambda: run_wrk(
                f"c-{name}", url, lua_static(path, body, close=True), D, conns))
            log_rate(S["c_new_conn"][name])

        # (d) latency at 50 % of our (a) rate, HTTP/1.1, 8 connections, both servers.
        rate = max(8, int(S["a_h1_keepalive"]["ours"]["rps"] * 0.5))
        S["d_latency_half_load"] = {"rate": rate}
        for name, url in servers:
            log(f"(d) {rate} req/s (50 % of ours (a)), HTTP/1.1, {D}s: {name}")
            S["d_latency_half_load"][name] = run_h2load(
                f"d-{name}", url, body_file,
                ["--h1", "-c", "8", "-t", "1", "--rps", str(max(1, rate // 8)), "-D", str(D)])
            r = S["d_latency_half_load"][name]
            log(f"    p50 {r['p50_us']} us  p99 {r['p99_us']} us  p99.9 {r['p999_us']} us")
        ratio_pairs(S["d_latency_half_load"], servers, "(d)", lambda name, url, i: run_h2load(
            f"d-{name}-{i}", url, body_file,
            ["--h1", "-c", "8", "-t", "1", "--rps", str(max(1, rate // 8)), "-D", str(D)]),
            metric="p99_us")

        # (a)-(d) again with RUST_LOG=warn (no request line): the line's cost is the
        # difference, in CPU per request.
        warn_scenarios(sysm, S, servers, path, body, body_file, D, conns, rate)
        # The line's cost once more, from alternating pairs: one pair of runs moves by more
        # than the line costs.
        line_pairs(sysm, S, dict(servers)["ours"], path, body, body_file, D, conns)
        pids["ours"] = [sysm.proxy.pid]

        # (j) the peer users would otherwise run, against the same Entra emulator.
        if args.peer:
            peer_url = start_peer(sysm, os.path.abspath(args.peer))
            peer_scenarios(sysm, S, peer_url, D, conns, rate)
            procs.stop(sysm.peer)

        # (g) many distinct SA tokens (100 service accounts) round-robin.
        log(f"(g) minting {n_tokens} SA tokens for 100 service accounts")
        started = time.monotonic()
        tokens = mint_many(sysm, n_tokens, 100)
        log(f"    minted in {time.monotonic() - started:.1f}s")
        bodies = os.path.join(WORK, "bodies.form")
        with open(bodies, "w") as f:
            for t in tokens:
                f.write(form(sysm.client_id, SCOPE, t) + "\n")
        one_body = os.path.join(WORK, "one-body.form")
        with open(one_body, "w") as f:
            f.write(body + "\n")
        log("(g) warming: each token once (TokenReview + SubjectAccessReview per SA)")
        started = time.monotonic()
        warm(p["admin"], ours_url, path, bodies, len(tokens))
        log(f"    warmed in {time.monotonic() - started:.1f}s")
        S["g_distinct_tokens"] = {"tokens": n_tokens}
        log(f"(g) {n_tokens} tokens round-robin, {D}s")
        S["g_distinct_tokens"]["ours"] = with_cpu(pids["ours"], lambda: run_wrk(
            "g-many", ours_url, lua_rotating(path, bodies), D, conns))
        log(f"(g) control: the same script with one token, {D}s")
        S["g_distinct_tokens"]["ours_one_token"] = with_cpu(pids["ours"], lambda: run_wrk(
            "g-one", ours_url, lua_rotating(path, one_body), D, conns))
        log(f"    {S['g_distinct_tokens']['ours']['rps']:.0f} vs "
            f"{S['g_distinct_tokens']['ours_one_token']['rps']:.0f} req/s")

        # (e) cold fan-in: 1000 concurrent requests for one uncached key, Entra at 100 ms.
        sysm.set_entra_latency(100)
        fanin = os.path.join(WORK, "fanin.form")
        with open(fanin, "w") as f:
            f.write(form(sysm.client_id, f"https://fanin-{uuid.uuid4().hex[:8]}.example/.default",
                         sysm.token))
        before = sysm.entra_stats()["tokens_issued"]
        log("(e) 1000 concurrent requests for one uncached key (10 h2 connections x 100 streams)")
        e = run_h2load("e-fanin", ours_url, fanin, ["-n", "1000", "-c", "10", "-m", "100", "-t", "1"])
        e["entra_calls"] = sysm.entra_stats()["tokens_issued"] - before
        S["e_cold_fanin"] = e
        log(f"    {e['succeeded']}/1000 ok, Entra calls {e['entra_calls']}, "
            f"all done within {e.get('span_us', 0) / 1000:.0f} ms of the first request")

        # (f) miss overhead: a new scope per request, Entra at 100 ms. This proxy instance logs
        # every request (info), so each miss's own overhead is its latency minus the time it
        # waited for Entra; the client-side view also carries the emulator's CPU on core 1.
        sysm.stop_proxy()
        sysm.start_proxy(log_level="info", name="proxy-f")
        first = TlsClient(p["proxy"], sysm.sni)
        if first.post(path, body)[0] != 200:
            raise SystemExit("the restarted proxy refused the warm-up request")
        up_sum0 = metric(p["admin"], "identity_binding_proxy_entra_request_duration_seconds_sum")
        up_cnt0 = metric(p["admin"], "identity_binding_proxy_entra_request_duration_seconds_count")
        prefix, suffix = body.split("scope=")[0] + "scope=", "&" + body.split("scope=")[1].split("&", 1)[1]
        log(f"(f) cache misses (new scope each), 4 connections, {D}s")
        f_res = run_wrk("f-miss", ours_url, lua_distinct_scopes(
            path, prefix, suffix, uuid.uuid4().hex[:8], 10_000_000), D, 4)
        up_sum = metric(p["admin"], "identity_binding_proxy_entra_request_duration_seconds_sum") - up_sum0
        up_cnt = metric(p["admin"], "identity_binding_proxy_entra_request_duration_seconds_count") - up_cnt0
        f_res["entra_latency_ms"] = 100
        f_res["upstream_mean_us"] = up_sum / up_cnt * 1e6 if up_cnt else 0
        f_res["overhead_p50_us"] = f_res["p50_us"] - 100_000
        f_res["overhead_p99_us"] = f_res["p99_us"] - 100_000
        f_res["overhead_mean_vs_upstream_us"] = f_res["mean_us"] - f_res["upstream_mean_us"]
        time.sleep(0.3)  # the proxy's log writer sends its lines at least every 200 ms
        own = proxy_miss_overheads(os.path.join(WORK, "proxy-f.log"), skip=1)  # the warm-up
        f_res["own_misses"] = len(own)
        f_res["own_overhead_p50_us"] = percentile(own, 50)
        f_res["own_overhead_p99_us"] = percentile(own, 99)
        f_res["own_overhead_p999_us"] = percentile(own, 99.9)
        S["f_miss_overhead"] = f_res
        log(f"    client-side: latency - 100 ms p50 {f_res['overhead_p50_us'] / 1000:.2f} ms, "
            f"p99 {f_res['overhead_p99_us'] / 1000:.2f} ms (includes the emulator's own work)")
        log(f"    proxy's own, {len(own)} misses: p50 {f_res['own_overhead_p50_us'] / 1000:.3f} ms, "
            f"p99 {f_res['own_overhead_p99_us'] / 1000:.3f} ms")
        sysm.stop_proxy()
        sysm.start_proxy()

        # (h) memory: idle, then after N distinct cached (client-id, scope) entries.
        sysm.set_entra_latency(0)
        n = args.entries
        entries0 = metric(p["admin"], "identity_binding_proxy_cache_entries")
        rss0 = rss_kib(sysm.proxy.pid)
        log(f"(h) filling {n} distinct cache entries (Entra latency 0); RSS before {rss0} KiB")
        h = fill_entries(sysm, ours_url, path, prefix, suffix, n, entries0)
        rss1 = rss_kib(sysm.proxy.pid)
        added = h["entries_added"]
        per_entry = (rss1 - rss0) * 1024 / added if added else 0
        S["h_memory"] = {"idle_rss_kib": idle_rss, "rss_before_kib": rss0, "rss_after_kib": rss1,
                         "entries_added": added, "fill_seconds": h["seconds"],
                         "token_bytes": token_len, "bytes_per_entry": round(per_entry),
                         "bytes_per_entry_beyond_token": round(per_entry - token_len)}
        log(f"    {added} entries in {h['seconds']:.0f}s; RSS {rss1} KiB; "
            f"{per_entry:.0f} B/entry ({per_entry - token_len:.0f} B beyond the {token_len} B token)")

        # (k) what a node saves: P SDK processes straight to Entra vs through the proxy.
        if args.sdk_python:
            sysm.stop_proxy()
            savings_scenario(sysm, S, args, quick)
    finally:
        procs.stop_all()

    report(results)


# PKCS#1 v1.5 DigestInfo prefix of SHA-256.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def warn_scenarios(sysm, S, servers, path, body, body_file, D, conns, rate):
    """(a)-(d) for ours under `ours_warn`, with RUST_LOG=warn; then `serve`'s default again."""
    p = sysm.ports
    url = dict(servers)["ours"]
    sysm.stop_proxy()
    sysm.start_proxy(log_level="warn", name="proxy-warn")
    if TlsClient(p["proxy"], sysm.sni).post(path, body)[0] != 200:
        raise SystemExit("the RUST_LOG=warn proxy refused the warm-up request")
    pids = [sysm.proxy.pid]
    log(f"(a) HTTP/1.1 keep-alive, {conns} connections, {D}s: ours, RUST_LOG=warn")
    S["a_h1_keepalive"]["ours_warn"] = with_cpu(pids, lambda: run_wrk(
        "a-ours-warn", url, lua_static(path, body), D, conns))
    log_rate(S["a_h1_keepalive"]["ours_warn"])
    log(f"(b) h2, 4 connections x 32 streams, {D}s: ours, RUST_LOG=warn")
    S["b_h2"]["ours_warn"] = with_cpu(pids, lambda: run_h2load(
        "b-ours-warn", url, body_file, ["-c", "4", "-m", "32", "-t", "1", "-D", str(D)]))
    log_rate(S["b_h2"]["ours_warn"])
    log(f"(c) new TLS connection per request, {conns} connections, {D}s: ours, RUST_LOG=warn")
    S["c_new_conn"]["ours_warn"] = with_cpu(pids, lambda: run_wrk(
        "c-ours-warn", url, lua_static(path, body, close=True), D, conns))
    log_rate(S["c_new_conn"]["ours_warn"])
    log(f"(d) {rate} req/s, HTTP/1.1, {D}s: ours, RUST_LOG=warn")
    S["d_latency_half_load"]["ours_warn"] = run_h2load(
        "d-ours-warn", url, body_file,
        ["--h1", "-c", "8", "-t", "1", "--rps", str(max(1, rate // 8)), "-D", str(D)])
    sysm.stop_proxy()
    sysm.start_proxy()
    if TlsClient(p["proxy"], sysm.sni).post(path, body)[0] != 200:
        raise SystemExit("the restarted proxy refused the warm-up request")


# The targets of the hit scenarios' median ratios to nginx.
PAIR_TARGETS = {"a_h1_keepalive": 0.8, "b_h2": 0.95}

# Pairs of runs (`serve`'s default logging, then RUST_LOG=warn, or the other way round) that
# measure the request line's cost.
LINE_PAIRS = 3


def line_pairs(sysm, S, url, path, body, body_file, D, conns):
    """The request line's cost, robust to run-to-run drift: (a) and (b) on a fresh proxy at
    `info` and at `warn`, LINE_PAIRS times, alternating which goes first; per pair, the
    difference in server CPU per request; the median of the pairs. Leaves `serve`'s default
    running."""
    d = max(3, D // 2)
    diffs = {"a_h1_keepalive": [], "b_h2": []}
    for i in range(LINE_PAIRS):
        cpu = {}
        for level in (("info", "warn") if i % 2 == 0 else ("warn", "info")):
            sysm.stop_proxy()
            sysm.start_proxy(log_level=level, name=f"proxy-line-{level}")
            if TlsClient(sysm.ports["proxy"], sysm.sni).post(path, body)[0] != 200:
                raise SystemExit(f"the {level} proxy refused the warm-up request")
            pids = [sysm.proxy.pid]
            log(f"(a)/(b) the request line, pair {i + 1} of {LINE_PAIRS}, {d}s each: {level}")
            a = with_cpu(pids, lambda: run_wrk(
                f"line-a-{level}-{i}", url, lua_static(path, body), d, conns))
            b = with_cpu(pids, lambda: run_h2load(
                f"line-b-{level}-{i}", url, body_file,
                ["-c", "4", "-m", "32", "-t", "1", "-D", str(d)]))
            cpu[level] = {"a_h1_keepalive": a["cpu_us_per_req"], "b_h2": b["cpu_us_per_req"]}
        for key in diffs:
            diffs[key].append(cpu["info"][key] - cpu["warn"][key])
    S["line_pairs"] = {key: {"pairs_us": [round(v, 2) for v in vs],
                             "median_us": round(statistics.median(vs), 2)}
                       for key, vs in diffs.items()}
    log(f"    the request line: {S['line_pairs']}")
    sysm.stop_proxy()
    sysm.start_proxy()
    if TlsClient(sysm.ports["proxy"], sysm.sni).post(path, body)[0] != 200:
        raise SystemExit("the restarted proxy refused the warm-up request")


def warn_rows(S):
    """The RUST_LOG=warn column beside the production figures, and the request line's cost."""
    rows = []
    for key, label in (("a_h1_keepalive", "(a) hit, HTTP/1.1 keep-alive"), ("b_h2", "(b) hit, h2"),
                       ("c_new_conn", "(c) new TLS conn per request")):
        o, w, n = S[key]["ours"], S[key].get("ours_warn"), S[key]["nginx"]
        if not w:
            continue
        rows.append((label, "req/s with RUST_LOG=warn (no request line)", f"{w['rps']:,.0f}",
                     f"{n['rps']:,.0f}", f"{ratio(w['rps'], n['rps']):.3f}x", "-", "-"))
        line = o["cpu_us_per_req"] - w["cpu_us_per_req"]
        pairs = S.get("line_pairs", {}).get(key)
        if pairs:
            rows.append((label, "the request line: CPU per request (info - warn, single runs)",
                         f"{line:.2f} us", "n/a", "-", "-", "-"))
            line = pairs["median_us"]
            shown = ", ".join(f"{v:.2f}" for v in pairs["pairs_us"])
            rows.append((label, f"the request line: median of {len(pairs['pairs_us'])} "
                         "alternating pairs (info - warn)", f"{line:.2f} us ({shown})", "n/a",
                         "-", "<= 1 us", "yes" if line <= 1 else "NO"))
        else:
            rows.append((label, "the request line: CPU per request (info - warn)",
                         f"{line:.2f} us", "n/a", "-", "<= 1 us", "yes" if line <= 1 else "NO"))
    d = S["d_latency_half_load"]
    if d.get("ours_warn"):
        rows.append((f"(d) {d['rate']:,} req/s", "p99 with RUST_LOG=warn",
                     f"{d['ours_warn']['p99_us'] / 1000:.3f} ms", f"{d['nginx']['p99_us'] / 1000:.3f} ms",
                     f"{ratio(d['ours_warn']['p99_us'], d['nginx']['p99_us']):.3f}x", "-", "-"))
    return rows


def rsa_key(pem_file):
    """The CRT parameters of an RSA private key, read through `openssl rsa -text`."""
    text = subprocess.run(["openssl", "rsa", "-in", pem_file, "-noout", "-text"], check=True,
                          capture_output=True, text=True).stdout
    fields, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s*(.*)$", line)
        if m:
            name = m.group(1)
            fields[name] = m.group(2).split(" ")[0] if m.group(2) else ""
        elif name and line.startswith(" "):
            fields[name] += line.strip()
    num = lambda k: int(fields[k].replace(":", ""), 16)
    return {"n": num("modulus"), "p": num("prime1"), "q": num("prime2"), "dp": num("exponent1"),
            "dq": num("exponent2"), "qinv": num("coefficient")}


def rs256(key, signing_input):
    import hashlib
    size = (key["n"].bit_length() + 7) // 8
    t = SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
    m = int.from_bytes(b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t, "big")
    m1, m2 = pow(m, key["dp"], key["p"]), pow(m, key["dq"], key["q"])
    s = m2 + (key["qinv"] * (m1 - m2) % key["p"]) * key["q"]
    return s.to_bytes(size, "big")


def b64url(b):
    import base64
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def b64url_decode(s):
    import base64
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def resign(args):
    """A copy of a minted token with a fresh jti, signed with the kube emulator's key: the
    same claims `dev token` writes, at a fraction of a process start each."""
    key, template, count = args
    header, payload, _ = template.split(".")
    claims = json.loads(b64url_decode(payload))
    out = []
    for _ in range(count):
        claims["jti"] = str(uuid.uuid4())
        signing_input = header.encode() + b"." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        out.append((signing_input + b"." + b64url(rs256(key, signing_input))).decode())
    return out


def mint_many(sysm, n, accounts):
    """n distinct SA tokens for `accounts` service accounts of namespace `load`: one minted
    by `dev token` per account, the rest re-signed copies of it with fresh jti."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        templates = list(pool.map(lambda i: sysm.mint("load", f"sa-{i}"), range(accounts)))
    key = rsa_key(os.path.join(WORK, "kube", "sa-signing-key.pem"))
    per = [n // accounts + (1 if i < n % accounts else 0) for i in range(accounts)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        batches = list(pool.map(resign, [(key, t, c) for t, c in zip(templates, per)]))
    tokens = [t for batch in batches for t in batch]
    # Interleave the accounts, as pods of a node would.
    tokens.sort(key=lambda t: t[-12:])
    return tokens


def start_wrk(lua, url):
    """wrk in the background (16 connections, up to 10 minutes) until `stop_wrk`."""
    return subprocess.Popen(pin(1) + ["wrk", "-t1", "-c16", "-d600s", "--timeout", "10s", "-s",
                                      lua, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_wrk(wrk):
    wrk.send_signal(signal.SIGINT)
    try:
        wrk.wait(timeout=15)
    except subprocess.TimeoutExpired:
        wrk.kill()
        wrk.wait()


def warm(admin, url, path, bodies_file, n):
    """wrk round-robin over the bodies until the proxy has made n more TokenReviews: every
    token reviewed once, quickly enough that no review has expired when (g) runs."""
    reviews = 'identity_binding_proxy_kube_reviews_total'
    ok = 'kind="tokenreview",result="ok"'
    start = metric(admin, reviews, ok)
    lua = os.path.join(WORK, "g-warm.lua")
    with open(lua, "w") as f:
        f.write(lua_rotating(path, bodies_file))
    wrk = start_wrk(lua, url)
    started = time.monotonic()
    try:
        while metric(admin, reviews, ok) - start < n:
            if time.monotonic() - started > 590 or wrk.poll() is not None:
                raise SystemExit(f"warm-up: {metric(admin, reviews, ok) - start:.0f} of {n} "
                                 "tokens reviewed")
            time.sleep(0.2)
    finally:
        stop_wrk(wrk)


def fill_entries(sysm, url, path, prefix, suffix, n, entries0):
    """wrk with a new scope per request until the cache holds n more entries."""
    lua = os.path.join(WORK, "h-fill.lua")
    with open(lua, "w") as f:
        f.write(lua_distinct_scopes(path, prefix, suffix, uuid.uuid4().hex[:8], n))
    wrk = start_wrk(lua, url)
    started = time.monotonic()
    admin = sysm.ports["admin"]
    last_report = started
    entries, still = entries0, 0
    while time.monotonic() - started < 590:
        time.sleep(0.5)
        previous, entries = entries, metric(admin, "identity_binding_proxy_cache_entries")
        # The gauge is moka's eventually consistent count: it may stop a few entries short.
        still = still + 1 if entries == previous else 0
        if entries - entries0 >= n or (entries - entries0 >= 0.99 * n and still >= 6):
            break
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            log(f"    {int(entries - entries0)} entries")
    stop_wrk(wrk)
    time.sleep(1.0)
    entries = metric(admin, "identity_binding_proxy_cache_entries")
    return {"entries_added": int(entries - entries0), "seconds": time.monotonic() - started}


def machine():
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.*)", out)
        model = m.group(1).strip() if m else ""
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": os.uname().release}


# ---------------------------------------------------------------- report

def ratio(a, b):
    return a / b if b else float("nan")


def report(results):
    S = results["scenarios"]
    rows = []  # (scenario, metric, ours, nginx, ratio, target, met)

    def fmt_rps(v):
        return f"{v:,.0f}"

    a, b, c, d = S["a_h1_keepalive"], S["b_h2"], S["c_new_conn"], S["d_latency_half_load"]
    for key, label, target in (("a_h1_keepalive", "(a) hit, HTTP/1.1 keep-alive", 0.8),
                               ("b_h2", "(b) hit, h2", None),
                               ("c_new_conn", "(c) new TLS conn per request", 0.9)):
        r = ratio(S[key]["ours"]["rps"], S[key]["nginx"]["rps"])
        pairs = S[key].get("pairs")
        single = "req/s (first pair)" if pairs else "req/s"
        shown_target = target if not pairs else None
        rows.append((label, single, fmt_rps(S[key]["ours"]["rps"]),
                     fmt_rps(S[key]["nginx"]["rps"]), f"{r:.3f}x",
                     f">= {shown_target}x" if shown_target else "-",
                     "yes" if shown_target and r >= shown_target else
                     ("-" if not shown_target else "NO")))
        if pairs:
            target = PAIR_TARGETS.get(key)
            m = S[key]["median_ratio"]
            rows.append((label, f"ours/nginx, median of {len(pairs)} alternating pairs",
                         ", ".join(fmt_rps(p["ours"]) for p in pairs),
                         ", ".join(fmt_rps(p["nginx"]) for p in pairs), f"{m:.3f}x",
                         f">= {target}x", "yes" if m >= target else "NO"))
    for key, label in (("a_h1_keepalive", "(a) hit, HTTP/1.1 keep-alive"), ("b_h2", "(b) hit, h2"),
                       ("c_new_conn", "(c) new TLS conn per request")):
        o, n = S[key]["ours"], S[key]["nginx"]
        rows.append((label, "server CPU per request (core busy)",
                     f"{o['cpu_us_per_req']:.1f} us ({o['cpu_util'] * 100:.0f} %)",
                     f"{n['cpu_us_per_req']:.1f} us ({n['cpu_util'] * 100:.0f} %)",
                     f"{ratio(o['cpu_us_per_req'], n['cpu_us_per_req']):.3f}x", "-", "-"))
    rows.append(("(a) hit, HTTP/1.1 keep-alive", "p99 latency (32 conns, saturated)",
                 f"{a['ours']['p99_us'] / 1000:.2f} ms", f"{a['nginx']['p99_us'] / 1000:.2f} ms",
                 f"{ratio(a['ours']['p99_us'], a['nginx']['p99_us']):.3f}x", "-", "-"))
    for q, lab in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        target = "<= 1 ms" if q == "p99_us" else "-"
        met = ("yes" if d["ours"][q] <= 1000 else "NO") if q == "p99_us" else "-"
        rows.append((f"(d) {d['rate']:,} req/s (50 % of ours (a))", lab,
                     f"{d['ours'][q] / 1000:.3f} ms", f"{d['nginx'][q] / 1000:.3f} ms",
                     f"{ratio(d['ours'][q], d['nginx'][q]):.3f}x", target, met))
    if d.get("pairs"):
        m = d["median_ratio"]
        rows.append((f"(d) {d['rate']:,} req/s (50 % of ours (a))",
                     f"p99, ours/nginx, median of {len(d['pairs'])} alternating pairs",
                     ", ".join(f"{p['ours'] / 1000:.3f}" for p in d["pairs"]) + " ms",
                     ", ".join(f"{p['nginx'] / 1000:.3f}" for p in d["pairs"]) + " ms",
                     f"{m:.3f}x", "<= 1.2x", "yes" if m <= 1.2 else "NO"))
    rows += warn_rows(S)
    e = S["e_cold_fanin"]
    rows.append(("(e) 1000 concurrent, one cold key, Entra 100 ms", "Entra calls",
                 str(e["entra_calls"]), "n/a", "-", "exactly 1",
                 "yes" if e["entra_calls"] == 1 else "NO"))
    span = e.get("span_us", 0) / 1000
    rows.append(("(e) 1000 concurrent, one cold key, Entra 100 ms", "all complete within",
                 f"{span:.0f} ms ({e['succeeded']}/1000 ok)", "n/a", "-", "<= 300 ms",
                 "yes" if span <= 300 and e["succeeded"] == 1000 else "NO"))
    f = S["f_miss_overhead"]
    rows.append((f"(f) miss overhead in the proxy ({f['own_misses']} misses)",
                 "p50 / p99 (latency - wait for Entra)",
                 f"{f['own_overhead_p50_us'] / 1000:.3f} / {f['own_overhead_p99_us'] / 1000:.3f} ms",
                 "n/a", "-", "p99 <= 2 ms", "yes" if f["own_misses"] and f["own_overhead_p99_us"] <= 2000 else "NO"))
    rows.append(("(f) client-side latency - 100 ms", "p50 / p99 (+ emulator CPU, core 1)",
                 f"{f['overhead_p50_us'] / 1000:.2f} / {f['overhead_p99_us'] / 1000:.2f} ms",
                 "n/a", "-", "-", "-"))
    rows.append(("(f) miss overhead (mean - measured upstream mean)", "mean",
                 f"{f['overhead_mean_vs_upstream_us'] / 1000:.2f} ms", "n/a", "-", "-", "-"))
    g = S["g_distinct_tokens"]
    rg = ratio(g["ours"]["rps"], a["ours"]["rps"])
    rows.append((f"(g) {g['tokens']:,} distinct SA tokens round-robin", "req/s vs (a)",
                 fmt_rps(g["ours"]["rps"]), "n/a", f"{rg:.2f}x of (a)", ">= 0.7x (a)",
                 "yes" if rg >= 0.7 else "NO"))
    rows.append((f"(g) same script, one token (control)", "req/s",
                 fmt_rps(g["ours_one_token"]["rps"]), "n/a",
                 f"(g) = {ratio(g['ours']['rps'], g['ours_one_token']['rps']):.2f}x of this",
                 "-", "-"))
    rows.append(("(g) distinct tokens vs one token", "server CPU per request (core busy)",
                 f"{g['ours']['cpu_us_per_req']:.1f} us ({g['ours']['cpu_util'] * 100:.0f} %)",
                 f"one token: {g['ours_one_token']['cpu_us_per_req']:.1f} us "
                 f"({g['ours_one_token']['cpu_util'] * 100:.0f} %)",
                 "-", "-", "-"))
    h = S["h_memory"]
    rows.append(("(h) memory", "idle RSS", f"{h['idle_rss_kib'] / 1024:.1f} MiB", "n/a", "-",
                 "<= 32 MiB", "yes" if h["idle_rss_kib"] <= 32 * 1024 else "NO"))
    rows.append((f"(h) memory, +{h['entries_added']:,} cached entries", "bytes/entry beyond token",
                 f"{h['bytes_per_entry_beyond_token']:,} B (token {h['token_bytes']} B)", "n/a",
                 "-", "<= 1024 B", "yes" if h["bytes_per_entry_beyond_token"] <= 1024 else "NO"))
    i = S["i_startup"]
    rows.append(("(i) start-up to /readyz", "median of 3", f"{i['ms_median']:.0f} ms "
                 f"({', '.join(f'{x:.0f}' for x in i['ms_runs'])})", "n/a", "-", "<= 250 ms",
                 "yes" if i["ms_median"] <= 250 else "NO"))
    results["table"] = [dict(zip(("scenario", "metric", "ours", "nginx", "ratio", "target", "met"), r))
                        for r in rows]

    headers = ("scenario", "metric", "ours", "nginx", "ours/nginx", "target", "met")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(md)
    peer = peer_rows(S)
    if peer:
        headers = ("scenario", "metric", "ours", "peer (azure-workload-identity proxy)",
                   "ours/peer")
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(r) + " |" for r in peer]
        table += "\n\n" + "\n".join(md)
        results["peer_table"] = [dict(zip(("scenario", "metric", "ours", "peer", "ratio"), r))
                                 for r in peer]
    if S.get("k_savings"):
        table += "\n\n(k) What a node saves\n\n" + savings_table(S["k_savings"])
    results["table_markdown"] = table
    os.makedirs(OUT, exist_ok=True)
    if S.get("k_savings"):
        with open(os.path.join(OUT, "savings.svg"), "w") as fh:
            fh.write(savings_svg(S["k_savings"]))
    with open(os.path.join(OUT, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(OUT, "results.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(OUT, "results.svg"), "w") as fh:
        fh.write(svg(S))
    m = results["machine"]
    print(f"\nidentity-binding-proxy load harness, {results['date']}, {m['nproc']} cores "
          f"({m['cpu']}){' --quick' if results['quick'] else ''}. Ratios are from this one run "
          "(servers on core 0, load on core 1).\n")
    print(table)
    print(f"\nwrote {OUT}/results.json, results.md, results.svg"
          f"{', savings.svg' if S.get('k_savings') else ''} (raw tool output in {WORK}/)")


def savings_table(k):
    """(k) as markdown: one row per P, direct next to through the proxy."""
    by = {(r["mode"], r["pods"]): r for r in k["rows"]}
    headers = ("pods (P)", "Entra calls, direct (per compressed h)",
               "Entra calls, through the proxy (per compressed h)", "direct/proxy",
               "proxy requests served", "get_token ok / failed (direct; proxy)")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for n in sorted({r["pods"] for r in k["rows"]}):
        d, p = by.get(("direct", n)), by.get(("proxy", n))
        if not d or not p:
            continue
        md.append("| " + " | ".join((
            str(n),
            f"{d['entra_calls_window']} in {d['window_s']:.0f} s ({d['entra_calls_per_compressed_hour']:,.0f})",
            f"{p['entra_calls_window']} in {p['window_s']:.0f} s ({p['entra_calls_per_compressed_hour']:,.0f})",
            f"{ratio(d['entra_calls_window'], p['entra_calls_window']):,.1f}x",
            f"{p['proxy_requests_window']:,}",
            f"{d['get_token_ok']:,} / {d['get_token_failed']}; "
            f"{p['get_token_ok']:,} / {p['get_token_failed']}",
        )) + " |")
    note = (f"Token lifetime {k['token_lifetime_s']} s (one compressed hour), each pod calls "
            f"get_token every {k['get_token_every_s']} s, window {k['window_s']} s once every pod "
            f"runs; proxy --cache-min-remaining-secs {k['proxy_cache_min_remaining_s']}. "
            f"SDK: {k['sdk']}.")
    return "\n".join(md) + "\n\n" + note


def report_savings(results):
    """--savings alone: target/bench/savings.{json,md,svg}."""
    k = results["scenarios"]["k_savings"]
    table = savings_table(k)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "savings.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(OUT, "savings.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(OUT, "savings.svg"), "w") as fh:
        fh.write(savings_svg(k))
    print(f"\nidentity-binding-proxy load harness, (k) what a node saves, {results['date']}\n")
    print(table)
    print(f"\nmachine load: before {k['uptime_before']}\n              after  {k['uptime_after']}")
    print(f"\nwrote {OUT}/savings.json, savings.md, savings.svg (pod logs in {WORK}/)")


def savings_svg(k):
    """Entra calls per compressed hour against P, direct next to through the proxy (log scale)."""
    import math
    W, H, PAD = 760, 420, 80
    direct_c, ours_c = "#c05621", "#2b6cb0"
    by = {(r["mode"], r["pods"]): r["entra_calls_per_compressed_hour"] for r in k["rows"]}
    ps = sorted({r["pods"] for r in k["rows"]})
    top, bottom, left, right = 80, H - PAD, PAD, W - 30
    vmax = max([v for v in by.values()] + [10])
    decades = max(1, math.ceil(math.log10(vmax)))
    y = lambda v: bottom - (bottom - top) * (math.log10(max(v, 1)) / decades)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">Entra calls per hour '
           'vs P: direct vs through the proxy</text>',
           f'<text x="{W / 2}" y="40" text-anchor="middle" fill="#555" font-size="11">P pods: '
           f'Python SDK processes (azure-identity), one identity and scope, '
           f'{k["token_lifetime_s"]} s tokens (1 compressed hour), get_token every second</text>',
           f'<rect x="{left + 10}" y="52" width="12" height="12" fill="{direct_c}"/>'
           f'<text x="{left + 28}" y="63">classic workload identity (each pod calls Entra)</text>',
           f'<rect x="{left + 330}" y="52" width="12" height="12" fill="{ours_c}"/>'
           f'<text x="{left + 348}" y="63">through identity-binding-proxy</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>']
    for e in range(decades + 1):
        yy = y(10 ** e)
        out.append(f'<line x1="{left - 4}" y1="{yy:.1f}" x2="{right}" y2="{yy:.1f}" '
                   'stroke="#e2e8f0"/>')
        out.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end">{10 ** e:,}</text>')
    gw = (right - left) / max(1, len(ps))
    for i, n in enumerate(ps):
        gx = left + i * gw
        bw = gw * 0.3
        for j, (mode, col) in enumerate((("direct", direct_c), ("proxy", ours_c))):
            v = by.get((mode, n))
            if v is None:
                continue
            x = gx + gw * 0.17 + j * (bw + 6)
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw:.1f}" '
                       f'height="{bottom - y(v):.1f}" fill="{col}"/>')
            out.append(f'<text x="{x + bw / 2:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle" '
                       f'font-size="10">{v:,.0f}</text>')
        out.append(f'<text x="{gx + gw / 2:.1f}" y="{bottom + 16}" text-anchor="middle">'
                   f'P = {n}</text>')
    out.append(f'<text x="{W / 2}" y="{bottom + 36}" text-anchor="middle" fill="#555" '
               'font-size="11">Entra calls per compressed hour, measured (log scale). The SDK '
               'refreshes on fixed clocks (300 s before expiry, at most every 30 s)</text>')
    out.append(f'<text x="{W / 2}" y="{bottom + 52}" text-anchor="middle" fill="#555" '
               'font-size="11">that do not compress: docs/performance.md translates both to '
               '1 h and 24 h tokens.</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def peer_rows(S):
    """Ours next to the peer: ours over TLS with authentication and authorization, the peer
    over plain HTTP with neither (what users compare with)."""
    j = S.get("j_peer")
    if not j:
        return []
    a, d, e = S["a_h1_keepalive"]["ours"], S["d_latency_half_load"], S["e_cold_fanin"]
    pa, pd, pe = j["a_h1_keepalive"], j["d_latency"], j["e_cold_fanin"]
    rows = [
        ("hit, HTTP/1.1 keep-alive, 32 conns (ours TLS + authn + authz; peer plain HTTP)",
         "req/s", f"{a['rps']:,.0f}", f"{pa['rps']:,.0f}", f"{ratio(a['rps'], pa['rps']):.2f}x"),
        ("hit, HTTP/1.1 keep-alive, same core", "server CPU per request (core busy)",
         f"{a['cpu_us_per_req']:.1f} us ({a['cpu_util'] * 100:.0f} %)",
         f"{pa['cpu_us_per_req']:.1f} us ({pa['cpu_util'] * 100:.0f} %)",
         f"{ratio(a['cpu_us_per_req'], pa['cpu_us_per_req']):.2f}x"),
    ]
    for q, lab in (("p50_us", "p50"), ("p99_us", "p99")):
        rows.append((f"{d['rate']:,} req/s fixed rate, HTTP/1.1, 8 conns", lab,
                     f"{d['ours'][q] / 1000:.3f} ms", f"{pd[q] / 1000:.3f} ms",
                     f"{ratio(d['ours'][q], pd[q]):.2f}x"))
    rows.append(("1000 concurrent, one cold resource, Entra 100 ms", "Entra calls",
                 f"{e['entra_calls']} ({e['succeeded']}/1000 ok)",
                 f"{pe['entra_calls']} ({pe['succeeded']}/1000 ok)",
                 f"{ratio(e['entra_calls'], pe['entra_calls']):.3f}x"))
    return rows


def svg(S):
    """Two panels: throughput (req/s) and latency (ms), ours next to nginx, and the peer (the
    workload identity project's proxy) where it was measured: (a) throughput, (d) p50/p99."""
    W, H, PAD = 980, 440, 60
    ours_c, nginx_c, peer_c = "#2b6cb0", "#a0aec0", "#dd6b20"
    j = S.get("j_peer") or {}
    pa, pd = j.get("a_h1_keepalive"), j.get("d_latency")
    tp = [("(a) h1 keep-alive", S["a_h1_keepalive"], pa and pa["rps"]),
          ("(b) h2", S["b_h2"], None), ("(c) new conn/req", S["c_new_conn"], None)]
    lat = [("(a) p50", S["a_h1_keepalive"], "p50_us", None),
           ("(a) p99", S["a_h1_keepalive"], "p99_us", None),
           ("(d) p50", S["d_latency_half_load"], "p50_us", pd and pd["p50_us"] / 1000),
           ("(d) p99", S["d_latency_half_load"], "p99_us", pd and pd["p99_us"] / 1000),
           ("(d) p99.9", S["d_latency_half_load"], "p999_us", None)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">identity-binding-proxy '
           f'vs nginx (static JSON){" and the peer" if j else ""}, one core each, same run</text>',
           f'<rect x="{W - 270}" y="30" width="12" height="12" fill="{ours_c}"/>'
           f'<text x="{W - 252}" y="41">identity-binding-proxy</text>',
           f'<rect x="{W - 270}" y="46" width="12" height="12" fill="{nginx_c}"/>'
           f'<text x="{W - 252}" y="57">nginx</text>']
    if j:
        out.append(f'<rect x="{W - 270}" y="62" width="12" height="12" fill="{peer_c}"/>'
                   f'<text x="{W - 252}" y="73">peer: azure-workload-identity proxy</text>')
        out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" fill="#555" '
                   'font-size="11">The peer serves plain HTTP without authentication or '
                   'authorization; ours serves TLS and checks both on every request.</text>')

    def panel(x0, width, title, groups, unit):
        top, bottom = 90, H - PAD - 10
        vmax = max(max(v for v in g[1:] if v is not None) for g in groups) or 1
        out.append(f'<text x="{x0 + width / 2}" y="{top - 6}" text-anchor="middle" '
                   f'font-weight="bold">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{bottom}" x2="{x0 + width}" y2="{bottom}" stroke="black"/>')
        gw = width / len(groups)
        bars = 3 if j else 2
        for k, (label, *values) in enumerate(groups):
            gx = x0 + k * gw
            bw = gw * (0.32 if bars == 2 else 0.24)
            for n, (v, col) in enumerate(zip(values, (ours_c, nginx_c, peer_c))):
                if v is None:
                    continue
                h = (bottom - top - 20) * v / vmax
                x = gx + gw * (0.15 if bars == 2 else 0.1) + n * (bw + 3)
                out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bw:.1f}" '
                           f'height="{h:.1f}" fill="{col}"/>')
                txt = f"{v:,.0f}" if unit == "req/s" else f"{v:.2f}"
                out.append(f'<text x="{x + bw / 2:.1f}" y="{bottom - h - 4:.1f}" '
                           f'text-anchor="middle" font-size="{10 if bars == 2 else 9}">{txt}</text>')
            out.append(f'<text x="{gx + gw / 2:.1f}" y="{bottom + 16}" text-anchor="middle">'
                       f'{label}</text>')
        out.append(f'<text x="{x0 + width / 2}" y="{bottom + 34}" text-anchor="middle" '
                   f'fill="#555">{unit}</text>')

    panel(PAD, W / 2 - PAD * 1.5, "Throughput (higher is better)",
          [(lbl, s["ours"]["rps"], s["nginx"]["rps"], peer) for lbl, s, peer in tp], "req/s")
    panel(W / 2 + PAD / 2, W / 2 - PAD * 1.5, "Latency (lower is better)",
          [(lbl, s["ours"][q] / 1000, s["nginx"][q] / 1000, peer) for lbl, s, q, peer in lat],
          "ms")
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
