#!/usr/bin/env bash
# All the tests: formatting, lints, unit tests, socket-level boundary tests, the end-to-end
# enrolments with the real SCEP tools, the TLS audit, slow-client attacks, the supply-chain and
# deployment checks. Installs what they need (Debian packages, cargo-deny) when missing.
#
# Every stage runs whatever the ones before it did, so one run shows every failure. The last line
# counts every check that ran, cargo's tests one by one: `N passed, N failed`; the exit status is
# 1 when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
# scep: scepserver and scepclient; python3-h2: an HTTP/2 client that can send a :path longer than
# Rust's URI type allows; prometheus: promtool, which lints a real scrape; curl and openssl:
# clients the CLI tests use as a user would; gcc: ring's C parts; tmux: the terminal `init` is
# answered in, as a person would; podman, runc and debootstrap: the container image, built on a
# base made here and run; pebble: Pebble and pebble-challtestsrv, the ACME server the ACME tests
# run against.
need_packages scep:scepserver scep:scepclient python3-h2:/usr/lib/python3/dist-packages/h2 \
  prometheus:promtool curl:curl openssl:openssl gcc:cc ca-certificates:/etc/ssl/certs \
  testssl.sh:testssl slowhttptest:slowhttptest tmux:tmux podman:podman runc:runc \
  debootstrap:debootstrap pebble:pebble pebble:pebble-challtestsrv
command -v cargo-deny >/dev/null 2>&1 || cargo install --locked --quiet cargo-deny --version 0.20.2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

passed=0 failed=0
summary=()

# stage NAME COMMAND...: one stage, in a subshell with errexit, so that any failing command fails
# this stage alone. It is one check, unless it wrote "PASSED FAILED [SKIPPED]" to $work/counted
# for checks of its own. Exit status 77: the stage could not run here, and said why.
stage() {
  local name=$1
  shift
  echo
  echo "== $name"
  rm -f "$work/counted"
  set +e
  (set -e; "$@")
  local rc=$?
  set -e
  local p=0 f=0 s=0 result
  if ((rc == 77)); then
    result="$name skipped"
  elif [[ -s $work/counted ]]; then
    read -r p f s <"$work/counted"
    s=${s:-0}
    # A stage that fails although none of its counted checks did (a build, a crash) is a failure.
    ((rc == 0 || f > 0)) || f=1
    result="$name $p passed"
    ((f == 0)) || result+=" $f FAILED"
    ((s == 0)) || result+=" $s skipped"
  elif ((rc == 0)); then
    p=1
    result="$name ok"
  else
    f=1
    result="$name FAILED"
  fi
  passed=$((passed + p)) failed=$((failed + f))
  summary+=("$result")
}

# The last "N passed, M failed[, K skipped]" line a script printed, as its counts.
count_from() { # log
  sed -nE 's/^([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?$/\1 \2 \4/p' "$1" |
    tail -n 1 >"$work/counted"
}

# The RustSec database as cargo-deny always gets it, fetched from GitHub; where GitHub is out of
# reach (CI), the offline copy beside the project (../shared/rustsec/README.md).
advisories() {
  local rc=0 why
  timeout 90 cargo deny fetch db >"$work/fetch.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    cargo deny check advisories
    return
  elif ((rc == 124)); then
    why="no answer within 90 s"
  else
    why=$(grep -a 'fatal:' "$work/fetch.log" | tail -n 1 || true)
    why=${why:-$(tail -n 1 "$work/fetch.log")}
  fi
  echo "the RustSec database cannot be fetched: $why"
  # cargo-deny 0.20's folder for the default db-urls (deny.toml sets neither db-urls nor db-path).
  local db=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691
  local bundle
  bundle=$(cd .. && pwd)/shared/rustsec/advisory-db.bundle
  if [[ -f $bundle ]]; then
    seed_advisory_db "$bundle" "$db"
  elif [[ -d $db/.git ]]; then
    echo "no offline copy at $bundle: the database already in $db is used"
  else
    echo "advisories NOT checked: no offline copy at $bundle, and no database in $db"
    return 77
  fi
  echo "offline: the RustSec database of $(git -C "$db" show -s --format=%cs HEAD) in $db"
  cargo deny --offline check advisories
}

# The copy goes where cargo-deny looks for the default database, with its origin left at GitHub so
# that a run with a network fetches from there. A database fetched from GitHub that is newer than
# the copy stays.
seed_advisory_db() { # bundle db
  local bundle=$1 db=$2
  local git=(git -c advice.detachedHead=false -c init.defaultBranch=main)
  if [[ ! -d $db/.git ]]; then
    mkdir -p "$(dirname "$db")"
    "${git[@]}" clone -q "$bundle" "$db"
    git -C "$db" remote set-url origin https://github.com/RustSec/advisory-db
    return
  fi
  "${git[@]}" -C "$db" fetch -q "$bundle" HEAD
  local copy here
  copy=$(git -C "$db" show -s --format=%ct FETCH_HEAD)
  here=$(git -C "$db" show -s --format=%ct HEAD)
  ((copy < here)) || "${git[@]}" -C "$db" reset -q --hard FETCH_HEAD
}

slow_clients() {
  # slowhttptest redraws its status many times a second: its output is kept for a failure only.
  local log=$work/slow-clients.log rc=0
  bash scripts/check-slow-clients.sh >"$log" 2>&1 || rc=$?
  if ((rc == 0)); then
    grep -aE '^(slow-|[0-9]+ passed)' "$log"
  else
    grep -avE '^\[|^$' "$log" | tail -40
  fi
  count_from "$log"
  return "$rc"
}

container_checks() {
  local rc=0
  bash scripts/check-container.sh 2>&1 | tee "$work/container.log" || rc=$?
  # 77: podman cannot run a container on this machine, and the log says why.
  ((rc == 77)) || count_from "$work/container.log"
  return "$rc"
}

deploy_checks() {
  local rc=0
  bash scripts/check-deploy.sh 2>&1 | tee "$work/deploy.log" || rc=$?
  count_from "$work/deploy.log"
  return "$rc"
}

# Unit, integration and doc tests: one "test result:" line per test binary, summed. A build that
# fails prints none, and fails the stage.
cargo_test() {
  local log=$work/cargo-test.log rc=0
  cargo test --locked --workspace --no-fail-fast 2>&1 | tee "$log" || rc=$?
  local results
  results=$(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed;.*/\1 \2/p' "$log")
  if [[ -z $results ]]; then
    echo "cargo test printed no test result"
    return 1
  fi
  awk '{ p += $1; f += $2 } END { print p, f }' <<<"$results" >"$work/counted"
  return "$rc"
}

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --locked --all-targets -- -D warnings
for check in licenses bans sources; do
  stage "cargo deny $check" cargo deny check "$check"
done
stage "cargo deny advisories" advisories
stage "TLS audit (testssl.sh)" bash scripts/check-tls.sh
stage "slow clients (slowhttptest) during enrolments" slow_clients
stage "deploy/ checks" deploy_checks
stage "container image built and run (podman, runc)" container_checks
stage "cargo test" cargo_test

echo
summary_line=$(printf '%s, ' "${summary[@]}")
echo "== summary: ${summary_line%, }"
echo "$passed passed, $failed failed"
((failed == 0))
