#!/usr/bin/env bash
# Load harness: identity-binding-proxy (serve mode, one core) next to nginx (one worker, same
# core, same certificate, static JSON of the same size). One command:
#
#   bash benches/load/run.sh            # full run, about 8-10 minutes
#   bash benches/load/run.sh --quick    # shorter runs and fewer entries, about 3 minutes
#   bash benches/load/run.sh --quick --hold   # after (a), keep everything up for profiling
#
# Builds the release binary, installs nginx/wrk/h2load from Debian if missing, maps the SNI
# name to 127.0.0.1 in /etc/hosts (wrk and h2load take SNI from the URL host), then hands over
# to harness.py. Results: target/bench/results.{json,md,svg}. Everything runs on loopback and
# every load is bounded in time.
set -euo pipefail

cd "$(dirname "$0")/../.."
quick=()
for arg in "$@"; do
    case "$arg" in
        --quick | --hold) quick+=("$arg") ;;
        *) echo "usage: bash benches/load/run.sh [--quick] [--hold]" >&2; exit 64 ;;
    esac
done

SNI=bench.identity-binding-proxy.test
BIN=target/release/identity-binding-proxy

echo "==> cargo build --release"
cargo build --release

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
exec python3 benches/load/harness.py --bin "$BIN" --sni "$SNI" "${quick[@]}"
