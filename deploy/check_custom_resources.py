"""Helpers for deploy/check.sh (run with the venv's python: needs PyYAML and jsonschema).

kubernetes-validate bundles schemas for built-in kinds only; for any other kind it merely
warns and passes. So the rendering is split: built-in kinds go to kubernetes-validate
--strict, cert-manager kinds are validated here against cert-manager's own CRD schemas when
those are given (CERT_MANAGER_CRDS=cert-manager.crds.yaml from a cert-manager release), made
strict the way kubernetes-validate does it (no unknown fields). Any other kind fails.

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
CUSTOM_GROUPS = {"cert-manager.io"}


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


def crds(custom_file, crds_file=None):
    with open(custom_file) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        return
    if not crds_file:
        for doc in docs:
            print(f"  SKIP {name_of(doc)} ({doc['apiVersion']}): no CRD schema given; set "
                  "CERT_MANAGER_CRDS=<cert-manager.crds.yaml> to validate it "
                  "(tests/deploy_manifests.rs still checks its fields)")
        return
    schemas = load_crd_schemas(crds_file)
    failed = False
    for doc in docs:
        schema = schemas.get((doc["apiVersion"], doc["kind"]))
        if schema is None:
            print(f"  FAIL {name_of(doc)}: {crds_file} has no schema for {doc['apiVersion']}")
            failed = True
            continue
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        for e in errors:
            print(f"  FAIL {name_of(doc)}: {'.'.join(map(str, e.path))}: {e.message}")
        failed |= bool(errors)
        if not errors:
            print(f"  ok   {name_of(doc)} against {crds_file}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"split": split, "crds": crds}[command](*args)
