//! The proxy's view of the kube-apiserver: TokenReview, SubjectAccessReview, and the
//! service-account issuer's discovery document and JWKS. In sidecar mode the proxy asks
//! about itself instead ([`ReviewMode::OwnToken`]): a SelfSubjectAccessReview made with the
//! pod's own API token, which needs no RBAC beyond what every authenticated user has.
//!
//! kube-rs applies no client-side rate limit; we bound the number of reviews in flight
//! explicitly instead, so a burst of new callers cannot pile thousands of requests onto the
//! apiserver, and nothing hides a client-go-like 5 QPS throttle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::Api;
use tokio::sync::Semaphore;

use crate::startup::StartError;

/// The API group, verb and resource prefix of an identity-binding grant.
pub const GRANT_GROUP: &str = "cid.wi.aks.azure.com";
pub const GRANT_VERB: &str = "use-managed-identity";

/// At most this many reviews in flight to the apiserver at once.
const MAX_REVIEWS_IN_FLIGHT: usize = 64;

/// A request (a review, a list, the JWKS) must send something within this, or it failed.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the apiserver keeps one RBAC watch open (`timeoutSeconds`) before the proxy opens
/// the next from the same resource version: kube-rs's default, under the apiserver's own
/// 30-minute minimum request timeout. A quiet watch sends nothing for this long but the
/// apiserver's bookmarks, so a watch's reads may take up to this long without failing.
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// Beyond the watch's own `timeoutSeconds`, how long a read on a watch connection may wait
/// before the connection counts as dead (kube-rs's watcher adds 5 s of its own). Only when
/// the apiserver is reached through an HTTP proxy: otherwise TCP keepalive finds a dead
/// connection sooner.
const WATCH_READ_MARGIN: Duration = Duration::from_secs(30);

/// TCP keepalive on watch connections: probed after 30 s without traffic, every 10 s, given
/// up after 3 unanswered probes. A watch whose apiserver or path vanished without a reset (a
/// node rebooted, a load balancer dropped the flow) is found dead within about a minute, where
/// the watch's own `timeoutSeconds` would leave it unnoticed for up to that long.
const WATCH_KEEPALIVE: Duration = Duration::from_secs(30);
const WATCH_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const WATCH_KEEPALIVE_RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the Kubernetes API server could not be reached or failed: {0}")]
    Unavailable(String),
    #[error("the Kubernetes API server answered something unexpected: {0}")]
    Unexpected(String),
}

/// Who is asking for a SubjectAccessReview.
pub struct Subject<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
    pub uid: &'a str,
    pub namespace: &'a str,
}

/// Whose access a review asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewMode {
    /// A SubjectAccessReview about the caller (the DaemonSet: the proxy holds the right to
    /// create them).
    Subject,
    /// A SelfSubjectAccessReview with the proxy's own credentials (the sidecar: the caller IS
    /// the pod's service account, checked before, and the pod may ask only about itself).
    OwnToken,
}

pub struct Cluster {
    client: kube::Client,
    /// The same apiserver and credentials for watchers: their lists go through `client`, their
    /// watches over connections with TCP keepalive and no read deadline short of the watch's
    /// end (see [`watch_client`]).
    watch_client: kube::Client,
    watch_timeout: Duration,
    reviews: Arc<Semaphore>,
    mode: ReviewMode,
}

impl Cluster {
    /// From a kubeconfig file, or from the in-cluster service-account environment; watches
    /// ask the apiserver to end them after `watch_timeout` (at least a second). Nothing is
    /// sent yet: every failure here is the configuration's (a kubeconfig that does not exist,
    /// does not parse or names credentials that cannot be loaded; no cluster environment).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        watch_timeout: Duration,
    ) -> Result<Self, StartError> {
        let mut config = match kubeconfig {
            Some(path) => {
                let bad = |e: &dyn std::fmt::Display| {
                    StartError::usage(format!("--kubeconfig {}: {e}", path.display()))
                };
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| bad(&e))?
            }
            None => kube::Config::incluster().map_err(|e| {
                StartError::usage(format!(
                    "not running in a cluster ({e}); pass --kubeconfig FILE to run elsewhere"
                ))
            })?,
        };
        // kube-rs would otherwise retry 429/503/504 for minutes; a caller waiting on us needs
        // a prompt 503 with Retry-After instead (the SDKs retry themselves).
        config.default_retry = false;
        config.connect_timeout = Some(Duration::from_secs(5));
        // One read deadline does not fit both: a review answers within seconds, while a watch
        // on a quiet cluster sends nothing for minutes (cut at 10 s, every watch re-opened
        // every 10 s on every node, and revocations leaned on the TTLs meanwhile).
        let watch_timeout = watch_timeout.max(Duration::from_secs(1));
        let mut watch_config = config.clone();
        watch_config.read_timeout = Some(watch_timeout + WATCH_READ_MARGIN);
        config.read_timeout = Some(REQUEST_READ_TIMEOUT);
        let client = kube::Client::try_from(config).map_err(client_error)?;
        let watch_client = watch_client(watch_config, client.clone()).map_err(client_error)?;
        Ok(Self {
            client,
            watch_client,
            watch_timeout,
            reviews: Arc::new(Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
            mode: ReviewMode::Subject,
        })
    }

    /// The same connection, reviewing access as `mode` says.
    pub fn with_review_mode(mut self, mode: ReviewMode) -> Self {
        self.mode = mode;
        self
    }

    /// Who the apiserver takes our own credentials for (a SelfSubjectReview): the sidecar's
    /// own service account, e.g. `system:serviceaccount:apps:web`.
    pub async fn whoami(&self) -> Result<String, ClusterError> {
        use k8s_openapi::api::authentication::v1::SelfSubjectReview;
        let api: Api<SelfSubjectReview> = Api::all(self.client.clone());
        let created = api
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .map_err(unavailable)?;
        created
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ClusterError::Unexpected("SelfSubjectReview without a user".into()))
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The client for watchers: lists with the requests' read deadline, watches with TCP
    /// keepalive and no read deadline short of the watch's own end.
    pub fn watch_client(&self) -> &kube::Client {
        &self.watch_client
    }

    /// What watches ask the apiserver for as `timeoutSeconds`.
    pub fn watch_timeout_secs(&self) -> u32 {
        u32::try_from(self.watch_timeout.as_secs()).unwrap_or(u32::MAX)
    }

    /// TokenReview of `token` for `audience`.
    pub async fn token_review(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<TokenReviewStatus, ClusterError> {
        let _permit = self.permit().await?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let created = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        created
            .status
            .ok_or_else(|| ClusterError::Unexpected("TokenReview without status".into()))
    }

    /// SubjectAccessReview for `use-managed-identity` on `client_id`. Returns (allowed, reason).
    pub async fn access_review(
        &self,
        subject: &Subject<'_>,
        client_id: &str,
    ) -> Result<(bool, String), ClusterError> {
        let _permit = self.permit().await?;
        if self.mode == ReviewMode::OwnToken {
            return self.self_access_review(subject.namespace, client_id).await;
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(subject.user.to_string()),
                groups: Some(subject.groups.to_vec()),
                uid: (!subject.uid.is_empty()).then(|| subject.uid.to_string()),
                resource_attributes: Some(grant_attributes(subject.namespace, client_id)),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let created = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = created
            .status
            .ok_or_else(|| ClusterError::Unexpected("SubjectAccessReview without status".into()))?;
        let reason = status
            .reason
            .or(status.evaluation_error)
            .unwrap_or_default();
        Ok((status.allowed && !status.denied.unwrap_or(false), reason))
    }

    /// SelfSubjectAccessReview for `use-managed-identity` on `client_id` in `namespace`, with
    /// our own credentials. Returns (allowed, reason).
    async fn self_access_review(
        &self,
        namespace: &str,
        client_id: &str,
    ) -> Result<(bool, String), ClusterError> {
        use k8s_openapi::api::authorization::v1::{
            SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(grant_attributes(namespace, client_id)),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let created = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = created.status.ok_or_else(|| {
            ClusterError::Unexpected("SelfSubjectAccessReview without status".into())
        })?;
        let reason = status
            .reason
            .or(status.evaluation_error)
            .unwrap_or_default();
        Ok((status.allowed && !status.denied.unwrap_or(false), reason))
    }

    /// The service-account issuer's JWKS document (`/openid/v1/jwks`).
    pub async fn jwks(&self) -> Result<String, ClusterError> {
        self.get_text("/openid/v1/jwks").await
    }

    /// The service-account issuer URL, from the apiserver's OIDC discovery document.
    pub async fn issuer(&self) -> Result<String, ClusterError> {
        let text = self.get_text("/.well-known/openid-configuration").await?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ClusterError::Unexpected(format!("discovery document: {e}")))?;
        doc["issuer"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClusterError::Unexpected("discovery document without issuer".into()))
    }

    async fn get_text(&self, path: &str) -> Result<String, ClusterError> {
        let req = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| ClusterError::Unexpected(e.to_string()))?;
        self.client.request_text(req).await.map_err(unavailable)
    }

    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ClusterError> {
        self.reviews
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClusterError::Unavailable("shutting down".into()))
    }
}

/// The client a watcher uses: watch requests go over their own connections, with TCP keepalive
/// and no read deadline (a quiet watch sends nothing for minutes); everything else (the lists a
/// watcher starts with, and re-lists after a 410) goes through `requests`, so a list that hangs
/// fails after [`REQUEST_READ_TIMEOUT`]. Behind an HTTP proxy (the proxy's connector has no
/// keepalive setting), watches get kube-rs's own client with a read deadline just past the
/// watch's end instead.
fn watch_client(config: kube::Config, requests: kube::Client) -> kube::Result<kube::Client> {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;
    let namespace = config.default_namespace.clone();
    let watches = if config.proxy_url.is_some() {
        kube::Client::try_from(config)?
    } else {
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(config.connect_timeout);
        tcp.set_keepalive(Some(WATCH_KEEPALIVE));
        tcp.set_keepalive_interval(Some(WATCH_KEEPALIVE_INTERVAL));
        tcp.set_keepalive_retries(Some(WATCH_KEEPALIVE_RETRIES));
        let https = config.rustls_https_connector_with_connector(tcp)?;
        let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer()?)
            .layer(config.extra_headers_layer()?)
            .map_err(tower::BoxError::from)
            .service(http);
        kube::Client::new(service, namespace.clone())
    };
    Ok(kube::Client::new(
        SplitWatches { requests, watches },
        namespace,
    ))
}

/// Sends watch requests (`watch=true`) to `watches` and every other request to `requests`.
#[derive(Clone)]
struct SplitWatches {
    requests: kube::Client,
    watches: kube::Client,
}

impl tower::Service<http::Request<kube::client::Body>> for SplitWatches {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, kube::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), kube::Error>> {
        // Each client has its own buffer; `send` waits for it.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let client = if is_watch(request.uri()) {
            self.watches.clone()
        } else {
            self.requests.clone()
        };
        Box::pin(async move { client.send(request).await })
    }
}

/// Whether a request is a watch: kube-rs asks for one with `watch=true` in the query.
fn is_watch(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// What a grant is: `use-managed-identity` on `<client-id>` in `cid.wi.aks.azure.com`, asked in
/// the caller's namespace (so a namespaced RoleBinding also grants).
fn grant_attributes(namespace: &str, client_id: &str) -> ResourceAttributes {
    ResourceAttributes {
        group: Some(GRANT_GROUP.to_string()),
        resource: Some(client_id.to_string()),
        verb: Some(GRANT_VERB.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    }
}

/// A kube client that cannot be built from a loaded configuration: its TLS material or its
/// credentials (a kubeconfig's certificate, key or CA that do not load), the operator's to fix.
fn client_error(e: kube::Error) -> StartError {
    StartError::usage("the kubeconfig's TLS or credentials cannot be used").because(e)
}

fn unavailable(e: kube::Error) -> ClusterError {
    match e {
        kube::Error::Api(status) if status.code >= 500 || status.code == 429 => {
            ClusterError::Unavailable(format!("{} {}", status.code, status.message))
        }
        kube::Error::Api(status) => {
            ClusterError::Unexpected(format!("{} {}", status.code, status.message))
        }
        other => ClusterError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_watch_is_told_apart_by_its_query() {
        let watch = |uri: &str| is_watch(&uri.parse().unwrap());
        assert!(watch("/api/v1/namespaces?watch=true&resourceVersion=1"));
        assert!(watch("/api/v1/namespaces?timeoutSeconds=290&watch=1"));
        assert!(!watch("/api/v1/namespaces?limit=500"));
        assert!(!watch("/api/v1/namespaces?watchdog=true"));
        assert!(!watch("/api/v1/namespaces"));
    }

    /// Whether the kernel runs a keepalive timer on our end of the loopback connection from
    /// `port` (the `tr` column of /proc/net/tcp: 2; an idle socket without keepalive has 0).
    fn keepalive_timer(port: u16) -> bool {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let local = format!(":{port:04X}");
        table.lines().skip(1).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f[1].ends_with(&local) && f[3] == "01" && f[5].starts_with("02:")
        })
    }

    /// An apiserver that answers a list with an empty one and a watch with headers and then
    /// silence; sends the client port and the request line of each request.
    async fn apiserver(tx: tokio::sync::mpsc::UnboundedSender<(u16, String)>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        let head = String::from_utf8_lossy(&buf[..n]).to_string();
                        let line = head.lines().next().unwrap_or_default().to_string();
                        let _ = tx.send((peer.port(), line.clone()));
                        let reply = if line.contains("watch=true") {
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             transfer-encoding: chunked\r\n\r\n"
                                .to_string()
                        } else {
                            let body = r#"{"apiVersion":"v1","kind":"NamespaceList","metadata":{"resourceVersion":"7"},"items":[]}"#;
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                 content-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        };
                        let _ = tcp.write_all(reply.as_bytes()).await;
                    }
                });
            }
        });
        port
    }

    /// A watcher's list goes over the requests' connection (with its short read deadline), its
    /// watch over another one, on which the kernel keeps a keepalive timer.
    #[tokio::test]
    async fn watches_get_keepalive_connections_and_lists_the_request_client() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let port = apiserver(tx).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters:\n- name: t\n  \
                 cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: t\n  \
                 context:\n    cluster: t\n    user: t\nusers:\n- name: t\n  user: {{}}\n"
            ),
        )
        .unwrap();
        let cluster = Cluster::connect(Some(&kubeconfig), DEFAULT_WATCH_TIMEOUT)
            .await
            .unwrap();
        let api: Api<Namespace> = Api::all(cluster.watch_client().clone());
        let list = api.list(&Default::default()).await.unwrap();
        assert_eq!(list.metadata.resource_version.as_deref(), Some("7"));
        let (list_port, line) = rx.recv().await.unwrap();
        assert!(line.starts_with("GET /api/v1/namespaces"), "{line}");
        let params = kube::api::WatchParams::default().timeout(290);
        let _watch = api.watch(&params, "7").await.unwrap();
        let (watch_port, line) = rx.recv().await.unwrap();
        assert!(line.contains("watch=true"), "{line}");
        assert_ne!(
            list_port, watch_port,
            "the watch has a connection of its own"
        );
        assert!(
            keepalive_timer(watch_port),
            "keepalive on the watch's connection"
        );
        assert!(
            !keepalive_timer(list_port),
            "the list's client is the requests' one"
        );
    }
}
