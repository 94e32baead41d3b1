#!/usr/bin/env bash
# Build (or reuse) a minimal OpenTelemetry Collector for the tracing tests:
# the OTLP receiver (core) and the debug exporter (core) plus the file exporter
# (contrib). It is a hand-written main in a wrapper module calling
# otelcol.NewCommand with those factories -- the same thing the collector
# builder (ocb) would generate from a manifest, without building ocb first.
# The binary lands in a cache keyed by version, outside the repo, like the
# control plane (e2e/build-binaries.sh): a warm run costs nothing, a cold one
# about 5 minutes on 2 busy cores (downloads included; ~0.5 GB module cache and
# ~0.5 GB build cache).
#
#   e2e/build-collector.sh           # prints the otelcol path on its last line
#   KVFLEET_CACHE=/elsewhere e2e/build-collector.sh
set -euo pipefail

# One release for every collector module. v0.161.0 is the newest contrib
# fileexporter known to fetch and tidy here (newer ones failed or were not
# tried); core v0.161.0 is its pair.
# The collector's stable modules (confmap, its providers, pdata, ...) are tagged
# v1.x alongside: v0.161.0 goes with v1.67.0. Pin them too, or `go mod tidy`
# resolves the config providers at their newest tag and mixes releases.
OTELCOL_VERSION=${OTELCOL_VERSION:-v0.161.0}
OTELCOL_STABLE_VERSION=${OTELCOL_STABLE_VERSION:-v1.67.0}
CONTRIB_VERSION=${CONTRIB_VERSION:-$OTELCOL_VERSION}

CACHE=${KVFLEET_CACHE:-$HOME/.cache/kvfleet}
BIN="$CACHE/bin/otelcol-$OTELCOL_VERSION"
mkdir -p "$BIN"
log() { printf '[build-collector %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

# A pipeline like the tests': a binary that cannot load it is not cached (or is rebuilt).
smoke_config() {
  cat <<YAML
receivers: {otlp: {protocols: {grpc: {endpoint: "127.0.0.1:0"}}}}
exporters: {file: {path: /dev/null, format: json}, debug: {}}
service:
  telemetry: {metrics: {level: none}}
  pipelines:
    traces: {receivers: [otlp], exporters: [file, debug]}
    metrics: {receivers: [otlp], exporters: [file]}
YAML
}
works() { smoke_config > "$BIN/smoke.yaml" && "$1" validate --config="file:$BIN/smoke.yaml" >&2; }

if [ -x "$BIN/otelcol" ] && works "$BIN/otelcol"; then
  log "otelcol $OTELCOL_VERSION cached"
  echo "$BIN/otelcol"
  exit 0
fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
start=$(date +%s)
log "building otelcol $OTELCOL_VERSION (otlp receiver; file + debug exporters)"
cat > "$work/go.mod" <<MOD
module kvfleet.local/otelcol

go 1.26
MOD
cat > "$work/main.go" <<'GO'
// A minimal OpenTelemetry Collector distribution for kvfleet's tests.
package main

import (
	"log"

	"github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	var err error
	// Telemetry must be set since v0.13x: the collector's own logs (and metrics, off in the tests).
	f := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}
	f.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory())
	if err != nil {
		return f, err
	}
	f.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](
		debugexporter.NewFactory(), fileexporter.NewFactory())
	if err != nil {
		return f, err
	}
	return f, nil
}

func main() {
	info := component.BuildInfo{Command: "otelcol", Description: "kvfleet test collector", Version: "KVFLEET_OTELCOL_VERSION"}
	set := otelcol.CollectorSettings{
		BuildInfo: info,
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{
					fileprovider.NewFactory(), envprovider.NewFactory(),
				},
			},
		},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}
GO
sed -i "s/KVFLEET_OTELCOL_VERSION/${OTELCOL_VERSION#v}/" "$work/main.go"
(cd "$work" &&
  go get "go.opentelemetry.io/collector/otelcol@$OTELCOL_VERSION" \
         "go.opentelemetry.io/collector/receiver/otlpreceiver@$OTELCOL_VERSION" \
         "go.opentelemetry.io/collector/exporter/debugexporter@$OTELCOL_VERSION" \
         "go.opentelemetry.io/collector/confmap/provider/fileprovider@$OTELCOL_STABLE_VERSION" \
         "go.opentelemetry.io/collector/confmap/provider/envprovider@$OTELCOL_STABLE_VERSION" \
         "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter@$CONTRIB_VERSION" >&2 &&
  go mod tidy >&2 &&
  go build -trimpath -ldflags="-s -w" -o "$BIN/otelcol.tmp.$$" . >&2)
works "$BIN/otelcol.tmp.$$" || { log "the built otelcol cannot load a minimal config"; exit 1; }
mv "$BIN/otelcol.tmp.$$" "$BIN/otelcol"
log "otelcol $OTELCOL_VERSION built in $(( $(date +%s) - start ))s"
echo "$BIN/otelcol"
