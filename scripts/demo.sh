#!/usr/bin/env bash
# The demo: a real SCEP enrolment through the gateway, on loopback. Installs micromdm scepserver
# and scepclient (Debian package scep) when missing, builds the gateway, runs `ndes-gateway demo`.
# Extra arguments go to the demo: --listen ADDR, --dir DIR, --once, --ndes N (N NDES hosts, each
# with its own CA, the gateway routing each enrolment to the one that can answer it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
need_packages scep:scepserver scep:scepclient gcc:cc
exec cargo run --release --locked --quiet -p ndes-gateway --features dev -- demo "$@"
