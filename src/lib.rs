//! The proxy with its emulators: `dev` runs the whole system on loopback in one process and
//! `emulate` runs one emulator alone. The production crate (`identity_binding_proxy`) holds the
//! proxy; the emulators (`ibp_emulators`) stand in for the kube-apiserver and Entra. The
//! integration tests and benches of the workspace live in this package.
#![forbid(unsafe_code)]

pub mod cli;
pub mod dev;
