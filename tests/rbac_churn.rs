//! RBAC churn against the kube emulator: a change drops only the cached decisions it can
//! affect. Unrelated RBAC (the churn of CD systems and operators) costs no reviews; every
//! kind of relevant change still revokes within 2 s; and the callers that pile in after a
//! relevant change share one review per (subject, client id).

mod common;

use std::time::{Duration, Instant};

use common::*;
use identity_binding_proxy_dev::dev::DevSystem;
use serde_json::{json, Value};

/// Decisions live long (the proxy's defaults for allows, and as long for denies), so only the
/// RBAC watch can make them change quickly and every review counted is one the watch caused.
async fn start(dir: &std::path::Path) -> DevSystem {
    start_dev_with(dir, |a| {
        a.authz_allowed_ttl_secs = 300;
        a.authz_denied_ttl_secs = 300;
    })
    .await
}

fn cluster_role(name: &str, labels: Value, rules: Value) -> Value {
    let mut role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name}, "rules": rules,
    });
    if labels != json!({}) {
        role["metadata"]["labels"] = labels;
    }
    role
}

fn role(ns: &str, name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": name, "namespace": ns}, "rules": rules,
    })
}

fn crb(name: &str, role: &str, subjects: Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    })
}

fn rb(ns: &str, name: &str, kind: &str, role: &str, subjects: Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": subjects,
    })
}

fn sa(ns: &str, name: &str) -> Value {
    json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}])
}

fn grant(client_id: &str) -> Value {
    json!([{"apiGroups": ["cid.wi.aks.azure.com"], "resources": [client_id], "verbs": ["use-managed-identity"]}])
}

fn view() -> Value {
    json!([{"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": ["get", "list", "watch"]}])
}

/// Multi-document YAML (JSON documents are YAML).
fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The ClusterRole that grants the demo identity (named as the dev system's own, which the
/// proxy lists at start), and an unrelated one (as `view` is).
fn base(client_id: &str) -> Vec<Value> {
    vec![
        cluster_role("use-demo-identity", json!({}), grant(client_id)),
        cluster_role("view", json!({}), view()),
    ]
}

fn set(sys: &DevSystem, docs: &[Value]) {
    sys.kube.set_rbac_yaml(&yaml(docs)).expect("valid RBAC");
}

fn reviews(sys: &DevSystem) -> u64 {
    sys.kube.counts().subject_access_reviews
}

async fn status(sys: &DevSystem, token: &str) -> u16 {
    Client::for_dev(sys)
        .post_token(&sys.info.client_id, token)
        .await
        .status
}

fn token(sys: &DevSystem, ns: &str, name: &str) -> String {
    mint_sa(sys, ns, name, &[&sys.info.token_audience], 3600)
}

/// The sum of a metric over every label set whose labels contain `labels`.
async fn metric_sum(sys: &DevSystem, name: &str, labels: &[&str]) -> f64 {
    let text = scrape(sys.proxy.admin_addr).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("identity_binding_proxy_{name}")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until the proxy has seen `events` RBAC events with this effect (generous: a loaded
/// machine delivers a thousand watch events slowly; how fast they revoke is asserted elsewhere).
async fn seen(sys: &DevSystem, effect: &str, events: f64) -> bool {
    eventually(Duration::from_secs(60), || async {
        metric_sum(sys, "rbac_events_total", &[&format!("effect=\"{effect}\"")]).await >= events
    })
    .await
}

/// Waits until the RBAC index keeps `roles` roles and `bindings` bindings.
async fn settled(sys: &DevSystem, roles: usize, bindings: usize) -> bool {
    eventually(Duration::from_secs(20), || async {
        let kept = |what: &str| {
            let what = format!("what=\"{what}\"");
            async move { metric_sum(sys, "rbac_index_entries", &[&what]).await }
        };
        kept("roles").await == roles as f64 && kept("bindings").await == bindings as f64
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Unrelated churn

/// 1000 changes to RBAC that grants no managed identity: RoleBindings of `view` added,
/// changed and removed across 50 namespaces, and ClusterRoles added, changed and removed.
fn unrelated_step(step: usize) -> Vec<Value> {
    let mut docs = Vec::new();
    // Steps 0..20 add 20 RoleBindings each (400), 20..30 change 20 each (200), 30..40 remove
    // 20 each (200); ClusterRoles: 5 added per step in 0..20 (100)... as below.
    let added = (step.min(20) + 1) * 20;
    let changed_upto = if step >= 20 {
        (step.min(30) - 19) * 20
    } else {
        0
    };
    let removed_upto = if step >= 30 {
        (step.min(40) - 29) * 20
    } else {
        0
    };
    for i in removed_upto..added {
        let subject = if i < changed_upto {
            "deployer-2"
        } else {
            "deployer"
        };
        docs.push(rb(
            &format!("team-{}", i % 50),
            &format!("view-{i}"),
            "ClusterRole",
            "view",
            sa(&format!("team-{}", i % 50), subject),
        ));
    }
    // ClusterRoles: 5 added per step in 0..20 (100), each changed once in 20..40 (5 per step,
    // 100), and the first 0..50 removed in 40..50 (50 more events).
    let roles = (step.min(19) + 1) * 5;
    let roles_changed = if step >= 20 {
        (step.min(39) - 19) * 5
    } else {
        0
    };
    let roles_removed = if step >= 40 {
        (step.min(49) - 39) * 5
    } else {
        0
    };
    for i in roles_removed..roles {
        let verbs = if i < roles_changed {
            json!(["get"])
        } else {
            json!(["get", "list"])
        };
        docs.push(cluster_role(
            &format!("operator-{i}"),
            json!({"app": "operator"}),
            json!([{"apiGroups": ["*"], "resources": ["widgets"], "verbs": verbs}]),
        ));
    }
    docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unrelated_rbac_changes_cost_no_reviews() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start(dir.path()).await;
    let allowed = token(&sys, "demo", "demo");
    let mut docs = base(&sys.info.client_id);
    docs.push(crb(
        "demo-uses-demo-identity",
        "use-demo-identity",
        sa("demo", "demo"),
    ));
    set(&sys, &docs);
    // The dev system's own demo RBAC has been replaced: the index holds exactly our role and
    // binding, so no event of the set-up is still on its way.
    assert!(
        settled(&sys, 1, 1).await,
        "the index holds the role and its binding"
    );
    assert_eq!(status(&sys, &allowed).await, 200);
    let before = reviews(&sys);
    let unrelated_before = metric_sum(&sys, "rbac_events_total", &["effect=\"unrelated\""]).await;
    let everyone_before = metric_sum(&sys, "rbac_events_total", &["effect=\"everyone\""]).await;

    let mut served = 0;
    for step in 0..50 {
        let mut all = docs.clone();
        all.extend(unrelated_step(step));
        set(&sys, &all);
        // Token requests interleaved with the churn, as pods keep asking.
        assert_eq!(status(&sys, &allowed).await, 200);
        served += 1;
    }
    assert!(
        seen(&sys, "unrelated", unrelated_before + 1000.0).await,
        "the proxy saw 1000 unrelated RBAC events"
    );
    for _ in 0..10 {
        assert_eq!(status(&sys, &allowed).await, 200);
        served += 1;
    }
    let events =
        metric_sum(&sys, "rbac_events_total", &["effect=\"unrelated\""]).await - unrelated_before;
    let extra = reviews(&sys) - before;
    eprintln!("{served} token requests during {events} unrelated RBAC events: {extra} reviews");
    assert_eq!(
        extra, 0,
        "unrelated RBAC changes must cost no SubjectAccessReview"
    );
    assert_eq!(
        metric_sum(&sys, "rbac_events_total", &["effect=\"everyone\""]).await,
        everyone_before,
        "no unrelated event dropped every decision"
    );
    // The index kept only the granting role and its binding, none of the churn.
    let admin = sys.proxy.admin_addr;
    assert_eq!(
        metric(
            admin,
            "identity_binding_proxy_rbac_index_entries{what=\"roles\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            admin,
            "identity_binding_proxy_rbac_index_entries{what=\"bindings\"}"
        )
        .await,
        1.0
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relevant_change_reviews_only_the_subjects_it_binds() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start(dir.path()).await;
    let demo = token(&sys, "demo", "demo");
    let api = token(&sys, "apps", "api");
    let mut docs = base(&sys.info.client_id);
    docs.push(crb(
        "demo-uses-demo-identity",
        "use-demo-identity",
        sa("demo", "demo"),
    ));
    let mut with_api = docs.clone();
    with_api.push(rb(
        "apps",
        "api",
        "ClusterRole",
        "use-demo-identity",
        sa("apps", "api"),
    ));
    set(&sys, &with_api);
    assert!(
        settled(&sys, 1, 2).await,
        "the index holds the role and both bindings"
    );
    assert_eq!(status(&sys, &api).await, 200);
    assert_eq!(status(&sys, &demo).await, 200);
    let before = reviews(&sys);

    set(&sys, &docs);
    let revoked = eventually(Duration::from_secs(2), || async {
        status(&sys, &api).await == 403
    })
    .await;
    assert!(revoked, "apps/api is refused within 2 s");
    let after_revocation = reviews(&sys);
    assert_eq!(
        after_revocation - before,
        1,
        "one review: apps/api's, for the identity"
    );
    for _ in 0..20 {
        assert_eq!(status(&sys, &demo).await, 200);
    }
    assert_eq!(
        reviews(&sys),
        after_revocation,
        "demo/demo's decisions were kept"
    );
    sys.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Revocation, per kind of relevant change

/// Grants `apps/api` with `granted`, checks it is served, applies `revoked` and requires a
/// 403 within 2 s; then applies `granted` again and requires a 200 within 2 s (the deny is
/// cached for 5 minutes, so only the watch can do it).
async fn revoke_then_grant(
    granted: impl Fn(&str) -> Vec<Value>,
    revoked: impl Fn(&str) -> Vec<Value>,
) {
    let dir = tempfile::tempdir().unwrap();
    let sys = start(dir.path()).await;
    let api = token(&sys, "apps", "api");
    let id = sys.info.client_id.clone();
    set(&sys, &granted(&id));
    let served = eventually(Duration::from_secs(5), || async {
        status(&sys, &api).await == 200
    })
    .await;
    assert!(served, "granted at first");

    set(&sys, &revoked(&id));
    let at = Instant::now();
    let denied = eventually(Duration::from_secs(2), || async {
        status(&sys, &api).await == 403
    })
    .await;
    assert!(denied, "revoked within 2 s");
    eprintln!("revoked after {:?}", at.elapsed());

    set(&sys, &granted(&id));
    let at = Instant::now();
    let again = eventually(Duration::from_secs(2), || async {
        status(&sys, &api).await == 200
    })
    .await;
    assert!(again, "granted again within 2 s");
    eprintln!("granted again after {:?}", at.elapsed());
    sys.shutdown().await;
}

fn with(mut docs: Vec<Value>, more: impl IntoIterator<Item = Value>) -> Vec<Value> {
    docs.extend(more);
    docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cluster_role_binding_deleted() {
    revoke_then_grant(
        |id| {
            with(
                base(id),
                [crb("api", "use-demo-identity", sa("apps", "api"))],
            )
        },
        base,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cluster_role_binding_subject_replaced() {
    revoke_then_grant(
        |id| {
            with(
                base(id),
                [crb("api", "use-demo-identity", sa("apps", "api"))],
            )
        },
        |id| {
            with(
                base(id),
                [crb("api", "use-demo-identity", sa("apps", "web"))],
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_role_binding_of_a_cluster_role_deleted() {
    revoke_then_grant(
        |id| {
            with(
                base(id),
                [rb(
                    "apps",
                    "api",
                    "ClusterRole",
                    "use-demo-identity",
                    sa("apps", "api"),
                )],
            )
        },
        base,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_group_binding_deleted() {
    let group = json!([{"kind": "Group", "name": "system:serviceaccounts:apps"}]);
    revoke_then_grant(
        move |id| {
            with(
                base(id),
                [rb(
                    "apps",
                    "all",
                    "ClusterRole",
                    "use-demo-identity",
                    group.clone(),
                )],
            )
        },
        base,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_role_rule_removed() {
    let binding = || rb("apps", "api", "Role", "use", sa("apps", "api"));
    revoke_then_grant(
        |id| with(base(id), [role("apps", "use", grant(id)), binding()]),
        |id| with(base(id), [role("apps", "use", view()), binding()]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_role_deleted() {
    let binding = || rb("apps", "api", "Role", "use", sa("apps", "api"));
    revoke_then_grant(
        |id| with(base(id), [role("apps", "use", grant(id)), binding()]),
        |id| with(base(id), [binding()]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cluster_role_rule_names_another_identity() {
    let binding = || crb("api", "use-demo-identity", sa("apps", "api"));
    revoke_then_grant(
        |id| with(base(id), [binding()]),
        |_| {
            let other = "00000000-0000-4000-8000-000000000000";
            with(base(other), [binding()])
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cluster_role_deleted() {
    let binding = || crb("api", "use-demo-identity", sa("apps", "api"));
    revoke_then_grant(
        |id| with(base(id), [binding()]),
        |_| vec![cluster_role("view", json!({}), view()), binding()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_aggregated_cluster_role_loses_its_granting_part() {
    let label = "example.com/aggregate-to-identities";
    let aggregating = move || {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "identities"},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]},
        })
    };
    let binding = || crb("api", "identities", sa("apps", "api"));
    revoke_then_grant(
        move |id| {
            vec![
                aggregating(),
                cluster_role("part", json!({label: "true"}), grant(id)),
                binding(),
            ]
        },
        move |id| {
            vec![
                aggregating(),
                cluster_role("part", json!({}), grant(id)),
                binding(),
            ]
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Coalescing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_a_relevant_change_makes_one_review_per_subject_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start(dir.path()).await;
    let demo = token(&sys, "demo", "demo");
    let mut docs = base(&sys.info.client_id);
    docs.push(crb(
        "demo-uses-demo-identity",
        "use-demo-identity",
        sa("demo", "demo"),
    ));
    set(&sys, &docs);
    assert!(
        settled(&sys, 1, 1).await,
        "the index holds the role and its binding"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(&sys, &demo).await == 200
        })
        .await
    );

    // A relevant change for demo/demo: its binding gains a subject.
    let subjects_before = metric_sum(&sys, "rbac_events_total", &["effect=\"subjects\""]).await;
    let mut changed = base(&sys.info.client_id);
    changed.push(crb(
        "demo-uses-demo-identity",
        "use-demo-identity",
        json!([
            {"kind": "ServiceAccount", "name": "demo", "namespace": "demo"},
            {"kind": "ServiceAccount", "name": "worker", "namespace": "demo"},
        ]),
    ));
    set(&sys, &changed);
    assert!(seen(&sys, "subjects", subjects_before + 1.0).await);

    // A slow apiserver: every caller of the burst arrives while the review is in flight.
    let latency = Duration::from_millis(400);
    sys.kube.set_review_latency(latency);
    let before = reviews(&sys);
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let h2 = Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"]);
    let sender = h2.h2_sender().await;
    let started = Instant::now();
    let mut burst = Vec::new();
    for _ in 0..64 {
        let mut sender = sender.clone();
        let form = token_form(&sys.info.client_id, &demo)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>();
        burst.push(tokio::spawn(async move {
            sender.ready().await.unwrap();
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (&**k, &**v)).collect();
            send_h2(&mut sender, form_request(&pairs)).await.status
        }));
    }
    for call in burst {
        assert_eq!(call.await.unwrap(), 200);
    }
    let took = started.elapsed();
    let made = reviews(&sys) - before;
    eprintln!("64 callers after a relevant change: {made} reviews in {took:?}");
    // One for the identity, one for the wildcard probe, each awaited by the whole burst.
    assert_eq!(
        made, 2,
        "one review per (subject, resource) across the burst"
    );
    assert!(
        took >= latency,
        "the burst waited for the review in flight: {took:?}"
    );
    sys.shutdown().await;
}

/// How long the apiserver keeps each watch open in the quiet-cluster test (its `timeoutSeconds`).
const QUIET_WATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// A quiet cluster: nothing changes for ten (paused) minutes. The watches stay open until the
/// apiserver ends them at their `timeoutSeconds` — more than the 10 s read deadline of the
/// proxy's requests and than the emulator's 30 s bookmark interval — and each is then re-opened
/// from where it was, once per timeout: no list, no interruption, no error.
#[tokio::test(start_paused = true)]
async fn a_quiet_cluster_keeps_each_watch_open_until_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec![format!(
            "--watch-timeout-secs={}",
            QUIET_WATCH_TIMEOUT.as_secs()
        )];
    })
    .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            metric_sum(&sys, "rbac_watch_synced", &[]).await == 1.0
        })
        .await,
        "the RBAC watches are synced"
    );
    let before = sys.kube.counts();
    let lists_before = metric_sum(&sys, "rbac_lists_total", &[]).await;
    let idle = 10 * QUIET_WATCH_TIMEOUT;
    tokio::time::sleep(idle).await;
    let after = sys.kube.counts();
    let interrupted = metric_sum(&sys, "rbac_watch_interruptions_total", &[]).await;
    let opened = after.rbac_watches - before.rbac_watches;
    eprintln!(
        "{} s idle: {opened} watches opened, {} lists, {interrupted} interruptions",
        idle.as_secs(),
        after.rbac_lists - before.rbac_lists
    );
    assert_eq!(interrupted, 0.0, "no watch was cut");
    assert_eq!(
        after.rbac_lists, before.rbac_lists,
        "no kind was listed again"
    );
    assert_eq!(
        metric_sum(&sys, "rbac_lists_total", &[]).await,
        lists_before
    );
    // Four kinds, each re-opened once per timeout: 10 in the window (11 when an end falls on
    // its edge); cut at 10 s they were 60 each.
    assert!(
        (4 * 9..=4 * 11).contains(&opened),
        "{opened} watches opened in {} s with timeoutSeconds={}",
        idle.as_secs(),
        QUIET_WATCH_TIMEOUT.as_secs()
    );
    sys.shutdown().await;
}
