"""Helpers for deploy/check.sh (run with the venv's python: needs PyYAML and jsonschema).

kubernetes-validate bundles schemas for built-in kinds only; for any other kind it merely
warns and passes. So the rendering is split: built-in kinds go to kubernetes-validate
--strict; cert-manager kinds are validated here, made strict the way kubernetes-validate does
it (no unknown fields), against
  - the CRD schemas of a cert-manager release when given (CERT_MANAGER_CRDS=cert-manager.crds.yaml),
  - else the schemas of the PyPI package cloudcoil-models-cert-manager, which are generated
    from cert-manager's CRDs;
and the Prometheus operator's kinds (the chart's PodMonitor and PrometheusRule) against the
schemas of the PyPI package cloudcoil-models-prometheus-operator, generated from its CRDs.
Any other kind fails.

  split RENDERED BUILTIN_OUT CUSTOM_OUT
  crds CUSTOM_FILE [CRDS_FILE]
"""

import sys

import jsonschema
import yaml

# Groups whose kinds ship with Kubernetes (kubernetes-validate has schemas for them).
BUILTIN_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io", "scheduling.k8s.io", "storage.k8s.io", "coordination.k8s.io",
    "discovery.k8s.io", "node.k8s.io", "certificates.k8s.io", "apiextensions.k8s.io",
}
# Custom resource groups we know how to validate.
CUSTOM_GROUPS = {"cert-manager.io", "monitoring.coreos.com"}


def group_of(doc):
    api_version = doc.get("apiVersion", "")
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def split(rendered, builtin_out, custom_out):
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    builtin, custom = [], []
    for doc in docs:
        group = group_of(doc)
        if group in BUILTIN_GROUPS:
            builtin.append(doc)
        elif group in CUSTOM_GROUPS:
            custom.append(doc)
        else:
            sys.exit(f"FAIL {rendered}: {name_of(doc)} ({doc.get('apiVersion')}) has no schema this check knows")
    with open(builtin_out, "w") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    with open(custom_out, "w") as f:
        yaml.safe_dump_all(custom, f, sort_keys=False)
    print(f"  {len(builtin)} built-in, {len(custom)} custom resources")


def strict(schema):
    """Reject unknown fields wherever the schema lists its properties (as kubernetes-validate's
    -strict schemas do), leaving free-form maps alone."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def load_crd_schemas(crds_file):
    schemas = {}
    with open(crds_file) as f:
        for crd in yaml.safe_load_all(f):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                # apiVersion/kind/metadata are checked by the apiserver, not the CRD schema.
                schema.setdefault("properties", {}).update(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                     "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = strict(schema)
    return schemas


def load_package_schemas():
    from importlib.metadata import version

    from cloudcoil.models.cert_manager import v1

    source = f"cloudcoil-models-cert-manager {version('cloudcoil-models-cert-manager')}"
    schemas = {}
    for model in (v1.Certificate, v1.Issuer, v1.ClusterIssuer, v1.CertificateRequest):
        schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
        schemas[("cert-manager.io/v1", model.__name__)] = schema
    return schemas, source


def load_monitoring_schemas():
    """The Prometheus operator's kinds the chart can render (PodMonitor, PrometheusRule), from
    the PyPI package cloudcoil-models-prometheus-operator (generated from its CRDs)."""
    from importlib.metadata import version
    from cloudcoil.models.prometheus_operator import v1
    source = f"cloudcoil-models-prometheus-operator {version('cloudcoil-models-prometheus-operator')}"
    return {("monitoring.coreos.com/v1", m.__name__):
            (strict(m.model_json_schema(by_alias=True, mode="validation")), source)
            for m in (v1.PodMonitor, v1.PrometheusRule)}


def leaf_errors(error):
    """The errors that say what is wrong, rather than 'matched none of anyOf [model, null]'."""
    if not error.context:
        return [error]
    leaves = [leaf for sub in error.context for leaf in leaf_errors(sub)]
    return [e for e in leaves if not (e.validator == "type" and e.validator_value == "null")] or [error]


def crds(custom_file, crds_file=None):
    with open(custom_file) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        print("  none")
        return
    if crds_file:
        schemas, source = load_crd_schemas(crds_file), crds_file
    else:
        schemas, source = load_package_schemas()
    sources = {key: source for key in schemas}
    if any(group_of(d) == "monitoring.coreos.com" for d in docs):
        for key, (schema, monitoring_source) in load_monitoring_schemas().items():
            schemas[key], sources[key] = schema, monitoring_source
    failed = False
    for doc in docs:
        schema = schemas.get((doc["apiVersion"], doc["kind"]))
        doc_source = sources.get((doc["apiVersion"], doc["kind"]), source)
        if schema is None:
            print(f"  FAIL {name_of(doc)}: {doc_source} has no schema for {doc['apiVersion']} {doc['kind']}")
            failed = True
            continue
        errors = [leaf for e in jsonschema.Draft202012Validator(schema).iter_errors(doc) for leaf in leaf_errors(e)]
        for e in errors:
            print(f"  FAIL {name_of(doc)}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
        failed |= bool(errors)
        if not errors:
            print(f"  ok   {name_of(doc)} against {doc_source}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"split": split, "crds": crds}[command](*args)
