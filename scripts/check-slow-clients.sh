#!/usr/bin/env bash
# Slow clients (slowhttptest, Debian): hundreds of slow-headers (slowloris) and slow-body
# connections against the gateway on loopback while a real client enrols through it. Every
# enrolment must succeed, and the slow connections must be cut by the gateway's timeouts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_packages slowhttptest:slowhttptest scep:scepserver scep:scepclient
bin=${NDES_GATEWAY_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/ndes-gateway}
[[ -x $bin ]] || cargo build --quiet -p ndes-gateway
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

attack() { # mode name: 300 connections for 40 s, each sending a little every 5 s
  slowhttptest "$1" -c 300 -r 150 -i 5 -l 40 -s 8192 -t POST -f application/x-pki-message -x 10 -p 3 -g -o "$work/$2" \
    -u "$url?operation=PKIOperation" > "$work/$2.log" 2>&1
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
for mode in -H -B; do
  name=$([[ $mode == -H ]] && echo slow-headers || echo slow-body)
  attack "$mode" "$name" & attacker=$!
  if enrol_during "$name"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  wait "$attacker" || true
  # slowhttptest's CSV: seconds,closed,pending,connected,service available. The gateway must have
  # closed connections itself (timeouts), and the service must have stayed available.
  if python3 - "$work/$name.csv" "$name" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
closed = max(int(r[1]) for r in rows)
# The last column is plotted as 0 when slowhttptest's probe found the service unavailable.
unavailable = sum(1 for r in rows if r[4].strip() == "0")
print(f"{sys.argv[2]}: {closed} slow connections closed by the gateway; service unavailable in {unavailable} of {len(rows)} samples")
sys.exit(0 if closed > 0 and unavailable == 0 else 1)
PY
  then passed=$((passed + 1)); else failed=$((failed + 1)); tail -20 "$work/$name.log"; fi
done
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
