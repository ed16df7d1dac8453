//! A static file host over plain HTTP on loopback: in dev it stands in for the HTTPS host that
//! serves the published issuer documents (discovery + JWKS) to Entra.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use http::StatusCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use identity_binding_proxy::http::response::{json, text};

/// Serves the files under `root` until `stop` fires. Returns the bound address.
pub async fn start(
    listen: SocketAddr,
    root: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let limits = identity_binding_proxy::serve::limits::Limits::new(
        identity_binding_proxy::serve::limits::LimitsConfig::unbounded(),
    );
    let timeouts = identity_binding_proxy::http::conn::ConnTimeouts::NONE;
    tokio::spawn(identity_binding_proxy::http::conn::serve_plain(
        listener,
        stop,
        limits,
        timeouts,
        move |req, _| {
            let root = root.clone();
            async move {
                if req.method() != http::Method::GET {
                    return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
                }
                match resolve(&root, req.uri().path()) {
                    Some(file) => match tokio::fs::read(&file).await {
                        Ok(bytes) => json(StatusCode::OK, bytes),
                        Err(_) => text(StatusCode::NOT_FOUND, "not found\n"),
                    },
                    None => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            }
        },
    ));
    Ok(addr)
}

/// The file for a URL path, refusing anything that would leave `root`.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = Path::new(url_path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_root() {
        let root = Path::new("/srv");
        assert_eq!(
            resolve(root, "/a/.well-known/x"),
            Some(PathBuf::from("/srv/a/.well-known/x"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/../../b"), None);
    }
}
