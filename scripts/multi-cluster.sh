#!/usr/bin/env bash
# Three clusters, one Entra, ONE federated identity credential — every part its own process,
# exactly as docs/multi-cluster.md describes:
#
#   issuer keygen (one key per cluster) → issuer publish --fleet (the identity's JWKS holds the
#   keys of the three clusters that bind it)
#   → emulate static (the issuer's static host) → emulate entra --fic (ONE FIC)
#   → emulate kube ×3 (three clusters, three SA issuers) → serve ×3 → a token in each cluster.
#
# Usage: scripts/multi-cluster.sh            (uses target/release/identity-binding-proxy-dev)
#        BIN=path/to/binary BASE_PORT=18500 scripts/multi-cluster.sh
# Needs curl and openssl. Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail

BIN=${BIN:-target/release/identity-binding-proxy-dev}
BASE_PORT=${BASE_PORT:-18500}
WORK=$(mktemp -d)
CLIENT_ID=7d1f9c4e-0b3a-4c55-9e2d-3f6a8b1c2d4e
TENANT=72f988bf-86f1-41af-91ab-2d7cd011db47
SNI=proxy.cluster.internal
STATIC=$((BASE_PORT + 10)); ENTRA=$((BASE_PORT + 11))

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
wait_for() { # URL [LOG]: on a timeout, the log of the process that should answer
  for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "timed out waiting for $1" >&2
  if [ -n "${2:-}" ]; then echo "--- $2" >&2; tail -n 30 "$2" >&2; fi
  return 1
}

[ -x "$BIN" ] || { echo "no binary at $BIN: run cargo build --release first" >&2; exit 1; }

echo "1. one issuer key per cluster"
cat > "$WORK/bindings.yaml" <<YAML
bindings:
  - clientId: $CLIENT_ID
    tenantId: $TENANT
YAML
for i in 1 2 3; do
  mkdir -p "$WORK/c$i"
  "$BIN" issuer keygen --out "$WORK/c$i/issuer.key" >/dev/null
done

echo "2. publish the identity's JWKS with the keys of the clusters that bind it, and serve it"
ISSUER_URL="http://127.0.0.1:$STATIC/{tenant}/{client_id}"
{
  echo "clusters:"
  for i in 1 2 3; do
    printf '  - name: c%s\n    publicKeys: [c%s/issuer.pub]\n    bindings: bindings.yaml\n' "$i" "$i"
  done
} > "$WORK/fleet.yaml"
"$BIN" issuer publish --out "$WORK/site" --fleet "$WORK/fleet.yaml" --issuer-url "$ISSUER_URL" >/dev/null
"$BIN" emulate static --listen "127.0.0.1:$STATIC" --dir "$WORK/site" >"$WORK/static.log" 2>&1 & pids+=($!)
"$BIN" issuer fic --bindings "$WORK/bindings.yaml" --issuer-url "$ISSUER_URL" | sed 's/^/   /'

echo "3. Entra with exactly ONE FIC on the identity"
"$BIN" emulate entra --listen "127.0.0.1:$ENTRA" \
  --fic "client_id=$CLIENT_ID,issuer=http://127.0.0.1:$STATIC/$TENANT/$CLIENT_ID,subject=$CLIENT_ID,audience=api://AzureADTokenExchange" \
  >"$WORK/entra.log" 2>&1 & pids+=($!)

echo "4. three clusters: apiserver emulator and proxy each"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=$SNI" \
  -addext "subjectAltName=DNS:$SNI" -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
cat > "$WORK/rbac.yaml" <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: use-identity}
rules:
  - apiGroups: ["cid.wi.aks.azure.com"]
    resources: ["$CLIENT_ID"]
    verbs: ["use-managed-identity"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: worker-uses-identity}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: use-identity}
subjects:
  - {kind: ServiceAccount, name: worker, namespace: apps}
YAML
for i in 1 2 3; do
  "$BIN" emulate kube --listen "127.0.0.1:$((BASE_PORT + i))" --state-dir "$WORK/c$i/kube" \
    --rbac "$WORK/rbac.yaml" --issuer "https://oidc.cluster-$i.example/issuer" >"$WORK/c$i/kube.log" 2>&1 & pids+=($!)
done
wait_for "http://127.0.0.1:$ENTRA/_emulator/stats" "$WORK/entra.log"
for i in 1 2 3; do
  wait_for "http://127.0.0.1:$((BASE_PORT + i))/.well-known/openid-configuration" "$WORK/c$i/kube.log"
  RUST_LOG=warn "$BIN" serve --kubeconfig "$WORK/c$i/kube/kubeconfig" \
    --tls "$SNI=$WORK/tls.crt,$WORK/tls.key" --issuer-key "$WORK/c$i/issuer.key" \
    --issuer-url "$ISSUER_URL" --bindings "$WORK/bindings.yaml" \
    --authority-host "http://127.0.0.1:$ENTRA" --state-dir "$WORK/c$i/state" \
    --listen "127.0.0.1:$((BASE_PORT + 20 + i))" --admin-listen "127.0.0.1:$((BASE_PORT + 30 + i))" \
    >"$WORK/c$i/proxy.log" 2>&1 & pids+=($!)
done
for i in 1 2 3; do wait_for "http://127.0.0.1:$((BASE_PORT + 30 + i))/readyz" "$WORK/c$i/proxy.log"; done

echo "5. a token for the same identity in every cluster"
for i in 1 2 3; do
  port=$((BASE_PORT + 20 + i))
  sa_token=$("$BIN" dev token --state-dir "$WORK/c$i" --namespace apps --service-account worker)
  answer=$(curl -sS --resolve "$SNI:$port:127.0.0.1" --cacert "$WORK/tls.crt" \
    "https://$SNI:$port/$TENANT/oauth2/v2.0/token" \
    -d grant_type=client_credentials -d client_id="$CLIENT_ID" -d scope=https://vault.azure.net/.default \
    -d client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer \
    --data-urlencode "client_assertion=$sa_token")
  if [[ "$answer" == *'"access_token"'* ]]; then
    echo "   cluster $i: token issued ($(grep -o '"expires_in":[0-9]*' <<<"$answer"))"
  else
    echo "   cluster $i: FAILED: $answer" >&2; exit 1
  fi
done
fics=$(curl -sS "http://127.0.0.1:$ENTRA/_emulator/fics/$CLIENT_ID" | grep -o '"issuer"' | wc -l)
echo "   FICs on the identity: $fics"
