//! Gets tokens through identity-binding-proxy with the official Rust SDK (azure_identity) in
//! proxy mode, reading the AZURE_* environment as a pod would.
//!
//! One request per line of stdin, one JSON line per request on stdout:
//!   get <scope>    the credential built at start (so the SDK's own CA-file handling is used)
//!   fresh <scope>  a new credential (so the SDK's in-memory token cache is not)
//! {"ok": true, "token": ..., "expires_on": <unix secs>} or {"ok": false, "error": "<text>"}.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_identity::{WorkloadIdentityCredential, WorkloadIdentityCredentialOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn new_credential() -> azure_core::Result<Arc<WorkloadIdentityCredential>> {
    WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
        enable_proxy: true,
        ..Default::default()
    }))
}

fn failure(e: &azure_core::Error) -> Value {
    // The whole chain: the text users would see in their logs.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(" | caused by: {s}"));
        source = s.source();
    }
    json!({"ok": false, "error": text})
}

async fn get(credential: &WorkloadIdentityCredential, scope: &str) -> Value {
    match credential.get_token(&[scope], None).await {
        Ok(t) => json!({"ok": true, "token": t.token.secret(), "expires_on": t.expires_on.unix_timestamp()}),
        Err(e) => failure(&e),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let shared = new_credential();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        let (mode, scope) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let reply = match mode {
            "get" => match &shared {
                Ok(c) => get(c, scope).await,
                Err(e) => failure(e),
            },
            "fresh" => match new_credential() {
                Ok(c) => get(&c, scope).await,
                Err(e) => failure(&e),
            },
            _ => json!({"ok": false, "error": format!("unknown command {mode}")}),
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).await.is_err() || out.flush().await.is_err() {
            return;
        }
    }
}
