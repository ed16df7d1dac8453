//! Entra's FIC and key refusals, as the pod and the log see them: Entra's own status, error,
//! codes and words, followed by what the proxy presented (issuer, subject, audience, key id —
//! never the assertion) and the advice to run `identity-binding-proxy doctor`. Each refusal is
//! made the way it happens: the identity's FIC edited in the Entra emulator.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use ibp_emulators::entra::Fic;

/// Every log line of this test process (the dev system runs in it).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(writer.clone()))
            .try_init();
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fic_refusals_name_what_the_proxy_presented_and_doctor_in_the_answer_and_the_log() {
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let cid = sys.info.client_id.clone();
    let fic = sys.entra.fics(&cid)[0].clone();
    let kid = identity_binding_proxy::exchange::keys::SigningKey::from_pem(
        &std::fs::read_to_string(dir.path().join("issuer.key")).unwrap(),
    )
    .unwrap()
    .kid()
    .to_string();
    // Each FIC as users get it wrong, with the code Entra answers.
    let cases = [
        (
            "subject-case",
            fic.subject.to_uppercase(),
            fic.issuer.clone(),
            fic.audience.clone(),
            7002138,
        ),
        (
            "other-subject",
            "someone-else".to_string(),
            fic.issuer.clone(),
            fic.audience.clone(),
            700213,
        ),
        (
            "trailing-slash",
            fic.subject.clone(),
            format!("{}/", fic.issuer),
            fic.audience.clone(),
            700211,
        ),
        (
            "other-audience",
            fic.subject.clone(),
            fic.issuer.clone(),
            "api://elsewhere".to_string(),
            700212,
        ),
    ];
    let mut current = fic.name.clone();
    for (name, subject, issuer, audience, code) in cases {
        assert!(sys.entra.remove_fic(&cid, &current));
        let wrong = Fic {
            name: name.into(),
            subject,
            issuer,
            audience,
            ..fic.clone()
        };
        sys.entra.add_fic(wrong).unwrap();
        current = name.to_string();
        let r = client.post_token(&cid, &token).await;
        assert_eq!(r.status, 401, "{name}: {}", r.json);
        assert_eq!(r.json["error"], "invalid_client", "{name}: {}", r.json);
        assert_eq!(r.json["error_codes"][0], code, "{name}: {}", r.json);
        let d = r.error_description();
        assert!(
            d.starts_with(&format!("AADSTS{code}: ")),
            "Entra's own words first: {d}"
        );
        for fact in [
            format!("issuer '{}'", fic.issuer),
            format!("subject '{}'", fic.subject),
            format!("audience '{}'", fic.audience),
            format!("key id '{kid}'"),
            "run `identity-binding-proxy doctor`".to_string(),
        ] {
            assert!(d.contains(&fact), "{name}: {fact} missing from {d}");
        }
    }
    // The log names the same facts, once per refusal, and never a token or an assertion.
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Entra refused the proxy's assertion"))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    for line in &lines {
        assert!(
            line.contains(&format!("kid={kid}"))
                && line.contains(&format!("subject={}", fic.subject)),
            "{line}"
        );
        assert!(
            line.contains(&format!("issuer={}", fic.issuer))
                && line.contains("identity-binding-proxy doctor"),
            "{line}"
        );
    }
    assert!(
        !text.contains(token.trim()),
        "the caller's token is never logged"
    );
    assert!(!text.contains("eyJ"), "no JWT is ever logged");
    // Counted by code, for doctor's summary of the metrics.
    let metrics = scrape_metrics(&sys).await;
    for code in [7002138, 700213, 700211, 700212] {
        let series = format!("identity_binding_proxy_entra_refusals_total{{aadsts=\"{code}\"}} 1");
        assert!(metrics.contains(&series), "{series}:\n{metrics}");
    }
    // Fixed, as doctor's `az identity federated-credential update` does: a token.
    assert!(sys.entra.remove_fic(&cid, &current));
    sys.entra.add_fic(fic).unwrap();
    let r = client.post_token(&cid, &token).await;
    assert_eq!(r.status, 200, "{}", r.json);
    sys.shutdown().await;
}
