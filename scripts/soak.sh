#!/usr/bin/env bash
# Soak: a fixed, moderate request rate against `identity-binding-proxy dev` for N minutes,
# sampling the dev process's resident memory every 10 s from /proc. Fails when any request
# fails or when RSS grows more than 5 % between the end of the warm-up and the end.
#
#   scripts/soak.sh [MINUTES]            (default 10)
#   SOAK_RPS=50 SOAK_CLIENTS=4 SOAK_WARMUP_SECS=60 IBP_BIN=target/release/identity-binding-proxy-dev
#
# The load generator is h2load (Debian: nghttp2-client); it is installed with apt-get when
# missing and we are root. `dev` runs the Kubernetes and Entra emulators in the same process,
# so the RSS measured is the proxy's plus theirs; they hold no per-request state.
set -euo pipefail

minutes="${1:-10}"
rps_per_client="${SOAK_RPS:-25}"
clients="${SOAK_CLIENTS:-4}"
warmup="${SOAK_WARMUP_SECS:-60}"
max_growth_pct="${SOAK_MAX_GROWTH_PCT:-5}"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${IBP_BIN:-$root/target/debug/identity-binding-proxy-dev}"

if ! command -v h2load >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
    else
        echo "soak: h2load is missing (apt-get install nghttp2-client)" >&2
        exit 2
    fi
fi
if [ ! -x "$bin" ]; then
    (cd "$root" && cargo build --quiet)
fi

work="$(mktemp -d)"
dev_pid=""
sampler_pid=""
cleanup() {
    [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
    [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" dev --state-dir "$work/state" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 600); do
    [ -f "$work/state/dev.json" ] && break
    kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.log" >&2; exit 1; }
    sleep 0.1
done
[ -f "$work/state/dev.json" ] || { echo "soak: dev did not become ready" >&2; exit 1; }

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/state/dev.json" "$1"; }
proxy_url="$(field proxy_url)"
sni="$(field sni_name)"
tenant="$(field tenant_id)"
client_id="$(field client_id)"
token_file="$(field allowed_token_file)"
port="${proxy_url##*:}"

python3 - "$client_id" "$token_file" >"$work/body" <<'PY'
import sys, urllib.parse
print(urllib.parse.urlencode({
    "grant_type": "client_credentials",
    "client_id": sys.argv[1],
    "scope": "https://vault.azure.net/.default",
    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    "client_assertion": open(sys.argv[2]).read().strip(),
}), end="")
PY

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$dev_pid/status"; }
: >"$work/rss"
(
    start=$(date +%s)
    while kill -0 "$dev_pid" 2>/dev/null; do
        echo "$(( $(date +%s) - start )) $(rss_kib)" >>"$work/rss"
        sleep 10
    done
) &
sampler_pid=$!

duration="${SOAK_SECS:-$(( minutes * 60 ))}"
echo "soak: ${duration} s, ${clients} clients x ${rps_per_client} req/s against ${proxy_url} (SNI ${sni}), dev pid ${dev_pid}"
h2load --connect-to="127.0.0.1:${port}" \
    -c "$clients" --rps "$rps_per_client" -D "$duration" \
    -d "$work/body" \
    -H "content-type: application/x-www-form-urlencoded" \
    "https://${sni}:${port}/${tenant}/oauth2/v2.0/token" >"$work/h2load.txt" 2>&1 || true
sleep 1
kill "$sampler_pid" 2>/dev/null || true
sampler_pid=""
echo "$(( duration + 1 )) $(rss_kib)" >>"$work/rss"

cat "$work/h2load.txt" | grep -E "^(finished|requests|status codes|traffic|time for request|req/s)" || cat "$work/h2load.txt"
echo "soak: RSS samples (seconds KiB):"
tr '\n' ';' <"$work/rss"; echo

fail=0
read -r total started done succeeded failed errored timeout < <(
    sed -nE 's/^requests: ([0-9]+) total, ([0-9]+) started, ([0-9]+) done, ([0-9]+) succeeded, ([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout.*/\1 \2 \3 \4 \5 \6 \7/p' "$work/h2load.txt")
non2xx=$(sed -nE 's/^status codes: [0-9]+ 2xx, ([0-9]+) 3xx, ([0-9]+) 4xx, ([0-9]+) 5xx.*/\1 \2 \3/p' "$work/h2load.txt" | awk '{print $1+$2+$3}')
if [ -z "${total:-}" ] || [ "${done:-0}" -eq 0 ]; then
    echo "soak: FAIL: no requests completed" >&2; fail=1
elif [ "$failed" -ne 0 ] || [ "$errored" -ne 0 ] || [ "$timeout" -ne 0 ] || [ "${non2xx:-1}" -ne 0 ]; then
    echo "soak: FAIL: $failed failed, $errored errored, $timeout timed out, $non2xx non-2xx of $done" >&2; fail=1
fi
# Baseline: the first sample at or after the warm-up; final: the last sample.
baseline=$(awk -v w="$warmup" '$1 >= w {print $2; exit}' "$work/rss")
final=$(tail -n1 "$work/rss" | awk '{print $2}')
if [ -z "$baseline" ]; then
    baseline=$(head -n1 "$work/rss" | awk '{print $2}')
fi
growth=$(awk -v b="$baseline" -v f="$final" 'BEGIN {printf "%.2f", (f - b) * 100 / b}')
echo "soak: RSS after warm-up ${baseline} KiB, at the end ${final} KiB, growth ${growth} %"
if awk -v g="$growth" -v m="$max_growth_pct" 'BEGIN {exit !(g > m)}'; then
    echo "soak: FAIL: RSS grew more than ${max_growth_pct} % after warm-up" >&2; fail=1
fi
if grep -qiE "panicked|thread .* panicked" "$work/dev.log"; then
    echo "soak: FAIL: the dev process logged a panic" >&2; fail=1
fi
[ "$fail" -eq 0 ] && echo "soak: PASS (${done} requests, ${succeeded} succeeded)"
exit "$fail"
