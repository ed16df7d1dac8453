#!/usr/bin/env bash
# Load harness: identity-binding-proxy (serve mode, one core) next to nginx (one worker, same
# core, same certificate, static JSON of the same size). One command:
#
#   bash benches/load/run.sh            # full run, about 11 minutes, + ~7 for (k)
#   bash benches/load/run.sh --quick    # shorter runs and fewer entries, about 3 minutes, + ~4 for (k)
#   bash benches/load/run.sh --quick --hold   # after (a), keep everything up for profiling
#   bash benches/load/run.sh --savings  # only (k), what a node saves: P = 1, 10, 100 Python
#                                       # SDK pods direct vs through the proxy, about 7 minutes
#
# Builds the release binary, installs nginx/wrk/h2load from Debian if missing, maps the SNI
# name to 127.0.0.1 in /etc/hosts (wrk and h2load take SNI from the URL host), then hands over
# to harness.py. Results: target/bench/results.{json,md,svg}. Everything runs on loopback and
# every load is bounded in time.
set -euo pipefail

cd "$(dirname "$0")/../.."
quick=()
savings=0
for arg in "$@"; do
    case "$arg" in
        --quick | --hold) quick+=("$arg") ;;
        --savings)
            savings=1
            quick+=("$arg")
            ;;
        *) echo "usage: bash benches/load/run.sh [--quick] [--hold] [--savings]" >&2; exit 64 ;;
    esac
done

SNI=bench.identity-binding-proxy.test
BIN=target/release/identity-binding-proxy-dev

echo "==> cargo build --release"
cargo build --release

# The peer: the workload identity project's token proxy, built from the Go module proxy at a
# pinned version (benches/load/peer/go.mod + go.sum) into the cache outside the clone, reusing
# the module and build caches of scripts/real-cluster.sh (the same v1.6.0 module).
PEER_VERSION=v1.6.0
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/identity-binding-proxy
PEER=
if ((!savings)); then # (k) alone does not run the peer
    command -v go >/dev/null || {
        echo "error: go is required to build the peer (github.com/Azure/azure-workload-identity/cmd/proxy@$PEER_VERSION)" >&2
        exit 1
    }
    mlog=scripts/real-cluster/webhook/mlog # the stand-in for monis.app/mlog the webhook build uses too
    peer_key=$( (cat benches/load/peer/go.mod benches/load/peer/go.sum $mlog/go.mod $mlog/mlog.go && go version) |
        sha256sum | cut -c1-12)
    PEER=$CACHE/peer/$PEER_VERSION-$peer_key/proxy
    if [[ ! -x $PEER ]]; then
        echo "==> go build azure-workload-identity/cmd/proxy@$PEER_VERSION -> $PEER"
        mkdir -p "$(dirname "$PEER")"
        (
            cd benches/load/peer
            export GOMODCACHE=$CACHE/real-cluster/go/mod GOCACHE=$CACHE/real-cluster/go/build
            export GOFLAGS="-buildvcs=false -mod=readonly -p=2"
            go build -trimpath -ldflags "-s -w" -o "$PEER.tmp" github.com/Azure/azure-workload-identity/cmd/proxy
        )
        mv "$PEER.tmp" "$PEER"
    fi
fi

# (k): the official Python SDK, from PyPI at the version the client tests pin, in a venv in
# the cache outside the clone (reused by later runs).
SDK=azure-identity==1.27.0
VENV=$CACHE/python-sdk/${SDK/==/-}
if [[ ! -f $VENV/.installed ]]; then
    echo "==> python venv with $SDK -> $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SDK"
    touch "$VENV/.installed"
fi

echo "==> tools"
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v openssl >/dev/null || missing+=(openssl)
command -v taskset >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo)
    echo "installing from Debian: ${missing[*]}"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}"
fi

# wrk has no --resolve: the SNI name must resolve to loopback. Added once, idempotently.
if ! grep -qE "^127\.0\.0\.1[[:space:]].*\b${SNI//./\\.}\b" /etc/hosts; then
    echo "adding '127.0.0.1 $SNI' to /etc/hosts"
    if [[ $(id -u) -eq 0 ]]; then
        echo "127.0.0.1 $SNI" >>/etc/hosts
    else
        echo "127.0.0.1 $SNI" | sudo tee -a /etc/hosts >/dev/null
    fi
fi

if [[ $(nproc) -lt 2 ]]; then
    echo "warning: fewer than 2 cores; servers and load generators will share a core" >&2
fi

echo "==> load (servers on core 0, emulators and load generators on core 1)"
peer=()
[[ -z $PEER ]] || peer=(--peer "$PEER")
exec python3 benches/load/harness.py --bin "$BIN" --sni "$SNI" "${peer[@]}" \
    --sdk-python "$VENV/bin/python" "${quick[@]}"
