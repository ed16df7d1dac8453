//! What one node's proxy costs the real apiserver with a large RBAC population: the bytes
//! it transfers and the time it takes to list RBAC at start, the memory it keeps for the
//! watch, and the reviews unrelated RBAC churn costs (none). The emulator could flatter all
//! of these, so they are measured here.
//!
//! Bytes are counted on the wire: the proxy reaches the apiserver through a loopback TCP
//! relay that counts what the apiserver sends (TLS included). Memory is the proxy's resident
//! set from /proc. Both proxies run side by side on one cluster: one started before the
//! population was created (it follows the creation as watch events), one after.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// The large population: RoleBindings of `view` spread over namespaces, and ClusterRoles an
/// operator-heavy cluster carries. None grants a managed identity.
const NAMESPACES: usize = 100;
const ROLE_BINDINGS: usize = 10_000;
const CLUSTER_ROLES: usize = 2_000;

/// A loopback TCP relay to `upstream` counting the bytes it sends back (apiserver → proxy).
struct Relay {
    addr: SocketAddr,
    down: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let down = Arc::new(AtomicU64::new(0));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = down.clone();
        rt.spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut cw).await;
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Self {
            addr,
            down,
            _rt: rt,
        }
    }

    fn bytes(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

/// The proxy's kubeconfig, pointed at `relay` instead of the apiserver (same IP, so the
/// apiserver's certificate still verifies).
fn through_relay(c: &Cluster, kubeconfig: &Path, relay: &Relay, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let apiserver = c.get("APISERVER");
    let relayed = text.replace(apiserver, &format!("https://{}", relay.addr));
    assert_ne!(text, relayed, "the kubeconfig names the apiserver");
    let path = c.path().join(name);
    std::fs::write(&path, relayed).unwrap();
    path
}

fn apiserver_addr(c: &Cluster) -> SocketAddr {
    let url = c.get("APISERVER");
    let hostport = url.trim_start_matches("https://").trim_end_matches('/');
    hostport.parse().unwrap()
}

fn scrape_text(admin: SocketAddr) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "5", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The sum of a proxy metric over the label sets containing every one of `labels`.
fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    scrape_text(admin)
        .lines()
        .filter(|l| l.starts_with(&format!("identity_binding_proxy_{name}")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// (resident, peak resident) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let mut status = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .unwrap()
        .read_to_string(&mut status)
        .unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One proxy's start: wire bytes until its RBAC watch was synced, the time that took, and
/// its memory once synced (and settled).
struct Start {
    proxy: Proxy,
    relay: Relay,
    bytes: u64,
    took: Duration,
    rss_kib: u64,
    peak_kib: u64,
}

fn start_proxy(c: &Cluster, kubeconfig: &Path, cid: &str, name: &str) -> Start {
    let relay = Relay::start(apiserver_addr(c));
    let relayed = through_relay(c, kubeconfig, &relay, name);
    let started = Instant::now();
    // Decisions are kept an hour: only the RBAC watch can make this proxy ask again.
    let flags = [
        "--authz-allowed-ttl-secs",
        "3600",
        "--authz-denied-ttl-secs",
        "3600",
    ];
    let proxy = Proxy::start(&relayed, &[(cid, TENANT)], &flags);
    let synced = within(Duration::from_secs(120), || {
        metric(proxy.admin, "rbac_watch_synced", &[]) == 1.0
    });
    assert!(synced.is_some(), "RBAC listed:\n{}", proxy.logs());
    let took = started.elapsed();
    proxy.wait_ready();
    let bytes = relay.bytes();
    // Freed list pages go back to the system after jemalloc's decay time (10 s by default).
    std::thread::sleep(Duration::from_secs(12));
    let (rss_kib, peak_kib) = memory_kib(proxy.process.id());
    Start {
        proxy,
        relay,
        bytes,
        took,
        rss_kib,
        peak_kib,
    }
}

/// Creates the population through the API, 32 requests at a time.
fn populate(c: &Cluster) -> Duration {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
    use kube::api::{Api, PostParams};
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        identity_binding_proxy::crypto::install_provider();
        let kubeconfig = kube::config::Kubeconfig::read_from(c.get("KUBECONFIG")).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let pp = PostParams::default();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        futures::stream::iter(0..NAMESPACES)
            .map(|i| {
                let ns: Namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": format!("fleet-{i}")}}))
                        .unwrap();
                let (api, pp) = (&namespaces, &pp);
                async move { api.create(pp, &ns).await.map(|_| ()) }
            })
            .buffer_unordered(16)
            .for_each(|r| async move { r.expect("namespace created") })
            .await;
        let roles: Api<ClusterRole> = Api::all(client.clone());
        futures::stream::iter(0..CLUSTER_ROLES)
            .map(|i| {
                let role: ClusterRole = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("fleet-operator-{i}"), "labels": {"app.kubernetes.io/part-of": "fleet-operators"}},
                    "rules": [
                        {"apiGroups": [format!("operator{i}.example.com")], "resources": ["widgets", "widgets/status"], "verbs": ["get", "list", "watch", "update", "patch"]},
                        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]},
                        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
                    ],
                }))
                .unwrap();
                let (api, pp) = (&roles, &pp);
                async move { api.create(pp, &role).await.map(|_| ()) }
            })
            .buffer_unordered(32)
            .for_each(|r| async move { r.expect("ClusterRole created") })
            .await;
        futures::stream::iter(0..ROLE_BINDINGS)
            .map(|i| {
                let ns = format!("fleet-{}", i % NAMESPACES);
                let binding: RoleBinding = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("viewers-{i}"), "namespace": ns},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                    "subjects": [
                        {"kind": "ServiceAccount", "name": format!("app-{i}"), "namespace": ns},
                        {"kind": "Group", "name": format!("team-{}", i % 37), "apiGroup": "rbac.authorization.k8s.io"},
                    ],
                }))
                .unwrap();
                let api: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
                let pp = &pp;
                async move { api.create(pp, &binding).await.map(|_| ()) }
            })
            .buffer_unordered(32)
            .for_each(|r| async move { r.expect("RoleBinding created") })
            .await;
    });
    started.elapsed()
}

/// (bytes, gzip-compressed bytes) of the complete list of `resource`, as the apiserver
/// serves it to a client that accepts gzip.
fn list_bytes(c: &Cluster, resource: &str) -> (u64, u64) {
    let script = format!(
        "\"$0\" --kubeconfig \"$1\" get --raw /apis/rbac.authorization.k8s.io/v1/{resource} > \"$2\" \
         && wc -c < \"$2\" && gzip -c \"$2\" | wc -c"
    );
    let out = run_ok(std::process::Command::new("bash").args([
        "-c",
        &script,
        &c.bin("kubectl").to_string_lossy(),
        c.get("KUBECONFIG"),
        &c.path().join(format!("{resource}.json")).to_string_lossy(),
    ]));
    let mut n = out.lines().map(|l| l.trim().parse::<u64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Entries of the proxy's RBAC index (`what`: roles or bindings).
fn index_entries(p: &Proxy, what: &str) -> f64 {
    metric(
        p.admin,
        "rbac_index_entries",
        &[&format!("what=\"{what}\"")],
    )
}

fn reviews(p: &Proxy) -> f64 {
    metric(p.admin, "kube_reviews_total", &["subjectaccessreview"])
}

fn unrelated_events(p: &Proxy) -> f64 {
    metric(p.admin, "rbac_events_total", &["effect=\"unrelated\""])
}

/// What creating the population cost the proxy that watched it.
struct Churn {
    /// The time the creation took.
    took: Duration,
    /// Token requests served meanwhile.
    served: usize,
    /// SubjectAccessReviews it made meanwhile.
    reviews: f64,
    /// Its resident set once it had seen every creation, in KiB.
    rss_after_kib: u64,
}

/// Creates the population while `watching` follows it (12 000 unrelated RBAC events), with
/// its caller asking for tokens meanwhile; returns once it has seen every creation.
fn populate_while_asking(c: &Cluster, watching: &Start, cid: &str, token: &str) -> Churn {
    let reviews_before = reviews(&watching.proxy);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (took, served) = std::thread::scope(|s| {
        let asker = s.spawn(|| {
            let mut served = 0;
            while !done.load(Ordering::Relaxed) {
                assert_eq!(watching.proxy.request(cid, token).0, 200);
                served += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            served
        });
        let took = populate(c);
        done.store(true, Ordering::Relaxed);
        (took, asker.join().unwrap())
    });
    let unrelated = within(Duration::from_secs(60), || {
        unrelated_events(&watching.proxy) >= (ROLE_BINDINGS + CLUSTER_ROLES) as f64
    });
    assert!(unrelated.is_some(), "the first proxy saw every creation");
    Churn {
        took,
        served,
        reviews: reviews(&watching.proxy) - reviews_before,
        rss_after_kib: memory_kib(watching.proxy.process.id()).0,
    }
}

/// The RoleBindings and ClusterRoles in the cluster.
fn rbac_objects(c: &Cluster) -> usize {
    let listed = c.kubectl(&["get", "rolebindings,clusterroles", "-A", "--no-headers"]);
    listed.lines().count()
}

/// Prints what was measured: the population, each start, the four lists' size, the churn.
fn report(c: &Cluster, objects: usize, churn: &Churn, small: &Start, large: &Start) {
    let (mut plain, mut gzipped) = (0, 0);
    for resource in [
        "clusterroles",
        "roles",
        "clusterrolebindings",
        "rolebindings",
    ] {
        let (p, g) = list_bytes(c, resource);
        plain += p;
        gzipped += g;
    }
    eprintln!(
        "population: {NAMESPACES} namespaces, {ROLE_BINDINGS} RoleBindings, {CLUSTER_ROLES} \
         ClusterRoles created in {:.1} s ({objects} RoleBindings and ClusterRoles in all)",
        churn.took.as_secs_f64()
    );
    for (name, s) in [("small", small), ("large", large)] {
        eprintln!(
            "start ({name} RBAC): {:.2} MiB from the apiserver until RBAC was listed, listed \
             in {:.2} s; resident {:.1} MiB (peak {:.1} MiB); index keeps {} roles, {} bindings",
            s.bytes as f64 / 1048576.0,
            s.took.as_secs_f64(),
            mib(s.rss_kib),
            mib(s.peak_kib),
            index_entries(&s.proxy, "roles"),
            index_entries(&s.proxy, "bindings"),
        );
    }
    eprintln!(
        "the four lists as JSON: {:.2} MiB; gzip-compressed: {:.2} MiB",
        plain as f64 / 1048576.0,
        gzipped as f64 / 1048576.0
    );
    eprintln!(
        "the small-start proxy after the population was created: resident {:.1} MiB; \
         {} token requests during {} unrelated RBAC events cost {} reviews; \
         apiserver → proxy since its start {:.2} MiB",
        mib(churn.rss_after_kib),
        churn.served,
        unrelated_events(&small.proxy),
        churn.reviews,
        small.relay.bytes() as f64 / 1048576.0,
    );
}

/// The apiserver restarts (etcd stays): the watches break and come back. Where the apiserver
/// still has their resource versions they resume; otherwise they list again. Deleting the
/// caller's binding then reaches `started`'s proxy through its watch; returns the lists that
/// took.
fn relists_after_an_apiserver_restart(c: &Cluster, started: &Start, cid: &str, token: &str) -> f64 {
    let lists = |p: &Proxy| metric(p.admin, "rbac_lists_total", &[]);
    let (lists_before, bytes_before) = (lists(&started.proxy), started.relay.bytes());
    harness_ok(&["restart-apiserver"], c.path());
    let back = Instant::now();
    c.kubectl(&["delete", "clusterrolebinding", "use-mi-fleet"]);
    let resumed = within(Duration::from_secs(90), || {
        started.proxy.request(cid, token).0 == 403
    });
    assert!(
        resumed.is_some(),
        "the RBAC watch is back:\n{}",
        started.proxy.logs()
    );
    let relists = lists(&started.proxy) - lists_before;
    eprintln!(
        "apiserver restart: watch back {:.1} s after the apiserver; {} re-lists, {:.2} MiB \
         from the apiserver",
        back.elapsed().as_secs_f64(),
        relists,
        (started.relay.bytes() - bytes_before) as f64 / 1048576.0,
    );
    relists
}

#[test]
fn start_up_cost_and_memory_with_ten_thousand_role_bindings_and_unrelated_churn_costs_no_reviews() {
    let c = Cluster::with_deploy_base();
    let cid = "0a1b2c3d-0000-4000-8000-000000000061";
    let token = c.granted_workload(("fleet-app", "app", "app-0"), "use-mi-fleet", cid);
    let kubeconfig = c.base_kubeconfig();

    // A proxy on the cluster as it is (bootstrap RBAC and ours).
    let small = start_proxy(&c, &kubeconfig, cid, "kubeconfig-small");
    assert_eq!(
        small.proxy.request(cid, &token).0,
        200,
        "{}",
        small.proxy.logs()
    );
    let churn = populate_while_asking(&c, &small, cid, &token);

    // A proxy started on the large cluster (a node joining, or a DaemonSet rollout).
    let large = start_proxy(&c, &kubeconfig, cid, "kubeconfig-large");
    assert_eq!(large.proxy.request(cid, &token).0, 200);
    let kept = ["roles", "bindings"].map(|w| {
        (
            index_entries(&small.proxy, w),
            index_entries(&large.proxy, w),
        )
    });
    let objects = rbac_objects(&c);
    report(&c, objects, &churn, &small, &large);

    let relists = relists_after_an_apiserver_restart(&c, &large, cid, &token);
    assert!(relists <= 4.0, "at most one list per kind after a restart");

    // Unrelated churn costs no review on the real apiserver either.
    assert_eq!(
        churn.reviews, 0.0,
        "12 000 unrelated RBAC events cost no review"
    );
    // The index holds the same few objects whatever the population.
    for (what, (small, large)) in ["roles", "bindings"].into_iter().zip(kept) {
        assert_eq!(small, large, "{what}");
    }
    assert!(kept[1].1 < 50.0, "bindings kept: {kept:?}");
    // The memory kept does not follow the population: no copy of the 12 000 objects (their
    // JSON alone is several MiB) stays after the list.
    let kept = large.rss_kib as i64 - small.rss_kib as i64;
    assert!(
        kept < 4 * 1024,
        "the large-RBAC proxy keeps {kept} KiB more than the small-RBAC one"
    );
    let grew = churn.rss_after_kib as i64 - small.rss_kib as i64;
    assert!(
        grew < 4 * 1024,
        "following 12 000 creations grew the proxy by {grew} KiB"
    );
    // The start's transfer is the list itself, gzip-compressed by the apiserver: ~650 bytes
    // per object as JSON, ~65 compressed; without compression this fails.
    assert!(
        large.bytes < objects as u64 * 256,
        "{} bytes for {objects} objects",
        large.bytes
    );
}
