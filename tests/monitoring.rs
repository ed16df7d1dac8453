//! The monitoring contract, checked with Prometheus's own tool: the alert rules
//! (deploy/monitoring/alerts.yaml, also the chart's PrometheusRule) pass `promtool check rules`
//! and their unit tests (`promtool test rules`, a firing and a quiet case per alert), each has a
//! runbook, the Grafana dashboard's queries parse, and a live `/metrics` scrape of `dev` passes
//! `promtool check metrics` (the naming conventions).
//!
//! promtool is built from the Go module proxy at the version pinned in
//! scripts/real-cluster/promtool/go.mod (`scripts/real-cluster.sh build promtool`, cached
//! outside the clone). A failed build fails these tests with the build's log.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A binary of the real-cluster harness's pinned builds, built on first use.
fn tool(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("scripts/real-cluster.sh"))
        .args(["build", name])
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let log = stderr
            .lines()
            .filter_map(|l| l.split("; see ").nth(1))
            .next_back()
            .and_then(|log| std::fs::read_to_string(log.trim()).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "scripts/real-cluster.sh build {name} failed:\n{stderr}\n--- log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next_back()
        .expect("the build prints its directory")
        .to_string();
    let bin = Path::new(&dir).join(name);
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(tool("promtool"))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or_default()).expect("stdin");
    drop(input);
    child.wait_with_output().expect("promtool finishes")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const ALERTS: &str = "deploy/monitoring/alerts.yaml";
const ALERT_TESTS: &str = "deploy/monitoring/alerts_test.yaml";

/// The alert rules: (name, rule).
fn alerts() -> Vec<(String, Value)> {
    let rules = yaml(&repo().join(ALERTS));
    let mut all = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            all.push((name.to_string(), rule.clone()));
        }
    }
    all
}

/// Every `identity_binding_proxy_*` metric name the proxy exports.
fn exported_names() -> BTreeSet<String> {
    let metrics = identity_binding_proxy::metrics::Metrics::new();
    metrics
        .certificate_expiry
        .with_label_values(&["proxy.example"])
        .set(1);
    String::from_utf8(metrics.render())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// The `identity_binding_proxy_*` names a PromQL expression uses, without histogram suffixes.
fn names_in(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("identity_binding_proxy_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(w, |n, s| n.strip_suffix(s).unwrap_or(n))
                .to_string()
        })
        .collect()
}

/// The operator's list: each of these conditions has an alert.
#[test]
fn alerts_cover_every_condition_operators_page_on_with_runbooks_and_exported_metrics() {
    let names: Vec<String> = alerts().into_iter().map(|(n, _)| n).collect();
    let wanted = [
        "IdentityBindingProxyNodeWithoutReadyProxy",
        "IdentityBindingProxyErrorRate",
        "IdentityBindingProxyEntraThrottledOrUnavailable",
        "IdentityBindingProxyCacheRefreshFailing",
        "IdentityBindingProxyKubeReviewsFailing",
        "IdentityBindingProxyCertificateExpiringSoon",
        "IdentityBindingProxyCallerOverBudget",
    ];
    assert_eq!(names, wanted, "the alerts of {ALERTS}");

    let operations = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let exported = exported_names();
    for (name, rule) in alerts() {
        // The runbook: a section named after the alert, the annotation pointing at it.
        assert!(
            operations.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no runbook section '### {name}'"
        );
        for part in ["What it means", "How to confirm", "What to do"] {
            let section = operations
                .split(&format!("\n### {name}\n"))
                .nth(1)
                .and_then(|s| s.split("\n### ").next())
                .unwrap_or_default();
            assert!(
                section.contains(part),
                "the runbook of {name} has no '{part}'"
            );
        }
        assert_eq!(
            rule["annotations"]["runbook"],
            format!("docs/operations.md#{}", name.to_lowercase()),
            "{name}'s runbook annotation"
        );
        assert!(
            ["critical", "warning", "info"].contains(&rule["labels"]["severity"].as_str().unwrap()),
            "{name} has a severity"
        );
        for metric in names_in(rule["expr"].as_str().unwrap()) {
            assert!(
                exported.contains(&metric),
                "{name} uses {metric}, which the proxy does not export"
            );
        }
    }
}

/// `promtool check rules` accepts the file, and its unit tests pass: for every alert at least
/// one case where it fires (with its labels and annotations) and one where it stays quiet.
#[test]
fn alert_rules_pass_promtool_check_and_unit_tests_for_every_alert() {
    let out = promtool(&["check", "rules", ALERTS], None);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("SUCCESS: {} rules found", alerts().len())),
        "{}",
        text(&out)
    );

    let tests = yaml(&repo().join(ALERT_TESTS));
    for (name, _) in alerts() {
        let cases: Vec<&Value> = tests["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|c| c["alertname"] == name.as_str())
            .collect();
        let fires = |c: &&Value| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
        assert!(cases.iter().any(fires), "no case where {name} fires");
        assert!(
            cases.iter().any(|c| !fires(c)),
            "no case where {name} stays quiet"
        );
    }

    let out = promtool(&["test", "rules", ALERT_TESTS], None);
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

/// The unit tests can fail: with a threshold no test data reaches, the firing cases fail.
#[test]
fn alert_unit_tests_fail_when_an_alert_no_longer_fires() {
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(repo().join(ALERTS)).unwrap();
    let broken = rules.replace("< 14 * 86400", "< 1 * 86400");
    assert_ne!(broken, rules, "the certificate threshold is in {ALERTS}");
    std::fs::write(dir.path().join("alerts.yaml"), broken).unwrap();
    std::fs::copy(
        repo().join(ALERT_TESTS),
        dir.path().join("alerts_test.yaml"),
    )
    .unwrap();
    let file = dir.path().join("alerts_test.yaml");
    let out = promtool(&["test", "rules", &file.to_string_lossy()], None);
    assert!(!out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("IdentityBindingProxyCertificateExpiringSoon"),
        "the failure names the alert:\n{report}"
    );
}

/// Every query of the Grafana dashboard parses as PromQL (as recording rules through
/// `promtool check rules`, Grafana's variables replaced) and names only exported metrics.
#[test]
fn grafana_dashboard_queries_parse_as_promql_and_name_exported_metrics() {
    let dash: Value = serde_json::from_slice(
        &std::fs::read(repo().join("deploy/grafana/identity-binding-proxy.json")).unwrap(),
    )
    .unwrap();
    let exported = exported_names();
    let mut rules = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL target");
            for metric in names_in(expr) {
                assert!(
                    exported.contains(&metric),
                    "panel {} queries {metric}, which is not exported",
                    panel["title"]
                );
            }
            let promql = expr
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            assert!(
                !promql.contains('$'),
                "a Grafana variable this test does not know: {expr}"
            );
            rules.push(serde_json::json!({
                "record": format!("dashboard:query_{}", rules.len()),
                "expr": promql,
            }));
        }
    }
    assert!(rules.len() >= 10, "{} queries", rules.len());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = promtool(&["check", "rules", &file.to_string_lossy()], None);
    assert!(
        out.status.success(),
        "the dashboard's queries do not parse:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{}",
        text(&out)
    );

    // The check itself refuses a query that does not parse.
    std::fs::write(
        &file,
        r#"{"groups":[{"name":"d","rules":[{"record":"r","expr":"sum by (le (x)"}]}]}"#,
    )
    .unwrap();
    let out = promtool(&["check", "rules", &file.to_string_lossy()], None);
    assert!(!out.status.success(), "{}", text(&out));
}

/// GET /metrics from an admin URL (`http://HOST:PORT`): the body.
fn scrape(admin_url: &str) -> Vec<u8> {
    let host = admin_url
        .strip_prefix("http://")
        .expect("an http URL")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).expect("connect to the admin server");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    assert!(
        buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&buf[..split])
    );
    buf[split + 4..].to_vec()
}

/// `promtool check metrics` over a live scrape of `dev` (every series is created at start)
/// reports nothing.
#[test]
fn promtool_check_metrics_finds_nothing_on_a_live_dev_scrape() {
    let state = tempfile::tempdir().unwrap();
    let dev = common::DevProcess::start(state.path());
    let scrape = scrape(&dev.get("admin_url"));
    let body = String::from_utf8_lossy(&scrape);
    assert!(
        body.contains("# TYPE identity_binding_proxy_requests_total counter"),
        "{body}"
    );
    let out = promtool(&["check", "metrics"], Some(&scrape));
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "promtool check metrics found problems (exit {:?}):\n{}",
        out.status.code(),
        text(&out)
    );

    // The lint is live: a counter without the _total suffix is reported.
    let bad = b"# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n";
    let out = promtool(&["check", "metrics"], Some(bad));
    assert!(
        text(&out).contains("counter metrics should have \"_total\" suffix"),
        "{}",
        text(&out)
    );
}
