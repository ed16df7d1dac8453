//! The admin server: `/livez`, `/readyz` and `/metrics` on their own port, with their own
//! connection cap and the token port's header and idle timeouts; and readiness, which it
//! reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authn::Authenticator;
use crate::config::AdminConfig;
use crate::http::conn::ConnTimeouts;
use crate::http::response::{json, text, Body};
use crate::metrics::Metrics;
use crate::serve::limits::Limits;

/// Readiness: certificates, JWKS and bindings loaded, and not shutting down.
pub struct Readiness {
    authn: Arc<Authenticator>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new(authn: Arc<Authenticator>) -> Self {
        Self {
            authn,
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.authn.ready() && !self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// The admin server: `/livez`, `/readyz`, `/metrics`, with its own connection cap and the
/// proxy's header and idle timeouts.
pub async fn serve(
    listener: TcpListener,
    (config, timeouts): (AdminConfig, ConnTimeouts),
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let evictions = metrics.connection_evictions.clone();
    let limits = Limits::counted(config.limits, evictions, "admin");
    crate::http::conn::serve_plain(listener, stop, limits, timeouts, move |req, _peer| {
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        async move { admin_response(req.uri().path(), &readiness, &metrics) }
    })
    .await
}

fn admin_response(path: &str, readiness: &Readiness, metrics: &Metrics) -> Response<Body> {
    match path {
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => json(StatusCode::NOT_FOUND, &b"{\"error\":\"not found\"}"[..]),
    }
}
