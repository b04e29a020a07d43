#!/usr/bin/env bash
# All the tests: formatting, lints, unit tests, socket-level boundary tests, the end-to-end
# enrolments with the real SCEP tools, the TLS audit, slow-client attacks, the supply-chain and
# deployment checks. Installs what they need (Debian packages, cargo-deny) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
# scep: scepserver and scepclient; python3-h2: an HTTP/2 client that can send a :path longer than
# Rust's URI type allows; prometheus: promtool, which lints a real scrape; curl and openssl:
# clients the CLI tests use as a user would; gcc: ring's C parts.
need_packages scep:scepserver scep:scepclient python3-h2:/usr/lib/python3/dist-packages/h2 \
  prometheus:promtool curl:curl openssl:openssl gcc:cc ca-certificates:/etc/ssl/certs \
  testssl.sh:testssl slowhttptest:slowhttptest
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo deny (licenses, duplicate versions, sources)"
command -v cargo-deny >/dev/null 2>&1 || cargo install --locked --quiet cargo-deny --version 0.20.2
# Advisories need the RustSec database from the network; run `cargo deny check advisories` where
# it can be fetched.
cargo deny check licenses bans sources
echo "== TLS audit (testssl.sh)"
bash scripts/check-tls.sh
echo "== slow clients (slowhttptest) during enrolments"
# slowhttptest redraws its status many times a second: keep its output for a failure only.
slow_log=$(mktemp)
if ! bash scripts/check-slow-clients.sh > "$slow_log" 2>&1; then
  grep -avE '^\[|^$' "$slow_log" | tail -40; echo "slow-client check failed"; exit 1
fi
grep -aE '^(slow-|[0-9]+ passed)' "$slow_log"; rm -f "$slow_log"
if [[ -f scripts/check-deploy.sh ]]; then
  echo "== deploy/ checks"
  bash scripts/check-deploy.sh
fi
echo "== cargo test"
cargo test --locked --workspace
