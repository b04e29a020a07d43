#!/usr/bin/env bash
# Side-by-side benchmark on loopback: the gateway, nginx and HAProxy publishing the same NDES
# stand-in (nginx with TLS: on one port a static answer at every path, on another micromdm
# scepserver behind /certsrv/mscep/mscep.dll), and the stand-in itself ("direct", the limit no
# proxy can beat). Every target is asked for /certsrv/mscep/mscep.dll, the path a real NDES has.
# The gateway runs with its cache off (cache_ttl "0s"), as nginx and HAProxy do not cache; one row
# more, getcacaps_cached, compares its cache with nginx's proxy_cache. The workload "several" runs
# real enrolments over two NDES hosts, each a scepserver with a CA of its own behind its own TLS
# front: through the gateway with both as [[upstream.server]], and through nginx balancing them
# with `random` and with `ip_hash`.
#
#   bash tests/bench/run.sh
#
# Writes results.md (printed at the end) and results.json to the run folder, and the raw output of
# every run to its runs/ folder. Environment:
#   BENCH_DIR             run folder (default: a new folder under /tmp)
#   BENCH_QUICK=1         smoke run: 1 round, 2 s runs, 500 idle connections, 8 enrolments, 8 per
#                         peer over two NDES
#   BENCH_ROUNDS (3), BENCH_DURATION (5 s), BENCH_CONNECTIONS (32), BENCH_THREADS (1),
#   BENCH_TLS_THREADS (wrk threads for a new TLS connection per request: 2),
#   BENCH_IDLE (10000), BENCH_ENROL (40), BENCH_ENROL_PARALLEL (4)
#   BENCH_SEVERAL (6 per peer and round), BENCH_SEVERAL_PARALLEL (2): enrolments over two NDES
#   BENCH_WORKLOADS       a subset of: getcacaps getcacaps_cached long_get post new_tls h2 enrol
#                         several idle
#   BENCH_GATEWAY_LOG     the gateway's log filter (default: no per-request lines, as the peers
#                         run with access_log off; see gateway.toml.in)
#   CARGO_TARGET_DIR      where cargo builds (default: <repo>/target)
#   BENCH_GATEWAY_BIN     a gateway binary to measure instead of building this tree's (to compare
#                         two versions on one machine)
# shellcheck disable=SC2154 # start() sets each pid_<name> with printf -v
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
# shellcheck source=/dev/null # scripts/lib.sh, checked on its own
. "$repo/scripts/lib.sh"
need_rust
need_packages nginx-light:/usr/sbin/nginx haproxy:/usr/sbin/haproxy wrk:wrk nghttp2-client:h2load \
  scep:scepserver scep:scepclient openssl:openssl python3:python3

if [[ ${BENCH_QUICK:-0} == 1 ]]; then
  ROUNDS=${BENCH_ROUNDS:-1} DURATION=${BENCH_DURATION:-2} IDLE=${BENCH_IDLE:-500} ENROL=${BENCH_ENROL:-8}
  SEVERAL=${BENCH_SEVERAL:-8}
else
  ROUNDS=${BENCH_ROUNDS:-3} DURATION=${BENCH_DURATION:-5} IDLE=${BENCH_IDLE:-10000} ENROL=${BENCH_ENROL:-40}
  SEVERAL=${BENCH_SEVERAL:-6}
fi
CONNS=${BENCH_CONNECTIONS:-32} THREADS=${BENCH_THREADS:-1} TLS_THREADS=${BENCH_TLS_THREADS:-2}
ENROL_PARALLEL=${BENCH_ENROL_PARALLEL:-4} SEVERAL_PARALLEL=${BENCH_SEVERAL_PARALLEL:-2}
WORKLOADS=${BENCH_WORKLOADS:-getcacaps getcacaps_cached long_get post new_tls h2 enrol several idle}
GATEWAY_LOG=${BENCH_GATEWAY_LOG:-info,ndes_gateway::access=off,ndes_gateway::scep=warn,rustls=error}
LONG_TARGET_BYTES=63488   # about 62 KiB, under the 65534 that IIS, the gateway and the peers are set to
POST_BODY_BYTES=3800
TARGETS=(gateway nginx haproxy direct)
PROXIES=(gateway nginx haproxy)
CACHED_TARGETS=(gateway nginx)
SEVERAL_TARGETS=(gateway nginx_random nginx_iphash)
NDES_HOSTS=(ndes01 ndes02)
bench() { python3 "$here/bench.py" "$@"; }
started=$(date +%s) run_id=$(date +%H%M%S) load_start=$(cut -d" " -f1-3 /proc/loadavg)

# Every connection is a descriptor in the proxy and another in the load generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
if ((nofile < IDLE + 1000)); then
  echo "open-file limit $nofile is too low for $IDLE idle connections; lower BENCH_IDLE or raise the hard limit" >&2
  exit 1
fi
maxconn=$((IDLE + 2000))

dir=${BENCH_DIR:-$(mktemp -d /tmp/ndes-bench.XXXXXX)}
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
runs=$dir/runs
rm -rf "$runs" "$dir/enrol" "$dir"/gateway-metrics.*.txt "$dir"/*.log && mkdir -p "$runs"
echo "run folder: $dir"

# ---- stop everything started here, whatever happens --------------------------------------------
pids=() load_pid='' sampler_pid=''
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in $load_pid $sampler_pid; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.3
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ((rc == 0)) || echo "benchmark stopped (exit $rc); logs in $dir" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- build ------------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
[[ $target_dir == /* ]] || target_dir=$repo/$target_dir
if [[ -n ${BENCH_GATEWAY_BIN:-} ]]; then
  gateway_bin=$BENCH_GATEWAY_BIN
else
  (cd "$repo" && cargo build --release -p ndes-gateway)
  gateway_bin=$target_dir/release/ndes-gateway
fi

# ---- PKI (as /work/shared/anchors/peers.sh makes it) -------------------------------------------
cd "$dir"
if [[ ! -f root.pem ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root.key -out root.pem \
    -days 30 -subj "/CN=Test Root CA" 2>/dev/null
  for n in ndes gw; do
    if [[ $n == ndes ]]; then san="DNS:ndes.corp.test,IP:127.0.0.1"; else san="DNS:scep.example.test,DNS:localhost,IP:127.0.0.1"; fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj "/CN=$n" 2>/dev/null
    openssl x509 -req -in $n.csr -CA root.pem -CAkey root.key -CAcreateserial -out $n.pem -days 30 \
      -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") 2>/dev/null
  done
  cat gw.pem gw.key > gw-combined.pem
fi
[[ -d depot ]] || scepserver ca -init -depot depot >/dev/null 2>&1
# Two NDES hosts, each with a CA of its own: with scepserver's default name both CA certificates
# would have the same issuer and serial, and a PKIOperation's recipient could not tell them apart.
for h in "${NDES_HOSTS[@]}"; do
  [[ -d depot-$h ]] || scepserver ca -init -keySize 2048 -organization "$h" -depot "depot-$h" >/dev/null 2>&1
done

# ---- configs ----------------------------------------------------------------------------------
read -r SCEP_PORT STATIC_PORT UPSTREAM_PORT NGINX_PORT NGINX_ENROL_PORT HAPROXY_PORT HAPROXY_ENROL_PORT \
  GW_PORT GW_ADMIN GWE_PORT GWE_ADMIN SCEP1_PORT SCEP2_PORT NDES1_PORT NDES2_PORT NGINX_CACHED_PORT \
  NGINX_RANDOM_PORT NGINX_IPHASH_PORT GWC_PORT GWC_ADMIN GWS_PORT GWS_ADMIN < <(bench ports 22)
render() { # template output [extra sed expressions]
  local in=$1 out=$2; shift 2
  sed -e "s|@DIR@|$dir|g; s|@SCEP_PORT@|$SCEP_PORT|g; s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" \
    -e "s|@STATIC_PORT@|$STATIC_PORT|g; s|@NGINX_ENROL_PORT@|$NGINX_ENROL_PORT|g" \
    -e "s|@HAPROXY_ENROL_PORT@|$HAPROXY_ENROL_PORT|g" \
    -e "s|@NGINX_PORT@|$NGINX_PORT|g; s|@HAPROXY_PORT@|$HAPROXY_PORT|g; s|@MAXCONN@|$maxconn|g" \
    -e "s|@WORKER_CONNECTIONS@|$maxconn|g; s|@NOFILE@|$nofile|g; s|@LOG_LEVEL@|$GATEWAY_LOG|g" \
    -e "s|@SCEP1_PORT@|$SCEP1_PORT|g; s|@SCEP2_PORT@|$SCEP2_PORT|g; s|@NDES1_PORT@|$NDES1_PORT|g" \
    -e "s|@NDES2_PORT@|$NDES2_PORT|g; s|@NGINX_CACHED_PORT@|$NGINX_CACHED_PORT|g" \
    -e "s|@NGINX_RANDOM_PORT@|$NGINX_RANDOM_PORT|g; s|@NGINX_IPHASH_PORT@|$NGINX_IPHASH_PORT|g" \
    "$@" "$here/$in" > "$dir/$out"
}
render upstream-nginx.conf.in upstream-nginx.conf
render peer-nginx-http.conf.in peer-nginx-http.conf
render peer-nginx.conf.in peer-nginx.conf
render peer-nginx-several.conf.in peer-nginx-several.conf
render peer-haproxy.cfg.in peer-haproxy.cfg
gateways=() # the instances the gateway binary can run
gateway_config() { # name listen-port admin-port cache-ttl ndes-port...: with several NDES ports,
  # one [[upstream.server]] entry each in place of [upstream] url and server_name
  local name=$1 listen=$2 admin=$3 ttl=$4 out=$dir/$1.toml p; shift 4
  render gateway.toml.in "$name.toml" \
    -e "s|@LISTEN_PORT@|$listen|; s|@ADMIN_PORT@|$admin|; s|@CACHE_TTL@|$ttl|; s|@NDES_PORT@|$1|"
  if (($# > 1)); then
    sed -i '/^url = /d; /^server_name = /d' "$out"
    for p in "$@"; do
      printf '\n[[upstream.server]]\nurl = "https://127.0.0.1:%s/certsrv/mscep/mscep.dll"\nserver_name = "ndes.corp.test"\n' \
        "$p" >> "$out"
    done
  fi
  # A build from before cache_ttl (BENCH_GATEWAY_BIN) has no cache: without the key it runs as
  # with "0s". One from before [[upstream.server]] or without a cache has no row where they matter.
  if [[ $ttl == 0s ]] && ! "$gateway_bin" check --config "$out" > /dev/null 2>&1; then
    sed -i '/^cache_ttl = /d' "$out"
  fi
  if "$gateway_bin" check --config "$out" > "$name-check.txt" 2>&1; then
    gateways+=("$name")
  elif [[ $name == gateway || $name == gateway-enrol ]]; then
    cat "$name-check.txt" >&2
    exit 1
  else
    echo "$gateway_bin cannot run $name, which has no row then: $(awk 'NF { l = $0 } END { print l }' "$name-check.txt")" >&2
  fi
}
declare -A admin_port=([gateway]=$GW_ADMIN [gateway-enrol]=$GWE_ADMIN [gateway-cached]=$GWC_ADMIN [gateway-several]=$GWS_ADMIN)
gateway_config gateway "$GW_PORT" "$GW_ADMIN" 0s "$STATIC_PORT"
gateway_config gateway-enrol "$GWE_PORT" "$GWE_ADMIN" 0s "$UPSTREAM_PORT"
gateway_config gateway-cached "$GWC_PORT" "$GWC_ADMIN" 60s "$STATIC_PORT"
gateway_config gateway-several "$GWS_PORT" "$GWS_ADMIN" 0s "$NDES1_PORT" "$NDES2_PORT"

# ---- start ------------------------------------------------------------------------------------
start() { # name command...
  local name=$1; shift
  "$@" >> "$dir/$name.log" 2>&1 &
  pids+=($!)
  printf -v "pid_${name//-/_}" %s "$!"
}
wait_port() { # name port
  local name=$1 port=$2 pidvar="pid_${1//-/_}"
  for _ in $(seq 100); do
    if ! kill -0 "${!pidvar}" 2>/dev/null; then
      echo "$name exited at start:" >&2; tail -20 "$dir/$name.log" "$dir"/*error.log >&2 2>/dev/null; exit 1
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$name does not listen on $port" >&2; exit 1
}
start scepserver scepserver -depot "$dir/depot" -port "$SCEP_PORT" -challenge secret
start scepserver-ndes01 scepserver -depot "$dir/depot-ndes01" -port "$SCEP1_PORT" -challenge secret
start scepserver-ndes02 scepserver -depot "$dir/depot-ndes02" -port "$SCEP2_PORT" -challenge secret
start upstream nginx -p "$dir" -e "$dir/upstream-error.log" -c "$dir/upstream-nginx.conf" -g 'daemon off;'
start nginx nginx -p "$dir" -e "$dir/nginx-error.log" -c "$dir/peer-nginx.conf" -g 'daemon off;'
start nginx-several nginx -p "$dir" -e "$dir/nginx-several-error.log" -c "$dir/peer-nginx-several.conf" -g 'daemon off;'
start haproxy haproxy -db -f "$dir/peer-haproxy.cfg"
wait_port scepserver "$SCEP_PORT"; wait_port upstream "$STATIC_PORT"; wait_port upstream "$UPSTREAM_PORT"
wait_port scepserver-ndes01 "$SCEP1_PORT"; wait_port scepserver-ndes02 "$SCEP2_PORT"
wait_port upstream "$NDES1_PORT"; wait_port upstream "$NDES2_PORT"
# The gateways after the stand-in: one that finds NDES down at start is ready only after its next
# probe, seconds later.
for g in "${gateways[@]}"; do
  start "$g" "$gateway_bin" serve --config "$dir/$g.toml"
done
wait_port nginx-several "$NGINX_CACHED_PORT"; wait_port nginx-several "$NGINX_RANDOM_PORT"
wait_port nginx-several "$NGINX_IPHASH_PORT"
wait_port nginx "$NGINX_PORT"; wait_port nginx "$NGINX_ENROL_PORT"
wait_port haproxy "$HAPROXY_PORT"; wait_port haproxy "$HAPROXY_ENROL_PORT"
# /healthz rather than a probe of the TLS port, which the gateway would count as a failed handshake.
for g in "${gateways[@]}"; do
  bench wait-ready "http://127.0.0.1:${admin_port[$g]}/healthz" 30
done

# Memory is read from the processes that hold the connections: nginx's workers, not its master
# (nor the cache manager and loader of the nginx with a cache).
workers() { # master pid
  local w
  for _ in $(seq 50); do
    w=$(pgrep -P "$1" -f 'worker process' | paste -sd,)
    [[ -n $w ]] && { echo "$w"; return; }
    sleep 0.1
  done
  echo "no workers under nginx master $1" >&2; exit 1
}
declare -A mem_pids url enrol_url port
mem_pids[gateway]=$pid_gateway
mem_pids[nginx]=$(workers "$pid_nginx")
mem_pids[haproxy]=$pid_haproxy
mem_pids[direct]=$(workers "$pid_upstream")
# What a workload measures where it is not the target's main process: "workload:target".
mem_pids[enrol:gateway]=$pid_gateway_enrol
mem_pids[getcacaps_cached:gateway]=${pid_gateway_cached:-}
mem_pids[getcacaps_cached:nginx]=$(workers "$pid_nginx_several")
mem_pids[several:gateway]=${pid_gateway_several:-}
[[ -n ${pid_gateway_cached:-} ]] || CACHED_TARGETS=(nginx)
[[ -n ${pid_gateway_several:-} ]] || SEVERAL_TARGETS=(nginx_random nginx_iphash)
mem_pids[several:nginx_random]=${mem_pids[getcacaps_cached:nginx]}
mem_pids[several:nginx_iphash]=${mem_pids[getcacaps_cached:nginx]}
port=([gateway]=$GW_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT [direct]=$STATIC_PORT)
declare -A enrol_port=([gateway]=$GWE_PORT [nginx]=$NGINX_ENROL_PORT [haproxy]=$HAPROXY_ENROL_PORT [direct]=$UPSTREAM_PORT)
declare -A cached_port=([gateway]=$GWC_PORT [nginx]=$NGINX_CACHED_PORT)
declare -A several_port=([gateway]=$GWS_PORT [nginx_random]=$NGINX_RANDOM_PORT [nginx_iphash]=$NGINX_IPHASH_PORT)
mscep() { echo "https://127.0.0.1:$1/certsrv/mscep/mscep.dll"; }
for t in "${TARGETS[@]}"; do
  url[$t]=$(mscep "${port[$t]}")
  enrol_url[$t]=$(mscep "${enrol_port[$t]}")
done

bench pkcsreq "http://127.0.0.1:$SCEP_PORT/scep" "$dir/pkcsreq.der" "$POST_BODY_BYTES" > "$dir/pkcsreq.size"
# The long GET carries a real PKCSReq too, its challenge grown until the request-target is about
# LONG_TARGET_BYTES, so the gateway's SCEP inspection reads a whole genuine message.
path=/certsrv/mscep/mscep.dll
prefix_bytes=$(printf %s "$path?operation=PKIOperation&message=" | wc -c)
bench pkcsreq "http://127.0.0.1:$SCEP_PORT/scep" "$dir/pkcsreq-long.der" \
  $(((LONG_TARGET_BYTES - prefix_bytes) * 3 / 4)) > /dev/null
long_target=$(bench long-target "$path" "$dir/pkcsreq-long.der")
if ((${#long_target} > 65534)); then
  echo "the long request-target is ${#long_target} bytes, over 65534" >&2; exit 1
fi
for t in "${TARGETS[@]}"; do
  bench preflight "$t" "${url[$t]}" "$long_target" "$dir/pkcsreq.der"
done
for t in "${CACHED_TARGETS[@]}"; do
  bench preflight "$t-cached" "$(mscep "${cached_port[$t]}")" "$long_target" "$dir/pkcsreq.der"
done

# ---- runs -------------------------------------------------------------------------------------
metrics_snapshots=0
scrape_gateway() { # its counters restart with the process: one file per life, summed by the report
  metrics_snapshots=$((metrics_snapshots + 1))
  python3 -c 'import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$GW_ADMIN/metrics" > "$dir/gateway-metrics.$metrics_snapshots.txt" || true
}
# Each idle round starts from a fresh process: what an earlier round left allocated would
# otherwise be the next round's baseline.
restart() { # target
  local t=$1 old pidvar="pid_$1" keep=() p
  old=${!pidvar}
  [[ $t == gateway ]] && scrape_gateway
  kill "$old" 2>/dev/null || true
  wait "$old" 2>/dev/null || true
  for p in "${pids[@]}"; do [[ $p == "$old" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
  case $t in
    gateway)
      start gateway "$gateway_bin" serve --config "$dir/gateway.toml"
      bench wait-ready "http://127.0.0.1:$GW_ADMIN/healthz" 30
      mem_pids[gateway]=$pid_gateway ;;
    nginx)
      start nginx nginx -p "$dir" -e "$dir/nginx-error.log" -c "$dir/peer-nginx.conf" -g 'daemon off;'
      wait_port nginx "$NGINX_PORT"
      mem_pids[nginx]=$(workers "$pid_nginx") ;;
    haproxy)
      start haproxy haproxy -db -f "$dir/peer-haproxy.cfg"
      wait_port haproxy "$HAPROXY_PORT"
      mem_pids[haproxy]=$pid_haproxy ;;
  esac
}
sample_rss() { # out pid,pid...: the peak sum of VmRSS, every 0.5 s
  local out=$1 peak=0 sum p k v _
  IFS=, read -ra ps <<< "$2"
  while :; do
    sum=0
    for p in "${ps[@]}"; do
      { while read -r k v _; do [[ $k == VmRSS: ]] && sum=$((sum + v)) && break; done < "/proc/$p/status"; } 2>/dev/null || true
    done
    ((sum > peak)) && peak=$sum && echo "$peak" > "$out"
    sleep 0.5
  done
}
cpu_ticks() { # pid,pid...: user and system clock ticks, summed over the processes and their threads
  local user=0 sys=0 p st f
  IFS=, read -ra ps <<< "$1"
  for p in "${ps[@]}"; do
    st=$(< "/proc/$p/stat") 2>/dev/null || continue
    read -ra f <<< "${st##*) }" # the fields after the command name, which may hold spaces
    user=$((user + f[11])) sys=$((sys + f[12]))
  done
  echo "$user $sys"
}
measure() { # workload target round command...: the command's output, the target's peak memory,
  # and the CPU time the target and the stand-in spent during the run
  local w=$1 t=$2 r=$3; shift 3
  local base=$runs/$w.$t.$r mem=${mem_pids[$w:$t]:-${mem_pids[$t]}} standin=${mem_pids[direct]} before
  before="$(cpu_ticks "$mem") $(cpu_ticks "$standin")"
  sample_rss "$base.rss" "$mem" & sampler_pid=$!
  "$@" > "$base.out" 2>&1 & load_pid=$!
  wait "$load_pid" || echo "  $w $t round $r: exit $?" >&2
  load_pid=
  kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=
  echo "$before $(cpu_ticks "$mem") $(cpu_ticks "$standin") $(getconf CLK_TCK)" > "$base.cpu"
}
wrk_run() { # workload target round url [wrk options]
  local w=$1 t=$2 r=$3 u=$4; shift 4
  measure "$w" "$t" "$r" wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$here/wrk.lua" "$@" "$u"
}
h2_run() {
  local w=$1 t=$2 r=$3
  measure "$w" "$t" "$r" h2load -t1 -c"$CONNS" -m4 -D"$DURATION" --log-file="$runs/$w.$t.$r.log" "${url[$t]}?operation=GetCACaps"
  mv "$runs/$w.$t.$r.out" "$runs/$w.$t.$r.h2load"
  bench h2sum "$runs/$w.$t.$r.h2load" "$runs/$w.$t.$r.log" > "$runs/$w.$t.$r.out"
}
run_one() { # workload target round
  local w=$1 t=$2 r=$3
  case $w in
    getcacaps) wrk_run "$@" "${url[$t]}?operation=GetCACaps" ;;
    getcacaps_cached) wrk_run "$@" "$(mscep "${cached_port[$t]}")?operation=GetCACaps" ;;
    long_get) wrk_run "$@" "https://127.0.0.1:${port[$t]}$long_target" ;;
    post) BENCH_BODY=$dir/pkcsreq.der wrk_run "$@" "${url[$t]}?operation=PKIOperation" ;;
    # A TLS client's handshake costs more than a server's, so one wrk thread would saturate its core
    # before the proxies do and cap every target at the same rate.
    new_tls) THREADS=$TLS_THREADS wrk_run "$@" "${url[$t]}?operation=GetCACaps" -H "Connection: close" ;;
    h2) h2_run "$@" ;;
    idle)
      restart "$t"
      measure "$@" bench idle --port "${port[$t]}" --path "${url[$t]#https://127.0.0.1:${port[$t]}}" \
        --n "$IDLE" --pids "${mem_pids[$t]}" ;;
    enrol)
      # scepserver refuses a second certificate for a CN it has issued, so every enrolment, in
      # this run or an earlier one in the same folder, has its own.
      measure "$@" bench enrol --url "${enrol_url[$t]}" --n "$ENROL" --parallel "$ENROL_PARALLEL" \
        --root "$dir/root.pem" --workdir "$dir/enrol/$t.$r" --prefix "bench-$run_id-$t-$r" ;;
    several)
      # Each NDES host's depot tells how many certificates it issued in this run.
      measure "$@" bench enrol --url "$(mscep "${several_port[$t]}")" --n "$SEVERAL" \
        --parallel "$SEVERAL_PARALLEL" --root "$dir/root.pem" --workdir "$dir/enrol/several.$t.$r" \
        --prefix "bench-$run_id-several-$t-$r" --depot "ndes01=$dir/depot-ndes01" --depot "ndes02=$dir/depot-ndes02" ;;
  esac
}

echo "warm-up"
for t in "${TARGETS[@]}"; do
  wrk -t1 -c"$CONNS" -d1s "${url[$t]}?operation=GetCACaps" > "$dir/warmup.$t.txt" 2>&1
done
for w in $WORKLOADS; do
  case $w in
    # What one held connection costs is a question for the proxies; the stand-in is nginx again.
    idle) ts=("${PROXIES[@]}") ;;
    getcacaps_cached) ts=("${CACHED_TARGETS[@]}") ;;
    several) ts=("${SEVERAL_TARGETS[@]}") ;;
    *) ts=("${TARGETS[@]}") ;;
  esac
  for r in $(seq "$ROUNDS"); do
    for t in "${ts[@]}"; do
      echo "$w: $t, round $r/$ROUNDS"
      run_one "$w" "$t" "$r"
      sleep 0.5
    done
  done
done

scrape_gateway

elapsed=$(($(date +%s) - started))
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "cpus=$(nproc)"
  echo "kernel=$(uname -r)"
  echo "rounds=$ROUNDS"
  echo "duration=$DURATION"
  echo "connections=$CONNS"
  echo "threads=$THREADS"
  echo "tls_threads=$TLS_THREADS"
  echo "idle=$IDLE"
  echo "enrol=$ENROL"
  echo "enrol_parallel=$ENROL_PARALLEL"
  echo "several=$SEVERAL"
  echo "several_parallel=$SEVERAL_PARALLEL"
  echo "post_body_bytes=$(cat "$dir/pkcsreq.size")"
  echo "long_target_bytes=${#long_target}"
  echo "gateway_log=$GATEWAY_LOG"
  echo "load=$load_start at the start, $(cut -d" " -f1-3 /proc/loadavg) at the end"
  echo "elapsed=$((elapsed / 60)) min $((elapsed % 60)) s"
  echo "versions=ndes-gateway $("$gateway_bin" --version | awk '{print $NF}'), $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR==1{print $3}'), wrk $(wrk -v 2>&1 | awk 'NR==1{print $2}'), h2load $(h2load --version | awk '{print $NF}'), $(openssl version | awk '{print $1, $2}')"
} > "$dir/meta.txt"
bench report "$dir"
echo "results: $dir/results.md $dir/results.json"
