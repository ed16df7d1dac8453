//! Test doubles with real semantics for the two services this proxy depends on: the
//! kube-apiserver and Microsoft Entra. Used by `dev`, `emulate`, the tests and the benches.

pub mod entra;
pub mod kube;
pub mod objects;
pub mod pki;
pub mod rbac;
pub mod static_host;
