//! The outbound HTTP client, and fetching JSON with it.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The outbound HTTP client: https through rustls (aws-lc-rs, webpki roots) and plain http
/// (callers decide whether plain http is allowed for a given URL).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// True for URLs whose host is a loopback address or `localhost`: the only places where
/// plain http is allowed (emulators and tests).
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A fetched response: status, headers and the whole body.
pub struct Fetched {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Why a fetch brought no usable answer; each says what failed, the URL where it knows it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
    /// No connection, or it broke: the whole cause chain, which hyper hides one level down.
    #[error("{0}")]
    Unreachable(String),
    #[error("reading the response body: {0}")]
    Body(String),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url} did not answer JSON: {source}")]
    NotJson {
        url: String,
        source: serde_json::Error,
    },
    /// JSON that lacks what the caller reads from it.
    #[error("{url}: {what}")]
    Unexpected { url: String, what: String },
}

/// Sends `req` and reads the whole response body (up to `limit` bytes) within `timeout`.
pub async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    limit: usize,
) -> Result<Fetched, FetchError> {
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            // hyper-util's error hides the cause one level down; show it.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            FetchError::Unreachable(msg)
        })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(timeout)),
    }
}

/// GET `url` and parse the body as JSON, requiring a 2xx status.
pub async fn get_json(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<serde_json::Value, FetchError> {
    let req = Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))?;
    let fetched = fetch(client, req, timeout, 1 << 20).await?;
    if !fetched.status.is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: fetched.status,
        });
    }
    serde_json::from_slice(&fetched.body).map_err(|source| FetchError::NotJson {
        url: url.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for (u, want) in [
            ("http://127.0.0.1:8080/x", true),
            ("http://localhost/x", true),
            ("http://[::1]:1/", true),
            ("https://login.microsoftonline.com/", false),
            ("http://10.0.0.1/", false),
        ] {
            assert_eq!(is_loopback(&url::Url::parse(u).unwrap()), want, "{u}");
        }
    }
}
