//! identity-binding-proxy: a per-node token proxy for Microsoft Entra workload identity in
//! identity-binding mode.
//!
//! # Layout
//!
//! Start with [`request`]: its `mod.rs` is the token request's journey top to bottom, and each
//! step it calls lives one folder away. docs/architecture.md draws the layers. The files import
//! each other without a cycle (`scripts/modcycles.py`, run by CI): each component owns its
//! flags, configuration and metric labels; `config` and `cli` compose them.
//!
//! | folder | what lives there |
//! |---|---|
//! | [`request`] | the handler (route → body → parse → authenticate → authorize → binding → cache/exchange → respond), the token form and our answers ([`request::token`]), every refusal ([`request::error`]), the per-token memo, the Entra-shaped error body |
//! | [`authn`] | who is calling: the service-account token verified against the cluster's JWKS, confirmed by TokenReview |
//! | [`authz`] | may that account use the identity: SubjectAccessReview, answered from a local RBAC index when it can |
//! | [`exchange`] | from an allowed caller to an access token: bindings, the token cache, the issuer's signed assertion, the exchange with Entra and where Entra is, issuer keys and their activation |
//! | [`cluster`] | the proxy's clients of the kube-apiserver |
//! | [`serve`] | the running process: [`serve::start`] builds everything, the TLS listener routed by SNI and its handshake failures, limits, the admin server, refusals, the log pipe, signals, sidecar mode |
//! | [`config`] | `serve`'s flags checked into one typed struct per component |
//! | [`doctor`] | `identity-binding-proxy doctor`: a live installation checked end to end (proxy on the nodes, webhook, grants, TLS, issuer, FICs, clocks), each check with its fix |
//! | [`cli`] | the command line, how the binary runs ([`cli::process`]), and the `issuer` commands |
//! | [`http`] | shared HTTP plumbing: responses, bodies, the accept loop, the outbound client, forms |
//! | [`crypto`], `expiry`, [`files`], [`metrics`] | the crypto provider, per-entry cache expiry, atomic file writes and watches, Prometheus metrics |
//! | [`startup`] | the one error of start-up, [`startup::StartError`]: exit 64 (misconfiguration), 69 (a dependency unavailable) or 70 (our own failure) |
#![forbid(unsafe_code)]

pub mod authn;
pub mod authz;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod doctor;
pub mod exchange;
pub(crate) mod expiry;
pub mod files;
pub mod http;
pub mod metrics;
pub mod request;
pub mod serve;
pub mod startup;

#[cfg(test)]
mod testlog;
