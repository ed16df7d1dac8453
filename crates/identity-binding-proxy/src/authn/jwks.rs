//! The cluster's service-account signing keys: the issuer and JWKS fetched from the apiserver,
//! refreshed (periodically, and when a token names a `kid` we do not know), persisted to the
//! state dir and loaded back at start, so a restart while the apiserver is unreachable still
//! verifies tokens. A refresh reports which keys left, so the memory of tokens they verified
//! can be dropped.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::cluster::{Cluster, ClusterError};

/// Between two JWKS refreshes caused by unknown `kid`s: a flood of forged kids must not turn
/// into a flood of apiserver requests.
const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

const PERSIST_FILE: &str = "cluster-jwks.json";

/// The cluster's signing keys, by `kid`.
#[derive(Default)]
pub(super) struct Jwks {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    unnamed: Vec<(DecodingKey, Algorithm)>,
    /// Each key's JWK as published, by `kid` (and the unnamed ones in order): what tells a
    /// refresh which keys left or changed.
    published: HashMap<String, String>,
    unnamed_published: Vec<String>,
}

/// A JWKS (or the file persisting one) that cannot be put in service.
#[derive(Debug, thiserror::Error)]
pub(super) enum InvalidJwks {
    #[error("JWKS is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("JWKS holds no usable asymmetric key")]
    NoUsableKey,
}

impl Jwks {
    pub(super) fn parse(text: &str) -> Result<Self, InvalidJwks> {
        let set: JwkSet = serde_json::from_str(text)?;
        let mut jwks = Jwks::default();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => Algorithm::ES256,
                },
                _ => continue, // symmetric or unknown key types are never trusted
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse().ok())
                .unwrap_or(alg);
            let published = serde_json::to_string(jwk).unwrap_or_default();
            match &jwk.common.key_id {
                Some(kid) => {
                    jwks.keys.insert(kid.clone(), (key, alg));
                    jwks.published.insert(kid.clone(), published);
                }
                None => {
                    jwks.unnamed.push((key, alg));
                    jwks.unnamed_published.push(published);
                }
            }
        }
        if jwks.keys.is_empty() && jwks.unnamed.is_empty() {
            return Err(InvalidJwks::NoUsableKey);
        }
        Ok(jwks)
    }

    /// The `kid`s of `self` that `next` no longer publishes as they were.
    pub(super) fn gone_in(&self, next: &Jwks) -> HashSet<String> {
        self.published
            .iter()
            .filter(|(kid, jwk)| next.published.get(*kid) != Some(*jwk))
            .map(|(kid, _)| kid.clone())
            .collect()
    }
}

/// What a new JWKS changed for tokens verified under the previous one.
pub(super) enum KeyChange {
    /// Another issuer: nothing verified before holds.
    Issuer,
    /// These `kid`s left or changed; `unnamed` when the keys without a `kid` changed.
    Keys {
        gone: HashSet<String>,
        unnamed: bool,
    },
}

/// The persisted form of the cluster's keys.
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedKeys {
    issuer: String,
    jwks: String,
}

/// The keys in service, swapped whole on each refresh.
pub(super) struct ClusterKeys {
    cluster: Arc<Cluster>,
    /// Where the last good issuer + JWKS are kept.
    persist_dir: Option<PathBuf>,
    issuer: ArcSwap<String>,
    jwks: ArcSwap<Jwks>,
    loaded: AtomicBool,
    /// Whether the latest JWKS fetch succeeded: an unknown `kid` proves a forged or foreign
    /// token only while we can see the apiserver's current keys.
    fresh: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
}

impl ClusterKeys {
    pub(super) fn new(cluster: Arc<Cluster>, persist_dir: Option<PathBuf>) -> Self {
        Self {
            cluster,
            persist_dir,
            issuer: ArcSwap::from_pointee(String::new()),
            jwks: ArcSwap::from_pointee(Jwks::default()),
            loaded: AtomicBool::new(false),
            fresh: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
        }
    }

    /// True once an issuer and a JWKS have been loaded.
    pub(super) fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Whether the latest fetch from the apiserver succeeded.
    pub(super) fn fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    pub(super) fn issuer(&self) -> Arc<String> {
        self.issuer.load_full()
    }

    /// The key that can check a signature of `alg` by the key named `kid` (or, without a
    /// `kid`, the first unnamed key of `alg`'s family).
    pub(super) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let jwks = self.jwks.load();
        let family_ok = |key_alg: Algorithm| family(key_alg) == family(alg);
        match kid {
            Some(kid) => jwks
                .keys
                .get(kid)
                .filter(|(_, a)| family_ok(*a))
                .map(|(k, _)| k.clone()),
            None => jwks
                .unnamed
                .iter()
                .find(|(_, a)| family_ok(*a))
                .map(|(k, _)| k.clone()),
        }
    }

    /// The algorithm of the published key named `kid`, if there is one.
    pub(super) fn algorithm_of(&self, kid: &str) -> Option<Algorithm> {
        self.jwks.load().keys.get(kid).map(|(_, alg)| *alg)
    }

    /// Fetches the issuer and the JWKS from the apiserver, puts them in service (`changed`
    /// hears what that changed before anything else happens), then persists them.
    pub(super) async fn refresh(
        &self,
        changed: impl FnOnce(KeyChange),
    ) -> Result<(), ClusterError> {
        *self.last_refresh.lock().await = Some(Instant::now());
        let fetched = async {
            let issuer = self.cluster.issuer().await?;
            let text = self.cluster.jwks().await?;
            let change = self
                .install(&issuer, &text)
                .map_err(|e| ClusterError::Unexpected(e.to_string()))?;
            Ok::<_, ClusterError>((issuer, text, change))
        }
        .await;
        self.fresh.store(fetched.is_ok(), Ordering::Release);
        let (issuer, text, change) = fetched?;
        if let Some(change) = change {
            changed(change);
        }
        if let Some(dir) = &self.persist_dir {
            let persisted = PersistedKeys { issuer, jwks: text };
            if let Err(e) = persist(dir, &persisted) {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot persist the cluster JWKS");
            }
        }
        Ok(())
    }

    /// Whether a token with an unknown `kid` may cause a refresh now: not more often than
    /// every [`UNKNOWN_KID_REFRESH_INTERVAL`].
    pub(super) async fn refresh_allowed_for_unknown_kid(&self) -> bool {
        let last = self.last_refresh.lock().await;
        !last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFRESH_INTERVAL)
    }

    /// Loads the keys persisted by an earlier run, if any. Returns whether keys were loaded.
    pub(super) fn load_persisted(&self, changed: impl FnOnce(KeyChange)) -> bool {
        let Some(dir) = &self.persist_dir else {
            return false;
        };
        let Ok(bytes) = std::fs::read(dir.join(PERSIST_FILE)) else {
            return false;
        };
        match serde_json::from_slice::<PersistedKeys>(&bytes)
            .map_err(InvalidJwks::from)
            .and_then(|p| self.install(&p.issuer, &p.jwks))
        {
            Ok(change) => {
                if let Some(change) = change {
                    changed(change);
                }
                tracing::info!("loaded the persisted cluster JWKS");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the persisted cluster JWKS");
                false
            }
        }
    }

    /// Puts `issuer` and `jwks_text` in service; says what changed for tokens verified before
    /// (nothing: `None`).
    fn install(&self, issuer: &str, jwks_text: &str) -> Result<Option<KeyChange>, InvalidJwks> {
        let jwks = Jwks::parse(jwks_text)?;
        let old = self.jwks.load_full();
        let issuer_changed = **self.issuer.load() != issuer;
        let gone = old.gone_in(&jwks);
        let unnamed = old.unnamed_published != jwks.unnamed_published;
        self.issuer.store(Arc::new(issuer.to_string()));
        self.jwks.store(Arc::new(jwks));
        self.loaded.store(true, Ordering::Release);
        Ok(if issuer_changed {
            Some(KeyChange::Issuer)
        } else if !gone.is_empty() || unnamed {
            Some(KeyChange::Keys { gone, unnamed })
        } else {
            None
        })
    }
}

fn persist(dir: &std::path::Path, keys: &PersistedKeys) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Public by nature (the apiserver serves it to anyone it authenticates).
    crate::files::write_public(
        &dir.join(PERSIST_FILE),
        &serde_json::to_vec(keys).unwrap_or_default(),
    )
}

/// Which keys can check which signatures: RSA (PKCS#1 and PSS) or elliptic curve.
fn family(alg: Algorithm) -> u8 {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => 1,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_names_only_the_keys_that_left_or_changed() {
        let a = crate::exchange::keys::SigningKey::generate(2048).unwrap();
        let b = crate::exchange::keys::SigningKey::generate(2048).unwrap();
        let c = crate::exchange::keys::SigningKey::generate(2048).unwrap();
        let set = |keys: &[(&str, &crate::exchange::keys::SigningKey)]| {
            let keys: Vec<serde_json::Value> = keys
                .iter()
                .map(|(kid, k)| {
                    let mut jwk = k.public().jwk();
                    jwk["kid"] = serde_json::json!(kid);
                    jwk
                })
                .collect();
            Jwks::parse(&serde_json::json!({ "keys": keys }).to_string()).unwrap()
        };
        let before = set(&[("a", &a), ("b", &b)]);
        assert!(before.gone_in(&set(&[("a", &a), ("b", &b)])).is_empty());
        assert!(before
            .gone_in(&set(&[("a", &a), ("b", &b), ("c", &c)]))
            .is_empty());
        let gone = before.gone_in(&set(&[("b", &b), ("c", &c)]));
        assert_eq!(gone.into_iter().collect::<Vec<_>>(), vec!["a".to_string()]);
        // The same kid with other key material is a key that left.
        let gone = before.gone_in(&set(&[("a", &c), ("b", &b)]));
        assert_eq!(gone.into_iter().collect::<Vec<_>>(), vec!["a".to_string()]);
    }

    /// A cluster at an address nobody serves: the keys' own logic needs no apiserver.
    async fn unreachable_cluster(dir: &std::path::Path) -> Arc<Cluster> {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n\
             contexts: [{name: c, context: {cluster: c, user: u}}]\n\
             users: [{name: u, user: {token: t}}]\n",
        )
        .unwrap();
        let timeout = crate::cluster::DEFAULT_WATCH_TIMEOUT;
        Arc::new(Cluster::connect(Some(&kubeconfig), timeout).await.unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kids_refresh_the_keys_at_most_every_ten_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ClusterKeys::new(unreachable_cluster(dir.path()).await, None);
        assert!(
            keys.refresh_allowed_for_unknown_kid().await,
            "never refreshed"
        );
        // What a refresh records when it starts, whether or not the apiserver answers.
        *keys.last_refresh.lock().await = Some(Instant::now());
        assert!(!keys.refresh_allowed_for_unknown_kid().await);
        tokio::time::advance(UNKNOWN_KID_REFRESH_INTERVAL - Duration::from_millis(1)).await;
        assert!(!keys.refresh_allowed_for_unknown_kid().await);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(keys.refresh_allowed_for_unknown_kid().await);
    }

    #[test]
    fn persisted_keys_are_loaded_back_and_replaced_whole() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cluster = rt.block_on(unreachable_cluster(dir.path()));
        let state = dir.path().join("state");
        let key = crate::exchange::keys::SigningKey::generate(2048).unwrap();
        let jwks = serde_json::json!({ "keys": [key.public().jwk()] }).to_string();
        let persisted = PersistedKeys {
            issuer: "https://kubernetes.default.svc".into(),
            jwks,
        };
        persist(&state, &persisted).unwrap();
        // Replacing leaves no temporary file behind.
        persist(&state, &persisted).unwrap();
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![PERSIST_FILE]);

        let keys = ClusterKeys::new(cluster, Some(state));
        assert!(!keys.loaded());
        let mut changes = 0;
        assert!(keys.load_persisted(|_| changes += 1));
        assert!(keys.loaded());
        assert_eq!(changes, 1, "a first issuer is a change of issuer");
        assert_eq!(*keys.issuer(), "https://kubernetes.default.svc");
        assert!(keys
            .find(Some(key.kid()), jsonwebtoken::Algorithm::RS256)
            .is_some());
    }

    #[test]
    fn jwks_ignores_symmetric_keys() {
        let text = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(Jwks::parse(text).is_err());
    }
}
