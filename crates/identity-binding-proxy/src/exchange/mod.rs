//! From an authorized caller to an Entra access token: the binding that names the identity,
//! the cache (one upstream call per key), the assertion our issuer signs, the exchange with
//! Entra, and the issuer keys and their activation.

pub mod activation;
pub(crate) mod authority;
pub mod bindings;
pub mod cache;
pub mod entra;
pub mod issuer;
pub mod keys;
