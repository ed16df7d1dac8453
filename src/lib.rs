//! identity-binding-proxy: a per-node token proxy for Microsoft Entra workload identity in
//! identity-binding mode. A request's journey is in `proxy`; each step has its own module:
//! `tls` → `token` → `authn` → `authz` → `bindings` → `cache` → `issuer` + `entra`.
#![forbid(unsafe_code)]

pub mod activation;
pub mod admin;
pub mod authn;
pub mod authz;
pub mod bindings;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod entra;
pub mod error;
pub mod expiry;
pub mod files;
pub mod fleet;
pub mod http;
pub mod issuer;
pub mod keys;
pub mod limits;
pub mod logline;
pub mod logpipe;
pub mod memo;
pub mod metrics;
pub mod oauth;
pub mod proxy;
pub mod refusals;
pub mod server;
pub mod sidecar;
pub mod signal;
pub mod tls;
pub mod token;

#[cfg(test)]
mod testlog;

#[cfg(feature = "emulators")]
pub mod dev;
#[cfg(feature = "emulators")]
pub mod emulators;
