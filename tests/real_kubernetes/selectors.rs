//! Label selectors against the real apiserver. For each selector, the ClusterRoles the
//! apiserver lists with the equivalent `labelSelector` (evaluated with the `labels.Selector`
//! semantics `LabelSelectorAsSelector` gives) are the ones our one matcher picks from the same
//! labelled roles, and the ClusterRole aggregation controller (which parses the selector with
//! `LabelSelectorAsSelector` itself) copies in the rules of exactly those; an aggregation rule whose selector the matcher refuses is one the apiserver
//! refuses to store, with the same 422 causes, and one the kube emulator refuses to load.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use ibp_emulators::rbac::RbacPolicy;
use identity_binding_proxy::authz::selector::{self, Matcher};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{json, Value};

use crate::harness::*;

/// The labelled ClusterRoles every selector is tried on: name and labels.
fn population() -> Vec<(&'static str, Value)> {
    vec![
        ("sel-plain", json!({})),
        ("sel-web", json!({"tier": "web"})),
        ("sel-api", json!({"tier": "api"})),
        ("sel-web-prod", json!({"tier": "web", "env": "prod"})),
        ("sel-prod", json!({"env": "prod"})),
        ("sel-blank", json!({"tier": ""})),
        ("sel-prefixed", json!({"example.com/tier": "web"})),
    ]
}

/// A `metav1.LabelSelector`, and the same selector in the query language.
fn cases() -> Vec<(Value, &'static str)> {
    let expr = |key: &str, op: &str, values: &[&str]| json!({"matchExpressions": [{"key": key, "operator": op, "values": values}]});
    vec![
        (json!({"matchLabels": {"tier": "web"}}), "tier=web"),
        (
            json!({"matchLabels": {"tier": "web", "env": "prod"}}),
            "env=prod,tier=web",
        ),
        (expr("tier", "In", &["web", "api"]), "tier in (web,api)"),
        (
            expr("example.com/tier", "In", &["web"]),
            "example.com/tier in (web)",
        ),
        (expr("tier", "NotIn", &["web"]), "tier notin (web)"),
        (expr("env", "Exists", &[]), "env"),
        (expr("tier", "DoesNotExist", &[]), "!tier"),
        (
            json!({"matchLabels": {"env": "prod"}, "matchExpressions": [
                {"key": "tier", "operator": "Exists"},
                {"key": "tier", "operator": "NotIn", "values": ["api"]},
            ]}),
            "env=prod,tier,tier notin (api)",
        ),
        (json!({}), ""),
        // The query language's `()` is the set holding the empty value, not an empty set.
        (expr("tier", "In", &[""]), "tier in ()"),
    ]
}

/// Selectors the apiserver refuses in an aggregation rule, an `In` with no values among them.
fn refused() -> Vec<Value> {
    let expr = |e: Value| json!({"matchExpressions": [e]});
    vec![
        expr(json!({"key": "tier", "operator": "Bogus", "values": ["web"]})),
        expr(json!({"key": "tier", "operator": "exists"})),
        expr(json!({"key": "tier", "operator": "In", "values": []})),
        expr(json!({"key": "tier", "operator": "NotIn"})),
        expr(json!({"key": "tier", "operator": "Exists", "values": ["web"]})),
        expr(json!({"key": "tier", "operator": "In", "values": ["-web-"]})),
        expr(json!({"key": "bad key", "operator": "Exists"})),
        json!({"matchLabels": {"tier": "x y"}}),
    ]
}

/// `curl` as the cluster's admin: the response body, parsed.
fn admin_curl(c: &Cluster, args: &[&str], path: &str) -> Value {
    let pki = c.get("PKI_DIR");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", c.get("CA_FILE")])
        .args(["--cert", &format!("{pki}/admin.crt")])
        .args(["--key", &format!("{pki}/admin.key")])
        .args(args)
        .arg(format!("{}{path}", c.get("APISERVER")))
        .output()
        .expect("curl runs");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{path}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The names of the `people` the matcher picks with `selector`.
fn picked<'a>(selector: &Value, people: &'a [(&'a str, Value)]) -> BTreeSet<&'a str> {
    let parsed: LabelSelector = serde_json::from_value(selector.clone()).unwrap();
    let matcher = Matcher::parse(&parsed).unwrap_or_else(|e| panic!("{selector}: {e}"));
    people
        .iter()
        .filter(|(_, labels)| {
            let labels: BTreeMap<String, String> = serde_json::from_value(labels.clone()).unwrap();
            matcher.matches(&labels)
        })
        .map(|(n, _)| *n)
        .collect()
}

fn url_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn the_matcher_selects_what_the_apiserver_selects() {
    let c = shared();
    let people = population();
    for (name, labels) in &people {
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels}});
        c.apply(&role.to_string());
    }
    let ours: BTreeSet<&str> = people.iter().map(|(n, _)| *n).collect();
    for (selector, query) in cases() {
        let path = format!(
            "/apis/rbac.authorization.k8s.io/v1/clusterroles?labelSelector={}",
            url_encoded(query)
        );
        let list = admin_curl(c, &[], &path);
        assert_eq!(list["kind"], "ClusterRoleList", "{query:?}: {list}");
        let real: BTreeSet<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .filter(|n| ours.contains(n))
            .collect();
        let picked = picked(&selector, &people);
        eprintln!("{query:?}: the apiserver lists {real:?}");
        assert_eq!(picked, real, "{selector} (labelSelector {query:?})");
    }
}

/// The group of the rules the aggregation test's roles hold, one resource per role.
const GROUP: &str = "selectors.test";

/// The resources of `GROUP` in ClusterRole `name`'s rules.
fn copied(c: &Cluster, name: &str) -> BTreeSet<String> {
    let role: Value =
        serde_json::from_str(&c.kubectl(&["get", "clusterrole", name, "-o", "json"])).unwrap();
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    rules
        .iter()
        .filter(|r| {
            r["apiGroups"]
                .as_array()
                .is_some_and(|g| g.contains(&json!(GROUP)))
        })
        .flat_map(|r| r["resources"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(String::from))
        .collect()
}

#[test]
fn the_aggregation_controller_copies_what_the_matcher_selects() {
    let c = shared();
    // Roles of their own (with rules), beside the listing test's (without).
    let names: Vec<String> = population()
        .iter()
        .map(|(n, _)| n.replace("sel-", "selagg-"))
        .collect();
    let people: Vec<(&str, Value)> = names
        .iter()
        .zip(population())
        .map(|(n, (_, labels))| (n.as_str(), labels))
        .collect();
    for (name, labels) in &people {
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": [{"apiGroups": [GROUP], "resources": [name], "verbs": ["get"]}]});
        c.apply(&role.to_string());
    }
    // One aggregating role at a time, so none aggregates another's copied rules.
    for (i, (selector, _)) in cases().into_iter().enumerate() {
        let want: BTreeSet<String> = picked(&selector, &people)
            .into_iter()
            .map(String::from)
            .collect();
        assert!(
            !want.is_empty(),
            "{selector}: a case that picks nothing proves nothing here"
        );
        let name = format!("selagg-aggregating-{i}");
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "aggregationRule": {"clusterRoleSelectors": [selector]}});
        c.apply(&role.to_string());
        let mut last = BTreeSet::new();
        let settled = within(Duration::from_secs(30), || {
            last = copied(c, &name);
            last == want
        });
        eprintln!("{selector}: the controller copied {last:?}");
        assert!(
            settled.is_some(),
            "{selector}: the controller copied {last:?}, the matcher picks {want:?}"
        );
        c.kubectl(&["delete", "clusterrole", &name]);
    }
}

#[test]
fn aggregation_selectors_the_matcher_refuses_the_apiserver_refuses_to_store() {
    let c = shared();
    let field = "aggregationRule.clusterRoleSelectors[0]";
    for (i, selector) in refused().into_iter().enumerate() {
        let name = format!("sel-refused-{i}");
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "aggregationRule": {"clusterRoleSelectors": [selector]}});
        let body = role.to_string();
        let status = admin_curl(
            c,
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ],
            "/apis/rbac.authorization.k8s.io/v1/clusterroles?dryRun=All",
        );
        eprintln!("{selector}: {}", status["message"]);
        assert_eq!(
            (status["code"].as_u64(), status["reason"].as_str()),
            (Some(422), Some("Invalid")),
            "{selector}: {status}"
        );
        let parsed: LabelSelector = serde_json::from_value(selector.clone()).unwrap();
        assert!(Matcher::parse(&parsed).is_err(), "{selector}");
        let mut ours: Vec<(String, String)> = selector::validate(&parsed, field)
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect();
        ours.push((
            field.into(),
            "Invalid value: null: invalid label selector.".into(),
        ));
        let real: Vec<(String, String)> = status["details"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["field"].as_str().unwrap().into(),
                    c["message"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(ours, real, "{selector}");
        // The kube emulator refuses to load it, with the apiserver's own words.
        let yaml = serde_json::to_string(&role).unwrap();
        let err = RbacPolicy::parse(&yaml).unwrap_err().to_string();
        let (_, causes) = status["message"]
            .as_str()
            .unwrap()
            .split_once(" is invalid: ")
            .unwrap();
        assert!(err.ends_with(causes), "{selector}: the emulator said {err}");
    }
}
