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
/// before the connection counts as dead (kube-rs's watcher adds 5 s of its own).
const WATCH_READ_MARGIN: Duration = Duration::from_secs(30);

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
    /// The same apiserver and credentials for watches: a read may wait as long as the watch
    /// lasts, where `client` gives up after [`REQUEST_READ_TIMEOUT`].
    watch_client: kube::Client,
    watch_timeout: Duration,
    reviews: Arc<Semaphore>,
    mode: ReviewMode,
}

impl Cluster {
    /// From a kubeconfig file, or from the in-cluster service-account environment; watches
    /// ask the apiserver to end them after `watch_timeout` (at least a second).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        watch_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display())
                })?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
            }
            None => kube::Config::incluster().map_err(|e| {
                anyhow::anyhow!(
                    "not running in a cluster ({e}); pass --kubeconfig FILE to run elsewhere"
                )
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
        let client = kube::Client::try_from(config)?;
        let watch_client = kube::Client::try_from(watch_config)?;
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

    /// The client for watches (and the lists they start with): no read deadline short of
    /// the watch's own end.
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
