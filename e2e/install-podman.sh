#!/usr/bin/env bash
# Install (or reuse) what `make image` needs: podman + runc + mmdebstrap + skopeo + a loopback
# registry (Debian's docker-registry), and write this machine's container config under $KVFLEET_CACHE.
# Idempotent and fast when warm (~0.1 s). Needs root (or sudo) only the first time, for apt-get.
#
# Prints the directory holding containers.conf / storage.conf on its last line; source
# `e2e/podman-env.sh` (or use e2e/images.py) to get CONTAINERS_CONF / CONTAINERS_STORAGE_CONF.
set -euo pipefail
CACHE=${KVFLEET_CACHE:-$HOME/.cache/kvfleet}
CONF_DIR=$CACHE/containers
PKGS=(podman buildah runc fuse-overlayfs slirp4netns uidmap mmdebstrap skopeo docker-registry)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "install-podman: missing ${missing[*]} and no apt-get; install podman (or docker) yourself" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "install-podman: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  # Debian starts the registry as a system service on :5000; the tests start their own, on free ports.
  $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

mkdir -p "$CONF_DIR/storage" "$CONF_DIR/run"
# NOTE (see /work/shared/notes/images.md): hybrid cgroups make crun fail -> runc + cgroupfs; the
# default nofile/nproc ulimits of 1048576 fail with EPERM without CAP_SYS_RESOURCE -> lower them.
cat > "$CONF_DIR/containers.conf.tmp" <<CONF
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$CONF_DIR/storage.conf.tmp" <<CONF
[storage]
driver = "overlay"
graphroot = "$CONF_DIR/storage"
runroot = "$CONF_DIR/run"
CONF
for f in containers.conf storage.conf; do
  cmp -s "$CONF_DIR/$f.tmp" "$CONF_DIR/$f" 2>/dev/null && rm "$CONF_DIR/$f.tmp" || mv "$CONF_DIR/$f.tmp" "$CONF_DIR/$f"
done
echo "$CONF_DIR"
