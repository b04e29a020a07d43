#!/usr/bin/env bash
# The public listener audited by testssl.sh (Debian): no SSLv2/v3, TLS 1.0 or 1.1, no NULL,
# anonymous, export, low or 3DES ciphers, no renegotiation or compression finding. Fails on any.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_packages testssl.sh:testssl openssl:openssl
bin=${NDES_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/ndes-gateway}
[[ -n ${NDES_GATEWAY_BIN:-} ]] || cargo build --quiet --locked -p ndes-gateway --features dev
work=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$bin" certs dev --out "$work/pki" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/gateway.toml" <<TOML
[listen]
addr = "127.0.0.1:$port"
cert = "pki/gateway.pem"
key = "pki/gateway.key"
[upstream]
url = "https://127.0.0.1:1/certsrv/mscep/mscep.dll"
ca = "pki/root.pem"
[admin]
enabled = false
[log]
level = "warn"
TOML
"$bin" serve --config "$work/gateway.toml" 2>"$work/gateway.log" &
pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
# Protocols, cipher categories, server preferences and the known vulnerabilities; the JSON is what
# is judged, the text is for the log.
testssl --quiet --color 0 --warnings off --ip one -p -s -U --jsonfile "$work/tls.json" "127.0.0.1:$port" \
  > "$work/testssl.txt" 2>&1 || true
python3 - "$work/tls.json" <<'PY'
import json, sys
findings = json.load(open(sys.argv[1]))
if isinstance(findings, dict):
    findings = findings.get("scanResult", [{}])[0].get("findings", findings)
bad = []
checked = 0
for f in findings:
    fid, sev, text = f.get("id", ""), f.get("severity", ""), f.get("finding", "")
    checked += 1
    if fid == "scanProblem" or sev in ("MEDIUM", "HIGH", "CRITICAL"):
        bad.append(f"{fid}: {sev}: {text}")
    # Old protocols must not be offered, whatever severity testssl gives them.
    if fid in ("SSLv2", "SSLv3", "TLS1", "TLS1_1") and "not offered" not in text:
        bad.append(f"{fid}: {text}")
    if fid in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA") and "not offered" not in text:
        bad.append(f"{fid}: {text}")
    if fid in ("secure_client_renego", "CRIME_TLS") and sev not in ("OK", "INFO"):
        bad.append(f"{fid}: {text}")
ids = {f.get("id") for f in findings}
for must in ("SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipherlist_NULL", "secure_client_renego", "CRIME_TLS"):
    if must not in ids:
        bad.append(f"{must}: not checked")
for b in bad:
    print("FAIL", b)
print(f"testssl: {checked} findings read, {len(bad)} problems")
sys.exit(1 if bad else 0)
PY
