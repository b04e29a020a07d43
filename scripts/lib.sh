# Shared by the README's two commands and the check scripts: install the Debian packages a step
# needs, once, as root; run checks and count them.
need_packages() {
  local missing=()
  for spec in "$@"; do
    # spec is "package:program-or-file"; the package is installed when the program is missing.
    local pkg=${spec%%:*} probe=${spec#*:}
    if [[ $probe == /* ]]; then [[ -e $probe ]] || missing+=("$pkg")
    else command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg"); fi
  done
  # One package may stand for several programs: name it once.
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk 'NF && !seen[$0]++')
  ((${#missing[@]})) || return 0
  echo "installing Debian packages: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

need_rust() {
  command -v cargo >/dev/null 2>&1 && return 0
  echo "cargo not found: install Rust (https://rustup.rs) or Debian's cargo package, then run this again" >&2
  exit 1
}

# The checks of a check script: `check NAME COMMAND...` runs one in a subshell with errexit, so
# any failing command fails that check alone and the others still run (exit status 77: skipped,
# having said why); `checks_summary` ends the script with the line test.sh counts.
passed=0 failed=0 skipped=0
failures=()
check() {
  local name=$1
  shift
  echo
  echo "== $name"
  set +e
  (set -e; "$@")
  local rc=$?
  set -e
  case $rc in
    0) passed=$((passed + 1)); echo "ok: $name" ;;
    77) skipped=$((skipped + 1)); echo "skipped: $name" ;;
    *) failed=$((failed + 1)); failures+=("$name"); echo "FAILED: $name" ;;
  esac
}

checks_summary() {
  echo
  ((${#failures[@]} == 0)) || printf 'failed: %s\n' "${failures[@]}"
  local summary="$passed passed, $failed failed"
  ((skipped == 0)) || summary+=", $skipped skipped"
  echo "$summary"
  ((failed == 0))
}
