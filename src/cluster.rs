//! The proxy's view of the kube-apiserver: TokenReview, SubjectAccessReview, and the
//! service-account issuer's discovery document and JWKS.
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

pub struct Cluster {
    client: kube::Client,
    reviews: Arc<Semaphore>,
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
        })
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
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(subject.user.to_string()),
                groups: Some(subject.groups.to_vec()),
                uid: (!subject.uid.is_empty()).then(|| subject.uid.to_string()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GRANT_GROUP.to_string()),
                    resource: Some(client_id.to_string()),
                    verb: Some(GRANT_VERB.to_string()),
                    namespace: Some(subject.namespace.to_string()),
                    ..Default::default()
                }),
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
