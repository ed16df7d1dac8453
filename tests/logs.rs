//! No credential ever reaches the logs: success and failure flows run with every log target at
//! TRACE (ours, the emulators', hyper's, h2's, rustls', kube's), and the captured output must
//! not contain any SA token, our assertion or an access token — nor any 16-character slice
//! of one.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_absent(logs: &str, secret: &str, what: &str) {
    let secret = secret.trim();
    assert!(secret.len() >= 16, "{what} is too short to scan for");
    let chars: Vec<char> = secret.chars().collect();
    for window in chars.windows(16) {
        let slice: String = window.iter().collect();
        // The JWT header of every RS256 token looks alike; a header is not a secret.
        if slice.starts_with("eyJ") && secret.starts_with(&slice) {
            continue;
        }
        assert!(
            !logs.contains(&slice),
            "a 16-character slice of {what} appears in the logs: {slice}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_assertion_appears_in_any_log_line() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .json()
        .init();

    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let h2 = Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"]);
    let info = sys.info.clone();
    let allowed = read(&info.allowed_token_file);
    let denied = read(&info.denied_token_file);
    let mut secrets = vec![
        (allowed.clone(), "the allowed SA token"),
        (denied.clone(), "the denied SA token"),
    ];

    // Success (miss and hit, HTTP/1.1 and h2), a CAE bypass, and refusals of every kind.
    for c in [&client, &h2, &client] {
        let r = c
            .post_form(
                &format!("/{}/oauth2/v2.0/token", info.tenant_id),
                &token_form(&info.client_id, &allowed),
            )
            .await;
        assert_eq!(r.status, 200);
        secrets.push((
            r.json["access_token"].as_str().unwrap().to_string(),
            "an access token",
        ));
    }
    let mut claims = token_form(&info.client_id, &allowed);
    claims.push(("claims", "{}"));
    let r = client.post_form("/", &claims).await;
    secrets.push((
        r.json["access_token"].as_str().unwrap().to_string(),
        "a CAE access token",
    ));
    assert_eq!(
        client.post_token(&info.client_id, &denied).await.status,
        403
    );
    let unbound = uuid::Uuid::new_v4().to_string();
    assert_eq!(client.post_token(&unbound, &allowed).await.status, 403);
    let tampered = format!("{}x", allowed.trim());
    assert_eq!(
        client.post_token(&info.client_id, &tampered).await.status,
        401
    );
    // Entra refuses: its error passes through.
    assert!(sys
        .entra
        .remove_fic(&info.client_id, "identity-binding-proxy"));
    let mut fresh = token_form(&info.client_id, &allowed);
    fresh[2] = ("scope", "https://storage.azure.com/.default");
    assert_ne!(client.post_form("/", &fresh).await.status, 200);

    // Our own assertion, as the Entra emulator received it.
    let binding = sys
        .proxy
        .app
        .bindings
        .current()
        .get(&info.client_id)
        .unwrap()
        .clone();
    let assertion = sys.proxy.app.issuer.assertion(&binding).unwrap();
    secrets.push((assertion.to_string(), "our assertion"));
    sys.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token request"),
        "the request log lines were captured"
    );
    assert!(
        logs.lines().count() > 100,
        "TRACE output of every target was captured"
    );
    for (secret, what) in &secrets {
        assert_absent(&logs, secret, what);
    }

    // One line per request: the first success went to Entra and says how long it waited for
    // it; the next ones were served from the cache and waited for nobody.
    let requests: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "token request")
        .map(|v| v["fields"].clone())
        .collect();
    let successes: Vec<&serde_json::Value> = requests
        .iter()
        .filter(|f| f["outcome"] == "success")
        .collect();
    assert_eq!(successes[0]["cache"], "miss", "{:?}", successes[0]);
    let waited = successes[0]["upstream_us"].as_u64().unwrap();
    let total = successes[0]["latency_us"].as_u64().unwrap();
    assert!(waited > 0 && waited <= total, "{:?}", successes[0]);
    for hit in &successes[1..3] {
        assert_eq!(hit["cache"], "hit", "{hit:?}");
        assert_eq!(hit["upstream_us"], 0, "{hit:?}");
    }
}
