# Shared by the README's two commands: install the Debian packages a step needs, once, as root.
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
