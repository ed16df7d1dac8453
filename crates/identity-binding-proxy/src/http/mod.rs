//! HTTP plumbing shared by the proxy, its admin server and the emulators, one file per
//! purpose: response builders, request bodies, the accept loop and connections, the outbound
//! client, and form encoding.

pub mod body;
pub mod client;
pub mod conn;
pub mod form;
pub mod response;
