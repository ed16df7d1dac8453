# shellcheck shell=bash
# Sourced by scripts/real-cluster.sh: the node(s) of `up --node DIR` / `up --nodes N DIR`.
#
# A node is a kubelet, containerd (+ runc, the CNI plugins) and kube-proxy, each in the node's
# own network namespace (ibp-<id>-<node>); the kubelet also in a mount namespace of its own where
# the /proc/sys files it would change (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops)
# are files of the node's. So the machine's iptables rules and sysctls are never touched; what
# the node adds to the machine is listed here and removed by `down`:
#   - per node, a veth pair: HOST_IP (10.200.N.1) on the machine's side, NODE_IP (10.200.N.2)
#     in the node's namespace, and routes to its pod network (10.244.N.0/24) and, through the
#     first node, to the service network (10.0.0.0/24) — so the apiserver reaches kubelets
#     (logs, exec) and admission webhooks served by pods;
#   - a socat per node forwarding HOST_IP:6443 to the apiserver on loopback (pods reach the
#     apiserver as `kubernetes.default` through it; the apiserver only listens on loopback);
#   - every pod's loopback ports 30000-32767 lead to the machine's (where tests run the Entra
#     emulator: see scripts/real-cluster/cni-loopback-forward), inside the pod's namespace only;
#   - cgroups under /ibp-<id>-<node> and the fixed paths containerd 1.6 and the kubelet insist
#     on (/run/containerd/s, /var/lib/kubelet/device-plugins, /var/log/containers, /var/lib/cni),
#     removed at `down` unless they existed before.
# kube-scheduler and kube-controller-manager (every default controller) run on the machine's
# loopback with the admin credentials; CoreDNS runs as a pod (kube-system/coredns, Service
# 10.0.0.10).

SERVICE_CIDR=10.0.0.0/24
KUBERNETES_SERVICE_IP=10.0.0.1
DNS_SERVICE_IP=10.0.0.10
CLUSTER_CIDR=10.244.0.0/16
CNI_BIN_DIR=/usr/lib/cni
# The name the containerd configuration gives the sandbox image; ours is imported under it.
PAUSE_IMAGE=registry.k8s.io/pause:3.10
# The sysctls the kubelet sets at start (and what kube-proxy might): checked before and after.
NODE_SYSCTLS="vm/overcommit_memory kernel/panic kernel/panic_on_oops net/ipv4/ip_forward
net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables net/netfilter/nf_conntrack_max"

node_names() { # N: node-1 .. node-N
  local i
  for i in $(seq 1 "$1"); do printf 'node-%s ' "$i"; done
}

node_id() { # DIR: a short id for names the machine shares (netns, veth, cgroups)
  echo "$1" | sha256sum | cut -c1-6
}

# ------------------------------------------------------------------------------------- checks
# Host tools the node needs, as Debian packages. Missing ones are installed with apt-get (so
# the README's `cargo test` sets up a fresh machine by itself); a failed install fails with
# apt's log, and without root the step names the packages to install.
node_missing_packages() {
  local t missing=""
  for t in containerd:containerd containerd-shim-runc-v2:containerd runc:runc ip:iproute2 \
    iptables:iptables socat:socat buildah:buildah mmdebstrap:mmdebstrap unshare:util-linux \
    nsenter:util-linux; do
    command -v "${t%%:*}" >/dev/null || missing="$missing ${t#*:}"
  done
  [ -x "$CNI_BIN_DIR/bridge" ] || missing="$missing containernetworking-plugins"
  echo "$missing" | tr ' ' '\n' | sort -u | xargs
}

node_check_tools() {
  local missing log=$LOGS/node-apt.log
  missing=$(node_missing_packages)
  [ -n "$missing" ] || return 0
  [ "$(id -u)" = 0 ] || fail "node tools (missing; apt-get install $missing)" "(none)"
  echo "real-cluster: installing $missing (Debian packages; log: $log)" >&2
  : >"$log"
  # shellcheck disable=SC2086
  run "node tools (apt-get install $missing)" "$log" \
    env DEBIAN_FRONTEND=noninteractive sh -c "apt-get update -qq && apt-get install -y -qq $missing"
  missing=$(node_missing_packages)
  [ -z "$missing" ] || fail "node tools (still missing after apt-get: $missing)" "$log"
}

# The machine's state the node must leave alone, for the before/after check.
host_state() {
  local s
  for s in $NODE_SYSCTLS; do
    printf '%s=%s\n' "$s" "$(cat "/proc/sys/$s" 2>/dev/null || echo absent)"
  done
  # Without comments (they carry a time) and packet counters; no rules at all is fine too.
  { iptables-save 2>/dev/null || true; } | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//'
  { ip6tables-save 2>/dev/null || true; } | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//'
  # The network objects the node adds beside its own namespaces: routes (IPv4 main table; the
  # IPv6 one carries expiry times), links and namespaces by name.
  ip -4 route show 2>/dev/null | sed 's/^/route /'
  ip -o link show 2>/dev/null | awk -F': ' '{print "link " $2}'
  ip netns list 2>/dev/null | awk '{print "netns " $1}'
  # Mounts (the kubelet's sysctl binds over /proc/sys, had they propagated; volumes, root
  # filesystems, namespaces' files): mount point, filesystem type and source, the fields that do
  # not change from one reading to the next. /run/netns is iproute2's own mount point, made by
  # the first `ip netns add` on a machine and left there by design; buildah's store (the image
  # cache, shared with other runs building images) mounts and unmounts its layers as it likes.
  awk -v b="${BUILDAH_STORE:-/nonexistent}/" \
    '{for (i = 7; $i != "-"; i++); if ($5 != "/run/netns" && index($5, b) != 1) print "mount " $5, $(i + 1), $(i + 2)}' \
    /proc/self/mountinfo | sort
  # The nodes' cgroups (any run's: the names carry the run's id).
  find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -name 'ibp-*' 2>/dev/null | sed 's/^/cgroup /' | sort
}

# --------------------------------------------------------------------------------- certificates
node_certs() { # DIR NODE: the kubelet's client certificate (the Node authorizer's identity)
  local d=$1 n=$2 log=$1/logs/certs.log
  leaf "node-$n" "/O=system:nodes/CN=system:node:$n" "extendedKeyUsage=clientAuth"
}

# Only the network namespace: `ip netns exec` would also give the process a mount namespace of
# its own (slave to the machine's), and the kubelet's volume mounts would not reach containerd.
in_node() { # NODE-DIR CMD...: exec, so that start_bg records the process itself
  local ns
  ns=$(cat "$1/netns")
  shift
  exec nsenter --net="/run/netns/$ns" "$@"
}

kubeconfig_for() { # DIR NAME SERVER CERT-NAME: a kubeconfig with a client certificate
  cat >"$1/$2.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: real
  cluster: {server: "$3", certificate-authority: "$1/pki/ca.crt"}
users:
- name: u
  user: {client-certificate: "$1/pki/$4.crt", client-key: "$1/pki/$4.key"}
contexts:
- name: c
  context: {cluster: real, user: u}
current-context: c
EOF
}

# ------------------------------------------------------------------------------------ network
# The node's addresses are fixed (10.200.N.0/30, 10.244.N.0/24, the service network): one run
# at a time on a machine. The lock's descriptor is inherited by every process `up` starts, so
# it is held until the last of them is gone (after `down`); a second run waits, then fails.
NODE_LOCK=/run/lock/identity-binding-proxy-real-node.lock
NODE_LOCK_WAIT=900

node_lock() {
  mkdir -p "$(dirname "$NODE_LOCK")"
  exec 8>>"$NODE_LOCK"
  flock -n 8 && return 0
  echo "real-cluster: another node run holds $NODE_LOCK (10.200.x addresses); waiting up to $NODE_LOCK_WAIT s" >&2
  flock -w "$NODE_LOCK_WAIT" 8 ||
    fail "node lock (held by another run for $NODE_LOCK_WAIT s; processes with it open: $(fuser "$NODE_LOCK" 2>/dev/null | xargs))" "$NODE_LOCK"
}

# A range the node adds must not be in use on the machine already: its routes would shadow the
# machine's (or be shadowed), and `down` must only remove what `up` added.
node_range_free() { # RANGE
  local used
  used=$({
    ip route show root "$1"
    ip route show match "$1" | { grep -v '^default' || true; }
    ip -o addr show to "$1"
  } 2>&1)
  [ -z "$used" ] || fail "node network ($1 overlaps what this machine has: $(echo "$used" |
    head -n 3 | tr -s ' \n' ' '))" "(ip route / ip addr)"
}

node_ranges_free() { # N
  local i
  node_range_free "$SERVICE_CIDR"
  for i in $(seq 1 "$1"); do
    node_range_free "10.200.$i.0/30"
    node_range_free "10.244.$i.0/24"
  done
}

node_network() { # DIR NODE INDEX: the namespace, its veth to the machine, routes
  local d=$1 n=$2 i=$3 id ns log=$1/logs/$2-network.log
  id=$(node_id "$d")
  ns=ibp-$id-$n
  run "$n network (netns)" "$log" ip netns add "$ns"
  echo "$ns" >"$d/nodes/$n/netns"
  run "$n network (veth)" "$log" ip link add "ibp$id$i" type veth peer name eth0 netns "$ns"
  echo "ibp$id$i" >"$d/nodes/$n/veth"
  run "$n network (host address)" "$log" ip addr add "10.200.$i.1/30" dev "ibp$id$i"
  run "$n network (host link)" "$log" ip link set "ibp$id$i" up
  run "$n network (node address)" "$log" ip -n "$ns" addr add "10.200.$i.2/30" dev eth0
  run "$n network (node links)" "$log" ip -n "$ns" link set eth0 up
  run "$n network (node lo)" "$log" ip -n "$ns" link set lo up
  run "$n network (default route)" "$log" ip -n "$ns" route add default via "10.200.$i.1"
  # Forwarding and source NAT for pods leaving the node: the namespace's own settings.
  run "$n network (forwarding)" "$log" ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  run "$n network (masquerade)" "$log" ip netns exec "$ns" iptables -t nat -A POSTROUTING \
    -s "10.244.$i.0/24" ! -d "$CLUSTER_CIDR" -j MASQUERADE
  # The machine reaches the node's pods (the apiserver calling a webhook pod) through it.
  run "$n network (pod route)" "$log" ip route add "10.244.$i.0/24" via "10.200.$i.2"
  if [ "$i" = 1 ]; then
    run "$n network (service route)" "$log" ip route add "$SERVICE_CIDR" via "10.200.$i.2"
  fi
  # The apiserver, which listens on loopback only, on the address the node's pods reach.
  start_bg "$d" "apiserver-forward-$n" socat "TCP-LISTEN:6443,bind=10.200.$i.1,fork,reuseaddr" \
    "TCP:127.0.0.1:$APISERVER_PORT"
}

# Nodes reach each other's pods over a veth pair between their namespaces (CoreDNS on the
# first node answers pods of the second).
link_nodes() { # DIR NODE-A INDEX-A NODE-B INDEX-B
  local d=$1 a b log=$1/logs/node-link.log
  a=$(cat "$d/nodes/$2/netns") b=$(cat "$d/nodes/$4/netns")
  run "node link" "$log" ip link add eth1 netns "$a" type veth peer name eth1 netns "$b"
  run "node link" "$log" ip -n "$a" addr add "10.201.0.$3/24" dev eth1
  run "node link" "$log" ip -n "$b" addr add "10.201.0.$5/24" dev eth1
  run "node link" "$log" ip -n "$a" link set eth1 up
  run "node link" "$log" ip -n "$b" link set eth1 up
  run "node link" "$log" ip -n "$a" route add "10.244.$5.0/24" via "10.201.0.$5"
  run "node link" "$log" ip -n "$b" route add "10.244.$3.0/24" via "10.201.0.$3"
}

# ---------------------------------------------------------------------------------- containerd
write_containerd_config() { # DIR NODE INDEX
  local nd=$1/nodes/$2 i=$3 id
  id=$(node_id "$1")
  mkdir -p "$nd/containerd" "$nd/cni" "$nd/runc"
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
# Snapshotters that would probe or mount the machine's filesystems.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt"]
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # runc here cannot lower oom_score_adj (no CAP_SYS_RESOURCE): without this every sandbox
  # fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$nd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$nd/cni-bin"
    conf_dir = "$nd/cni"
EOF
  # The pod network: a bridge in the node's namespace, addresses from this node's /24, hairpin
  # so a pod reaches itself through a Service. The network's name is the run's and the node's:
  # CNI keeps each attachment's result in the machine-wide /var/lib/cni/results/NAME-*, which
  # `down` removes by that name.
  cat >"$nd/cni/10-bridge.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "ibp-$id-$2", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$nd/cni-ipam",
            "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback-forward", "target": "10.200.1.1", "ports": "30000:32767"}
]}
EOF
  # The plugins: Debian's, and the loopback forward of scripts/real-cluster (see there).
  mkdir -p "$nd/cni-bin"
  ln -sf "$CNI_BIN_DIR"/* "$nd/cni-bin/"
  ln -sf "$MODS/cni-loopback-forward" "$nd/cni-bin/loopback-forward"
}

start_containerd() { # DIR NODE
  local d=$1 n=$2 nd=$1/nodes/$2
  start_bg "$d" "$n-containerd" in_node "$nd" containerd --config "$nd/containerd.toml"
  for _ in $(seq 1 100); do
    [ -S "$nd/containerd.sock" ] && ctr --address "$nd/containerd.sock" version >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$d/pids/$n-containerd")" 2>/dev/null || fail "$n containerd (exited)" "$d/logs/$n-containerd.log"
    sleep 0.1
  done
  fail "$n containerd (not ready after 10 s)" "$d/logs/$n-containerd.log"
}

import_images() { # DIR NODE ARCHIVE...
  local nd=$1/nodes/$2 log=$1/logs/$2-images.log a
  shift 2
  for a in "$@"; do
    run "$(basename "$nd") image import ($(basename "$a"))" "$log" \
      ctr --address "$nd/containerd.sock" -n k8s.io images import --no-unpack=false "$a"
  done
}

# -------------------------------------------------------------------------------------- kubelet
write_kubelet_config() { # DIR NODE INDEX
  local d=$1 n=$2 i=$3 nd=$1/nodes/$2 id
  id=$(node_id "$d")
  mkdir -p "$nd/kubelet" "$nd/pod-logs" "$nd/volume-plugins" "$nd/sysctl"
  printf 'nameserver 127.0.0.1\n' >"$nd/resolv.conf"
  kubeconfig_for "$d" "$n" "https://10.200.$i.1:6443" "node-$n"
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# /sys/fs/cgroup is cgroup v1 on these machines.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /ibp-$id-$n
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
# The summary stats cannot find the root disk's filesystem here: no disk-based eviction.
localStorageCapacityIsolation: false
evictionHard: {}
# Never delete the images imported here (none can be pulled back).
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
oomScoreAdj: 0
makeIPTablesUtilChains: false
protectKernelDefaults: false
containerRuntimeEndpoint: unix://$nd/containerd.sock
podLogsDir: $nd/pod-logs
volumePluginDir: $nd/volume-plugins
address: 10.200.$i.2
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: cluster.local
resolvConf: $nd/resolv.conf
serializeImagePulls: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/pki/ca.crt}
authorization: {mode: Webhook}
syncFrequency: 5s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 5s
EOF
}

# The kubelet in the node's network namespace and a mount namespace of its own: its root dir is
# a shared bind mount (the volumes it mounts there reach containerd, which runs in the machine's
# mount namespace), and the three /proc/sys files it writes are the node's own files.
start_kubelet() { # DIR NODE INDEX
  local d=$1 n=$2 i=$3 nd=$1/nodes/$2 s
  run "$n kubelet (root dir mount)" "$d/logs/$n-kubelet.log" mount --bind "$nd/kubelet" "$nd/kubelet"
  run "$n kubelet (root dir shared)" "$d/logs/$n-kubelet.log" mount --make-shared "$nd/kubelet"
  make_cgroups "/ibp-$(node_id "$d")-$n"
  local binds=""
  for s in vm/overcommit_memory kernel/panic kernel/panic_on_oops; do
    cat "/proc/sys/$s" >"$nd/sysctl/${s//\//.}"
    binds="$binds mount --bind $nd/sysctl/${s//\//.} /proc/sys/$s &&"
  done
  # `--propagation unchanged` keeps the root dir's shared peer group (volume mounts must reach
  # containerd), but also /proc's: on a systemd machine /proc is shared, and the binds would
  # appear over the machine's own /proc/sys files (and outlive `down`). So /proc, and only
  # /proc, is made private inside the new namespace before the binds.
  start_bg "$d" "$n-kubelet" in_node "$nd" unshare --mount --propagation unchanged \
    sh -c "mount --make-rprivate /proc &&$binds exec \"\$0\" \"\$@\"" "$BIN_DIR/kubelet" \
    --config="$nd/kubelet.yaml" --kubeconfig="$d/$n.kubeconfig" --root-dir="$nd/kubelet" \
    --cert-dir="$nd/kubelet-pki" --hostname-override="$n" --node-ip="10.200.$i.2" \
    --node-labels="real-cluster/node=$n" -v=1
}

# ----------------------------------------------------------------------------------- kube-proxy
start_kube_proxy() { # DIR NODE INDEX
  local d=$1 n=$2 i=$3 nd=$1/nodes/$2
  kubeconfig_for "$d" "$n-proxy" "https://10.200.$i.1:6443" admin
  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $d/$n-proxy.kubeconfig}
hostnameOverride: $n
mode: iptables
clusterCIDR: $CLUSTER_CIDR
bindAddress: 10.200.$i.2
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Only the node's own address: no route_localnet for loopback NodePorts.
nodePortAddresses: ["10.200.$i.2/32"]
# Zero: kube-proxy leaves the (machine-wide) conntrack settings as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s,
  udpTimeout: 0s, udpStreamTimeout: 0s}
# Pods' own addresses reach the proxy (no masquerade but for traffic from outside the cluster
# network): br_netfilter's bridge-nf-call-iptables is per namespace, and 1 in a new one.
iptables: {masqueradeAll: false, syncPeriod: 10s, minSyncPeriod: 0s}
EOF
  start_bg "$d" "$n-kube-proxy" in_node "$nd" "$BIN_DIR/kube-proxy" --config="$nd/kube-proxy.yaml" -v=1
}

# ------------------------------------------------------------------------------ control plane
start_scheduler() { # DIR
  start_bg "$1" kube-scheduler "$BIN_DIR/kube-scheduler" --kubeconfig="$1/kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT"
}

start_node_controller_manager() { # DIR: every default controller
  local d=$1
  start_bg "$d" kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$d/kubeconfig" --leader-elect=false --bind-address=127.0.0.1 \
    --secure-port="$CONTROLLER_MANAGER_PORT" --use-service-account-credentials=false \
    --root-ca-file="$d/pki/ca.crt" --service-account-private-key-file="$d/pki/sa.key" \
    --cluster-cidr="$CLUSTER_CIDR" --service-cluster-ip-range="$SERVICE_CIDR" \
    --node-monitor-grace-period=20s --concurrent-daemonset-syncs=2
}

# Pods reach the apiserver as the `kubernetes` Service: the apiserver (endpoint reconciler
# none: it only knows its loopback address) does not publish where, so the script does — the
# first node's forwarder.
publish_apiserver_endpoint() { # DIR
  local d=$1
  kubectl_apply "$d" "kubernetes endpoint" <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-real-node
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: real-cluster.sh}
addressType: IPv4
endpoints: [{addresses: [10.200.1.1], conditions: {ready: true}}]
ports: [{name: https, port: 6443, protocol: TCP}]
EOF
}

kubectl_apply() { # DIR STEP < MANIFEST
  local log=$1/logs/kubectl.log
  "$BIN_DIR/kubectl" --kubeconfig "$1/kubeconfig" apply -f - >>"$log" 2>&1 || fail "$2" "$log"
}

wait_for() { # STEP LOG SECONDS CMD...: until CMD succeeds
  local step=$1 log=$2 secs=$3 deadline
  shift 3
  # A deadline, not a count of tries: a try may itself take seconds (kubectl wait --timeout).
  deadline=$((SECONDS + secs))
  while [ "$SECONDS" -lt "$deadline" ]; do
    "$@" >/dev/null && return 0
    sleep 0.5
  done
  fail "$step (not after $secs s)" "$log"
}

# kube-proxy's healthz answers 200 once it has synced the Services' rules (503 before): pods
# reaching a Service (kubernetes, kube-dns) right after `up` must not find no rules yet.
kube_proxy_synced() { # DIR NODE
  kill -0 "$(cat "$1/pids/$2-kube-proxy")" 2>/dev/null ||
    fail "$2 kube-proxy (exited)" "$1/logs/$2-kube-proxy.log"
  nsenter --net="/run/netns/$(cat "$1/nodes/$2/netns")" \
    curl -sf --max-time 2 -o /dev/null http://127.0.0.1:10256/healthz
}

node_ready() { # DIR NODE: Ready; a kubelet that exited fails at once, with its log
  kill -0 "$(cat "$1/pids/$2-kubelet")" 2>/dev/null || fail "$2 kubelet (exited)" "$1/logs/$2-kubelet.log"
  [ "$("$BIN_DIR/kubectl" --kubeconfig "$1/kubeconfig" get node "$2" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# CoreDNS as the cluster DNS, the way clusters run it: a Deployment behind the kube-dns Service.
start_coredns() { # DIR
  local d=$1
  kubectl_apply "$d" "coredns" <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
        }
        cache 5
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      nodeSelector: {real-cluster/node: node-1}
      terminationGracePeriodSeconds: 2
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {containerPort: 53, name: dns, protocol: UDP}
        - {containerPort: 53, name: dns-tcp, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        livenessProbe: {httpGet: {path: /health, port: 8080}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_SERVICE_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
  wait_for "coredns ready" "$d/logs/kubectl.log" 120 coredns_available "$d"
}

coredns_available() { # DIR
  "$BIN_DIR/kubectl" --kubeconfig "$1/kubeconfig" -n kube-system wait --for=condition=Available \
    deployment/coredns --timeout=2s 2>/dev/null
}

# ---------------------------------------------------------------------------------- up / down
nodes_up() { # DIR N
  local d=$1 count=$2 i n names
  node_check_tools
  names=$(node_names "$count")
  mkdir -p "$d/nodes"
  node_lock
  node_ranges_free "$count"
  host_state >"$d/nodes/host-state.before"
  # Fixed paths outside DIR: removed at down only if the node made them.
  local p
  for p in /run/containerd /var/lib/kubelet /var/log/containers /var/lib/cni; do
    [ -e "$p" ] || echo "$p" >>"$d/nodes/made-paths"
  done
  local images
  images=$(build_images) || exit 1
  i=0
  for n in $names; do
    i=$((i + 1))
    mkdir -p "$d/nodes/$n"
    node_certs "$d" "$n"
    node_network "$d" "$n" "$i"
    write_containerd_config "$d" "$n" "$i"
    start_containerd "$d" "$n"
    # shellcheck disable=SC2086
    import_images "$d" "$n" $(echo "$images" | cut -d' ' -f3)
    write_kubelet_config "$d" "$n" "$i"
    start_kubelet "$d" "$n" "$i"
    start_kube_proxy "$d" "$n" "$i"
  done
  [ "$count" -lt 2 ] || link_nodes "$d" node-1 1 node-2 2
  start_scheduler "$d"
  publish_apiserver_endpoint "$d"
  for n in $names; do
    wait_for "$n Ready" "$d/logs/$n-kubelet.log" 120 node_ready "$d" "$n"
    wait_for "$n kube-proxy first sync" "$d/logs/$n-kube-proxy.log" 60 kube_proxy_synced "$d" "$n"
  done
  COREDNS_IMAGE=$(echo "$images" | awk '$1 == "COREDNS_IMAGE" {print $2}')
  start_coredns "$d"
  {
    echo "NODES=\"${names% }\""
    echo "$images" | awk '{print $1 "=" $2}'
    echo "NODE_STATE_DIR=$d/nodes"
  } >>"$d/env"
}

# The node(s) of DIR, found by their names (ibp-<id>-<node> namespaces and cgroups, ibp<id><i>
# veths) as well as from DIR: a failed `up`, or a DIR already deleted, leaves no list behind.
node_names_of() { # DIR
  local d=$1 id h
  id=$(node_id "$d")
  {
    find "$d/nodes" -maxdepth 1 -name 'node-*' -printf '%f\n' 2>/dev/null || true
    if command -v ip >/dev/null; then ip netns list | awk '{print $1}' | sed -n "s/^ibp-$id-//p"; fi
    for h in /sys/fs/cgroup/*/ibp-"$id"-*; do [ ! -d "$h" ] || basename "$h" | sed "s/^ibp-$id-//"; done
  } | sort -u
}

nodes_down() { # DIR: non-zero (with what) if a node's processes or cgroups remain
  local d=$1 id n nd ns i m p failed=0
  id=$(node_id "$d")
  for n in $(node_names_of "$d"); do
    nd=$d/nodes/$n i=${n#node-} ns=ibp-$id-$n
    stop_one "$d" "$n-kube-proxy"
    stop_one "$d" "$n-kubelet"
    # The pods' containers and shims: stopped through containerd, then containerd itself.
    if [ -S "$nd/containerd.sock" ]; then
      stop_pods "$nd" "$d/logs/$n-down.log"
    fi
    stop_one "$d" "$n-containerd"
    stop_one "$d" "apiserver-forward-$n"
    # Without its pid file (DIR gone), the forwarder is known by its listening address.
    for p in $(pgrep -f "^socat TCP-LISTEN:6443,bind=10.200.$i.1," || true); do kill -9 "$p" 2>/dev/null || true; done
    kill_shims "$nd" || failed=1
    # Exactly the routes up added (via the node's address): never the machine's own route to
    # the same range. Gone already if the veth went first.
    node_route_del "10.244.$i.0/24" "10.200.$i.2"
    [ "$i" != 1 ] || node_route_del "$SERVICE_CIDR" "10.200.1.2"
    if ip netns list | grep -q "^$ns\b"; then
      # Whatever still runs in the namespace (kube-proxy, containerd without pid files).
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    fi
    ! ip link show "ibp$id$i" >/dev/null 2>&1 || ip link del "ibp$id$i" || true
    ! ip netns list | grep -q "^$ns\b" || ip netns del "$ns" || true
    remove_cgroups "/ibp-$id-$n" || failed=1
    rm -f /var/lib/cni/results/"ibp-$id-$n"-*
  done
  [ -d "$d/nodes" ] || return "$failed"
  stop_one "$d" kube-scheduler
  # What the kubelet mounted (volumes: tmpfs for secrets and tokens; its root dir's bind
  # mount) and containerd (root filesystems, /dev/shm, network namespaces): deepest first.
  awk -v p="$d/nodes/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ -f "$d/nodes/made-paths" ]; then
    while read -r m; do rm -rf "$m"; done <"$d/nodes/made-paths"
    rm -f "$d/nodes/made-paths"
  fi
  host_state >"$d/nodes/host-state.after"
  return "$failed"
}

node_route_del() { # RANGE VIA
  if [ -n "$(ip route show "$1" via "$2" 2>/dev/null)" ]; then ip route del "$1" via "$2"; fi
}

stop_pods() { # NODE-DIR LOG: every container of this node's containerd, killed
  local nd=$1 log=$2 c
  # Failures go to LOG, not to down's result: remove_cgroups kills whatever this leaves.
  for c in $(ctr --address "$nd/containerd.sock" -n k8s.io tasks ls -q 2>>"$log"); do
    ctr --address "$nd/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$c" >>"$log" 2>&1 || true
  done
}

kill_shims() { # NODE-DIR: shims left by this node's containerd (their command line names its state)
  local nd=$1 p pattern="containerd-shim-runc-v2.*-address $1/containerd.sock"
  for p in $(pgrep -f "$pattern" || true); do
    kill -9 "$p" 2>/dev/null || true
  done
  # Shims are not in the node's cgroups (they run in containerd's): checked here instead.
  for _ in $(seq 1 50); do
    [ -n "$(pgrep -f "$pattern" || true)" ] || return 0
    sleep 0.1
  done
  echo "real-cluster: down: shims of $nd survive SIGKILL: $(pgrep -f "$pattern" | xargs)" >&2
  return 1
}

# The kubelet's cgroupRoot must exist in every hierarchy before it starts (cgroup v1 here); a
# new cpuset has no CPUs or memory nodes until given its parent's.
make_cgroups() { # CGROUP-PATH
  local h
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "$h${1#/}"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" >"$h${1#/}/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h${1#/}/cpuset.mems"
    fi
  done
}

# What the kubelet and containerd did not stop (a container whose shim is gone, a process a
# container forked) is still in the node's cgroups: every pid there is killed, the cgroups
# emptied, then removed; one that remains (a process that does not die) fails `down`, naming it.
remove_cgroups() { # CGROUP-PATH
  local h pids left=""
  for h in /sys/fs/cgroup/*; do
    [ -d "$h$1" ] || continue
    for _ in $(seq 1 100); do
      pids=$(find "$h$1" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs)
      [ -n "$pids" ] || break
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
      sleep 0.1
    done
    find "$h$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    if [ -d "$h$1" ]; then
      left="$left $h$1 (pids: $(find "$h$1" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs))"
    fi
  done
  [ -z "$left" ] || { echo "real-cluster: down: cgroups not removed:$left" >&2 && return 1; }
}
