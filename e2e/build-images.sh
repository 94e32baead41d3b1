#!/usr/bin/env bash
# `make image`: build kvfleet-operator and kvfleet-engine with podman (docker where that is what exists).
#
#   e2e/build-images.sh [TAG]           # default TAG=dev -> localhost/kvfleet-operator:dev, localhost/kvfleet-engine:dev
#
# Env: BASE_IMAGE (default: a Debian bookworm base made here with mmdebstrap, cached by Debian version),
#      TORCH_INDEX (empty = PyPI), KVFLEET_CACHE (~/.cache/kvfleet: base tarball, wheels, podman storage),
#      IMAGES ("operator engine").
# Warm (nothing changed) it takes seconds: podman's layer cache lives under $KVFLEET_CACHE/containers.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-dev}
CACHE=${KVFLEET_CACHE:-$HOME/.cache/kvfleet}
IMAGES=${IMAGES:-operator engine}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_REV=3   # bump when the package list below changes
log() { echo "[build-images $(date +%T)] $*" >&2; }

if command -v podman >/dev/null || ! command -v docker >/dev/null; then
  CONF_DIR=$(e2e/install-podman.sh | tail -1)
  export CONTAINERS_CONF=$CONF_DIR/containers.conf CONTAINERS_STORAGE_CONF=$CONF_DIR/storage.conf
  ENGINE=podman
else
  ENGINE=docker   # a laptop with Docker: BASE_IMAGE defaults to python:3.11-slim from Docker Hub
  BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
fi

if [ -z "${BASE_IMAGE:-}" ]; then
  # The base is keyed by Debian's point release (the Release file's Version, e.g. 12.12): a new point
  # release makes a new base; offline, the newest cached one is used.
  version=$(curl -fsS --max-time 10 "$MIRROR/dists/$SUITE/Release" 2>/dev/null | sed -n 's/^Version: //p' || true)
  if [ -z "$version" ]; then
    version=$(ls "$CACHE/images" 2>/dev/null | sed -n "s/^base-$SUITE-\(.*\)-r$BASE_REV\.tar$/\1/p" | sort -V | tail -1)
    [ -n "$version" ] || { log "no Debian mirror and no cached base"; exit 1; }
  fi
  BASE_IMAGE=localhost/kvfleet-base:$SUITE-$version-r$BASE_REV
  tarball=$CACHE/images/base-$SUITE-$version-r$BASE_REV.tar
  if ! podman image exists "$BASE_IMAGE"; then
    if [ ! -f "$tarball" ]; then
      log "mmdebstrap $SUITE ($version) -> $tarball"
      mkdir -p "$CACHE/images"
      # Essential packages + python3 and venv (no apt); merged /usr by mmdebstrap's hook rather than the
      # usrmerge package (which pulls in perl, ~50 MB); no docs, man pages or locales.
      mmdebstrap --quiet --format=tar --variant=essential --aptopt='APT::Install-Recommends "false"' \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --include=python3,python3-venv,ca-certificates,libstdc++6 \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$SUITE" "$tarball.tmp" "$MIRROR" > "$CACHE/images/mmdebstrap.log" 2>&1 \
        || { tail -30 "$CACHE/images/mmdebstrap.log" >&2; exit 1; }
      mv "$tarball.tmp" "$tarball"
    fi
    log "podman import $tarball as $BASE_IMAGE"
    podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["/usr/bin/python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
  fi
fi

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX=${TORCH_INDEX:-}")
if [ "$ENGINE" = podman ]; then
  mkdir -p "$CACHE/wheels" && touch "$CACHE/wheels/.cache-mount"
  # The wheel cache and the host's CA bundle (a TLS-intercepting proxy may sit before PyPI) are mounted
  # for the build steps only: neither lands in a layer.
  build_args+=(--network=host -v "$CACHE/wheels:/wheels" --layers --force-rm)
  ca=/etc/ssl/certs/ca-certificates.crt
  [ -f "$ca" ] && build_args+=(-v "$ca:$ca:ro")
fi
# Peak disk of a build: a layer exists twice while it is committed (container, then layer); the engine's
# largest (PyPI's CUDA libraries) is ~4 GB, next to the ~3 GB wheel cache. Refuse early rather than
# fill a shared disk.
declare -A NEED_GB=([operator]=2 [engine]=9)
for image in $IMAGES; do
  free_gb=$(( $(df -Pk "$CACHE" | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$ENGINE" = podman ] && ! podman image exists "localhost/kvfleet-$image:$TAG" \
     && [ "$free_gb" -lt "${NEED_GB[$image]}" ]; then
    log "only ${free_gb} GB free under $CACHE; building kvfleet-$image needs about ${NEED_GB[$image]} GB at its peak"
    exit 1
  fi
  start=$(date +%s)
  log "$ENGINE build --target $image -> localhost/kvfleet-$image:$TAG (base $BASE_IMAGE)"
  $ENGINE build -q "${build_args[@]}" --target "$image" -t "localhost/kvfleet-$image:$TAG" . >/dev/null
  size=$($ENGINE image inspect --format '{{.Size}}' "localhost/kvfleet-$image:$TAG")
  log "kvfleet-$image:$TAG built in $(( $(date +%s) - start ))s, $(( size / 1000000 )) MB"
done
if [ "$ENGINE" = podman ]; then
  # Layers of earlier builds that no tag uses any more: the engine's are GBs, and storage is a cache.
  podman image prune -f >/dev/null
fi
