#!/usr/bin/env bash
# Soak (not run in CI): mixed load for SOAK_SECONDS (default 600) against a gateway process of
# its own: wrk on GetCACaps, and real enrolments with scepclient one after another, through the
# demo's NDES stand-in. Reports failed enrolments (must be 0), wrk's totals and the gateway's
# peak resident memory.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_packages scep:scepserver scep:scepclient wrk:wrk
seconds=${SOAK_SECONDS:-600}
cargo build --release --quiet -p ndes-gateway --features dev
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/ndes-gateway
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$bin" demo --dir "$work/demo" --listen "127.0.0.1:$(free_port)" > "$work/demo.log" 2>&1 & pids+=($!)
for _ in $(seq 300); do grep -q "Press Ctrl-C" "$work/demo.log" 2>/dev/null && break; sleep 0.1; done
# The gateway under test: the demo's public config on a port of its own, in its own process.
port=$(free_port)
sed -e "s|^addr = \"127.0.0.1:[0-9]*\"|addr = \"127.0.0.1:$port\"|" -e '/^\[admin\]/,$d' "$work/demo/gateway.toml" > "$work/soak.toml"
printf '[admin]\nenabled = false\n[log]\nlevel = "warn"\n' >> "$work/soak.toml"
"$bin" serve --config "$work/soak.toml" 2> "$work/gateway.log" & gw=$!; pids+=($gw)
sleep 1
url="https://localhost:$port/certsrv/mscep/mscep.dll"
root="$work/demo/pki/root.pem"
peak=0
( while kill -0 "$gw" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$gw/status" 2>/dev/null || echo 0)
    echo "$rss"; sleep 1
  done ) > "$work/rss.log" & pids+=($!)
SSL_CERT_FILE="$root" wrk -t1 -c32 -d"${seconds}s" --latency "$url?operation=GetCACaps&message=soak" > "$work/wrk.log" 2>&1 & wrk=$!; pids+=($wrk)
ok=0 failed=0 end=$((SECONDS + seconds))
while (( SECONDS < end )); do
  dir=$(mktemp -d -p "$work")
  if (cd "$dir" && SSL_CERT_FILE="$root" timeout 60 scepclient -server-url "$url" -challenge secret \
       -private-key k.key -certificate k.pem -cn "soak-$ok-$failed" >"$dir/out.log" 2>&1) && [[ -s $dir/k.pem ]]; then
    ok=$((ok + 1))
  else
    failed=$((failed + 1)); cp "$dir/out.log" "$work/failed-$failed.log"
  fi
  rm -rf "$dir"
done
wait "$wrk" || true
peak=$(sort -n "$work/rss.log" | tail -1)
echo "soak: ${seconds} s; enrolments: $ok succeeded, $failed failed"
grep -E "Requests/sec|requests in|Non-2xx|Socket errors|99%" "$work/wrk.log" || cat "$work/wrk.log"
echo "gateway peak RSS: $((peak / 1024)) MiB"
[[ $failed -eq 0 ]]
