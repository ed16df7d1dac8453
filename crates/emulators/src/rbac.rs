//! Kubernetes RBAC evaluation for the kube-apiserver emulator.
//!
//! Parses `rbac.authorization.k8s.io/v1` objects from multi-document YAML and answers
//! authorization questions with the semantics of the apiserver's RBAC authorizer: cluster
//! role bindings grant everywhere, role bindings only in their namespace, and the `allowed`
//! reason is worded like upstream's so logs and tests read the same against either.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{
    AggregationRule, ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use serde::Deserialize;

use identity_binding_proxy::authz::selector::{self, Matcher};

const RBAC_API_VERSION: &str = "rbac.authorization.k8s.io/v1";

/// The group the apiserver allows everything, ahead of RBAC.
pub const PRIVILEGED_GROUP: &str = "system:masters";

/// Namespaced objects without a namespace land here, as `kubectl apply` would put them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why an RBAC document set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("RBAC document {index}: {message}")]
    Document { index: usize, message: String },
}

fn doc_err(index: usize, message: impl Into<String>) -> RbacError {
    RbacError::Document {
        index,
        message: message.into(),
    }
}

/// One RBAC object as loaded from YAML.
#[derive(Clone, Debug, PartialEq)]
pub enum RbacObject {
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
}

/// The four RBAC kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RbacKind {
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
}

impl RbacKind {
    pub const ALL: [RbacKind; 4] = [
        RbacKind::ClusterRole,
        RbacKind::ClusterRoleBinding,
        RbacKind::Role,
        RbacKind::RoleBinding,
    ];

    /// The `kind` field value.
    pub fn kind(self) -> &'static str {
        match self {
            RbacKind::ClusterRole => "ClusterRole",
            RbacKind::ClusterRoleBinding => "ClusterRoleBinding",
            RbacKind::Role => "Role",
            RbacKind::RoleBinding => "RoleBinding",
        }
    }

    /// The plural resource name used in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            RbacKind::ClusterRole => "clusterroles",
            RbacKind::ClusterRoleBinding => "clusterrolebindings",
            RbacKind::Role => "roles",
            RbacKind::RoleBinding => "rolebindings",
        }
    }

    pub fn from_plural(plural: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.plural() == plural)
    }

    pub fn namespaced(self) -> bool {
        matches!(self, RbacKind::Role | RbacKind::RoleBinding)
    }
}

impl RbacObject {
    pub fn kind(&self) -> RbacKind {
        match self {
            RbacObject::ClusterRole(_) => RbacKind::ClusterRole,
            RbacObject::ClusterRoleBinding(_) => RbacKind::ClusterRoleBinding,
            RbacObject::Role(_) => RbacKind::Role,
            RbacObject::RoleBinding(_) => RbacKind::RoleBinding,
        }
    }

    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            RbacObject::ClusterRole(o) => &o.metadata,
            RbacObject::ClusterRoleBinding(o) => &o.metadata,
            RbacObject::Role(o) => &o.metadata,
            RbacObject::RoleBinding(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// The namespace of a Role or RoleBinding; `None` for cluster-scoped kinds.
    pub fn namespace(&self) -> Option<&str> {
        if self.kind().namespaced() {
            self.metadata().namespace.as_deref()
        } else {
            None
        }
    }

    /// The object as Kubernetes JSON (with `apiVersion` and `kind`).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            RbacObject::ClusterRole(o) => serde_json::to_value(o),
            RbacObject::ClusterRoleBinding(o) => serde_json::to_value(o),
            RbacObject::Role(o) => serde_json::to_value(o),
            RbacObject::RoleBinding(o) => serde_json::to_value(o),
        };
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// Who is asking, and for what.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReviewAttributes {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: String,
    pub request: ReviewRequest,
}

/// The action being authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReviewRequest {
    Resource(ResourceRequest),
    NonResource(NonResourceRequest),
}

impl Default for ReviewRequest {
    fn default() -> Self {
        ReviewRequest::Resource(ResourceRequest::default())
    }
}

/// A request on an API resource. An empty `api_group` is the core group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceRequest {
    /// `None` (or empty) for cluster-wide requests, which only cluster role bindings grant.
    pub namespace: Option<String>,
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

/// A request on a non-resource URL such as `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NonResourceRequest {
    pub path: String,
    pub verb: String,
}

/// The authorizer's answer. `reason` is empty when denied, as upstream's RBAC authorizer
/// has no opinion rather than an explicit denial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// A loaded set of RBAC objects, keyed like the apiserver stores them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RbacPolicy {
    cluster_roles: BTreeMap<String, ClusterRole>,
    cluster_role_bindings: BTreeMap<String, ClusterRoleBinding>,
    roles: BTreeMap<(String, String), Role>,
    role_bindings: BTreeMap<(String, String), RoleBinding>,
}

impl RbacPolicy {
    /// Parses multi-document YAML. Empty documents are skipped; a later object with the same
    /// kind, namespace and name replaces an earlier one, as a re-apply would. A `v1` `List`
    /// document (what `kubectl get -o yaml` prints) contributes its items.
    pub fn parse(yaml: &str) -> Result<Self, RbacError> {
        let mut objects = Vec::new();
        for (index, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
            let value = serde_norway::Value::deserialize(doc)
                .map_err(|e| doc_err(index, format!("invalid YAML: {e}")))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            let api_version = value
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or("");
            if kind == "List" && api_version == "v1" {
                let items = match value.get("items") {
                    None | Some(serde_norway::Value::Null) => continue,
                    Some(serde_norway::Value::Sequence(items)) => items,
                    Some(_) => return Err(doc_err(index, "List items is not a sequence")),
                };
                for (i, item) in items.iter().enumerate() {
                    let obj = parse_object(item.clone())
                        .map_err(|m| doc_err(index, format!("List item {i}: {m}")))?;
                    objects.push(obj);
                }
                continue;
            }
            objects.push(parse_object(value).map_err(|m| doc_err(index, m))?);
        }
        Ok(Self::from_objects(objects))
    }

    pub fn from_objects(objects: impl IntoIterator<Item = RbacObject>) -> Self {
        let mut policy = Self::default();
        for obj in objects {
            let name = obj.name().to_string();
            let ns = obj.namespace().unwrap_or_default().to_string();
            match obj {
                RbacObject::ClusterRole(o) => {
                    policy.cluster_roles.insert(name, o);
                }
                RbacObject::ClusterRoleBinding(o) => {
                    policy.cluster_role_bindings.insert(name, o);
                }
                RbacObject::Role(o) => {
                    policy.roles.insert((ns, name), o);
                }
                RbacObject::RoleBinding(o) => {
                    policy.role_bindings.insert((ns, name), o);
                }
            }
        }
        policy
    }

    /// Every object, in a stable order (kind, namespace, name).
    pub fn objects(&self) -> Vec<RbacObject> {
        let mut out = Vec::new();
        out.extend(
            self.cluster_roles
                .values()
                .cloned()
                .map(RbacObject::ClusterRole),
        );
        out.extend(
            self.cluster_role_bindings
                .values()
                .cloned()
                .map(RbacObject::ClusterRoleBinding),
        );
        out.extend(self.roles.values().cloned().map(RbacObject::Role));
        out.extend(
            self.role_bindings
                .values()
                .cloned()
                .map(RbacObject::RoleBinding),
        );
        out
    }

    pub fn is_empty(&self) -> bool {
        self.cluster_roles.is_empty()
            && self.cluster_role_bindings.is_empty()
            && self.roles.is_empty()
            && self.role_bindings.is_empty()
    }

    /// Decides a request the way the apiserver's authorizer chain does: members of
    /// `system:masters` are allowed before RBAC is asked, with no reason (the apiserver's
    /// privileged-group authorizer); then the first RBAC rule that allows it wins, cluster role
    /// bindings visited before role bindings.
    pub fn authorize(&self, attrs: &ReviewAttributes) -> Decision {
        if attrs.groups.iter().any(|g| g == PRIVILEGED_GROUP) {
            return Decision {
                allowed: true,
                reason: String::new(),
            };
        }
        for binding in self.cluster_role_bindings.values() {
            let Some(subject) = matching_subject(binding.subjects.as_deref(), attrs, "") else {
                continue;
            };
            let rules = self.role_ref_rules(&binding.role_ref.kind, &binding.role_ref.name, "");
            if rules.iter().any(|r| rule_allows(r, &attrs.request)) {
                return Decision {
                    allowed: true,
                    reason: format!(
                        "RBAC: allowed by ClusterRoleBinding {:?} of {} {:?} to {}",
                        binding.metadata.name.as_deref().unwrap_or_default(),
                        binding.role_ref.kind,
                        binding.role_ref.name,
                        describe_subject(subject, "")
                    ),
                };
            }
        }
        let namespace = match &attrs.request {
            ReviewRequest::Resource(r) => r.namespace.as_deref().unwrap_or_default(),
            ReviewRequest::NonResource(_) => "",
        };
        if !namespace.is_empty() {
            for ((ns, name), binding) in self
                .role_bindings
                .range((namespace.to_string(), String::new())..)
            {
                if ns != namespace {
                    break;
                }
                let Some(subject) = matching_subject(binding.subjects.as_deref(), attrs, namespace)
                else {
                    continue;
                };
                let rules =
                    self.role_ref_rules(&binding.role_ref.kind, &binding.role_ref.name, namespace);
                if rules.iter().any(|r| rule_allows(r, &attrs.request)) {
                    return Decision {
                        allowed: true,
                        reason: format!(
                            "RBAC: allowed by RoleBinding {:?} of {} {:?} to {}",
                            format!("{name}/{ns}"),
                            binding.role_ref.kind,
                            binding.role_ref.name,
                            describe_subject(subject, namespace)
                        ),
                    };
                }
            }
        }
        Decision {
            allowed: false,
            reason: String::new(),
        }
    }

    /// The rules a role reference grants. A missing target grants nothing, as upstream: the
    /// binding stays but is inert until the role appears.
    fn role_ref_rules(&self, kind: &str, name: &str, namespace: &str) -> Vec<PolicyRule> {
        match kind {
            "ClusterRole" => match self.cluster_roles.get(name) {
                Some(role) => self.cluster_role_rules(name, role),
                None => Vec::new(),
            },
            "Role" if !namespace.is_empty() => self
                .roles
                .get(&(namespace.to_string(), name.to_string()))
                .and_then(|r| r.rules.clone())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// An aggregated ClusterRole's rules are those of the ClusterRoles its selectors match,
    /// which the clusterrole-aggregation controller would have copied into it. A selector
    /// the apiserver cannot parse (never loaded here: [`validate`] refuses it) makes that
    /// controller copy nothing, so the role keeps only its own rules.
    fn cluster_role_rules(&self, name: &str, role: &ClusterRole) -> Vec<PolicyRule> {
        let mut rules = role.rules.clone().unwrap_or_default();
        let selectors = role
            .aggregation_rule
            .as_ref()
            .and_then(|a| a.cluster_role_selectors.as_deref())
            .unwrap_or_default();
        let Ok(matchers) = selectors
            .iter()
            .map(Matcher::parse)
            .collect::<Result<Vec<_>, _>>()
        else {
            return rules;
        };
        if matchers.is_empty() {
            return rules;
        }
        for (other_name, other) in &self.cluster_roles {
            if other_name == name {
                continue;
            }
            let labels = other.metadata.labels.clone().unwrap_or_default();
            if matchers.iter().any(|m| m.matches(&labels)) {
                for rule in other.rules.iter().flatten() {
                    if !rules.contains(rule) {
                        rules.push(rule.clone());
                    }
                }
            }
        }
        rules
    }
}

fn parse_object(value: serde_norway::Value) -> Result<RbacObject, String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    if api_version != RBAC_API_VERSION {
        return Err(format!(
            "unsupported apiVersion {api_version:?} (kind {kind:?}): only {RBAC_API_VERSION} \
             ClusterRole, ClusterRoleBinding, Role and RoleBinding are accepted"
        ));
    }
    fn de<T: serde::de::DeserializeOwned>(v: serde_norway::Value, kind: &str) -> Result<T, String> {
        serde_norway::from_value(v).map_err(|e| format!("invalid {kind}: {e}"))
    }
    let mut obj = match kind.as_str() {
        "ClusterRole" => RbacObject::ClusterRole(de(value, &kind)?),
        "ClusterRoleBinding" => RbacObject::ClusterRoleBinding(de(value, &kind)?),
        "Role" => RbacObject::Role(de(value, &kind)?),
        "RoleBinding" => RbacObject::RoleBinding(de(value, &kind)?),
        other => {
            return Err(format!(
                "unsupported kind {other:?}: only ClusterRole, ClusterRoleBinding, Role and \
                 RoleBinding are accepted"
            ))
        }
    };
    if obj.name().is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    validate(&obj).map_err(|m| format!("invalid {kind} {:?}: {m}", obj.name()))?;
    let meta = match &mut obj {
        RbacObject::Role(o) => Some(&mut o.metadata),
        RbacObject::RoleBinding(o) => Some(&mut o.metadata),
        _ => None,
    };
    if let Some(meta) = meta {
        if meta.namespace.as_deref().unwrap_or_default().is_empty() {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
        }
    }
    Ok(obj)
}

/// The checks the apiserver's validation applies on create, so a policy the emulator accepts
/// is one a real cluster would accept too.
fn validate(obj: &RbacObject) -> Result<(), String> {
    match obj {
        RbacObject::ClusterRole(o) => {
            validate_rules(o.rules.as_deref(), false)?;
            o.aggregation_rule
                .as_ref()
                .map_or(Ok(()), validate_aggregation)
        }
        RbacObject::Role(o) => validate_rules(o.rules.as_deref(), true),
        RbacObject::ClusterRoleBinding(o) => {
            validate_binding(&o.role_ref, o.subjects.as_deref(), false)
        }
        RbacObject::RoleBinding(o) => validate_binding(&o.role_ref, o.subjects.as_deref(), true),
    }
}

fn validate_rules(rules: Option<&[PolicyRule]>, namespaced: bool) -> Result<(), String> {
    for (i, rule) in rules.unwrap_or_default().iter().enumerate() {
        if rule.verbs.is_empty() {
            return Err(format!("rules[{i}].verbs: Required value"));
        }
        let urls = rule.non_resource_urls.as_deref().unwrap_or_default();
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        if !urls.is_empty() {
            if namespaced {
                return Err(format!(
                    "rules[{i}].nonResourceURLs: Invalid value: namespaced rules cannot apply to non-resource URLs"
                ));
            }
            if !groups.is_empty() || !resources.is_empty() {
                return Err(format!(
                    "rules[{i}].nonResourceURLs: Invalid value: rules cannot apply to both regular resources and non-resource URLs"
                ));
            }
            continue;
        }
        if groups.is_empty() {
            return Err(format!(
                "rules[{i}].apiGroups: Required value: resource rules must supply at least one api group"
            ));
        }
        if resources.is_empty() {
            return Err(format!(
                "rules[{i}].resources: Required value: resource rules must supply at least one resource"
            ));
        }
    }
    Ok(())
}

/// The apiserver's checks of an aggregation rule: at least one selector, each one it can
/// parse (operator, values, label keys and values), each refusal followed by the selector's
/// own `invalid label selector.`, all causes in one message as its 422 words them.
fn validate_aggregation(rule: &AggregationRule) -> Result<(), String> {
    let path = "aggregationRule.clusterRoleSelectors";
    let selectors = rule.cluster_role_selectors.as_deref().unwrap_or_default();
    if selectors.is_empty() {
        return Err(format!(
            "{path}: Required value: at least one clusterRoleSelector required if \
             aggregationRule is non-nil"
        ));
    }
    let mut causes = Vec::new();
    for (i, s) in selectors.iter().enumerate() {
        let field = format!("{path}[{i}]");
        let refused = selector::validate(s, &field);
        if !refused.is_empty() {
            causes.extend(refused.iter().map(ToString::to_string));
            causes.push(format!(
                "{field}: Invalid value: null: invalid label selector."
            ));
        }
    }
    match causes.len() {
        0 => Ok(()),
        _ => Err(format!("[{}]", causes.join(", "))),
    }
}

fn validate_binding(
    role_ref: &k8s_openapi::api::rbac::v1::RoleRef,
    subjects: Option<&[Subject]>,
    namespaced: bool,
) -> Result<(), String> {
    if role_ref.api_group != "rbac.authorization.k8s.io" {
        return Err(format!(
            "roleRef.apiGroup: Unsupported value: {:?}: supported values: \"rbac.authorization.k8s.io\"",
            role_ref.api_group
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&role_ref.kind.as_str()) {
        return Err(format!(
            "roleRef.kind: Unsupported value: {:?}: supported values: {kinds:?}",
            role_ref.kind
        ));
    }
    if role_ref.name.is_empty() {
        return Err("roleRef.name: Required value".into());
    }
    for (i, s) in subjects.unwrap_or_default().iter().enumerate() {
        if s.name.is_empty() {
            return Err(format!("subjects[{i}].name: Required value"));
        }
        match s.kind.as_str() {
            "User" | "Group" => {}
            "ServiceAccount" => {
                if !namespaced && s.namespace.as_deref().unwrap_or_default().is_empty() {
                    return Err(format!("subjects[{i}].namespace: Required value"));
                }
            }
            other => {
                return Err(format!(
                    "subjects[{i}].kind: Unsupported value: {other:?}: supported values: \"ServiceAccount\", \"User\", \"Group\""
                ))
            }
        }
    }
    Ok(())
}

fn matching_subject<'a>(
    subjects: Option<&'a [Subject]>,
    attrs: &ReviewAttributes,
    namespace: &str,
) -> Option<&'a Subject> {
    subjects?
        .iter()
        .find(|s| subject_applies(s, attrs, namespace))
}

fn subject_applies(subject: &Subject, attrs: &ReviewAttributes, namespace: &str) -> bool {
    match subject.kind.as_str() {
        "User" => attrs.user == subject.name,
        "Group" => attrs.groups.contains(&subject.name),
        "ServiceAccount" => {
            // A role binding's subjects may leave the namespace out to mean its own.
            let sa_ns = subject
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(namespace);
            !sa_ns.is_empty()
                && attrs.user == format!("system:serviceaccount:{sa_ns}:{}", subject.name)
        }
        _ => false,
    }
}

fn describe_subject(subject: &Subject, binding_namespace: &str) -> String {
    match subject.kind.as_str() {
        "ServiceAccount" => {
            let ns = subject
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_namespace);
            format!("{} {:?}", subject.kind, format!("{}/{ns}", subject.name))
        }
        _ => format!("{} {:?}", subject.kind, subject.name),
    }
}

fn rule_allows(rule: &PolicyRule, request: &ReviewRequest) -> bool {
    match request {
        ReviewRequest::Resource(r) => {
            let combined = if r.subresource.is_empty() {
                r.resource.clone()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            verb_matches(rule, &r.verb)
                && rule
                    .api_groups
                    .iter()
                    .flatten()
                    .any(|g| g == "*" || *g == r.api_group)
                && resource_matches(rule, &combined, &r.subresource)
                && resource_name_matches(rule, &r.name)
        }
        ReviewRequest::NonResource(n) => {
            verb_matches(rule, &n.verb)
                && rule.non_resource_urls.iter().flatten().any(|u| {
                    u == "*"
                        || *u == n.path
                        || u.strip_suffix('*')
                            .is_some_and(|prefix| n.path.starts_with(prefix))
                })
        }
    }
}

fn verb_matches(rule: &PolicyRule, verb: &str) -> bool {
    rule.verbs.iter().any(|v| v == "*" || v == verb)
}

fn resource_matches(rule: &PolicyRule, combined: &str, subresource: &str) -> bool {
    rule.resources.iter().flatten().any(|res| {
        res == "*"
            || res == combined
            // `*/scale` grants the scale subresource of every resource.
            || (!subresource.is_empty()
                && res.strip_prefix("*/").is_some_and(|s| s == subresource))
    })
}

fn resource_name_matches(rule: &PolicyRule, name: &str) -> bool {
    match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => names.iter().any(|n| n == name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO_CLIENT_ID: &str = "7f3c2d1e-0a9b-4c8d-9e6f-5a4b3c2d1e0f";

    fn sa(ns: &str, name: &str) -> (String, Vec<String>) {
        (
            format!("system:serviceaccount:{ns}:{name}"),
            vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        )
    }

    fn resource(
        who: (String, Vec<String>),
        ns: Option<&str>,
        verb: &str,
        group: &str,
        res: &str,
    ) -> ReviewAttributes {
        ReviewAttributes {
            user: who.0,
            groups: who.1,
            uid: String::new(),
            request: ReviewRequest::Resource(ResourceRequest {
                namespace: ns.map(str::to_string),
                verb: verb.into(),
                api_group: group.into(),
                resource: res.into(),
                ..Default::default()
            }),
        }
    }

    fn managed_identity_policy() -> String {
        format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: use-demo
rules:
- verbs: ["use-managed-identity"]
  apiGroups: ["cid.wi.aks.azure.com"]
  resources: ["{DEMO_CLIENT_ID}"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: demo-binding
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: use-demo
subjects:
- kind: ServiceAccount
  name: demo
  namespace: demo
"#
        )
    }

    #[test]
    fn cluster_role_binding_grants_the_managed_identity_use_verb() {
        let policy = RbacPolicy::parse(&managed_identity_policy()).unwrap();
        let d = policy.authorize(&resource(
            sa("demo", "demo"),
            None,
            "use-managed-identity",
            "cid.wi.aks.azure.com",
            DEMO_CLIENT_ID,
        ));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                reason: "RBAC: allowed by ClusterRoleBinding \"demo-binding\" of ClusterRole \
                         \"use-demo\" to ServiceAccount \"demo/demo\""
                    .into()
            }
        );
        // Namespaced requests are granted by cluster role bindings too.
        assert!(
            policy
                .authorize(&resource(
                    sa("demo", "demo"),
                    Some("demo"),
                    "use-managed-identity",
                    "cid.wi.aks.azure.com",
                    DEMO_CLIENT_ID,
                ))
                .allowed
        );
    }

    #[test]
    fn wrong_verb_group_resource_or_subject_is_denied_with_empty_reason() {
        let policy = RbacPolicy::parse(&managed_identity_policy()).unwrap();
        for attrs in [
            resource(
                sa("demo", "demo"),
                None,
                "get",
                "cid.wi.aks.azure.com",
                DEMO_CLIENT_ID,
            ),
            resource(
                sa("demo", "demo"),
                None,
                "use-managed-identity",
                "",
                DEMO_CLIENT_ID,
            ),
            resource(
                sa("demo", "demo"),
                None,
                "use-managed-identity",
                "cid.wi.aks.azure.com",
                "00000000-0000-0000-0000-000000000000",
            ),
            resource(
                sa("other", "demo"),
                None,
                "use-managed-identity",
                "cid.wi.aks.azure.com",
                DEMO_CLIENT_ID,
            ),
        ] {
            assert_eq!(
                policy.authorize(&attrs),
                Decision {
                    allowed: false,
                    reason: String::new()
                },
                "{attrs:?}"
            );
        }
    }

    #[test]
    fn role_binding_grants_only_in_its_namespace_and_defaults_sa_namespace() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: demo}
rules:
- {verbs: [get, list], apiGroups: [""], resources: [configmaps]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: read, namespace: demo}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects:
- {kind: ServiceAccount, name: app}
"#,
        )
        .unwrap();
        let d = policy.authorize(&resource(
            sa("demo", "app"),
            Some("demo"),
            "get",
            "",
            "configmaps",
        ));
        assert_eq!(
            d.reason,
            "RBAC: allowed by RoleBinding \"read/demo\" of Role \"reader\" to ServiceAccount \"app/demo\""
        );
        assert!(d.allowed);
        // Same SA, another namespace: the binding does not reach there.
        assert!(
            !policy
                .authorize(&resource(
                    sa("demo", "app"),
                    Some("other"),
                    "get",
                    "",
                    "configmaps"
                ))
                .allowed
        );
        // Cluster-wide requests are never granted by role bindings.
        assert!(
            !policy
                .authorize(&resource(sa("demo", "app"), None, "get", "", "configmaps"))
                .allowed
        );
        // The defaulted SA namespace is the binding's, not the request's.
        assert!(
            !policy
                .authorize(&resource(
                    sa("other", "app"),
                    Some("demo"),
                    "get",
                    "",
                    "configmaps"
                ))
                .allowed
        );
    }

    #[test]
    fn role_binding_to_cluster_role_and_to_user() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: pod-reader}
rules:
- {verbs: [get], apiGroups: [""], resources: [pods, pods/log]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-pods, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: pod-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
"#,
        )
        .unwrap();
        let alice = ("alice".to_string(), vec![]);
        let d = policy.authorize(&resource(alice.clone(), Some("team"), "get", "", "pods"));
        assert_eq!(
            d.reason,
            "RBAC: allowed by RoleBinding \"alice-pods/team\" of ClusterRole \"pod-reader\" to User \"alice\""
        );
        let mut log = resource(alice.clone(), Some("team"), "get", "", "pods");
        if let ReviewRequest::Resource(r) = &mut log.request {
            r.subresource = "log".into();
        }
        assert!(policy.authorize(&log).allowed);
        let mut exec = log.clone();
        if let ReviewRequest::Resource(r) = &mut exec.request {
            r.subresource = "exec".into();
        }
        assert!(!policy.authorize(&exec).allowed);
        assert!(
            !policy
                .authorize(&resource(alice, Some("elsewhere"), "get", "", "pods"))
                .allowed
        );
    }

    #[test]
    fn group_subject_grants_every_service_account_of_a_namespace() {
        let policy = RbacPolicy::parse(&format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: use-demo}}
rules:
- {{verbs: [use-managed-identity], apiGroups: [cid.wi.aks.azure.com], resources: ["{DEMO_CLIENT_ID}"]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: demo-ns}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: use-demo}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:serviceaccounts:demo"}}
"#
        ))
        .unwrap();
        let attrs = |who| {
            resource(
                who,
                None,
                "use-managed-identity",
                "cid.wi.aks.azure.com",
                DEMO_CLIENT_ID,
            )
        };
        let d = policy.authorize(&attrs(sa("demo", "anything")));
        assert!(d.allowed);
        assert!(
            d.reason
                .ends_with("to Group \"system:serviceaccounts:demo\""),
            "{}",
            d.reason
        );
        assert!(!policy.authorize(&attrs(sa("prod", "anything"))).allowed);
    }

    #[test]
    fn wildcards_match_any_verb_group_and_resource() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: admin-ish}
rules:
- {verbs: ["*"], apiGroups: ["*"], resources: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: root}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin-ish}
subjects: [{kind: User, name: root}]
"#,
        )
        .unwrap();
        let root = || ("root".to_string(), vec![]);
        assert!(
            policy
                .authorize(&resource(root(), None, "delete", "apps", "deployments"))
                .allowed
        );
        assert!(
            policy
                .authorize(&resource(
                    root(),
                    Some("x"),
                    "use-managed-identity",
                    "cid.wi.aks.azure.com",
                    DEMO_CLIENT_ID
                ))
                .allowed
        );
        // Resource rules say nothing about non-resource URLs.
        let nonres = ReviewAttributes {
            user: "root".into(),
            request: ReviewRequest::NonResource(NonResourceRequest {
                path: "/healthz".into(),
                verb: "get".into(),
            }),
            ..Default::default()
        };
        assert!(!policy.authorize(&nonres).allowed);
    }

    #[test]
    fn resource_names_restrict_to_listed_names() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: one-secret}
rules:
- {verbs: [get], apiGroups: [""], resources: [secrets], resourceNames: [allowed]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: one-secret}
subjects: [{kind: User, name: u}]
"#,
        )
        .unwrap();
        let with_name = |name: &str| ReviewAttributes {
            user: "u".into(),
            request: ReviewRequest::Resource(ResourceRequest {
                verb: "get".into(),
                resource: "secrets".into(),
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(policy.authorize(&with_name("allowed")).allowed);
        assert!(!policy.authorize(&with_name("other")).allowed);
        assert!(!policy.authorize(&with_name("")).allowed);
    }

    #[test]
    fn non_resource_urls_match_exactly_or_by_star_prefix() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: probes}
rules:
- {verbs: [get], nonResourceURLs: [/healthz, "/metrics/*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: probes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: probes}
subjects: [{kind: Group, name: "system:authenticated"}]
"#,
        )
        .unwrap();
        let req = |path: &str, verb: &str| ReviewAttributes {
            user: "someone".into(),
            groups: vec!["system:authenticated".into()],
            request: ReviewRequest::NonResource(NonResourceRequest {
                path: path.into(),
                verb: verb.into(),
            }),
            ..Default::default()
        };
        assert!(policy.authorize(&req("/healthz", "get")).allowed);
        assert!(policy.authorize(&req("/metrics/slis", "get")).allowed);
        assert!(!policy.authorize(&req("/healthz/x", "get")).allowed);
        assert!(!policy.authorize(&req("/healthz", "post")).allowed);
    }

    #[test]
    fn missing_role_ref_target_grants_nothing() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dangling}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: absent}
subjects: [{kind: User, name: u}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: dangling, namespace: ns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: absent}
subjects: [{kind: User, name: u}]
"#,
        )
        .unwrap();
        let attrs = resource(("u".into(), vec![]), Some("ns"), "get", "", "pods");
        assert!(!policy.authorize(&attrs).allowed);
    }

    #[test]
    fn aggregated_cluster_role_collects_rules_of_labelled_roles() {
        let policy = RbacPolicy::parse(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: agg}
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {agg: "true"}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: part, labels: {agg: "true"}}
rules: [{verbs: [get], apiGroups: [""], resources: [pods]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agg}
subjects: [{kind: User, name: u}]
"#,
        )
        .unwrap();
        assert!(
            policy
                .authorize(&resource(("u".into(), vec![]), None, "get", "", "pods"))
                .allowed
        );
    }

    /// An aggregating role `agg` bound to user `u`, selecting with `selector`, and ClusterRoles
    /// granting `get` on one resource each: `plain` (no labels), `web` (tier=web), `api`
    /// (tier=api) and `prod` (tier=web, env=prod).
    fn aggregation_of(selector: &str) -> Result<RbacPolicy, RbacError> {
        let mut yaml = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: agg}}\n\
             aggregationRule: {{clusterRoleSelectors: [{selector}]}}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: b}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agg}}\n\
             subjects: [{{kind: User, name: u}}]\n"
        );
        for (name, labels) in [
            ("plain", "{}"),
            ("web", "{tier: web}"),
            ("api", "{tier: api}"),
            ("prod", "{tier: web, env: prod}"),
        ] {
            yaml.push_str(&format!(
                "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n\
                 metadata: {{name: {name}, labels: {labels}}}\n\
                 rules: [{{verbs: [get], apiGroups: [\"\"], resources: [{name}]}}]\n"
            ));
        }
        RbacPolicy::parse(&yaml)
    }

    #[test]
    fn aggregation_follows_the_shared_selector_semantics() {
        for (selector, want) in [
            ("{matchLabels: {tier: web}}", vec!["web", "prod"]),
            ("{matchExpressions: [{key: tier, operator: In, values: [web, api]}]}", vec!["web", "api", "prod"]),
            ("{matchExpressions: [{key: tier, operator: NotIn, values: [web]}]}", vec!["plain", "api"]),
            ("{matchExpressions: [{key: env, operator: Exists}]}", vec!["prod"]),
            ("{matchExpressions: [{key: tier, operator: DoesNotExist}]}", vec!["plain"]),
            ("{matchLabels: {tier: web}, matchExpressions: [{key: env, operator: DoesNotExist}]}", vec!["web"]),
            ("{}", vec!["plain", "web", "api", "prod"]),
        ] {
            let policy = aggregation_of(selector).unwrap();
            let granted: Vec<&str> = ["plain", "web", "api", "prod"]
                .into_iter()
                .filter(|r| policy.authorize(&resource(("u".into(), vec![]), None, "get", "", r)).allowed)
                .collect();
            assert_eq!(granted, want, "{selector}");
        }
    }

    #[test]
    fn aggregation_selectors_the_apiserver_refuses_are_refused_with_its_causes() {
        let err = aggregation_of("{matchExpressions: [{key: tier, operator: Bogus, values: [x]}]}")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "invalid ClusterRole \"agg\": [aggregationRule.clusterRoleSelectors[0].matchExpressions[0].operator: \
                 Invalid value: \"Bogus\": not a valid selector operator, \
                 aggregationRule.clusterRoleSelectors[0]: Invalid value: null: invalid label selector.]"
            ),
            "{err}"
        );
        let err = aggregation_of(
            "{matchLabels: {a: b}}, {matchExpressions: [{key: tier, operator: In, values: []}]}",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "aggregationRule.clusterRoleSelectors[1].matchExpressions[0].values: Required value: \
                 must be specified when `operator` is 'In' or 'NotIn'"
            ),
            "{err}"
        );
        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: agg}\n\
             aggregationRule: {clusterRoleSelectors: []}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("aggregationRule.clusterRoleSelectors: Required value"),
            "{err}"
        );
    }

    #[test]
    fn system_masters_is_allowed_ahead_of_rbac_with_no_reason() {
        let policy = RbacPolicy::default();
        let who = ("root".to_string(), vec!["system:masters".to_string()]);
        let d = policy.authorize(&resource(who, Some("x"), "delete", "", "secrets"));
        assert!(d.allowed);
        assert_eq!(d.reason, "");
        let who = ("root".to_string(), vec!["system:authenticated".to_string()]);
        assert!(
            !policy
                .authorize(&resource(who, Some("x"), "delete", "", "secrets"))
                .allowed
        );
    }

    #[test]
    fn parse_skips_empty_documents_and_defaults_namespace() {
        let policy = RbacPolicy::parse(
            "---\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: r}\n---\n",
        )
        .unwrap();
        let objects = policy.objects();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].namespace(), Some(DEFAULT_NAMESPACE));
        assert_eq!(objects[0].to_json()["kind"], "Role");
        assert_eq!(
            objects[0].to_json()["apiVersion"],
            "rbac.authorization.k8s.io/v1"
        );
        assert!(RbacPolicy::parse("").unwrap().is_empty());
    }

    #[test]
    fn parse_errors_name_the_document_and_the_problem() {
        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: r}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("RBAC document 1:"), "{err}");
        assert!(err.contains("\"v1\""), "{err}");

        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Thing\nmetadata: {name: r}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("document 0") && err.contains("\"Thing\""),
            "{err}"
        );

        let err = RbacPolicy::parse("a: [unclosed").unwrap_err().to_string();
        assert!(
            err.contains("document 0") && err.contains("invalid YAML"),
            "{err}"
        );

        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: b}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("invalid ClusterRoleBinding") && err.contains("roleRef"),
            "{err}"
        );

        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: b}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: r}\nsubjects: [{kind: ServiceAccount, name: sa}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("subjects[0].namespace"), "{err}");

        let err = RbacPolicy::parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("metadata.name"), "{err}");
    }
}
