//! identity-binding-proxy: a per-node token proxy for Microsoft Entra workload identity in
//! identity-binding mode. See README.md for the request path and the trust model.
#![forbid(unsafe_code)]

pub mod http;
pub mod keys;
pub mod oauth;

#[cfg(feature = "emulators")]
pub mod emulators;
