//! Grants: every opted-in pod's service account may use the client id it names, asked exactly
//! as the proxy asks (a SubjectAccessReview of `use-managed-identity` on the client id, in the
//! pod's namespace), and that client id is bound; grants that cover every identity are
//! flagged, as the proxy refuses them unless `--allow-wildcard-grants` is set.

use std::collections::BTreeSet;

use crate::authz::WILDCARD_PROBE;
use crate::cluster::{Cluster, Subject, GRANT_GROUP, GRANT_VERB};
use crate::doctor::install::{Proxy, Workload, CLIENT_ID_ANNOTATION};
use crate::doctor::report::Check;
use crate::doctor::report::Unchecked;
use crate::request::token::parse_guid;

pub async fn checks(
    cluster: &Cluster,
    proxy: &Proxy,
    workloads: &Result<Vec<Workload>, Unchecked>,
) -> Vec<Check> {
    let workloads = match workloads {
        Ok(w) => w,
        Err(e) => {
            return vec![
                Check::unknown("grants.pods", e.clone()),
                Check::unknown("grants.wildcard", e.clone()),
            ]
        }
    };
    let callers = callers(workloads);
    vec![
        pods_check(cluster, proxy, &callers).await,
        wildcard_check(cluster, proxy, &callers).await,
    ]
}

type Caller<'a> = (&'a str, &'a str, Option<String>);

/// One review per (namespace, service account, client id), as the proxy caches them; the
/// client id as the proxy reads it (a GUID lower-cased), or as written when it is no GUID
/// (it is named as such).
fn callers(workloads: &[Workload]) -> BTreeSet<Caller<'_>> {
    workloads
        .iter()
        .map(|w| {
            let cid = w
                .client_id
                .as_deref()
                .map(|c| parse_guid(c).unwrap_or_else(|| c.to_string()));
            (w.namespace.as_str(), w.service_account.as_str(), cid)
        })
        .collect()
}

async fn review(cluster: &Cluster, ns: &str, sa: &str, client_id: &str) -> Result<bool, Unchecked> {
    let groups = vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".to_string(),
    ];
    let subject = Subject {
        user: &format!("system:serviceaccount:{ns}:{sa}"),
        groups: &groups,
        uid: "",
        namespace: ns,
    };
    cluster
        .access_review(&subject, client_id)
        .await
        .map(|(allowed, _)| allowed)
        .map_err(|e| Unchecked::from(e.to_string()))
}

async fn pods_check(cluster: &Cluster, proxy: &Proxy, callers: &BTreeSet<Caller<'_>>) -> Check {
    const ID: &str = "grants.pods";
    let bound: Option<BTreeSet<&str>> = proxy
        .bindings
        .as_ref()
        .ok()
        .map(|b| b.iter().map(|b| b.client_id.as_str()).collect());
    let mut denied = Vec::new();
    let mut problems = Vec::new();
    let mut unbound = BTreeSet::new();
    for (ns, sa, cid) in callers {
        let Some(cid) = cid else {
            problems.push(format!(
                "{ns}/{sa}: no client id (annotate the service account with {CLIENT_ID_ANNOTATION})"
            ));
            continue;
        };
        // As the proxy does: nothing that is not a GUID goes into a review.
        if parse_guid(cid).is_none() {
            problems.push(format!(
                "{ns}/{sa}: no client id: '{cid}' is not a GUID (fix {CLIENT_ID_ANNOTATION})"
            ));
            continue;
        }
        if bound.as_ref().is_some_and(|b| !b.contains(cid.as_str())) {
            problems.push(format!("{ns}/{sa}: client id {cid} is not bound"));
            unbound.insert(cid.as_str());
        }
        match review(cluster, ns, sa, cid).await {
            Ok(true) => {}
            Ok(false) => denied.push((*ns, *sa, cid.as_str())),
            Err(e) => return Check::unknown(ID, format!("SubjectAccessReview: {e}")),
        }
    }
    if denied.is_empty() && problems.is_empty() {
        return Check::pass(
            ID,
            format!(
                "all {} service account(s) of opted-in pods may use their identity",
                callers.len()
            ),
        );
    }
    let mut details: Vec<String> = denied
        .iter()
        .map(|(ns, sa, cid)| format!("{ns}/{sa} may not {GRANT_VERB} {cid}"))
        .collect();
    details.extend(problems.iter().cloned());
    let fix = grants_fix(proxy, &denied, &unbound, &problems);
    Check::fail(
        ID,
        format!(
            "{} service account(s) of opted-in pods cannot get their tokens",
            denied.len() + problems.len()
        ),
        fix,
    )
    .with_details(details)
}

/// The grants to apply, the identities to bind, and the service accounts to annotate.
fn grants_fix(
    proxy: &Proxy,
    denied: &[(&str, &str, &str)],
    unbound: &BTreeSet<&str>,
    problems: &[String],
) -> String {
    let mut fixes = Vec::new();
    if !denied.is_empty() {
        let yaml: Vec<String> = denied
            .iter()
            .map(|(ns, sa, cid)| grant_yaml(ns, sa, cid))
            .collect();
        fixes.push(format!(
            "kubectl apply -f - <<'EOF'\n{}EOF",
            yaml.join("---\n")
        ));
    }
    if !unbound.is_empty() {
        fixes.push(format!(
            "# bind the identities: add them to the chart value `bindings` (ConfigMap {}/{}-bindings), then helm upgrade:",
            proxy.namespace, proxy.name
        ));
        fixes.extend(
            unbound
                .iter()
                .map(|cid| format!("#   - clientId: {cid}\n#     tenantId: <its tenant>")),
        );
    }
    let no_client_id = problems.iter().filter(|p| p.contains("no client id"));
    fixes.extend(no_client_id.map(|p| format!("# {p}")));
    fixes.join("\n")
}

/// The Role and RoleBinding that let `ns/sa` use `client_id` (namespaced: it grants nothing
/// beyond the pod's namespace).
pub fn grant_yaml(ns: &str, sa: &str, client_id: &str) -> String {
    // A name Kubernetes accepts, whatever the pod named as its client id.
    let short: String = client_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let name = format!("use-mi-{}", short.to_ascii_lowercase());
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         rules:\n  - apiGroups: [\"{GRANT_GROUP}\"]\n    resources: [\"{client_id}\"]\n    verbs: [\"{GRANT_VERB}\"]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {name}-{sa}\n  namespace: {ns}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}\n\
         subjects:\n  - kind: ServiceAccount\n    name: {sa}\n    namespace: {ns}\n"
    )
}

/// A service account allowed a client id that cannot exist holds a grant for every identity.
async fn wildcard_check(cluster: &Cluster, proxy: &Proxy, callers: &BTreeSet<Caller<'_>>) -> Check {
    const ID: &str = "grants.wildcard";
    let accounts: BTreeSet<(&str, &str)> = callers.iter().map(|(ns, sa, _)| (*ns, *sa)).collect();
    let mut wide = Vec::new();
    for (ns, sa) in &accounts {
        match review(cluster, ns, sa, WILDCARD_PROBE).await {
            Ok(true) => wide.push(format!("{ns}/{sa}")),
            Ok(false) => {}
            Err(e) => return Check::unknown(ID, format!("SubjectAccessReview: {e}")),
        }
    }
    if wide.is_empty() {
        return Check::pass(ID, format!("no service account of an opted-in pod holds a grant for every identity ({} checked)", accounts.len()));
    }
    let allowed = proxy
        .setting("IBP_ALLOW_WILDCARD_GRANTS")
        .is_some_and(|v| v == "true");
    let summary = format!(
        "{} service account(s) hold a grant for EVERY identity (a '*' rule, e.g. cluster-admin)",
        wide.len()
    );
    if allowed {
        return Check::pass(
            ID,
            format!("{summary}; the proxy allows it (IBP_ALLOW_WILDCARD_GRANTS)"),
        )
        .with_details(wide);
    }
    let fix = wide
        .iter()
        .map(|who| {
            let (ns, sa) = who.split_once('/').unwrap_or((who, ""));
            format!(
                "kubectl get rolebindings,clusterrolebindings -A -o wide | grep -w {sa}   # bind {ns}/{sa} to a role naming its client id instead"
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    Check::fail(
        ID,
        format!("{summary}: the proxy refuses them with 403"),
        fix,
    )
    .with_details(wide)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_carry_the_client_id_as_the_proxy_reads_it() {
        let workload = |cid: &str| Workload {
            namespace: "apps".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            client_id: Some(cid.into()),
            env: Default::default(),
            owner: None,
            sidecar: false,
        };
        let all = [
            workload(" 5F0E2A7C-1D3B-4C8E-9A6F-2B7D4E1C8A90"),
            workload("5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90"),
            workload("not-a-guid"),
        ];
        let callers: Vec<_> = callers(&all).into_iter().collect();
        assert_eq!(
            callers,
            [
                (
                    "apps",
                    "web",
                    Some("5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90".to_string())
                ),
                ("apps", "web", Some("not-a-guid".to_string())),
            ],
            "one review per identity as the proxy asks it; what is no GUID kept to be named"
        );
    }

    #[test]
    fn any_client_id_makes_a_valid_name() {
        let yaml = grant_yaml("apps", "web", "ÄÖ-é€x");
        assert!(yaml.contains("name: use-mi-x\n"), "{yaml}");
    }

    #[test]
    fn the_grant_is_a_namespaced_role_and_binding_for_exactly_that_identity() {
        let yaml = grant_yaml("apps", "web", "5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90");
        let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["kind"], "Role");
        assert_eq!(
            docs[0]["rules"][0],
            serde_json::json!({"apiGroups": [GRANT_GROUP],
                "resources": ["5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90"], "verbs": [GRANT_VERB]})
        );
        assert_eq!(docs[0]["metadata"]["name"], "use-mi-5f0e2a7c");
        assert_eq!(docs[1]["kind"], "RoleBinding");
        assert_eq!(docs[1]["metadata"]["namespace"], "apps");
        assert_eq!(docs[1]["roleRef"]["name"], docs[0]["metadata"]["name"]);
        assert_eq!(
            docs[1]["subjects"][0],
            serde_json::json!({"kind": "ServiceAccount", "name": "web", "namespace": "apps"})
        );
    }
}
