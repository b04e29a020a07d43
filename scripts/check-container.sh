#!/usr/bin/env bash
# The container image built and run for real, with Debian's podman and runc and no registry: a
# Debian base made locally with debootstrap (or, where no Debian mirror answers, assembled from
# this host's own files) is tagged as the Dockerfile's runtime base, `podman build` runs
# deploy/docker/Dockerfile's runtime stage on the release binary, and the image is run as
# deploy/README.md says: `init` inside it writes the config against the demo's NDES stand-in,
# then `serve` answers /healthz, passes its HEALTHCHECK, runs as UID 10001 on a read-only root
# file system, enrols a device with scepclient and stops cleanly on SIGTERM.
#
#   bash scripts/check-container.sh
#
# NDES_GATEWAY_RELEASE_BIN: the binary to put in the image (default: the release build, built
# when missing). NDES_GATEWAY_BIN: the binary with the `dev` feature that runs the demo's NDES
# stand-in (default: the debug build, built when missing).
# Exit 77 (skipped, with the reason) only where podman cannot run a container at all.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
# The Dockerfile's runtime base, and what the test calls the image it builds.
base_image=docker.io/library/debian:12.14-slim
image=localhost/ndes-gateway:check
binary_image=localhost/ndes-gateway-binary:check
container=ndes-gateway-check-$$
# The HEALTHCHECK asks 127.0.0.1:9180, the admin default, and the container shares the host's
# network: that port must be free.
admin_port=9180
# The crun that Debian's podman defaults to refuses on hosts whose cgroups are in hybrid mode;
# runc runs there, given explicit limits.
podman=(podman --runtime runc)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
# Podman schedules an image's HEALTHCHECK with a systemd timer and complains on stderr where
# systemd is not running; the check is run by hand below, and that complaint is left out.
quiet_timer() { grep -v 'unable to get systemd connection' || true; }

need_packages podman:podman runc:runc debootstrap:debootstrap scep:scepserver scep:scepclient \
  curl:curl openssl:openssl

work=$(mktemp -d)
demo_pid=
cleanup() {
  "${podman[@]}" rm -f -t 0 "$container" >/dev/null 2>&1 || true
  # The image and its binary are made anew each run; the base, slow to make, is kept.
  "${podman[@]}" rmi -f "$image" "$binary_image" >/dev/null 2>&1 || true
  [[ -z $demo_pid ]] || { kill "$demo_pid" 2>/dev/null; wait "$demo_pid" 2>/dev/null; } || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# The binaries

target=${CARGO_TARGET_DIR:-$root/target}
release_bin=${NDES_GATEWAY_RELEASE_BIN:-$target/release/ndes-gateway}
if [[ -z ${NDES_GATEWAY_RELEASE_BIN:-} ]]; then
  need_rust
  echo "building $release_bin"
  (cd "$root" && cargo build --release --locked --quiet --bin ndes-gateway)
fi
dev_bin=${NDES_GATEWAY_BIN:-$target/debug/ndes-gateway}
if [[ ! -x $dev_bin && -z ${NDES_GATEWAY_BIN:-} ]]; then
  need_rust
  echo "building $dev_bin"
  (cd "$root" && cargo build --locked --quiet --bin ndes-gateway --features dev)
fi
for bin in "$release_bin" "$dev_bin"; do
  [[ -x $bin ]] || { echo "no gateway binary at $bin" >&2; exit 1; }
done

# ---------------------------------------------------------------------------------------------
# The base image: what `FROM debian:12.14-slim` would pull, made here.

# The Debian mirror apt uses on this host (debootstrap needs one it can reach).
debian_mirror() {
  local uri
  uri=$(sed -nE 's/^URIs: *(http[^ ]*debian)\/?$/\1/p; s/^deb +(\[[^]]*\] +)?(http[^ ]*debian)\/? .*/\2/p' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v security | head -n 1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# A bookworm minbase, as small as the slim image: no apt lists, no docs, no locales.
base_by_debootstrap() {
  local rootfs=$work/rootfs mirror
  mirror=$(debian_mirror)
  echo "debootstrap bookworm from $mirror"
  timeout 900 debootstrap --variant=minbase --include=passwd bookworm "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 5 "$work/debootstrap.log"; return 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/{doc,man,info,locale}
  tar -C "$rootfs" -c . | "${podman[@]}" import -q - "$base_image" >/dev/null
}

# Where no mirror answers: the programs the runtime stage and the HEALTHCHECK run (groupadd,
# useradd, bash, head, grep), the libraries they and the gateway link, and the account files.
base_from_host() {
  local rootfs=$work/hostroot f lib
  echo "assembling the base from this host's files"
  mkdir -p "$rootfs"/{etc,tmp,usr/bin,usr/sbin,usr/lib,usr/lib64}
  # Debian 12's merged /usr: /bin, /sbin, /lib and /lib64 are links into it.
  for f in bin sbin lib lib64; do ln -s "usr/$f" "$rootfs/$f"; done
  local programs=(/usr/bin/dash /usr/bin/bash /usr/bin/head /usr/bin/grep /usr/sbin/groupadd
    /usr/sbin/useradd /usr/sbin/nologin "$release_bin")
  for f in "${programs[@]}"; do
    [[ $f == "$release_bin" ]] || cp -a "$f" "$rootfs$f"
    for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
      mkdir -p "$rootfs$(dirname "$lib")"
      cp -aL "$lib" "$rootfs$lib"
    done
  done
  ln -s dash "$rootfs/usr/bin/sh"
  for f in passwd group shadow gshadow login.defs nsswitch.conf; do
    [[ ! -e /etc/$f ]] || cp -a "/etc/$f" "$rootfs/etc/$f"
  done
  # Only root and the gateway's own account.
  grep '^root:' /etc/passwd >"$rootfs/etc/passwd"
  grep '^root:' /etc/group >"$rootfs/etc/group"
  grep '^root:' /etc/shadow >"$rootfs/etc/shadow" 2>/dev/null || true
  grep '^root:' /etc/gshadow >"$rootfs/etc/gshadow" 2>/dev/null || true
  tar -C "$rootfs" -c . | "${podman[@]}" import -q - "$base_image" >/dev/null
}

if "${podman[@]}" image exists "$base_image"; then
  echo "base: $base_image (already made)"
else
  base_by_debootstrap || base_from_host
fi

# Podman runs here, or the whole check is skipped with the reason.
if ! out=$("${podman[@]}" run --rm "${limits[@]}" --network none "$base_image" true 2>&1); then
  echo "podman cannot run a container on this machine: $out"
  exit 77
fi

# ---------------------------------------------------------------------------------------------
# The image: the Dockerfile's runtime stage, its binary from an image that holds the release
# build at /out/ndes-gateway.

mkdir -p "$work/binary/out" "$work/context"
cp "$release_bin" "$work/binary/out/ndes-gateway"
tar -C "$work/binary" -c out | "${podman[@]}" import -q - "$binary_image" >/dev/null
# Docker format: OCI images carry no HEALTHCHECK. The context is empty: the runtime stage copies
# nothing from it.
"${podman[@]}" build -q --format docker "${limits[@]}" --build-arg "BINARY_FROM=$binary_image" \
  -f "$root/deploy/docker/Dockerfile" -t "$image" "$work/context" >/dev/null
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
echo "image: $image, $((size / 1024 / 1024)) MiB ($(stat -c %s "$release_bin" | awk '{ printf "%.1f", $1 / 1048576 }') MiB of it the gateway)"

# ---------------------------------------------------------------------------------------------
# NDES: the demo's stand-in (micromdm scepserver behind a gateway with the NDES certificate).

"$dev_bin" demo --dir "$work/demo" --listen 127.0.0.1:0 >"$work/demo.log" 2>&1 &
demo_pid=$!
for _ in $(seq 300); do
  grep -q 'Press Ctrl-C' "$work/demo.log" && break
  kill -0 "$demo_pid" 2>/dev/null || break
  sleep 0.2
done
grep -q 'Press Ctrl-C' "$work/demo.log" || { echo "the demo did not start:"; cat "$work/demo.log"; exit 1; }
ndes_url=$(sed -nE 's/^NDES stand-in: (https:[^ ]*).*/\1/p' "$work/demo.log")
pki=$work/demo/pki
echo "NDES stand-in: $ndes_url"

# The mounted /etc/ndes-gateway: the public certificate and the NDES CA as an operator brings
# them, readable by the gateway's UID.
etc=$work/etc
mkdir -p "$etc/tls"
cp "$pki/gateway.pem" "$etc/tls/public.pem"
cp "$pki/gateway.key" "$etc/tls/public.key"
cp "$pki/root.pem" "$etc/tls/corp-root.pem"
chown -R 10001:10001 "$etc"
fingerprint=$(openssl x509 -in "$pki/ndes.pem" -noout -fingerprint -sha256 | cut -d= -f2)
public_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

if curl -s -o /dev/null "http://127.0.0.1:$admin_port/"; then
  echo "127.0.0.1:$admin_port is taken on this host: the container's admin port cannot bind" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------
# The checks

run_init() {
  "${podman[@]}" run --rm "${limits[@]}" --network host --read-only --cap-drop ALL \
    -v "$etc:/etc/ndes-gateway" "$image" init --yes --config /etc/ndes-gateway/gateway.toml \
    --public-name scep.example.test --ndes-url "$ndes_url" --trust-fingerprint "$fingerprint" \
    --ndes-ca /etc/ndes-gateway/tls/corp-root.pem --cert /etc/ndes-gateway/tls/public.pem \
    --key /etc/ndes-gateway/tls/public.key --listen "127.0.0.1:$public_port" 2>&1 |
    quiet_timer | sed 's/^/  /'
  grep -q '^url = ' "$etc/gateway.toml"
}

start_serve() {
  "${podman[@]}" run -d --name "$container" "${limits[@]}" --network host --read-only \
    --cap-drop ALL -v "$etc:/etc/ndes-gateway:ro" "$image" 2>&1 >/dev/null | quiet_timer
  local _
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$admin_port/healthz" && break
    sleep 0.2
  done
  curl -sf "http://127.0.0.1:$admin_port/healthz" | sed 's/^/  \/healthz: /'
}

healthcheck() {
  "${podman[@]}" healthcheck run "$container"
  echo "  podman healthcheck run: healthy"
}

runs_as_non_root() {
  local pid uid
  pid=$("${podman[@]}" inspect --format '{{.State.Pid}}' "$container")
  uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
  echo "  the gateway (pid $pid on the host) runs as UID $uid"
  [[ $uid == 10001 ]]
}

read_only_root() {
  [[ $("${podman[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$container") == true ]]
  if "${podman[@]}" exec "$container" bash -c ': >/usr/local/bin/written' 2>"$work/ro.err"; then
    echo "  a file was written to the root file system"
    return 1
  fi
  echo "  writing to /usr/local/bin: $(tail -n 1 "$work/ro.err")"
}

enrol() {
  mkdir -p "$work/client"
  (cd "$work/client" && SSL_CERT_FILE=$pki/root.pem timeout 120 scepclient \
    -server-url "https://localhost:$public_port/certsrv/mscep/mscep.dll" -challenge secret \
    -private-key device.key -certificate device.pem -cn container-device \
    -organization "ndes-gateway container check" >"$work/scepclient.log" 2>&1) ||
    { cat "$work/scepclient.log"; return 1; }
  openssl x509 -in "$work/client/device.pem" -noout -subject | sed 's/^/  /'
  "${podman[@]}" logs "$container" 2>&1 | grep -q 'PKIOperation'
  echo "  the container's access log shows the PKIOperation"
}

stops_cleanly() {
  "${podman[@]}" stop -t 30 "$container" 2>&1 >/dev/null | quiet_timer
  local code
  code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$container")
  echo "  exit code after SIGTERM: $code"
  [[ $code == 0 ]]
}

check "init inside the image writes the config against NDES" run_init
check "serve in the image: /healthz answers" start_serve
check "the image's HEALTHCHECK passes" healthcheck
check "the gateway runs as UID 10001, not root" runs_as_non_root
check "the root file system is read-only" read_only_root
check "a real enrolment (scepclient) through the container" enrol
check "SIGTERM stops it with exit code 0" stops_cleanly

checks_summary
