//! The proxy's own identity towards Entra. For each bound managed identity we sign an
//! assertion (RS256, `kid` in the header) that matches the ONE federated identity credential on
//! that identity: issuer = the identity's issuer URL, subject = the binding's subject, audience
//! `api://AzureADTokenExchange`. The same FIC serves every cluster whose key is published in the
//! issuer's JWKS. Also here: the `issuer` subcommands — the cluster's key pair (`keygen`), the
//! static issuer documents (`publish`) and the `az` lines that create the FICs (`fic`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use crate::exchange::bindings::Binding;
use crate::exchange::keys::SigningKey;
use crate::request::error::ProxyError;
use crate::startup::StartError;

/// The audience Entra requires on federated assertions.
pub const FIC_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Lifetime of our assertions (Entra accepts up to 1 hour; short limits the value of a leak).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);
/// Re-sign when less than this is left, so an assertion never expires in flight to Entra.
const ASSERTION_MIN_REMAINING: Duration = Duration::from_secs(120);
/// How long a signed assertion is handed out again: until [`ASSERTION_MIN_REMAINING`] before
/// its `exp`. Every assertion lives as long, so one cache-wide time-to-live is that rule.
const ASSERTION_REUSE: Duration = ASSERTION_LIFETIME.saturating_sub(ASSERTION_MIN_REMAINING);

/// An issuer URL, or a template of one with `{tenant}` and `{client_id}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerUrl(String);

impl IssuerUrl {
    pub fn parse(s: &str) -> Result<Self, StartError> {
        let probe = s.replace("{tenant}", "t").replace("{client_id}", "c");
        let url = url::Url::parse(&probe)
            .map_err(|e| StartError::usage(format!("issuer URL '{s}' is not a URL: {e}")))?;
        if url.scheme() != "https"
            && !(url.scheme() == "http" && crate::http::client::is_loopback(&url))
        {
            return Err(StartError::usage(format!(
                "issuer URL '{s}' must be https (Entra fetches the issuer documents over https)"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(StartError::usage(format!(
                "issuer URL '{s}' must not have a query, fragment or user-info"
            )));
        }
        if probe.contains(['{', '}']) {
            return Err(StartError::usage(format!(
                "issuer URL '{s}' has an unknown placeholder: only {{tenant}} and {{client_id}}"
            )));
        }
        Ok(Self(s.trim_end_matches('/').to_string()))
    }

    /// The issuer URL of one identity.
    pub fn for_binding(&self, b: &Binding) -> String {
        self.0
            .replace("{tenant}", &b.tenant_id)
            .replace("{client_id}", &b.client_id)
    }

    pub fn template(&self) -> &str {
        &self.0
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'static str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

/// Signs and caches our assertions, one per (tenant, client-id).
pub struct Issuer {
    /// Loaded keys; the last one is the newest and signs. The others stay loaded so a
    /// rotation is visible in logs; they are published, not used, during the overlap.
    keys: ArcSwap<Vec<SigningKey>>,
    /// Where the keys come from (empty for in-memory keys); re-read when they change.
    files: Vec<PathBuf>,
    url: IssuerUrl,
    /// Per (tenant, client-id): the assertion and the `kid` that signed it, each dropped when
    /// its reuse time is over.
    assertions: moka::sync::Cache<(String, String), (Arc<str>, Arc<str>)>,
    /// With key activation on (see [`crate::exchange::activation`]): the `kid` chosen to sign, once
    /// known. Off, the newest key signs at once.
    activation: Option<ArcSwapOption<String>>,
}

impl Issuer {
    pub fn new(keys: Vec<SigningKey>, url: IssuerUrl) -> Result<Self, StartError> {
        Self::reusing_for(keys, url, ASSERTION_REUSE)
    }

    fn reusing_for(
        keys: Vec<SigningKey>,
        url: IssuerUrl,
        reuse: Duration,
    ) -> Result<Self, StartError> {
        if keys.is_empty() {
            return Err(StartError::usage(
                "at least one issuer key is needed (--issuer-key)",
            ));
        }
        Ok(Self {
            keys: ArcSwap::from_pointee(keys),
            files: Vec::new(),
            url,
            // No capacity bound: one entry per identity in the bindings.
            assertions: moka::sync::Cache::builder().time_to_live(reuse).build(),
            activation: None,
        })
    }

    /// Turns key activation on: a key signs only once [`crate::exchange::activation`] chose it. Until the
    /// first choice the first key loaded (the previous one, in a rotation) signs.
    pub fn with_activation(mut self) -> Self {
        self.activation = Some(ArcSwapOption::empty());
        self
    }

    /// The `kid`s of the loaded keys, oldest first (the order of `--issuer-key`).
    pub fn loaded_kids(&self) -> Vec<String> {
        self.keys
            .load()
            .iter()
            .map(|k| k.kid().to_string())
            .collect()
    }

    /// Makes `kid` the signing key (when it is loaded; else the default applies).
    pub fn choose_signer(&self, kid: &str) {
        if let Some(chosen) = &self.activation {
            chosen.store(Some(Arc::new(kid.to_string())));
        }
    }

    /// The key that signs now: the chosen one when activation is on and it is loaded, else
    /// the first loaded key with activation on, the newest without.
    fn signer<'k>(&self, keys: &'k [SigningKey]) -> Option<&'k SigningKey> {
        match &self.activation {
            None => keys.last(),
            Some(chosen) => {
                let chosen = chosen.load();
                chosen
                    .as_deref()
                    .and_then(|kid| keys.iter().find(|k| k.kid() == kid.as_str()))
                    .or_else(|| keys.first())
            }
        }
    }

    /// Loads the keys from PEM files (the last file's key signs); see [`Issuer::watch`].
    pub fn from_files(files: &[PathBuf], url: IssuerUrl) -> Result<Self, StartError> {
        let mut issuer = Self::new(load_keys(files)?, url)?;
        issuer.files = files.to_vec();
        Ok(issuer)
    }

    /// The `kid` of the key that signs new assertions.
    pub fn signing_kid(&self) -> String {
        let keys = self.keys.load();
        self.signer(&keys)
            .map(|k| k.kid().to_string())
            .unwrap_or_default()
    }

    pub fn url(&self) -> &IssuerUrl {
        &self.url
    }

    /// An assertion for `binding`, reused until 2 minutes before it expires or until the
    /// signing key changes.
    pub fn assertion(&self, binding: &Binding) -> Result<Arc<str>, ProxyError> {
        let keys = self.keys.load();
        let signer = self
            .signer(&keys)
            .ok_or_else(|| ProxyError::Internal("no issuer key loaded".into()))?;
        let key = (binding.tenant_id.clone(), binding.client_id.clone());
        if let Some((jwt, kid)) = self.assertions.get(&key) {
            if &*kid == signer.kid() {
                return Ok(jwt);
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let iss = self.url.for_binding(binding);
        let claims = AssertionClaims {
            iss: &iss,
            sub: &binding.subject,
            aud: FIC_AUDIENCE,
            iat: now,
            nbf: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let jwt: Arc<str> = signer
            .sign(&claims)
            .map_err(|e| ProxyError::Internal(format!("signing our assertion failed: {e}")))?
            .into();
        self.assertions
            .insert(key, (jwt.clone(), signer.kid().into()));
        Ok(jwt)
    }

    /// Re-reads the key files when they change (a mounted Secret is updated by a symlink
    /// swap; a poll of the contents sees every kind of update). A file that fails to load
    /// keeps the previous keys in service.
    pub fn watch(
        self: Arc<Self>,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        crate::files::watch_contents(self.files.clone(), period, stop, move || {
            match load_keys(&self.files) {
                Ok(keys) => {
                    let kids: Vec<String> = keys.iter().map(|k| k.kid().to_string()).collect();
                    self.keys.store(Arc::new(keys));
                    tracing::info!(?kids, signing = %self.signing_kid(), "issuer keys reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "issuer keys not reloaded; the previous keys keep signing")
                }
            }
        })
    }
}

fn load_keys(files: &[PathBuf]) -> Result<Vec<SigningKey>, StartError> {
    files
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                StartError::usage(format!("cannot read issuer key {}: {e}", path.display()))
            })?;
            SigningKey::from_pem(&pem)
                .map_err(|e| StartError::usage(format!("issuer key {}: {e}", path.display())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            subject: "shared-subject".into(),
        }
    }

    #[test]
    fn template_expands_per_identity() {
        let url = IssuerUrl::parse("https://issuer.example.com/{tenant}/{client_id}/").unwrap();
        assert_eq!(
            url.for_binding(&binding()),
            "https://issuer.example.com/72f988bf-86f1-41af-91ab-2d7cd011db47/11111111-2222-3333-4444-555555555555"
        );
        assert!(IssuerUrl::parse("http://issuer.example.com/x").is_err());
        assert!(IssuerUrl::parse("http://127.0.0.1:8080/{tenant}").is_ok());
        assert!(IssuerUrl::parse("https://x/{other}").is_err());
        assert!(IssuerUrl::parse("https://x/?a=b").is_err());
    }

    #[test]
    fn assertion_matches_the_fic_and_is_reused() {
        let key = SigningKey::generate(2048).unwrap();
        let kid = key.kid().to_string();
        let issuer = Issuer::new(
            vec![key],
            IssuerUrl::parse("https://i.example/{tenant}/{client_id}").unwrap(),
        )
        .unwrap();
        let a = issuer.assertion(&binding()).unwrap();
        let b = issuer.assertion(&binding()).unwrap();
        assert_eq!(a, b);
        let header = jsonwebtoken::decode_header(&*a).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        let payload = a.split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], FIC_AUDIENCE);
        assert_eq!(claims["sub"], "shared-subject");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            600
        );
    }

    #[test]
    fn newest_key_signs() {
        let old = SigningKey::generate(2048).unwrap();
        let new = SigningKey::generate(2048).unwrap();
        let new_kid = new.kid().to_string();
        let issuer = Issuer::new(
            vec![old, new],
            IssuerUrl::parse("https://i.example/x").unwrap(),
        )
        .unwrap();
        let a = issuer.assertion(&binding()).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&*a).unwrap().kid.unwrap(),
            new_kid
        );
    }

    #[test]
    fn with_activation_the_chosen_key_signs_and_the_first_until_one_is_chosen() {
        let old = SigningKey::generate(2048).unwrap();
        let new = SigningKey::generate(2048).unwrap();
        let (old_kid, new_kid) = (old.kid().to_string(), new.kid().to_string());
        let issuer = Issuer::new(
            vec![old, new],
            IssuerUrl::parse("https://i.example/x").unwrap(),
        )
        .unwrap()
        .with_activation();
        let kid_of = |jwt: &str| jsonwebtoken::decode_header(jwt).unwrap().kid.unwrap();
        let first = issuer.assertion(&binding()).unwrap();
        assert_eq!(
            kid_of(&first),
            old_kid,
            "the previous key signs until one is chosen"
        );
        issuer.choose_signer(&new_kid);
        assert_eq!(issuer.signing_kid(), new_kid);
        let second = issuer.assertion(&binding()).unwrap();
        assert_eq!(
            kid_of(&second),
            new_kid,
            "re-signed at once with the chosen key"
        );
        issuer.choose_signer("not-loaded");
        assert_eq!(issuer.signing_kid(), old_kid, "a kid not loaded falls back");
    }

    // Real time: the assertions' cache keeps its own clock, which a paused tokio clock does
    // not move; a short reuse time stands in for the 8 minutes.
    #[test]
    fn an_assertion_is_signed_anew_once_its_reuse_time_is_over() {
        let issuer = Issuer::reusing_for(
            vec![SigningKey::generate(2048).unwrap()],
            IssuerUrl::parse("https://i.example/x").unwrap(),
            Duration::from_millis(200),
        )
        .unwrap();
        let first = issuer.assertion(&binding()).unwrap();
        assert_eq!(issuer.assertion(&binding()).unwrap(), first);
        std::thread::sleep(Duration::from_millis(400));
        let second = issuer.assertion(&binding()).unwrap();
        assert_ne!(
            second, first,
            "an assertion past its reuse time is not handed out"
        );
        assert_eq!(issuer.assertion(&binding()).unwrap(), second);
    }

    #[tokio::test(start_paused = true)]
    async fn rotated_key_files_sign_the_next_assertion() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            SigningKey::generate(2048).unwrap(),
            SigningKey::generate(2048).unwrap(),
        );
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&a, old.private_pem()).unwrap();
        std::fs::write(&b, old.private_pem()).unwrap();
        let issuer = Arc::new(
            Issuer::from_files(
                &[a, b.clone()],
                IssuerUrl::parse("https://i.example/x").unwrap(),
            )
            .unwrap(),
        );
        let first = issuer.assertion(&binding()).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(
            issuer
                .clone()
                .watch(Duration::from_millis(20), stop.clone()),
        );
        // The watcher took its first look when `watch` was called, before the file changes.
        std::fs::write(&b, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            issuer.assertion(&binding()).unwrap(),
            first,
            "a broken file keeps the old key"
        );
        std::fs::write(&b, new.private_pem()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = issuer.assertion(&binding()).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&*second).unwrap().kid.unwrap(),
            new.kid()
        );
        stop.cancel();
    }
}
