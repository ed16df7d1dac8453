//! Which RBAC objects can change a managed-identity decision, and whose decisions a change
//! makes stale. The RBAC watch feeds every event through [`RbacIndex`]; the authorizer drops
//! only the cached decisions the answer names, so the churn of RBAC that has nothing to do
//! with managed identities (CD systems, operators, namespace set-up) costs no reviews.
//!
//! The index keeps only what can grant `use-managed-identity` on `cid.wi.aks.azure.com`:
//! the names of the Roles and ClusterRoles that can (directly, with `*`, or through
//! ClusterRole aggregation), the labels and selectors aggregation needs, and the subjects of
//! the bindings that point at them. Irrelevant objects are looked at once, as they stream
//! by, and forgotten: memory follows the number of relevant objects, not the cluster's size.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject as RbacSubject,
};

use crate::cluster::{GRANT_GROUP, GRANT_VERB};

use super::selector::Matcher;
use super::WILDCARD_PROBE;

/// Whose cached decisions an RBAC event may have made stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Nobody's: the event cannot change any managed-identity decision.
    Nobody,
    /// These service accounts' (and namespaces') decisions; never empty.
    Some(BTreeSet<Who>),
    /// Anyone's: the change is not attributable to subjects (or the index cannot tell).
    Everyone,
}

/// A set of callers, as RBAC subjects name them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Who {
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// Every service account of a namespace (a group subject, or a RoleBinding's `*` reach).
    Namespace(String),
}

impl Stale {
    fn of(who: impl IntoIterator<Item = Who>) -> Self {
        let set: BTreeSet<Who> = who.into_iter().collect();
        if set.is_empty() {
            Stale::Nobody
        } else {
            Stale::Some(set)
        }
    }

    fn merge(self, other: Stale) -> Stale {
        match (self, other) {
            (Stale::Everyone, _) | (_, Stale::Everyone) => Stale::Everyone,
            (Stale::Nobody, x) | (x, Stale::Nobody) => x,
            (Stale::Some(mut a), Stale::Some(b)) => {
                a.extend(b);
                Stale::Some(a)
            }
        }
    }

    /// Whether the cached decisions of service account `namespace/name` are stale.
    pub fn covers(&self, namespace: &str, name: &str) -> bool {
        match self {
            Stale::Nobody => false,
            Stale::Everyone => true,
            Stale::Some(set) => set.iter().any(|w| match w {
                Who::ServiceAccount {
                    namespace: n,
                    name: s,
                } => n == namespace && s == name,
                Who::Namespace(n) => n == namespace,
            }),
        }
    }

    /// The metric label of this effect.
    pub fn label(&self) -> &'static str {
        match self {
            Stale::Nobody => "unrelated",
            Stale::Some(_) => "subjects",
            Stale::Everyone => "everyone",
        }
    }
}

/// A Role (namespace, name) or a ClusterRole (name), as a binding's `roleRef` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum RoleKey {
    Cluster(String),
    Namespaced(String, String),
}

/// A ClusterRoleBinding (name) or a RoleBinding (namespace, name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BindingKey {
    Cluster(String),
    Namespaced(String, String),
}

/// What the index keeps of a ClusterRole that matters to it.
#[derive(Clone, Debug, Default, PartialEq)]
struct ClusterRoleFacts {
    /// Its own rules can grant the verb.
    grants: bool,
    /// Its aggregation selectors (empty when it aggregates nothing); `None` for one the
    /// apiserver's validation refuses, which [`selects`] takes to select every role.
    selectors: Vec<Option<Matcher>>,
    /// Its labels, which aggregating ClusterRoles select on.
    labels: BTreeMap<String, String>,
}

impl ClusterRoleFacts {
    fn of(role: &ClusterRole) -> Option<Self> {
        let grants = grants(role.rules.as_deref());
        let selectors = role
            .aggregation_rule
            .as_ref()
            .and_then(|a| a.cluster_role_selectors.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|s| Matcher::parse(s).ok())
            .collect::<Vec<_>>();
        // A ClusterRole that neither grants nor aggregates cannot matter: its labels only
        // pull its (non-granting) rules into aggregating roles.
        (grants || !selectors.is_empty()).then(|| ClusterRoleFacts {
            grants,
            selectors,
            labels: role.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// The kinds the index follows, each with its own watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ClusterRole,
    Role,
    ClusterRoleBinding,
    RoleBinding,
}

impl Kind {
    pub fn plural(self) -> &'static str {
        match self {
            Kind::ClusterRole => "clusterroles",
            Kind::Role => "roles",
            Kind::ClusterRoleBinding => "clusterrolebindings",
            Kind::RoleBinding => "rolebindings",
        }
    }
}

/// A (re)list in progress for one kind: what it has found so far, swapped in at its end.
#[derive(Default)]
struct Pending {
    cluster_roles: HashMap<String, ClusterRoleFacts>,
    roles: HashSet<(String, String)>,
    bindings: HashMap<BindingKey, (RoleKey, Stale)>,
}

/// The relevant part of the cluster's RBAC. See the module documentation.
#[derive(Default)]
pub struct RbacIndex {
    /// ClusterRoles that grant or aggregate.
    cluster_roles: HashMap<String, ClusterRoleFacts>,
    /// Roles whose rules grant.
    roles: HashSet<(String, String)>,
    /// Every role that can grant, aggregation included (derived from the two above).
    relevant: HashSet<RoleKey>,
    /// The bindings that point at a relevant role, with whom they bind.
    bindings: HashMap<BindingKey, (RoleKey, Stale)>,
    /// Relevant roles that became relevant after bindings were listed: bindings made while
    /// they were irrelevant were not kept, so their changes are dropped wholesale.
    incomplete: HashSet<RoleKey>,
    /// Bindings are being listed (or were): from now on a role turning relevant may have
    /// bindings the index never kept.
    bindings_listed: bool,
    pending: HashMap<Kind, Pending>,
}

impl RbacIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// (Roles and ClusterRoles kept, bindings kept): what the index holds, for the metrics.
    pub fn sizes(&self) -> (usize, usize) {
        (
            self.cluster_roles.len() + self.roles.len(),
            self.bindings.len(),
        )
    }

    /// Bindings are about to be listed: roles must have been listed first, so that each
    /// binding is judged against the complete set of relevant roles.
    pub fn bindings_watch_started(&mut self) {
        self.bindings_listed = true;
    }

    /// Bindings are listed again, now that every role is known: the roles that turned
    /// relevant meanwhile will have all their bindings seen.
    pub fn bindings_relist(&mut self) {
        self.incomplete.clear();
    }

    /// A watch (re)starts listing `kind`.
    pub fn init(&mut self, kind: Kind) {
        self.pending.insert(kind, Pending::default());
    }

    /// The list of `kind` is complete: it replaces what the index knew of that kind. Changes
    /// missed while the watch was down are not attributable, so everyone's decisions drop.
    pub fn init_done(&mut self, kind: Kind) -> Stale {
        let pending = self.pending.remove(&kind).unwrap_or_default();
        match kind {
            Kind::ClusterRole | Kind::Role => {
                if kind == Kind::ClusterRole {
                    self.cluster_roles = pending.cluster_roles;
                } else {
                    self.roles = pending.roles;
                }
                let before = std::mem::take(&mut self.relevant);
                self.recompute();
                self.relevance_moved(&before);
            }
            Kind::ClusterRoleBinding | Kind::RoleBinding => {
                let cluster = kind == Kind::ClusterRoleBinding;
                self.bindings
                    .retain(|k, _| matches!(k, BindingKey::Cluster(_)) != cluster);
                self.bindings.extend(pending.bindings);
            }
        }
        Stale::Everyone
    }

    pub fn init_cluster_role(&mut self, role: &ClusterRole) {
        if let (Some(facts), Some(name)) = (ClusterRoleFacts::of(role), &role.metadata.name) {
            let p = self.pending.entry(Kind::ClusterRole).or_default();
            p.cluster_roles.insert(name.clone(), facts);
        }
    }

    pub fn init_role(&mut self, role: &Role) {
        if let Some(key) = role_key(role) {
            if grants(role.rules.as_deref()) {
                let p = self.pending.entry(Kind::Role).or_default();
                p.roles.insert(key);
            }
        }
    }

    pub fn init_binding(&mut self, binding: Binding<'_>) {
        let Some((key, role, who)) = self.binding_parts(&binding) else {
            return;
        };
        if self.relevant.contains(&role) {
            self.pending
                .entry(binding.kind())
                .or_default()
                .bindings
                .insert(key, (role, who));
        }
    }

    /// A ClusterRole was added or changed.
    pub fn apply_cluster_role(&mut self, role: &ClusterRole) -> Stale {
        let Some(name) = role.metadata.name.clone() else {
            return Stale::Nobody;
        };
        let facts = ClusterRoleFacts::of(role);
        let before = self.cluster_roles.get(&name).cloned();
        if before == facts && !facts.as_ref().is_some_and(|f| f.grants) {
            // Neither grants, and aggregation is unchanged (or absent): nothing moved.
            return Stale::Nobody;
        }
        match facts {
            Some(f) => self.cluster_roles.insert(name.clone(), f),
            None => self.cluster_roles.remove(&name),
        };
        self.role_changed(RoleKey::Cluster(name))
    }

    pub fn delete_cluster_role(&mut self, role: &ClusterRole) -> Stale {
        let Some(name) = role.metadata.name.clone() else {
            return Stale::Nobody;
        };
        if self.cluster_roles.remove(&name).is_none() {
            return Stale::Nobody;
        }
        self.role_changed(RoleKey::Cluster(name))
    }

    pub fn apply_role(&mut self, role: &Role) -> Stale {
        let Some(key) = role_key(role) else {
            return Stale::Nobody;
        };
        let was = self.roles.contains(&key);
        let is = grants(role.rules.as_deref());
        if !was && !is {
            return Stale::Nobody;
        }
        if is {
            self.roles.insert(key.clone());
        } else {
            self.roles.remove(&key);
        }
        self.role_changed(RoleKey::Namespaced(key.0, key.1))
    }

    pub fn delete_role(&mut self, role: &Role) -> Stale {
        let Some(key) = role_key(role) else {
            return Stale::Nobody;
        };
        if !self.roles.remove(&key) {
            return Stale::Nobody;
        }
        self.role_changed(RoleKey::Namespaced(key.0, key.1))
    }

    /// A binding was added or changed.
    pub fn apply_binding(&mut self, binding: Binding<'_>) -> Stale {
        let Some((key, role, who)) = self.binding_parts(&binding) else {
            return Stale::Nobody;
        };
        let old = self.bindings.remove(&key);
        let was_known = old.is_some();
        let mut stale = old.map_or(Stale::Nobody, |(_, who)| who);
        if self.relevant.contains(&role) {
            if !was_known && self.incomplete.contains(&role) {
                // Possibly a change to a binding made while the role was irrelevant: whom it
                // bound before is unknown.
                stale = Stale::Everyone;
            }
            stale = stale.merge(who.clone());
            self.bindings.insert(key, (role, who));
        }
        stale
    }

    pub fn delete_binding(&mut self, binding: Binding<'_>) -> Stale {
        let Some((key, role, who)) = self.binding_parts(&binding) else {
            return Stale::Nobody;
        };
        let old = self.bindings.remove(&key);
        let mut stale = old.map_or(Stale::Nobody, |(_, who)| who);
        if self.relevant.contains(&role) {
            // The deleted object carries its last subjects: exact even for incomplete roles.
            stale = stale.merge(who);
        }
        stale
    }

    fn binding_parts(&self, binding: &Binding<'_>) -> Option<(BindingKey, RoleKey, Stale)> {
        let (key, role_ref, subjects, namespace) = match binding {
            Binding::Cluster(b) => (
                BindingKey::Cluster(b.metadata.name.clone()?),
                &b.role_ref,
                b.subjects.as_deref(),
                None,
            ),
            Binding::Namespaced(b) => {
                let ns = b.metadata.namespace.clone()?;
                (
                    BindingKey::Namespaced(ns.clone(), b.metadata.name.clone()?),
                    &b.role_ref,
                    b.subjects.as_deref(),
                    Some(ns),
                )
            }
        };
        let role = role_ref_key(role_ref, namespace.as_deref())?;
        let who = bound(subjects.unwrap_or_default(), namespace.as_deref());
        Some((key, role, who))
    }

    /// A role's rules or aggregation changed: recompute which roles can grant, and name the
    /// subjects of every binding whose role's grants may differ now.
    fn role_changed(&mut self, changed: RoleKey) -> Stale {
        let before = self.relevant.clone();
        self.recompute();
        let after = &self.relevant;
        let mut touched: HashSet<RoleKey> = before.symmetric_difference(after).cloned().collect();
        if before.contains(&changed) || after.contains(&changed) {
            touched.insert(changed.clone());
            if matches!(changed, RoleKey::Cluster(_)) {
                // Its rules may be aggregated into others: every aggregating role that can
                // grant is touched (few exist: admin, edit, view and the like).
                for (name, facts) in &self.cluster_roles {
                    let key = RoleKey::Cluster(name.clone());
                    if !facts.selectors.is_empty()
                        && (before.contains(&key) || after.contains(&key))
                    {
                        touched.insert(key);
                    }
                }
            }
        }
        let mut stale = Stale::Nobody;
        for role in &touched {
            if !before.contains(role) && self.bindings_listed {
                // Turned relevant: bindings made while it was not are unknown.
                self.incomplete.insert(role.clone());
                stale = Stale::Everyone;
            }
            if self.incomplete.contains(role) {
                stale = Stale::Everyone;
            }
            for (r, who) in self.bindings.values() {
                if r == role {
                    stale = stale.merge(who.clone());
                }
            }
        }
        self.relevance_moved(&before);
        stale
    }

    /// After the relevant set changed from `before`: roles that turned relevant once bindings
    /// were listed have bindings the index never kept; roles that ceased keep none.
    fn relevance_moved(&mut self, before: &HashSet<RoleKey>) {
        if self.bindings_listed {
            let turned: Vec<RoleKey> = self.relevant.difference(before).cloned().collect();
            self.incomplete.extend(turned);
        }
        let ceased: Vec<RoleKey> = before.difference(&self.relevant).cloned().collect();
        for role in ceased {
            self.bindings.retain(|_, (r, _)| *r != role);
            self.incomplete.remove(&role);
        }
    }

    /// Which roles can grant: the granting ones, and (to a fixed point) the ClusterRoles
    /// whose aggregation selects a relevant ClusterRole, as the aggregation controller copies
    /// their rules in.
    fn recompute(&mut self) {
        let mut relevant: HashSet<String> = self
            .cluster_roles
            .iter()
            .filter(|(_, f)| f.grants)
            .map(|(n, _)| n.clone())
            .collect();
        loop {
            let newly: Vec<String> = self
                .cluster_roles
                .iter()
                .filter(|(name, f)| !f.selectors.is_empty() && !relevant.contains(*name))
                .filter(|(name, f)| {
                    relevant.iter().any(|r| {
                        r != *name
                            && self.cluster_roles.get(r).is_some_and(|rf| {
                                f.selectors.iter().any(|s| selects(s.as_ref(), &rf.labels))
                            })
                    })
                })
                .map(|(n, _)| n.clone())
                .collect();
            if newly.is_empty() {
                break;
            }
            relevant.extend(newly);
        }
        self.relevant = relevant
            .into_iter()
            .map(RoleKey::Cluster)
            .chain(
                self.roles
                    .iter()
                    .map(|(ns, n)| RoleKey::Namespaced(ns.clone(), n.clone())),
            )
            .collect();
    }
}

/// A ClusterRoleBinding or a RoleBinding, as the watch delivers it.
pub enum Binding<'a> {
    Cluster(&'a ClusterRoleBinding),
    Namespaced(&'a RoleBinding),
}

impl Binding<'_> {
    fn kind(&self) -> Kind {
        match self {
            Binding::Cluster(_) => Kind::ClusterRoleBinding,
            Binding::Namespaced(_) => Kind::RoleBinding,
        }
    }
}

fn role_key(role: &Role) -> Option<(String, String)> {
    Some((
        role.metadata.namespace.clone()?,
        role.metadata.name.clone()?,
    ))
}

/// The role a binding points at. A ClusterRoleBinding can only point at a ClusterRole; a
/// RoleBinding at a ClusterRole or a Role of its own namespace.
fn role_ref_key(role_ref: &RoleRef, namespace: Option<&str>) -> Option<RoleKey> {
    match (role_ref.kind.as_str(), namespace) {
        ("ClusterRole", _) => Some(RoleKey::Cluster(role_ref.name.clone())),
        ("Role", Some(ns)) => Some(RoleKey::Namespaced(ns.into(), role_ref.name.clone())),
        _ => None,
    }
}

/// Whether any rule can allow the verb on a managed identity (a client id), or on the
/// wildcard probe that finds `*` grants.
fn grants(rules: Option<&[PolicyRule]>) -> bool {
    rules.unwrap_or_default().iter().any(|rule| {
        let group = rule
            .api_groups
            .iter()
            .flatten()
            .any(|g| g == "*" || g == GRANT_GROUP);
        let verb = rule.verbs.iter().any(|v| v == "*" || v == GRANT_VERB);
        let resource =
            rule.resources.iter().flatten().any(|r| {
                r.starts_with('*') || r == WILDCARD_PROBE || uuid::Uuid::parse_str(r).is_ok()
            });
        group && verb && resource
    })
}

/// Whom a binding's subjects can be, among callers (service accounts). A RoleBinding only
/// grants in its own namespace, and callers ask only about their own namespace, so it can
/// reach no service account of another.
fn bound(subjects: &[RbacSubject], binding_namespace: Option<&str>) -> Stale {
    let mut stale = Stale::Nobody;
    for s in subjects {
        let one = match s.kind.as_str() {
            "ServiceAccount" => {
                let ns = s
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .or(binding_namespace);
                match ns {
                    Some(ns) => Stale::of([Who::ServiceAccount {
                        namespace: ns.into(),
                        name: s.name.clone(),
                    }]),
                    None => Stale::Nobody,
                }
            }
            "User" => match s
                .name
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
            {
                Some((ns, name)) => Stale::of([Who::ServiceAccount {
                    namespace: ns.into(),
                    name: name.into(),
                }]),
                // Callers are service accounts: any other user is none of them.
                None => Stale::Nobody,
            },
            "Group" => match s.name.strip_prefix("system:serviceaccounts:") {
                Some(ns) if !ns.is_empty() => Stale::of([Who::Namespace(ns.into())]),
                // `system:serviceaccounts`, `system:authenticated`, or a group a token
                // review may add: any caller.
                _ => Stale::Everyone,
            },
            // Unknown subject kinds bind nobody.
            _ => Stale::Nobody,
        };
        stale = stale.merge(one);
    }
    match (binding_namespace, stale) {
        (Some(ns), Stale::Everyone) => Stale::of([Who::Namespace(ns.into())]),
        (Some(ns), Stale::Some(set)) => Stale::of(set.into_iter().filter(|w| match w {
            Who::ServiceAccount { namespace, .. } | Who::Namespace(namespace) => namespace == ns,
        })),
        (_, stale) => stale,
    }
}

/// Whether an aggregation selector picks a ClusterRole with `labels`, as the apiserver's
/// `labels.Selector` would. A selector that cannot be parsed (`None`) picks every role: the
/// apiserver refuses to store one, so it can only come from a source that skipped validation
/// (an object stored before a check existed, a store written around the apiserver). The
/// aggregation controller then copies nothing, but the rules such a role already holds are
/// unknown here, so the index errs towards dropping decisions rather than keeping stale ones.
fn selects(selector: Option<&Matcher>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|m| m.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "7f3c2d1e-0a9b-4c8d-9e6f-5a4b3c2d1e0f";

    fn cluster_role(name: &str, rules: serde_json::Value) -> ClusterRole {
        serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).unwrap()
    }

    fn grant_rules() -> serde_json::Value {
        json!([{"apiGroups": [GRANT_GROUP], "resources": [ID], "verbs": [GRANT_VERB]}])
    }

    fn view_rules() -> serde_json::Value {
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}])
    }

    fn role(ns: &str, name: &str, rules: serde_json::Value) -> Role {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "rules": rules}))
            .unwrap()
    }

    fn crb(name: &str, role: &str, subjects: serde_json::Value) -> ClusterRoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subjects,
        }))
        .unwrap()
    }

    fn rb(
        ns: &str,
        name: &str,
        kind: &str,
        role: &str,
        subjects: serde_json::Value,
    ) -> RoleBinding {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": subjects,
        }))
        .unwrap()
    }

    fn sa(ns: &str, name: &str) -> serde_json::Value {
        json!({"kind": "ServiceAccount", "name": name, "namespace": ns})
    }

    fn who_sa(ns: &str, name: &str) -> Who {
        Who::ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn subjects(who: &[Who]) -> Stale {
        Stale::Some(who.iter().cloned().collect())
    }

    /// An index that has listed `roles` then (empty) bindings, as the watch does at start.
    fn listed(cluster_roles: &[ClusterRole], roles: &[Role]) -> RbacIndex {
        let mut index = RbacIndex::new();
        index.init(Kind::ClusterRole);
        for r in cluster_roles {
            index.init_cluster_role(r);
        }
        assert_eq!(index.init_done(Kind::ClusterRole), Stale::Everyone);
        index.init(Kind::Role);
        for r in roles {
            index.init_role(r);
        }
        index.init_done(Kind::Role);
        index.bindings_watch_started();
        for kind in [Kind::ClusterRoleBinding, Kind::RoleBinding] {
            index.init(kind);
            index.init_done(kind);
        }
        index
    }

    fn demo() -> RbacIndex {
        listed(
            &[
                cluster_role("use-identity", grant_rules()),
                cluster_role("view", view_rules()),
            ],
            &[],
        )
    }

    #[test]
    fn bindings_to_unrelated_roles_drop_nothing_and_are_not_kept() {
        let mut index = demo();
        for i in 0..100 {
            let b = rb(
                &format!("ns{i}"),
                "viewers",
                "ClusterRole",
                "view",
                json!([sa("x", "y")]),
            );
            assert_eq!(index.apply_binding(Binding::Namespaced(&b)), Stale::Nobody);
            let c = crb(&format!("c{i}"), "view", json!([sa("demo", "demo")]));
            assert_eq!(index.apply_binding(Binding::Cluster(&c)), Stale::Nobody);
            assert_eq!(index.delete_binding(Binding::Cluster(&c)), Stale::Nobody);
        }
        let r = cluster_role("operator-thing", view_rules());
        assert_eq!(index.apply_cluster_role(&r), Stale::Nobody);
        assert_eq!(index.delete_cluster_role(&r), Stale::Nobody);
        let r = role("apps", "reader", view_rules());
        assert_eq!(index.apply_role(&r), Stale::Nobody);
        assert_eq!(index.sizes(), (1, 0), "only the granting role is kept");
    }

    #[test]
    fn a_binding_to_a_granting_role_drops_its_subjects_when_added_changed_or_removed() {
        let mut index = demo();
        let b = crb("demo", "use-identity", json!([sa("demo", "demo")]));
        let demo = who_sa("demo", "demo");
        assert_eq!(
            index.apply_binding(Binding::Cluster(&b)),
            subjects(std::slice::from_ref(&demo))
        );
        assert_eq!(index.sizes(), (1, 1));
        // Changed: whom it bound before and whom it binds now.
        let b2 = crb("demo", "use-identity", json!([sa("other", "worker")]));
        let worker = who_sa("other", "worker");
        assert_eq!(
            index.apply_binding(Binding::Cluster(&b2)),
            subjects(&[demo, worker.clone()])
        );
        assert_eq!(
            index.delete_binding(Binding::Cluster(&b2)),
            subjects(&[worker])
        );
        assert_eq!(index.sizes(), (1, 0));
    }

    #[test]
    fn a_role_binding_reaches_only_its_own_namespace() {
        let mut index = demo();
        let b = rb(
            "apps",
            "uses",
            "ClusterRole",
            "use-identity",
            json!([
                sa("apps", "api"),
                sa("elsewhere", "job"),
                {"kind": "Group", "name": "system:serviceaccounts"},
            ]),
        );
        assert_eq!(
            index.apply_binding(Binding::Namespaced(&b)),
            // The group reaches every service account of the binding's namespace.
            subjects(&[Who::Namespace("apps".into())])
        );
        let stale = index.delete_binding(Binding::Namespaced(&b));
        assert!(stale.covers("apps", "anyone"));
        assert!(!stale.covers("elsewhere", "job"));
    }

    #[test]
    fn subjects_are_read_as_the_apiserver_matches_them() {
        let mut index = demo();
        let b = crb(
            "mixed",
            "use-identity",
            json!([
                {"kind": "User", "name": "system:serviceaccount:apps:api"},
                {"kind": "User", "name": "alice"},
                {"kind": "Group", "name": "system:serviceaccounts:batch"},
            ]),
        );
        let stale = index.apply_binding(Binding::Cluster(&b));
        assert_eq!(
            stale,
            subjects(&[who_sa("apps", "api"), Who::Namespace("batch".into())])
        );
        assert!(stale.covers("batch", "any") && !stale.covers("apps", "other"));
        let everyone = crb(
            "all",
            "use-identity",
            json!([{"kind": "Group", "name": "system:authenticated"}]),
        );
        assert_eq!(
            index.apply_binding(Binding::Cluster(&everyone)),
            Stale::Everyone
        );
    }

    #[test]
    fn role_changes_drop_the_subjects_of_their_bindings() {
        let mut index = listed(&[], &[role("apps", "use", grant_rules())]);
        let b = rb("apps", "uses", "Role", "use", json!([sa("apps", "api")]));
        let api = subjects(&[who_sa("apps", "api")]);
        assert_eq!(index.apply_binding(Binding::Namespaced(&b)), api);
        // A Role of the same name elsewhere is another role.
        let other = rb("batch", "uses", "Role", "use", json!([sa("batch", "job")]));
        assert_eq!(
            index.apply_binding(Binding::Namespaced(&other)),
            Stale::Nobody
        );
        // The role's grant edited: still relevant, its subjects drop.
        let edited = json!([{"apiGroups": ["*"], "resources": [ID], "verbs": [GRANT_VERB]}]);
        assert_eq!(index.apply_role(&role("apps", "use", edited)), api);
        // It stops granting: its subjects drop, and its bindings are forgotten.
        assert_eq!(index.apply_role(&role("apps", "use", view_rules())), api);
        assert_eq!(index.sizes(), (0, 0));
        assert_eq!(index.delete_binding(Binding::Namespaced(&b)), Stale::Nobody);
    }

    #[test]
    fn a_deleted_granting_role_drops_its_subjects() {
        let mut index = demo();
        let b = crb("demo", "use-identity", json!([sa("demo", "demo")]));
        index.apply_binding(Binding::Cluster(&b));
        let gone = cluster_role("use-identity", grant_rules());
        assert_eq!(
            index.delete_cluster_role(&gone),
            subjects(&[who_sa("demo", "demo")])
        );
        assert_eq!(index.apply_binding(Binding::Cluster(&b)), Stale::Nobody);
    }

    #[test]
    fn a_role_turning_relevant_after_bindings_were_listed_drops_everyone_until_known() {
        let mut index = demo();
        // Bound while it grants nothing: not kept.
        let b = crb("late", "view", json!([sa("apps", "api")]));
        assert_eq!(index.apply_binding(Binding::Cluster(&b)), Stale::Nobody);
        assert_eq!(
            index.apply_cluster_role(&cluster_role("view", grant_rules())),
            Stale::Everyone
        );
        // Whom an unknown binding of it bound before is unknown.
        let b2 = crb("late", "view", json!([sa("apps", "web")]));
        assert_eq!(index.apply_binding(Binding::Cluster(&b2)), Stale::Everyone);
        // A deletion carries its subjects.
        assert_eq!(
            index.delete_binding(Binding::Cluster(&b2)),
            subjects(&[who_sa("apps", "web")])
        );
    }

    #[test]
    fn roles_listed_before_bindings_are_complete() {
        let mut index = RbacIndex::new();
        index.init(Kind::ClusterRole);
        index.init_cluster_role(&cluster_role("use-identity", grant_rules()));
        index.init_done(Kind::ClusterRole);
        index.bindings_watch_started();
        index.init(Kind::ClusterRoleBinding);
        index.init_binding(Binding::Cluster(&crb(
            "demo",
            "use-identity",
            json!([sa("demo", "demo")]),
        )));
        index.init_binding(Binding::Cluster(&crb(
            "v",
            "view",
            json!([sa("demo", "demo")]),
        )));
        index.init_done(Kind::ClusterRoleBinding);
        assert_eq!(index.sizes(), (1, 1));
        let changed = crb("demo", "use-identity", json!([sa("demo", "other")]));
        assert_eq!(
            index.apply_binding(Binding::Cluster(&changed)),
            subjects(&[who_sa("demo", "demo"), who_sa("demo", "other")])
        );
    }

    #[test]
    fn wildcards_grant_and_unrelated_wildcards_do_not() {
        let admin = json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]);
        assert!(grants(Some(
            &serde_json::from_value::<Vec<PolicyRule>>(admin).unwrap()
        )));
        for rules in [
            json!([{"apiGroups": ["*"], "resources": ["pods"], "verbs": ["*"]}]),
            json!([{"apiGroups": [GRANT_GROUP], "resources": ["*"], "verbs": ["get"]}]),
            json!([{"apiGroups": ["apps"], "resources": ["*"], "verbs": ["*"]}]),
            json!([{"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ] {
            let rules: Vec<PolicyRule> = serde_json::from_value(rules.clone()).unwrap();
            assert!(!grants(Some(&rules)), "{rules:?}");
        }
        let probe =
            json!([{"apiGroups": [GRANT_GROUP], "resources": [WILDCARD_PROBE], "verbs": ["*"]}]);
        assert!(grants(Some(
            &serde_json::from_value::<Vec<PolicyRule>>(probe).unwrap()
        )));
    }

    fn labelled(name: &str, labels: serde_json::Value, rules: serde_json::Value) -> ClusterRole {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": labels}, "rules": rules}),
        )
        .unwrap()
    }

    fn aggregating(name: &str, label: &str) -> ClusterRole {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]},
        }))
        .unwrap()
    }

    #[test]
    fn aggregation_makes_the_aggregating_role_relevant() {
        let mut index = listed(&[aggregating("identities", "example.com/identities")], &[]);
        let b = crb("apps", "identities", json!([sa("apps", "api")]));
        // Not yet relevant: nothing it aggregates grants.
        assert_eq!(index.apply_binding(Binding::Cluster(&b)), Stale::Nobody);
        // A labelled granting role appears: the aggregating role turns relevant.
        let part = labelled(
            "part",
            json!({"example.com/identities": "true"}),
            grant_rules(),
        );
        assert_eq!(index.apply_cluster_role(&part), Stale::Everyone);
        // Its binding, unknown before, is known once it changes or is deleted.
        assert_eq!(
            index.delete_binding(Binding::Cluster(&b)),
            subjects(&[who_sa("apps", "api")])
        );
        let b2 = crb("apps2", "identities", json!([sa("apps", "web")]));
        index.apply_binding(Binding::Cluster(&b2));
        // The labelled role losing its label: the aggregating role stops granting.
        let unlabelled = labelled("part", json!({}), grant_rules());
        let stale = index.apply_cluster_role(&unlabelled);
        assert!(stale.covers("apps", "web"), "{stale:?}");
    }

    #[test]
    fn aggregation_known_at_start_is_exact() {
        let part = labelled(
            "part",
            json!({"example.com/identities": "true"}),
            grant_rules(),
        );
        let mut index = listed(
            &[aggregating("identities", "example.com/identities"), part],
            &[],
        );
        let b = crb("apps", "identities", json!([sa("apps", "api")]));
        assert_eq!(
            index.apply_binding(Binding::Cluster(&b)),
            subjects(&[who_sa("apps", "api")])
        );
        // An unrelated labelled role aggregated in changes nothing that grants.
        let other = labelled(
            "other",
            json!({"example.com/identities": "true"}),
            view_rules(),
        );
        assert_eq!(index.apply_cluster_role(&other), Stale::Nobody);
        // The granting part edited: the aggregating role's subjects drop.
        let edited = labelled(
            "part",
            json!({"example.com/identities": "true"}),
            json!([{"apiGroups": [GRANT_GROUP], "resources": ["*"], "verbs": [GRANT_VERB]}]),
        );
        assert_eq!(
            index.apply_cluster_role(&edited),
            subjects(&[who_sa("apps", "api")])
        );
    }

    /// An aggregating ClusterRole, itself labelled `tier: aggregating` (aggregation is
    /// transitive: an unlabelled one would be picked by a `DoesNotExist` of `tier`).
    fn aggregating_by(name: &str, expression: serde_json::Value) -> ClusterRole {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"tier": "aggregating"}},
            "aggregationRule": {"clusterRoleSelectors": [{"matchExpressions": [expression]}]},
        }))
        .unwrap()
    }

    #[test]
    fn aggregation_selectors_are_read_as_the_apiserver_reads_them() {
        let part = labelled("part", json!({"tier": "identities"}), grant_rules());
        let binding_to = |role: &str| crb(role, role, json!([sa("apps", role)]));
        let roles = [
            // Selects the part: NotIn is met by a value outside the set.
            aggregating_by(
                "not-in",
                json!({"key": "tier", "operator": "NotIn", "values": ["web"]}),
            ),
            // Selects nothing here: every role has the label.
            aggregating_by("absent", json!({"key": "tier", "operator": "DoesNotExist"})),
            // Refused by the apiserver's validation, so never parsed: taken to select all.
            aggregating_by(
                "bogus",
                json!({"key": "tier", "operator": "Bogus", "values": ["x"]}),
            ),
            aggregating_by(
                "in-nothing",
                json!({"key": "tier", "operator": "In", "values": []}),
            ),
            part,
        ];
        let mut index = listed(&roles, &[]);
        for (role, relevant) in [
            ("not-in", true),
            ("absent", false),
            ("bogus", true),
            ("in-nothing", true),
        ] {
            let stale = index.apply_binding(Binding::Cluster(&binding_to(role)));
            let want = if relevant {
                subjects(&[who_sa("apps", role)])
            } else {
                Stale::Nobody
            };
            assert_eq!(stale, want, "{role}");
        }
    }

    #[test]
    fn a_role_found_granting_by_a_relist_is_followed_wholesale() {
        let mut index = demo();
        let b = crb("late", "view", json!([sa("apps", "api")]));
        assert_eq!(index.apply_binding(Binding::Cluster(&b)), Stale::Nobody);
        // The ClusterRole watch re-lists: `view` grants now (changed while unwatched).
        index.init(Kind::ClusterRole);
        index.init_cluster_role(&cluster_role("use-identity", grant_rules()));
        index.init_cluster_role(&cluster_role("view", grant_rules()));
        assert_eq!(index.init_done(Kind::ClusterRole), Stale::Everyone);
        let b2 = crb("late", "view", json!([sa("apps", "web")]));
        assert_eq!(index.apply_binding(Binding::Cluster(&b2)), Stale::Everyone);
    }

    #[test]
    fn a_relist_replaces_what_was_known_of_its_kind() {
        let mut index = demo();
        let b = crb("demo", "use-identity", json!([sa("demo", "demo")]));
        index.apply_binding(Binding::Cluster(&b));
        index.init(Kind::ClusterRoleBinding);
        assert_eq!(index.init_done(Kind::ClusterRoleBinding), Stale::Everyone);
        assert_eq!(
            index.sizes(),
            (1, 0),
            "the binding deleted while unwatched is gone"
        );
        index.init(Kind::ClusterRole);
        index.init_done(Kind::ClusterRole);
        assert_eq!(index.sizes(), (0, 0));
    }
}
