#!/usr/bin/env bash
# Builds inferd's container images from this checkout:
#
#   scripts/docker_build.sh cpu     # docker/Dockerfile      -> inferd:cpu
#   scripts/docker_build.sh cuda    # docker/Dockerfile.cuda -> inferd:cuda (no GPU needed to build)
#   scripts/docker_build.sh bases   # only make sure the base images exist
#   scripts/docker_build.sh engine  # only make sure the Docker engine runs (scripts/docker_check.sh)
#   scripts/docker_build.sh cpu -- --no-cache   # anything after -- goes to `docker build`
#
# The Dockerfiles name the public base images (ARG RUST_IMAGE, ARG RUNTIME_IMAGE). Each one is used
# when it is already local or `docker pull` gets it; where image registries cannot be reached (as on
# the project's build machines) a local stand-in is made from Debian's packages and passed in with
# --build-arg instead, under its own name so that it never shadows the real image:
#   inferd-local/debian:bookworm-slim   Debian 12 minbase, slimmed as the official image is
#                                       (mmdebstrap; about 75 MB, like debian:bookworm-slim)
#   inferd-local/rust:<ver>-bookworm    the same plus gcc/g++ and this machine's Rust toolchain of
#                                       the pinned version (rustup installs it when missing), laid
#                                       out as in the rust image (/usr/local/cargo, /usr/local/rustup)
# Builds use the host network (crates.io, PyPI, Debian). The Docker engine is installed (Debian's
# docker.io) and started (dockerd as root, overlay2, else vfs) when it is not running.
#
# Environment: INFERD_IMAGE (tag; default inferd:cpu / inferd:cuda), INFERD_DOCKER_PULL=0 (never try
# to pull the bases), DOCKERD_LOG (default /tmp/inferd-dockerd.log).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

what="${1:-}"
shift || true
extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
case "$what" in
  cpu) dockerfile=docker/Dockerfile ;;
  cuda) dockerfile=docker/Dockerfile.cuda ;;
  bases|engine) dockerfile=docker/Dockerfile ;;
  *) echo "usage: scripts/docker_build.sh cpu|cuda|bases|engine [-- docker build args]" >&2; exit 2 ;;
esac

log() { printf '==> %s\n' "$*" >&2; }
die() { echo "docker_build: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root for: $*"; fi; }

# --- the Docker engine ------------------------------------------------------------------------
ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    log "installing Debian's docker.io"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
  fi
  local logf="${DOCKERD_LOG:-/tmp/inferd-dockerd.log}" pidf=/var/run/docker.pid
  for driver in "" vfs; do
    log "starting dockerd${driver:+ with storage driver $driver} (log: $logf)"
    # In its own session, so that it outlives this script: later builds and checks use it.
    as_root sh -c "setsid dockerd ${driver:+--storage-driver $driver} >'$logf' 2>&1 </dev/null &"
    for _ in $(seq 60); do
      docker info >/dev/null 2>&1 && return 0
      sleep 1
    done
    tail -5 "$logf" >&2 || true
    [ -f "$pidf" ] && as_root kill "$(cat "$pidf")" 2>/dev/null && sleep 3 || true
  done
  die "the Docker engine does not start (see $logf)"
}

# --- base images -------------------------------------------------------------------------------
MIRRORS=("deb http://deb.debian.org/debian bookworm main"
         "deb http://deb.debian.org/debian bookworm-updates main"
         "deb http://deb.debian.org/debian-security bookworm-security main")
# What the official slim images leave out (debuerreotype's slimify), and merged /usr without the
# usrmerge package (which would pull in perl: 46 MB).
MMDEBSTRAP_OPTS=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')

# The apt settings of the official Debian images (debuerreotype): no package caches or .deb files
# left in image layers (without them an `apt-get install` layer keeps 80 MB of /var/cache/apt/*.bin).
# With these, `apt-get clean` no longer finds the caches of the bootstrap itself: removed here.
apt_docker_conf() {
  local d="$1"
  mkdir -p "$d"
  cat > "$d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
  echo 'Acquire::Languages "none";' > "$d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' > "$d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$d/docker-autoremove-suggests"
  echo "--customize-hook=cp $d/docker-* \"\$1/etc/apt/apt.conf.d/\" && rm -f \"\$1\"/var/cache/apt/*.bin"
}

ensure_mmdebstrap() {
  command -v mmdebstrap >/dev/null && return 0
  log "installing mmdebstrap"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
try_pull() { [ "${INFERD_DOCKER_PULL:-1}" != 0 ] && timeout 300 docker pull -q "$1" >/dev/null 2>&1; }

# Default of `ARG NAME=...` in a Dockerfile.
arg_default() { sed -n "s/^ARG $2=//p" "$1" | head -1; }

debian_standin() {
  local tag=inferd-local/debian:bookworm-slim
  if ! have_image "$tag"; then
    ensure_mmdebstrap
    log "making $tag (mmdebstrap, Debian's packages)"
    as_root mmdebstrap "${MMDEBSTRAP_OPTS[@]}" "$(apt_docker_conf "$(mktemp -d)")" bookworm - "${MIRRORS[@]}" 2>/tmp/inferd-mmdebstrap.log \
      | docker import -c 'CMD ["bash"]' -m "Debian bookworm minbase (mmdebstrap), stand-in for debian:bookworm-slim" - "$tag" >/dev/null \
      || { tail -20 /tmp/inferd-mmdebstrap.log >&2; die "mmdebstrap failed"; }
  fi
  echo "$tag"
}

rust_standin() {
  local image="$1" ver
  ver="$(echo "$image" | sed -n 's/^rust:\([0-9][0-9.]*\)-bookworm.*/\1/p')"
  [ -n "$ver" ] || die "cannot read a Rust version from $image (expected rust:X.Y.Z-bookworm)"
  local tag="inferd-local/rust:$ver-bookworm"
  if ! have_image "$tag"; then
    ensure_mmdebstrap
    command -v rustup >/dev/null || die "making $tag needs rustup (to provide Rust $ver)"
    rustup toolchain list | grep -q "^$ver-" || rustup toolchain install "$ver" --profile minimal >&2
    local sysroot host tc
    sysroot="$(rustup run "$ver" rustc --print sysroot)"
    host="$(rustup run "$ver" rustc -vV | sed -n 's/^host: //p')"
    rustup run "$ver" rustc --version | grep -q "^rustc $ver " || die "rustup's $ver is $(rustup run "$ver" rustc --version)"
    tc="/usr/local/rustup/toolchains/$ver-$host"
    log "making $tag (mmdebstrap + Rust $ver from $sysroot)"
    # The toolchain's bin/ and lib/ (not its docs), with cargo, rustc and rustdoc on PATH where the
    # rust image has its rustup proxies. rustc finds its sysroot from its own (resolved) path.
    as_root mmdebstrap "${MMDEBSTRAP_OPTS[@]}" "$(apt_docker_conf "$(mktemp -d)")" \
      --include=ca-certificates,curl,git,gcc,g++,libc6-dev,make,pkg-config,python3,xz-utils,file \
      --customize-hook="mkdir -p \"\$1$tc\" \"\$1/usr/local/cargo/bin\" && cp -a '$sysroot/bin' '$sysroot/lib' \"\$1$tc/\"" \
      --customize-hook="for b in cargo rustc rustdoc; do ln -s '$tc/bin/'\$b \"\$1/usr/local/cargo/bin/\$b\"; done" \
      bookworm - "${MIRRORS[@]}" 2>/tmp/inferd-mmdebstrap.log \
      | docker import -m "Debian bookworm + Rust $ver (mmdebstrap), stand-in for $image" \
          -c "ENV RUSTUP_HOME=/usr/local/rustup" -c "ENV CARGO_HOME=/usr/local/cargo" -c "ENV RUST_VERSION=$ver" \
          -c "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
          -c 'CMD ["bash"]' - "$tag" >/dev/null \
      || { tail -20 /tmp/inferd-mmdebstrap.log >&2; die "mmdebstrap failed"; }
  fi
  echo "$tag"
}

# Prints the image to build FROM for a public base: itself when local or pullable, else a stand-in.
base_for() {
  local image="$1"
  if have_image "$image" || try_pull "$image"; then echo "$image"; return; fi
  case "$image" in
    debian:bookworm-slim*) debian_standin ;;
    rust:*-bookworm*) rust_standin "$image" ;;
    *) die "cannot pull $image and have no stand-in for it; pull or load it, or pass another with -- --build-arg" ;;
  esac
}

ensure_docker
[ "$what" = engine ] && exit 0
rust_image="$(arg_default "$dockerfile" RUST_IMAGE)"
runtime_image="$(arg_default "$dockerfile" RUNTIME_IMAGE)"
[ -n "$rust_image" ] && [ -n "$runtime_image" ] || die "$dockerfile lacks ARG RUST_IMAGE= / ARG RUNTIME_IMAGE= defaults"
rust_base="$(base_for "$rust_image")"
runtime_base="$(base_for "$runtime_image")"
log "bases: build stage $rust_base (for $rust_image), runtime $runtime_base (for $runtime_image)"
[ "$what" = bases ] && exit 0

# Locally added CA certificates of this host (a TLS-inspecting proxy on the way to crates.io / PyPI)
# go to the build stage for its downloads, never into the image. INFERD_BUILD_CA=none: none;
# INFERD_BUILD_CA=FILE: that PEM file.
ca_files=()
case "${INFERD_BUILD_CA:-auto}" in
  none) ;;
  auto) for f in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt; do [ -f "$f" ] && ca_files+=("$f"); done ;;
  *) ca_files=("$INFERD_BUILD_CA") ;;
esac
ca_pem=""
if [ ${#ca_files[@]} -gt 0 ]; then
  ca_pem="$(cat "${ca_files[@]}")"
  log "build-stage CA certificates: ${ca_files[*]}"
fi

tag="${INFERD_IMAGE:-inferd:$what}"
# BuildKit where the buildx plugin exists; else the classic builder (the Dockerfiles need nothing more).
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
log "docker build -f $dockerfile -t $tag (host network for crates.io / PyPI / Debian)"
start=$(date +%s)
docker build --network host -f "$dockerfile" \
  --build-arg RUST_IMAGE="$rust_base" --build-arg RUNTIME_IMAGE="$runtime_base" --build-arg BUILD_CA_CERTS="$ca_pem" \
  -t "$tag" ${extra[@]+"${extra[@]}"} .
log "built $tag in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
