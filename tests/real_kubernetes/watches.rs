//! RBAC watches on a quiet real cluster: each lasts as long as the apiserver keeps it open
//! (its `timeoutSeconds`), then the next starts where it ended — no re-list, no interruption.
//! The apiserver's own request counts (`apiserver_request_total` on its `/metrics`) are read
//! before and after the idle time.
//!
//! The idle time and the watch timeout default to 80 s and 40 s, so a run costs ~2 minutes; set
//! `IBP_TEST_IDLE_SECS` (e.g. 300) and `IBP_TEST_WATCH_TIMEOUT_SECS` (0: the binary's own
//! default, no flag) to measure longer, and `IBP_TEST_SERVE_BIN` to measure another build of
//! the proxy (e.g. an earlier one) against the same harness. docs/fleet-scale.md has figures.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::*;

/// The RBAC resources the proxy watches.
const RBAC: [&str; 4] = [
    "clusterroles",
    "roles",
    "clusterrolebindings",
    "rolebindings",
];

/// The apiserver's and the controller manager's own informers watch RBAC too, and re-open each
/// watch every 5-10 minutes (client-go's reflector): at most one each in a window this short.
const OWN_INFORMERS: u64 = 2;

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not seconds"))
        })
        .unwrap_or(default)
}

/// `apiserver_request_total` for the RBAC resources, summed by (verb, resource).
fn rbac_requests(c: &Cluster) -> BTreeMap<(String, String), u64> {
    let text = c.kubectl(&["get", "--raw", "/metrics"]);
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let label = |name: &str| {
            rest.split_once(&format!("{name}=\""))
                .and_then(|(_, v)| v.split_once('"'))
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        };
        let (resource, verb) = (label("resource"), label("verb"));
        if label("group") != "rbac.authorization.k8s.io" || !RBAC.contains(&resource.as_str()) {
            continue;
        }
        let value: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
        *counts.entry((verb, resource)).or_insert(0) += value as u64;
    }
    counts
}

fn proxy_metric(p: &Proxy, name: &str) -> f64 {
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{}/metrics", p.admin),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("identity_binding_proxy_{name}")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_quiet_cluster_costs_no_relist_and_no_interruption() {
    let idle = Duration::from_secs(env_secs("IBP_TEST_IDLE_SECS", 80));
    let timeout = env_secs("IBP_TEST_WATCH_TIMEOUT_SECS", 40);
    let c = Cluster::up();
    c.kubectl(&["apply", "-k", &repo().join("deploy/base").to_string_lossy()]);
    let kubeconfig = c.sa_kubeconfig("identity-binding-proxy", "identity-binding-proxy");
    let flag = format!("--watch-timeout-secs={timeout}");
    let flags: &[&str] = if timeout == 0 { &[] } else { &[&flag] };
    let cid = "0a1b2c3d-0000-4000-8000-000000000031";
    let p = Proxy::start(&kubeconfig, &[(cid, TENANT)], flags);
    p.wait_ready();
    let synced = within(Duration::from_secs(30), || {
        proxy_metric(&p, "rbac_watch_synced") == 1.0
    });
    assert!(synced.is_some(), "RBAC listed:\n{}", p.logs());
    let logged = |p: &Proxy| p.logs().matches("RBAC watch interrupted").count();
    let (before, logged_before) = (rbac_requests(&c), logged(&p));
    std::thread::sleep(idle);
    let (after, logged_after) = (rbac_requests(&c), logged(&p));

    let minutes = idle.as_secs_f64() / 60.0;
    let delta = |verb: &str, resource: &str| {
        let key = (verb.to_string(), resource.to_string());
        after.get(&key).unwrap_or(&0) - before.get(&key).unwrap_or(&0)
    };
    for (verb, resource) in after.keys() {
        let d = delta(verb, resource);
        eprintln!(
            "{verb:>6} {resource:<20} +{d} in {} s ({:.1}/min)",
            idle.as_secs(),
            d as f64 / minutes
        );
    }
    let interrupted = logged_after - logged_before;
    eprintln!(
        "proxy: {interrupted} 'RBAC watch interrupted' lines ({:.1}/min), watch timeout {}",
        interrupted as f64 / minutes,
        if timeout == 0 {
            "default".into()
        } else {
            format!("{timeout} s")
        }
    );

    assert_eq!(interrupted, 0, "no watch was cut:\n{}", p.logs());
    assert_eq!(proxy_metric(&p, "rbac_watch_interruptions_total"), 0.0);
    // Each watch ends after its timeout and is re-opened once per timeout, from where it was.
    let per_timeout = idle.as_secs() / if timeout == 0 { 290 } else { timeout } + 1;
    for resource in RBAC {
        assert_eq!(delta("LIST", resource), 0, "{resource} listed again");
        let watches = delta("WATCH", resource);
        assert!(
            watches <= per_timeout + OWN_INFORMERS,
            "{resource}: {watches} watches in {} s, at most {per_timeout} of them ours",
            idle.as_secs()
        );
    }
}
