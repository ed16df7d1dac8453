#!/usr/bin/env bash
# A real control plane on loopback: etcd, kube-apiserver (RBAC, RSA service-account keys,
# readable OIDC discovery) and kube-controller-manager (ClusterRole aggregation only), plus the
# Azure workload identity webhook and helm binaries for the tests to run — all built from the Go
# module proxy at the versions pinned in scripts/real-cluster/*/go.mod. With --node, also real
# nodes (kubelet, containerd, kube-proxy, CoreDNS; scripts/real-cluster/node.sh), every default
# controller and kube-scheduler, and the images pods run (scripts/real-cluster/images.sh).
#
#   scripts/real-cluster.sh build [COMPONENT...]   build (or find cached) binaries, print their dirs
#   scripts/real-cluster.sh up DIR             build, start the control plane, write DIR/env
#   scripts/real-cluster.sh up --node DIR      the same plus a node (kubelet, containerd, kube-proxy,
#                                              kube-scheduler, every controller, CoreDNS; images
#                                              built here): see scripts/real-cluster/node.sh
#   scripts/real-cluster.sh up --nodes N DIR   N nodes (1 or 2), each in its own network namespace
#   scripts/real-cluster.sh build-images       build (or find cached) the node's images, print them
#   scripts/real-cluster.sh host-state         what the node must not leave changed (sysctls,
#                                              iptables, routes, links, netns, mounts, cgroups)
#   scripts/real-cluster.sh restart-apiserver DIR   stop and start kube-apiserver (same etcd)
#   scripts/real-cluster.sh stop-apiserver DIR | start-apiserver DIR   the same in two steps
#   scripts/real-cluster.sh rotate-sa-key DIR  new signing key; old public key still accepted
#                                              (takes effect at the next restart-apiserver)
#   scripts/real-cluster.sh drop-old-sa-keys DIR   only the current public key is accepted (ditto)
#   scripts/real-cluster.sh down DIR           stop everything started in DIR
#
# DIR/env holds shell assignments: KUBECONFIG (admin), BIN_DIR (kubectl, kube-apiserver,
# kube-controller-manager, etcd, webhook, helm), APISERVER (URL), CA_FILE, ISSUER, PKI_DIR (with
# a serving certificate for the webhook in DIR/webhook-certs), WEBHOOK_CHART (the chart in the
# webhook module's source) and the ports; with nodes also NODES (their names), PROXY_IMAGE (the
# Dockerfile's image), GO_CLIENT_IMAGE, PYTHON_CLIENT_IMAGE, COREDNS_IMAGE, WEBHOOK_IMAGE and
# PAUSE_IMAGE (names the nodes' containerd has; pods use imagePullPolicy Never/IfNotPresent). Binaries and Go caches live under
# ${XDG_CACHE_HOME:-$HOME/.cache}/identity-binding-proxy/real-cluster/, keyed by the wrapper
# modules' content, so only the first run builds. Ports are derived from the pid, in
# 10000-29999, below Linux's default ephemeral range (32768-60999). With OWNER_PID set,
# everything stops once that process exits
# (and with OWNER_CLEANUP=1, DIR is removed). Any failure prints ONE line naming the step and its
# log file, and exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODS=$ROOT/scripts/real-cluster
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/identity-binding-proxy/real-cluster
# Versions: each must match its wrapper module's go.mod (checked below).
K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
WEBHOOK_VERSION=v1.6.0
HELM_VERSION=v3.22.0
COREDNS_VERSION=v1.15.0
# Built only when asked for by name (`build promtool`): the alert-rule and metric checks. Without
# the service-discovery plugins (tag remove_all_sd): the checks need none, and the build halves.
PROMTOOL_VERSION=v0.316.0

LOGS=${LOGS:-/tmp}
# shellcheck source=real-cluster/node.sh
. "$MODS/node.sh"
# shellcheck source=real-cluster/images.sh
. "$MODS/images.sh"
fail() { # STEP LOG
  echo "real-cluster: step '$1' failed; see $2" >&2
  exit 1
}
run() { # STEP LOG CMD...: run CMD with its output in LOG
  local step=$1 log=$2
  shift 2
  "$@" >>"$log" 2>&1 || fail "$step" "$log"
}

# ---------------------------------------------------------------------------------------- build
module_key() { # wrapper-module dir: hash of its content and the Go toolchain
  (cd "$1" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | LC_ALL=C sort |
    xargs sha256sum && go version) | sha256sum | cut -c1-12
}

build_component() { # NAME VERSION LDFLAGS PKG...: binaries in $CACHE/bin/NAME-VERSION-KEY
  local name=$1 version=$2 ldflags=$3
  shift 3
  local mod=$MODS/$name
  grep -q " $version\$\| $version " "$mod/go.mod" ||
    fail "build $name: $mod/go.mod does not require $version" "$mod/go.mod"
  local out=$CACHE/bin/$name-$version-$(module_key "$mod")
  if [ -f "$out/.complete" ]; then
    echo "$out"
    return
  fi
  local log=$CACHE/logs/build-$name-$version.log
  mkdir -p "$CACHE/logs" "$out"
  : >"$log"
  local start=$SECONDS
  echo "real-cluster: building $name $version (log: $log)" >&2
  (
    cd "$mod"
    export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build
    export GOFLAGS="-buildvcs=false -mod=readonly -p=2"
    go build -trimpath -ldflags "-s -w $ldflags" -o "$out/" "$@"
  ) >>"$log" 2>&1 || fail "build $name $version" "$log"
  echo "built $name $version in $((SECONDS - start)) s" >>"$log"
  echo "real-cluster: built $name $version in $((SECONDS - start)) s" >&2
  touch "$out/.complete"
  echo "$out"
}

build_webhook() { # prints the directory of the webhook binary (also the node's webhook image)
  build_component webhook "$WEBHOOK_VERSION" \
    "-X github.com/Azure/azure-workload-identity/pkg/version.BuildVersion=$WEBHOOK_VERSION" \
    github.com/Azure/azure-workload-identity/cmd/webhook
}

build_all() { # [COMPONENT...]: prints the directories of the built binaries, one per line
  local want=" ${*:-kubernetes etcd webhook helm} " k8s_ld="" kv
  for kv in "gitVersion=$K8S_VERSION" gitMajor=1 "gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)" \
    gitTreeState=clean buildDate=1970-01-01T00:00:00Z; do
    k8s_ld="$k8s_ld -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  [[ $want != *" kubernetes "* ]] || build_component kubernetes "$K8S_VERSION" "$k8s_ld" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-proxy
  [[ $want != *" etcd "* ]] || build_component etcd "$ETCD_VERSION" "" go.etcd.io/etcd/server/v3
  [[ $want != *" webhook "* ]] || build_webhook
  [[ $want != *" helm "* ]] || build_component helm "$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
  [[ $want != *" promtool "* ]] || build_component promtool "$PROMTOOL_VERSION" \
    "-X github.com/prometheus/common/version.Version=$PROMTOOL_VERSION" \
    -tags=remove_all_sd github.com/prometheus/prometheus/cmd/promtool
}

link_bins() { # DIR/bin: one directory with every binary
  local bin=$1/bin d f
  mkdir -p "$bin" "$CACHE"
  # One build at a time: parallel 'up's wait for the first one's binaries.
  exec 9>"$CACHE/build.lock"
  flock 9
  build_all | while read -r d; do
    for f in "$d"/*; do ln -sf "$f" "$bin/$(basename "$f")"; done
    # etcd's main package is the module root, go.etcd.io/etcd/server/v3: go names it "server".
    if [ -e "$d/server" ]; then ln -sf "$d/server" "$bin/etcd"; fi
  done
  rm -f "$bin/server"
  flock -u 9
  exec 9>&-
  # Every binary must be there, or the step fails now rather than later.
  for f in kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy etcd \
    webhook helm; do
    [ -x "$bin/$f" ] || fail "build (no $f)" "$CACHE/logs"
  done
}

# ---------------------------------------------------------------------------------------- ports
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_ports() { # sets BASE: 10 consecutive free ports in 10000-29999
  local try
  for try in $(seq 0 50); do
    BASE=$((10000 + ($$ * 37 + try * 211) % 1999 * 10))
    local p ok=1
    for p in $(seq "$BASE" $((BASE + 9))); do port_free "$p" || { ok=0 && break; }; done
    [ $ok = 1 ] && return 0
  done
  fail "pick ports" "(no 10 free consecutive ports found in 10000-29999)"
}

# ---------------------------------------------------------------------------------- certificates
make_certs() { # DIR
  local d=$1 log=$1/logs/certs.log
  run "certificates" "$log" openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=real-cluster-ca" \
    -keyout "$d/pki/ca.key" -out "$d/pki/ca.crt" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  leaf() { # NAME SUBJECT EXT
    run "certificates ($1)" "$log" openssl req -newkey rsa:2048 -nodes -subj "$2" \
      -keyout "$d/pki/$1.key" -out "$d/pki/$1.csr"
    printf '%s\n' "$3" >"$d/pki/$1.ext"
    run "certificates ($1)" "$log" openssl x509 -req -in "$d/pki/$1.csr" -CA "$d/pki/ca.crt" \
      -CAkey "$d/pki/ca.key" -CAcreateserial -days 2 -out "$d/pki/$1.crt" -extfile "$d/pki/$1.ext"
  }
  # Beside loopback, the names pods use (the `kubernetes` Service) and the nodes' forwarders.
  leaf apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,\
IP:10.200.1.1,IP:10.200.2.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  leaf admin "/O=system:masters/CN=real-cluster-admin" "extendedKeyUsage=clientAuth"
  leaf webhook "/CN=azure-wi-webhook" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
  mkdir -p "$d/webhook-certs" "$d/sa-verify"
  cp "$d/pki/webhook.crt" "$d/webhook-certs/tls.crt"
  cp "$d/pki/webhook.key" "$d/webhook-certs/tls.key"
  new_sa_key "$d"
}

new_sa_key() { # DIR: a new RSA signing key; its public key joins DIR/sa-verify/
  local d=$1 n log=$1/logs/certs.log
  n=$(find "$d/sa-verify" -name '*.pub' | wc -l)
  run "service-account key" "$log" openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
    -out "$d/pki/sa.key.new"
  run "service-account key" "$log" openssl pkey -in "$d/pki/sa.key.new" -pubout \
    -out "$d/sa-verify/$((n + 1)).pub"
  mv "$d/pki/sa.key.new" "$d/pki/sa.key"
}

# --------------------------------------------------------------------------------------- process
start_bg() { # DIR NAME CMD...: start CMD in the background, its pid in DIR/pids/NAME
  local d=$1 name=$2
  shift 2
  "$@" >>"$d/logs/$name.log" 2>&1 &
  echo $! >"$d/pids/$name"
}

stop_one() { # DIR NAME: SIGTERM, then SIGKILL after 10 s
  local pidfile=$1/pids/$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

wait_url() { # STEP LOG PIDNAME DIR CURL-ARGS...: until the URL answers 200, or the process dies
  local step=$1 log=$2 name=$3 d=$4
  shift 4
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null --max-time 2 "$@" && return 0
    kill -0 "$(cat "$d/pids/$name")" 2>/dev/null || fail "$step (process exited)" "$log"
    sleep 0.1
  done
  fail "$step (not ready after 60 s)" "$log"
}

load_env() { # DIR
  [ -f "$1/env" ] || fail "read env" "$1/env (missing: run 'up' first)"
  # shellcheck disable=SC1091
  . "$1/env"
}

start_etcd() { # DIR
  local d=$1
  start_bg "$d" etcd "$BIN_DIR/etcd" --name real-cluster --data-dir "$d/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "real-cluster=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes=1073741824
  wait_url "etcd" "$d/logs/etcd.log" etcd "$d" "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() { # DIR
  local d=$1 f keys=() node_flags=(--authorization-mode=RBAC --disable-admission-plugins=ServiceAccount)
  for f in "$d"/sa-verify/*.pub; do keys+=("--service-account-key-file=$f"); done
  # With nodes: kubelets authorized as nodes, pods given their service account's token (the
  # controllers create the accounts), and the apiserver's own client certificate for kubelets.
  if [ "${NODE_COUNT:-0}" -gt 0 ]; then
    node_flags=(--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction
      --kubelet-client-certificate="$d/pki/admin.crt" --kubelet-client-key="$d/pki/admin.key"
      --kubelet-preferred-address-types=InternalIP)
  fi
  start_bg "$d" kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$d/pki/apiserver.crt" --tls-private-key-file="$d/pki/apiserver.key" \
    --client-ca-file="$d/pki/ca.crt" \
    "${node_flags[@]}" \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --service-account-issuer="$ISSUER" \
    --service-account-jwks-uri="$ISSUER/openid/v1/jwks" \
    "${keys[@]}" \
    --service-account-signing-key-file="$d/pki/sa.key" \
    --cert-dir="$d/apiserver-certs"
  wait_url "kube-apiserver" "$d/logs/kube-apiserver.log" kube-apiserver "$d" \
    --cacert "$d/pki/ca.crt" --cert "$d/pki/admin.crt" --key "$d/pki/admin.key" "$APISERVER/readyz"
}

start_controller_manager() { # DIR: only the ClusterRole aggregation controller (RBAC fidelity)
  local d=$1
  start_bg "$d" kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$d/kubeconfig" --controllers=clusterrole-aggregation \
    --leader-elect=false --secure-port=0 --use-service-account-credentials=false
}

watch_owner() { # DIR PID: stop everything in DIR once process PID has exited
  local d=$1 owner=$2
  (
    while kill -0 "$owner" 2>/dev/null && [ -d "$d/pids" ]; do sleep 1; done
    (cmd_down "$d") || true # a down that fails still lets the directory go
    # A directory the owner could not remove itself (OWNER_CLEANUP=1) goes with it.
    if [ "${OWNER_CLEANUP:-}" = 1 ] && ! kill -0 "$owner" 2>/dev/null; then rm -rf "$d"; fi
  ) </dev/null >/dev/null 2>&1 &
  # An explicit `down` stops the watcher: nothing of the run is left running after it.
  echo $! >"$d/watcher.pid"
}

# ------------------------------------------------------------------------------------- commands
cmd_up() { # [--node | --nodes N] DIR
  NODE_COUNT=0
  case "$1" in
  --node) NODE_COUNT=1 && shift ;;
  --nodes) NODE_COUNT=$2 && shift 2 ;;
  esac
  [[ $NODE_COUNT =~ ^[012]$ ]] || fail "up (--nodes takes 1 or 2)" "(command line)"
  local d=${1:?usage: real-cluster.sh up [--node|--nodes N] DIR}
  mkdir -p "$d/logs" "$d/pids" "$d/pki" "$d/etcd"
  d=$(cd "$d" && pwd)
  # A failed `up` stops what it started (nodes included): `fail` exits rather than returning an
  # error, so this is an EXIT trap that acts on a non-zero status only.
  UP_DIR=$d
  trap 'up_failed $?' EXIT
  link_bins "$d"
  BIN_DIR=$d/bin
  pick_ports
  ETCD_PORT=$BASE ETCD_PEER_PORT=$((BASE + 1)) APISERVER_PORT=$((BASE + 2))
  # The webhook serves on :9443 (fixed in v1.6.0); only its health and metrics ports are ours.
  WEBHOOK_HEALTH_PORT=$((BASE + 4)) WEBHOOK_METRICS_PORT=$((BASE + 5))
  SCHEDULER_PORT=$((BASE + 6)) CONTROLLER_MANAGER_PORT=$((BASE + 7))
  APISERVER=https://127.0.0.1:$APISERVER_PORT
  ISSUER=$APISERVER
  make_certs "$d"
  cat >"$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: real
  cluster: {server: "$APISERVER", certificate-authority: "$d/pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$d/pki/admin.crt", client-key: "$d/pki/admin.key"}
contexts:
- name: admin
  context: {cluster: real, user: admin}
current-context: admin
EOF
  # The webhook's Helm chart is in its module's source.
  local chart
  chart=$(cd "$MODS/webhook" && GOMODCACHE=$CACHE/go/mod GOFLAGS=-mod=readonly \
    go mod download -json "github.com/Azure/azure-workload-identity@$WEBHOOK_VERSION" 2>>"$d/logs/chart.log" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')/charts/workload-identity-webhook
  [ -f "$chart/Chart.yaml" ] || fail "webhook chart (not in the module source: $chart)" "$d/logs/chart.log"
  cat >"$d/env" <<EOF
KUBECONFIG=$d/kubeconfig
BIN_DIR=$BIN_DIR
APISERVER=$APISERVER
CA_FILE=$d/pki/ca.crt
ISSUER=$ISSUER
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
WEBHOOK_HEALTH_PORT=$WEBHOOK_HEALTH_PORT
WEBHOOK_METRICS_PORT=$WEBHOOK_METRICS_PORT
WEBHOOK_CHART=$chart
PKI_DIR=$d/pki
NODE_COUNT=$NODE_COUNT
SCHEDULER_PORT=$SCHEDULER_PORT
CONTROLLER_MANAGER_PORT=$CONTROLLER_MANAGER_PORT
EOF
  # With OWNER_PID set (the tests set it), everything stops when that process exits.
  if [ -n "${OWNER_PID:-}" ]; then watch_owner "$d" "$OWNER_PID"; fi
  start_etcd "$d"
  start_apiserver "$d"
  if [ "$NODE_COUNT" -gt 0 ]; then start_node_controller_manager "$d"; else start_controller_manager "$d"; fi
  # OIDC discovery readable without credentials, as on AKS.
  run "oidc discovery binding" "$d/logs/kubectl.log" "$BIN_DIR/kubectl" --kubeconfig "$d/kubeconfig" \
    create clusterrolebinding service-account-issuer-discovery-unauthenticated \
    --clusterrole=system:service-account-issuer-discovery --group=system:unauthenticated
  if [ "$NODE_COUNT" -gt 0 ]; then
    local start=$SECONDS
    nodes_up "$d" "$NODE_COUNT"
    echo "real-cluster: $NODE_COUNT node(s) Ready with CoreDNS in $((SECONDS - start)) s" >&2
  fi
  echo "real-cluster: apiserver ready at $APISERVER; env in $d/env" >&2
}

up_failed() { # STATUS
  [ "$1" != 0 ] || return 0
  echo "real-cluster: up failed; stopping what it started (log: $UP_DIR/logs/down.log)" >&2
  cmd_down "$UP_DIR" >>"$UP_DIR/logs/down.log" 2>&1 ||
    echo "real-cluster: down after the failed up failed too; see $UP_DIR/logs/down.log" >&2
}

cmd_restart_apiserver() {
  local d=$1
  load_env "$d"
  stop_one "$d" kube-apiserver
  start_apiserver "$d"
}

cmd_down() {
  local d=$1 n rc=0
  # The same path `up` hashed into the nodes' names, while DIR exists; the nodes are looked for
  # by those names even when DIR (its pid files) is gone.
  [ ! -d "$d" ] || d=$(cd "$d" && pwd)
  # A node that could not be cleaned up fails `down`, after the control plane is stopped too.
  nodes_down "$d" || rc=1
  if [ -d "$d/pids" ]; then
    for n in webhook kube-controller-manager kube-apiserver etcd; do stop_one "$d" "$n"; done
  fi
  # Unless this is the watcher itself running down.
  if [ -f "$d/watcher.pid" ] && [ "$(cat "$d/watcher.pid")" != "$BASHPID" ]; then
    kill "$(cat "$d/watcher.pid")" 2>/dev/null || true
    rm -f "$d/watcher.pid"
  fi
  [ "$rc" = 0 ] || fail "down (the node's processes or cgroups above remain)" "$d/logs"
}

case "${1:-}" in
build)
  mkdir -p "$CACHE"
  exec 9>"$CACHE/build.lock"
  flock 9
  build_all "${@:2}"
  ;;
up) cmd_up "${@:2}" ;;
host-state) host_state ;;
build-images) build_images ;;
restart-apiserver) cmd_restart_apiserver "${2:?usage: $0 restart-apiserver DIR}" ;;
stop-apiserver) load_env "${2:?usage: $0 stop-apiserver DIR}" && stop_one "$2" kube-apiserver ;;
start-apiserver) load_env "${2:?usage: $0 start-apiserver DIR}" && start_apiserver "$2" ;;
rotate-sa-key) new_sa_key "${2:?usage: $0 rotate-sa-key DIR}" ;;
drop-old-sa-keys)
  d=${2:?usage: $0 drop-old-sa-keys DIR}
  last=$(find "$d/sa-verify" -name '*.pub' | sort -V | tail -n 1)
  find "$d/sa-verify" -name '*.pub' ! -path "$last" -delete
  ;;
down) cmd_down "${2:?usage: $0 down DIR}" ;;
*)
  sed -n '2,36p' "$0" >&2
  exit 2
  ;;
esac
