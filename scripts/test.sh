#!/usr/bin/env bash
# All the tests: formatting, lints, unit tests, socket-level boundary tests, and the end-to-end
# enrolments with the real SCEP tools. Installs what they need (Debian packages) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
# scep: scepserver and scepclient; python3-h2: an HTTP/2 client that can send a :path longer than
# Rust's URI type allows; prometheus: promtool, which lints a real scrape; curl: a client the CLI
# test uses as a user would; gcc: ring's C parts.
need_packages scep:scepserver scep:scepclient python3-h2:/usr/lib/python3/dist-packages/h2 \
  prometheus:promtool curl:curl gcc:cc ca-certificates:/etc/ssl/certs
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
