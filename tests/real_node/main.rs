//! The proxy as a pod on a real node: kubelet, containerd and runc, kube-proxy, the CNI bridge,
//! CoreDNS, kube-scheduler and kube-controller-manager, on the real control plane
//! (`scripts/real-cluster.sh up --node`), with the image built from the Dockerfile by buildah.
//! The chart and the real workload identity webhook are installed with helm; workloads are real
//! pods that get tokens with the official SDKs through the URL the webhook injected, with the
//! token the kubelet projected.
//!
//! One node is brought up for the whole suite, so the tests run in order, each timed, from a
//! `main` of our own (harness = false); the machine's sysctls, iptables rules, routes, links,
//! network namespaces, mounts and cgroups are compared with their state before the node, while
//! it runs and after `down` (then also: no process of the run left). A component that cannot
//! be built or started fails the suite with the script's one-line error and its log.

mod node;
mod tests;

use std::time::{Duration, Instant};

use node::*;

fn main() {
    // `cargo test -- --list` and filters: this suite is one unit, named real_node.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("real_node: test");
        return;
    }
    // The first word that is neither a flag nor a flag's value (libtest's `--skip X` and the
    // like) is a filter.
    let takes_value = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "-Z",
    ];
    let filter = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            !a.starts_with('-') && (*i == 0 || !takes_value.contains(&args[i - 1].as_str()))
        })
        .map(|(_, a)| a);
    // `--skip X` (libtest: skip the tests whose name contains X), any number of times.
    let skips = args
        .windows(2)
        .filter(|w| w[0] == "--skip")
        .map(|w| &w[1][..]);
    let skips_eq = args.iter().filter_map(|a| a.strip_prefix("--skip="));
    let skipped = skips.chain(skips_eq).any(|x| "real_node".contains(x));
    let filtered = filter.is_some_and(|f| !"real_node".contains(f.as_str()));
    if skipped || filtered {
        println!("test result: ok. 0 passed; 0 failed; 1 filtered out");
        return;
    }
    let start = Instant::now();
    let node = Node::up(tests::NODES);
    let up = start.elapsed();
    eprintln!("real_node: control plane and node Ready (CoreDNS included) in {up:.1?}");

    let mut times: Vec<(&str, Duration)> = vec![];
    let mut timed = |name: &'static str, test: &dyn Fn()| {
        eprintln!("real_node: {name} ...");
        let t = Instant::now();
        test();
        times.push((name, t.elapsed()));
        eprintln!("real_node: {name} ok in {:.1?}", t.elapsed());
    };
    timed("host_state_is_untouched_while_the_node_runs", &|| {
        tests::host_state_is_untouched(&node, "while the node runs", true)
    });
    let ctx = tests::Context::new(&node);
    timed(
        "a_chart_daemonset_is_ready_as_65532_on_a_read_only_root",
        &|| tests::chart_daemonset_is_ready_as_65532_on_a_read_only_root(&ctx),
    );
    timed(
        "b_example_app_gets_tokens_through_the_injected_url",
        &|| tests::example_app_gets_tokens_through_the_injected_url(&ctx),
    );
    timed("c_revoked_grant_is_refused_within_2s_in_the_sdk", &|| {
        tests::revoked_grant_is_refused_within_2s_in_the_sdk(&ctx)
    });
    timed("d_rolling_update_under_load_fails_no_request", &|| {
        tests::rolling_update_under_load_fails_no_request(&ctx)
    });
    timed("e_killed_proxy_is_restarted_by_the_kubelet", &|| {
        tests::killed_proxy_is_restarted_by_the_kubelet(&ctx)
    });
    timed(
        "f_sidecar_serves_its_pod_and_refuses_another_pods_account",
        &|| tests::sidecar_serves_its_pod_and_refuses_another_pods_account(&ctx),
    );
    timed("g_second_node_is_served_by_its_own_proxy", &|| {
        tests::second_node_is_served_by_its_own_proxy(&ctx)
    });
    timed("h_doctor_finds_a_node_whose_proxy_is_not_ready", &|| {
        tests::doctor_finds_a_node_whose_proxy_is_not_ready(&ctx)
    });
    drop(ctx);
    let t = Instant::now();
    let down = script(&["down"], node.path());
    assert!(down.status.success(), "down: {}", text(&down));
    times.push(("down", t.elapsed()));
    tests::host_state_is_untouched(&node, "after down", false);
    eprintln!("real_node: times (up {up:.1?}):");
    for (name, d) in &times {
        eprintln!("  {d:>8.1?}  {name}");
    }
    println!("test result: ok. {} passed; 0 failed", times.len() - 1);
}
