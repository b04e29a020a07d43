#!/usr/bin/env bash
# Slow clients (slowhttptest, Debian): hundreds of slow-headers (slowloris), slow-body and
# slow-read connections against the gateway on loopback while a real client enrols through it.
# Every enrolment must succeed and the service must stay available throughout; the slow-headers
# and slow-body connections must also be cut by the gateway's timeouts. A slow reader of a small
# answer (GetCACert, a few KB) may well get its whole answer before [listen] send_timeout, so for
# slow reads the connections the gateway closed are only reported.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_packages slowhttptest:slowhttptest scep:scepserver scep:scepclient
bin=${NDES_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/ndes-gateway}
[[ -n ${NDES_GATEWAY_BIN:-} ]] || cargo build --quiet --locked -p ndes-gateway --features dev
work=$(mktemp -d)
demo=
cleanup() { [[ -n $demo ]] && kill "$demo" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The demo brings up scepserver, the NDES stand-in and the public gateway (default limits:
# 10 s header timeout, 30 s body timeout) and stays up.
"$bin" demo --dir "$work/demo" --listen "127.0.0.1:$port" > "$work/demo.log" 2>&1 &
demo=$!
for _ in $(seq 300); do grep -q "Press Ctrl-C" "$work/demo.log" 2>/dev/null && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$work/demo.log" || { cat "$work/demo.log"; echo "the demo did not start"; exit 1; }
url="https://localhost:$port/certsrv/mscep/mscep.dll"
root="$work/demo/pki/root.pem"

attack() { # mode name: 300 connections for 40 s
  if [[ $1 == -X ]]; then
    # Slow read: each connection advertises a TCP window of 512 to 1024 bytes, pipelines ten
    # GetCACert requests (slowhttptest's most) and reads 32 bytes of the answers every 5 s. With
    # the demo's CA the ten answers (about 13 KB) still fit in loopback's send buffer, so the
    # gateway's writes may never block long enough for [listen] send_timeout.
    slowhttptest -X -c 300 -r 150 -l 40 -w 512 -y 1024 -n 5 -z 32 -k 10 -p 3 -g -o "$work/$2" \
      -u "$url?operation=GetCACert" > "$work/$2.log" 2>&1
  else
    # Slow headers or slow body: each connection sends a little every 5 s.
    slowhttptest "$1" -c 300 -r 150 -i 5 -l 40 -s 8192 -t POST -f application/x-pki-message -x 10 -p 3 -g -o "$work/$2" \
      -u "$url?operation=PKIOperation" > "$work/$2.log" 2>&1
  fi
}
enrol_during() { # name: enrolments one after another while the attack runs
  local ok=0 failed=0
  for i in $(seq 6); do
    sleep 4
    dir=$(mktemp -d -p "$work")
    if (cd "$dir" && SSL_CERT_FILE="$root" timeout 60 scepclient -server-url "$url" -challenge secret \
         -private-key k.key -certificate k.pem -cn "slow-$1-$i" >"$dir/out.log" 2>&1) && [[ -s $dir/k.pem ]]; then
      ok=$((ok + 1))
    else
      failed=$((failed + 1)); cat "$dir/out.log"
    fi
  done
  echo "$1: $ok enrolments succeeded, $failed failed during the attack"
  [[ $failed -eq 0 && $ok -eq 6 ]]
}
passed=0 failed=0
for mode in -H -B -X; do
  case $mode in -H) name=slow-headers ;; -B) name=slow-body ;; -X) name=slow-read ;; esac
  attack "$mode" "$name" & attacker=$!
  if enrol_during "$name"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  wait "$attacker" || true
  # slowhttptest's CSV: seconds,closed,pending,connected,service available. The service must have
  # stayed available; for slow headers and slow body the gateway must also have closed
  # connections itself (timeouts).
  must_close=$([[ $mode == -X ]] && echo no || echo yes)
  if python3 - "$work/$name.csv" "$name" "$must_close" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
if not rows:
    print(f"{sys.argv[2]}: slowhttptest wrote no samples")
    sys.exit(1)
closed = max(int(r[1]) for r in rows)
# The last column is plotted as 0 when slowhttptest's probe found the service unavailable.
unavailable = sum(1 for r in rows if r[4].strip() == "0")
print(f"{sys.argv[2]}: {closed} slow connections closed; service unavailable in {unavailable} of {len(rows)} samples")
must_close = sys.argv[3] == "yes"
sys.exit(0 if (closed > 0 or not must_close) and unavailable == 0 else 1)
PY
  then passed=$((passed + 1)); else failed=$((failed + 1)); tail -20 "$work/$name.log"; fi
done
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
