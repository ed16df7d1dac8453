//! The process's one rustls crypto provider (aws-lc-rs): the TLS listener, the outbound client
//! and kube's client all use it.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// Installs aws-lc-rs as the process-wide rustls provider, for the clients that read it (kube's,
/// hyper-rustls'). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider, for the configurations this crate builds itself.
pub fn provider() -> Arc<CryptoProvider> {
    install_provider();
    match CryptoProvider::get_default() {
        Some(p) => p.clone(),
        None => Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    }
}
