//! The proxy's own identity towards Entra. For each bound managed identity we sign an
//! assertion (RS256, `kid` in the header) that matches the ONE federated identity credential on
//! that identity: issuer = the identity's issuer URL, subject = the binding's subject, audience
//! `api://AzureADTokenExchange`. The same FIC serves every cluster whose key is published in the
//! issuer's JWKS. Also here: the `issuer` subcommands — the cluster's key pair (`keygen`), the
//! static issuer documents (`publish`) and the `az` lines that create the FICs (`fic`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use crate::bindings::{Binding, BindingSet};
use crate::cli::IssuerCommand;
use crate::error::ProxyError;
use crate::fleet::Fleet;
use crate::keys::{RsaPublicKey, SigningKey};

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
    pub fn parse(s: &str) -> Result<Self, String> {
        let probe = s.replace("{tenant}", "t").replace("{client_id}", "c");
        let url =
            url::Url::parse(&probe).map_err(|e| format!("issuer URL '{s}' is not a URL: {e}"))?;
        if url.scheme() != "https" && !(url.scheme() == "http" && crate::http::is_loopback(&url)) {
            return Err(format!(
                "issuer URL '{s}' must be https (Entra fetches the issuer documents over https)"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
            return Err(format!(
                "issuer URL '{s}' must not have a query, fragment or user-info"
            ));
        }
        if probe.contains(['{', '}']) {
            return Err(format!(
                "issuer URL '{s}' has an unknown placeholder: only {{tenant}} and {{client_id}}"
            ));
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
    /// With key activation on (see [`crate::activation`]): the `kid` chosen to sign, once
    /// known. Off, the newest key signs at once.
    activation: Option<ArcSwapOption<String>>,
}

impl Issuer {
    pub fn new(keys: Vec<SigningKey>, url: IssuerUrl) -> Result<Self, String> {
        Self::reusing_for(keys, url, ASSERTION_REUSE)
    }

    fn reusing_for(keys: Vec<SigningKey>, url: IssuerUrl, reuse: Duration) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("at least one issuer key is needed (--issuer-key)".into());
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

    /// Turns key activation on: a key signs only once [`crate::activation`] chose it. Until the
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
    pub fn from_files(files: &[PathBuf], url: IssuerUrl) -> Result<Self, String> {
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

fn load_keys(files: &[PathBuf]) -> Result<Vec<SigningKey>, String> {
    files
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read issuer key {}: {e}", path.display()))?;
            SigningKey::from_pem(&pem).map_err(|e| format!("issuer key {}: {e}", path.display()))
        })
        .collect()
}

/// The OIDC discovery document of one issuer URL.
pub fn discovery_document(issuer: &str) -> serde_json::Value {
    serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}

/// The JWKS holding every cluster's public key. Built from public keys only: a private
/// exponent cannot reach it.
pub fn jwks_document(keys: &[RsaPublicKey]) -> serde_json::Value {
    serde_json::json!({ "keys": keys.iter().map(RsaPublicKey::jwk).collect::<Vec<_>>() })
}

/// Writes the discovery document and JWKS of every issuer URL the bindings use, laid out as
/// a static HTTPS host serves them: `<out>/<issuer path>/.well-known/openid-configuration` and
/// `<out>/<issuer path>/openid/v1/jwks`. Every identity's JWKS holds every key given, so each
/// key can mint for every identity; [`publish_fleet`] gives each identity only its clusters'
/// keys. Returns the files written.
pub fn publish(
    out: &Path,
    keys: &[RsaPublicKey],
    bindings: &BindingSet,
    url: &IssuerUrl,
) -> Result<Vec<PathBuf>, String> {
    if keys.is_empty() {
        return Err("no public keys to publish (--public-key)".into());
    }
    let jwks = public_jwks(keys)?;
    let mut issuers: Vec<String> = bindings.iter().map(|b| url.for_binding(b)).collect();
    if !url.template().contains('{') {
        issuers.push(url.template().to_string());
    }
    issuers.sort();
    issuers.dedup();
    let mut written = Vec::new();
    for issuer in issuers {
        written.extend(write_issuer(out, &issuer, &jwks)?);
    }
    Ok(written)
}

/// Like [`publish`], but each identity's JWKS holds only the keys of the clusters of `fleet`
/// that bind it: a cluster's key mints for its own identities only. Needs one issuer path per
/// identity (`{client_id}` in the URL).
pub fn publish_fleet(out: &Path, fleet: &Fleet, url: &IssuerUrl) -> Result<Vec<PathBuf>, String> {
    if !url.template().contains("{client_id}") {
        return Err(format!(
            "issuer URL '{}' has no {{client_id}}: per-identity key sets need one issuer path \
             per identity, e.g. https://issuer.example.com/{{tenant}}/{{client_id}}",
            url.template()
        ));
    }
    let mut written = Vec::new();
    for identity in fleet.identities()? {
        let jwks = public_jwks(&identity.keys)?;
        written.extend(write_issuer(
            out,
            &url.for_binding(&identity.binding),
            &jwks,
        )?);
    }
    Ok(written)
}

/// The JWKS of `keys`, checked to hold no private material.
fn public_jwks(keys: &[RsaPublicKey]) -> Result<Vec<u8>, String> {
    let jwks = serde_json::to_vec_pretty(&jwks_document(keys)).map_err(|e| e.to_string())?;
    if contains_private_material(&jwks) {
        return Err("refusing to publish: the JWKS would contain private key material".into());
    }
    Ok(jwks)
}

/// Writes one issuer's discovery document and JWKS under its URL's path.
fn write_issuer(out: &Path, issuer: &str, jwks: &[u8]) -> Result<Vec<PathBuf>, String> {
    let parsed = url::Url::parse(issuer).map_err(|e| format!("{issuer}: {e}"))?;
    let mut dir = out.to_path_buf();
    for seg in parsed
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        if seg == ".." || seg == "." {
            return Err(format!("issuer URL {issuer} has a '..' path segment"));
        }
        dir.push(seg);
    }
    let discovery =
        serde_json::to_vec_pretty(&discovery_document(issuer)).map_err(|e| e.to_string())?;
    let mut written = Vec::new();
    for (rel, body) in [
        (".well-known/openid-configuration", &discovery[..]),
        ("openid/v1/jwks", jwks),
    ] {
        let file = dir.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // Replaced whole: a host serving this directory never hands out half a JWKS while it
        // is being republished.
        crate::files::write_public(&file, body).map_err(|e| e.to_string())?;
        written.push(file);
    }
    Ok(written)
}

fn contains_private_material(jwks: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(jwks) else {
        return true;
    };
    v["keys"].as_array().is_none_or(|keys| {
        keys.iter().any(|k| {
            ["d", "p", "q", "dp", "dq", "qi", "k"]
                .iter()
                .any(|f| k.get(f).is_some())
        })
    })
}

/// The `az` command creating the FIC of each binding.
pub fn fic_commands(bindings: &BindingSet, url: &IssuerUrl) -> Vec<String> {
    bindings
        .iter()
        .map(|b| {
            format!(
                "# managed identity {client} (tenant {tenant})\n\
                 az identity federated-credential create --name identity-binding-proxy \
                 --identity-name \"$IDENTITY_NAME\" --resource-group \"$RESOURCE_GROUP\" \
                 --issuer '{issuer}' --subject '{subject}' --audiences '{FIC_AUDIENCE}'",
                client = b.client_id,
                tenant = b.tenant_id,
                issuer = url.for_binding(b),
                subject = b.subject,
            )
        })
        .collect()
}

/// What `issuer publish` without `--fleet` says on stderr, once.
pub const SHARED_KEYS_WARNING: &str = "warning: every --public-key is published for every \
     identity, so any one cluster's key can mint tokens for identities only other clusters bind; \
     publish with --fleet to give each identity only the keys of the clusters that bind it";

/// `issuer keygen | publish | fic`. The error is one line for the operator: what is wrong
/// with which flag or file.
pub fn run(cmd: IssuerCommand) -> Result<(), String> {
    match cmd {
        IssuerCommand::Keygen(a) => keygen(&a.out, a.bits),
        IssuerCommand::Publish(a) => {
            let url = IssuerUrl::parse(&a.issuer_url)?;
            let written = match (&a.fleet, &a.bindings) {
                (Some(fleet), _) => publish_fleet(&a.out, &crate::fleet::load(fleet)?, &url)?,
                (None, Some(bindings)) => {
                    let set = crate::bindings::load(bindings)?;
                    let publics = a
                        .public_keys
                        .iter()
                        .map(|p| {
                            let pem = std::fs::read_to_string(p);
                            let pem = pem.map_err(|e| format!("{}: {e}", p.display()))?;
                            RsaPublicKey::from_pem(&pem)
                                .map_err(|e| format!("{}: {e}", p.display()))
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    let written = publish(&a.out, &publics, &set, &url)?;
                    eprintln!("{SHARED_KEYS_WARNING}");
                    written
                }
                (None, None) => return Err("--fleet or --bindings is required".into()),
            };
            for f in written {
                println!("{}", f.display());
            }
            Ok(())
        }
        IssuerCommand::Fic(a) => {
            let url = IssuerUrl::parse(&a.issuer_url)?;
            let set = crate::bindings::load(&a.bindings)?;
            for line in fic_commands(&set, &url) {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// A new key pair: `out` (private, 0600) and `out.pub`. A key is never overwritten, not even
/// by a second `keygen` racing this one: the one it would replace may already be published.
fn keygen(out: &Path, bits: usize) -> Result<(), String> {
    let public = out.with_extension("pub");
    let exists = |path: &Path| {
        format!(
            "{} exists already: remove it first or choose another --out",
            path.display()
        )
    };
    // Early, before the key is generated; `create` below is what guarantees it.
    if let Some(taken) = [out, &public].into_iter().find(|p| p.exists()) {
        return Err(exists(taken));
    }
    let key = SigningKey::generate(bits).map_err(|e| e.to_string())?;
    use crate::files::{create, PRIVATE, PUBLIC};
    create(out, key.private_pem().as_bytes(), PRIVATE).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => exists(out),
        _ => e.to_string(),
    })?;
    create(&public, key.public().to_pem().as_bytes(), PUBLIC).map_err(|e| e.to_string())?;
    println!(
        "kid {}\nprivate key {} (0600)\npublic key  {}",
        key.kid(),
        out.display(),
        public.display()
    );
    Ok(())
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

    #[test]
    fn publish_writes_public_documents_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(2048).unwrap();
        let set = BindingSet::parse(
            "- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: t.example\n",
        )
        .unwrap();
        let url = IssuerUrl::parse("https://i.example/{tenant}/{client_id}").unwrap();
        let files = publish(dir.path(), &[key.public().clone()], &set, &url).unwrap();
        assert_eq!(files.len(), 2);
        let jwks = std::fs::read_to_string(
            dir.path()
                .join("t.example/11111111-2222-3333-4444-555555555555/openid/v1/jwks"),
        )
        .unwrap();
        assert!(jwks.contains(key.kid()));
        assert!(!jwks.contains("\"d\""));
        let disc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(
                "t.example/11111111-2222-3333-4444-555555555555/.well-known/openid-configuration",
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            disc["issuer"],
            "https://i.example/t.example/11111111-2222-3333-4444-555555555555"
        );
        assert!(contains_private_material(
            br#"{"keys":[{"kty":"RSA","d":"x"}]}"#
        ));
    }

    #[test]
    fn publish_fleet_gives_each_identity_only_the_keys_of_its_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            SigningKey::generate(2048).unwrap(),
            SigningKey::generate(2048).unwrap(),
        );
        let (only_a, both) = (
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
        );
        let cluster = |name: &str, key: &SigningKey, clients: &[&str]| crate::fleet::FleetCluster {
            name: name.into(),
            keys: vec![key.public().clone()],
            bindings: BindingSet::parse(
                &clients
                    .iter()
                    .map(|c| format!("- clientId: {c}\n  tenantId: t.example\n"))
                    .collect::<String>(),
            )
            .unwrap(),
        };
        let fleet = Fleet {
            clusters: vec![cluster("a", &a, &[only_a, both]), cluster("b", &b, &[both])],
        };
        let url = IssuerUrl::parse("https://i.example/{tenant}/{client_id}").unwrap();
        let files = publish_fleet(&dir.path().join("site"), &fleet, &url).unwrap();
        assert_eq!(files.len(), 4);
        let kids = |client: &str| -> Vec<String> {
            let path = dir
                .path()
                .join(format!("site/t.example/{client}/openid/v1/jwks"));
            let jwks: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(kids(only_a), [a.kid()], "bound only in a: a's key only");
        assert_eq!(kids(both), [a.kid(), b.kid()], "bound in both: both keys");

        // One issuer path for every identity cannot hold per-identity key sets.
        for shared in ["https://i.example/shared", "https://i.example/{tenant}"] {
            let e = publish_fleet(
                &dir.path().join("refused"),
                &fleet,
                &IssuerUrl::parse(shared).unwrap(),
            )
            .unwrap_err();
            assert!(e.contains("has no {client_id}"), "{e}");
        }
        assert!(!dir.path().join("refused").exists());
    }
}
