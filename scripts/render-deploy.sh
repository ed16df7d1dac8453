#!/usr/bin/env bash
# The kustomize manifests are rendered from the Helm chart, their one source:
#   charts/identity-binding-proxy/templates/X.yaml   -> deploy/base/X.yaml
#                                                       (values: deploy/base/chart-values.yaml)
#   the chart's settings ConfigMap                    -> deploy/base/settings.env
#                                                       (kustomize's configMapGenerator)
#   templates/certificate.yaml, templates/issuers.yaml -> deploy/overlays/cert-manager/
#   charts/identity-binding-proxy/files/alerts.yaml   -> deploy/monitoring/alerts.yaml
#   templates/sidecar-component.yaml (the sidecar      -> deploy/components/sidecar/sidecar.yaml
#   templates a workload chart includes, _sidecar.tpl)    (values: its chart-values.yaml)
#
#   bash scripts/render-deploy.sh           write the files
#   bash scripts/render-deploy.sh --check   fail (with the diff) when a committed file differs
#
# helm is the real-cluster harness's pinned build (scripts/real-cluster.sh build helm), or
# $HELM when set.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CHART=charts/identity-binding-proxy
RELEASE=identity-binding-proxy
NAMESPACE=identity-binding-proxy
# The version deploy/check.sh validates against.
KUBE_VERSION=1.33.0

if [ -z "${HELM:-}" ]; then
  dir=$(bash scripts/real-cluster.sh build helm | tail -n 1) || {
    echo "render-deploy: building helm failed (above)" >&2
    exit 1
  }
  HELM=$dir/helm
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/deploy/base" "$out/deploy/overlays/cert-manager" "$out/deploy/monitoring" \
  "$out/deploy/components/sidecar"

template() { # OUTDIR HELM-ARGS...: one file per chart template, under OUTDIR
  local dir=$1
  shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" "$@" >"$out/rendered.yaml"
  python3 - "$out/rendered.yaml" "$dir" <<'PY'
import re, sys
text, outdir = open(sys.argv[1]).read(), sys.argv[2]
parts = re.split(r"^---\n# Source: [^/\n]+/templates/([^\n]+)\n", text, flags=re.M)
files = {}
for name, body in zip(parts[1::2], parts[2::2]):
    files.setdefault(name, []).append(body.rstrip("\n") + "\n")
for name, bodies in files.items():
    with open(f"{outdir}/{name}", "w") as f:
        f.write(f"# Rendered from charts/identity-binding-proxy/templates/{name} by\n"
                "# scripts/render-deploy.sh: edit the chart, not this file.\n")
        f.write("---\n".join(bodies))
PY
}

template "$out/deploy/base" -f deploy/base/chart-values.yaml
template "$out/deploy/overlays/cert-manager" -f deploy/base/chart-values.yaml \
  --set tls.source=cert-manager --show-only templates/certificate.yaml \
  --show-only templates/issuers.yaml
# The settings: the chart's ConfigMap data as KEY=VALUE lines.
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" -f deploy/base/chart-values.yaml \
  --set kustomize=false --show-only templates/settings-configmap.yaml >"$out/settings.yaml"
python3 - "$out/settings.yaml" >"$out/deploy/base/settings.env" <<'PY'
import json, re, sys
print("# Rendered from the chart's settings (templates/_helpers.tpl, ibp.settings) by")
print("# scripts/render-deploy.sh: edit the chart values in chart-values.yaml, then render.")
data = sys.stdin if False else open(sys.argv[1]).read().split("\ndata:\n", 1)[1]
for line in data.splitlines():
    m = re.fullmatch(r"  ([A-Z_]+): (\".*\")", line)
    if not m:
        sys.exit(f"render-deploy: unexpected settings line: {line!r}")
    print(f"{m.group(1)}={json.loads(m.group(2))}")
PY
cp "$CHART/files/alerts.yaml" "$out/deploy/monitoring/alerts.yaml"
# The sidecar component's patch: the chart's sidecar mode, through the same named templates.
template "$out/deploy/components/sidecar" -f deploy/components/sidecar/chart-values.yaml \
  --show-only templates/sidecar-component.yaml
mv "$out/deploy/components/sidecar/sidecar-component.yaml" "$out/deploy/components/sidecar/sidecar.yaml"

generated=$(cd "$out" && find deploy -type f | LC_ALL=C sort)
if [ "${1:-}" = "--check" ]; then
  drift=0
  for f in $generated; do
    if ! diff -u "$f" "$out/$f" >"$out/diff" 2>&1; then
      echo "DRIFT: $f differs from the chart's rendering (run: bash scripts/render-deploy.sh):" >&2
      cat "$out/diff" >&2
      drift=1
    fi
  done
  [ $drift = 0 ] || exit 1
  echo "render-deploy: $(wc -w <<<"$generated") files match the chart"
else
  for f in $generated; do cp "$out/$f" "$f"; done
  echo "render-deploy: wrote $(wc -w <<<"$generated") files"
fi
