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
    reviews: Arc<Semaphore>,
    mode: ReviewMode,
}

impl Cluster {
    /// From a kubeconfig file, or from the in-cluster service-account environment.
    pub async fn connect(kubeconfig: Option<&Path>) -> anyhow::Result<Self> {
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
        config.read_timeout = Some(Duration::from_secs(10));
        let client = kube::Client::try_from(config)?;
        Ok(Self {
            client,
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
