//! A Microsoft Entra ID token endpoint emulator for the client-credentials grant with a JWT
//! client assertion matched against federated identity credentials (FICs).
//!
//! The proxy presents Entra an assertion signed by its own issuer key. To test that path
//! without a tenant, this emulator does what Entra does with such an assertion: it fetches the
//! assertion issuer's OIDC discovery document and JWKS over HTTP, verifies the signature,
//! matches issuer, subject and audience against the FICs registered for the client, and answers
//! with Entra's own error codes, statuses and description shapes when something is wrong. On
//! success it issues a v1-shaped app-only access token signed by a key it generates at start,
//! published through the tenant's discovery document so tests can verify what they got.
//!
//! Plain HTTP on loopback only. Faults (error statuses, stalls, garbage) can be scripted per
//! token call, and `/_emulator/*` control endpoints expose the same knobs to tests that run the
//! emulator as a separate process (`emulate entra`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use identity_binding_proxy::exchange::keys::SigningKey;
use identity_binding_proxy::http::client::HttpClient;
use identity_binding_proxy::http::response::{json_value, Body};
use identity_binding_proxy::request::oauth::ErrorBody;

/// The audience Entra suggests for FICs, and the default when none is given.
pub const DEFAULT_FIC_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Entra refuses a 21st federated identity credential on one application or managed identity.
pub const MAX_FICS_PER_IDENTITY: usize = 20;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Clock skew tolerated on the assertion's `exp`, `nbf` and `iat`. Entra does not publish its
/// own; a small one keeps "expired assertion" tests quick and still absorbs test-host jitter.
const ASSERTION_LEEWAY_SECS: i64 = 60;

/// Time allowed for each fetch of the assertion issuer's discovery document or JWKS.
const ISSUER_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Larger token requests than this are refused; real ones are a few kilobytes.
const MAX_FORM_BYTES: usize = 64 * 1024;

const WFI_DOC: &str = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation";

/// How long Entra reuses an assertion issuer's discovery document and JWKS. Microsoft does
/// not publish the figure; keys published moments ago are refused for minutes (AADSTS7000272,
/// e.g. Azure/azure-workload-identity#1232), so the default is five minutes.
pub const DEFAULT_ISSUER_METADATA_TTL: Duration = Duration::from_secs(300);

/// How long a FIC change takes to apply. Microsoft's AKS workload identity guide: "It takes a
/// few seconds for the federated identity credential to propagate after it's initially added.
/// If a token request is made immediately after adding the federated identity credential, the
/// request might fail until the cache is refreshed"
/// (https://learn.microsoft.com/azure/aks/workload-identity-deploy-cluster); in practice it
/// runs to minutes, so the default is one.
pub const DEFAULT_FIC_PROPAGATION: Duration = Duration::from_secs(60);

/// The longest assertion lifetime Entra accepts: `1.01:00:00` in its AADSTS70023 answer.
const MAX_ASSERTION_LIFETIME_SECS: i64 = 25 * 3600;

/// How the emulator starts.
#[derive(Clone, Debug)]
pub struct EntraEmulatorConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port (see [`EntraEmulator::url`]).
    pub listen: SocketAddr,
    /// `expires_in` (and `ext_expires_in`) of issued tokens; Entra's usual answer is 3599 s.
    /// Like Entra's client-credentials answers (1 h and 24 h tokens alike), the answer has no
    /// `refresh_in`: the proxy refreshes at half the lifetime on its own.
    pub token_lifetime: Duration,
    /// Added to every token call before it is answered.
    pub latency: Duration,
    /// Registered at start, with the same checks as [`EntraEmulator::add_fic`].
    pub fics: Vec<Fic>,
    /// How long an assertion issuer's discovery document and JWKS are reused, as Entra does
    /// ([`DEFAULT_ISSUER_METADATA_TTL`]). Within it an assertion signed by a key the cached JWKS
    /// lacks is refused with AADSTS7000272 without a fetch; a removed key keeps verifying.
    /// Zero fetches them for every exchange (tests that need a key change to act at once).
    pub issuer_metadata_ttl: Duration,
    /// How long a FIC added or removed at run time takes to apply ([`DEFAULT_FIC_PROPAGATION`]):
    /// a new one answers AADSTS70021 meanwhile, a removed one keeps matching. FICs given at
    /// start are in effect at once. Zero applies changes at once.
    pub fic_propagation: Duration,
    /// The shape of error bodies; Entra's varies (see [`BodyStyle`]).
    pub body_style: BodyStyle,
}

/// How Entra's error bodies look. Both shapes are recorded from real answers: the
/// `error_uri` field is present in most (Azure/azure-workload-identity#1232, 2024) and absent
/// in others (a 700211 answer recorded in gravitational/teleport's Azure plugin tests,
/// 2024-07-04); older descriptions separate the trace lines with `\r\n` instead of a space
/// (Azure/azure-workload-identity#616, 2022).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyStyle {
    pub error_uri: bool,
    pub crlf_lines: bool,
}

impl Default for BodyStyle {
    fn default() -> Self {
        Self {
            error_uri: true,
            crlf_lines: false,
        }
    }
}

impl Default for EntraEmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_lifetime: Duration::from_secs(3599),
            latency: Duration::ZERO,
            fics: Vec::new(),
            issuer_metadata_ttl: DEFAULT_ISSUER_METADATA_TTL,
            fic_propagation: DEFAULT_FIC_PROPAGATION,
            body_style: BodyStyle::default(),
        }
    }
}

/// A federated identity credential: `client_id` trusts tokens from `issuer` about `subject`
/// presented for `audience`. Matching is exact and case-sensitive, as Entra's is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fic {
    pub client_id: String,
    pub issuer: String,
    pub subject: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Unique per identity. Left empty, the emulator names the credential itself.
    #[serde(default)]
    pub name: String,
}

fn default_audience() -> String {
    DEFAULT_FIC_AUDIENCE.to_string()
}

/// Why a `key=value,...` FIC could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FicParseError {
    #[error("federated identity credential is missing `{0}=`: expected client_id=..,issuer=..,subject=..[,audience=..][,name=..]")]
    MissingKey(&'static str),
    #[error("unknown key `{0}` in federated identity credential: expected client_id, issuer, subject, audience or name")]
    UnknownKey(String),
    #[error("`{0}` appears twice in the federated identity credential")]
    DuplicateKey(String),
    #[error("`{0}` is not key=value in the federated identity credential")]
    NotKeyValue(String),
    #[error("`{0}` is empty in the federated identity credential")]
    Empty(String),
}

impl FromStr for Fic {
    type Err = FicParseError;

    /// `client_id=..,issuer=..,subject=..[,audience=..][,name=..]`. Values may hold `:`, `/`
    /// and `=` (URLs, `system:serviceaccount:ns:sa`) but not `,`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| FicParseError::NotKeyValue(part.to_string()))?;
            let key = key.trim();
            if !matches!(
                key,
                "client_id" | "issuer" | "subject" | "audience" | "name"
            ) {
                return Err(FicParseError::UnknownKey(key.to_string()));
            }
            if fields.insert(key, value.trim()).is_some() {
                return Err(FicParseError::DuplicateKey(key.to_string()));
            }
        }
        let required = |key: &'static str| -> Result<String, FicParseError> {
            match fields.get(key).copied() {
                None => Err(FicParseError::MissingKey(key)),
                Some("") => Err(FicParseError::Empty(key.to_string())),
                Some(v) => Ok(v.to_string()),
            }
        };
        let audience = match fields.get("audience") {
            None => DEFAULT_FIC_AUDIENCE.to_string(),
            Some(_) => required("audience")?,
        };
        Ok(Fic {
            client_id: required("client_id")?,
            issuer: required("issuer")?,
            subject: required("subject")?,
            audience,
            name: fields
                .get("name")
                .map(|v| v.to_string())
                .unwrap_or_default(),
        })
    }
}

impl std::fmt::Display for Fic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client_id={},issuer={},subject={},audience={}",
            self.client_id, self.issuer, self.subject, self.audience
        )?;
        if !self.name.is_empty() {
            write!(f, ",name={}", self.name)?;
        }
        Ok(())
    }
}

/// Why a FIC was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FicError {
    #[error("identity {client_id} already has {limit} federated identity credentials, the most Entra allows on one application or managed identity")]
    LimitReached { client_id: String, limit: usize },
    #[error("identity {client_id} already has a federated identity credential for issuer {issuer} and subject {subject}; Entra allows one per issuer and subject")]
    Duplicate {
        client_id: String,
        issuer: String,
        subject: String,
    },
    #[error("identity {client_id} already has a federated identity credential named {name}")]
    DuplicateName { client_id: String, name: String },
    #[error("the federated identity credential has an empty {0}")]
    Empty(&'static str),
}

/// What the emulator has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntraStats {
    /// Every POST to a token endpoint, faulted and refused ones included.
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub issued_per_client: BTreeMap<String, u64>,
    /// Discovery documents requested from assertion issuers (each is followed by a JWKS fetch
    /// when it succeeds).
    pub issuer_metadata_fetches: u64,
}

/// A scripted misbehaviour, consumed by one token call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an Entra-shaped error body, plus `Retry-After` if given.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Wait this long, then answer normally.
    Stall(Duration),
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer exactly this status and JSON body (e.g. a token with an absurd lifetime).
    Answer { status: u16, body: String },
    /// Throttling as the token service's front end answers it: 429, `Retry-After`, and a
    /// plain-text body (`Too Many Requests`) rather than an Entra JSON error.
    PlainThrottle { retry_after: u64 },
}

impl Fault {
    /// Parses the control endpoint's shape: `{"status":503,"retry_after":1}`,
    /// `{"stall_ms":500}`, `{"garbage":true}`, `{"answer":{..}}` or `{"plain_throttle_secs":60}`.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("a fault is a JSON object, not {value}"))?;
        let known = [
            "status",
            "retry_after",
            "stall_ms",
            "garbage",
            "answer",
            "plain_throttle_secs",
        ];
        if let Some(unknown) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "unknown fault field `{unknown}`: expected status (+retry_after), stall_ms, garbage, answer or plain_throttle_secs"
            ));
        }
        if let Some(status) = obj.get("status") {
            let status = status
                .as_u64()
                .filter(|s| (400..=599).contains(s))
                .ok_or_else(|| format!("fault status must be 400..=599, not {status}"))?;
            let retry_after = match obj.get("retry_after") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .ok_or_else(|| format!("retry_after must be whole seconds, not {v}"))?,
                ),
            };
            return Ok(Fault::Status {
                status: status as u16,
                retry_after,
            });
        }
        if let Some(ms) = obj.get("stall_ms") {
            let ms = ms
                .as_u64()
                .ok_or_else(|| format!("stall_ms must be whole milliseconds, not {ms}"))?;
            return Ok(Fault::Stall(Duration::from_millis(ms)));
        }
        if obj.get("garbage") == Some(&Value::Bool(true)) {
            return Ok(Fault::Garbage);
        }
        if let Some(secs) = obj.get("plain_throttle_secs") {
            let retry_after = secs
                .as_u64()
                .ok_or_else(|| format!("plain_throttle_secs must be whole seconds, not {secs}"))?;
            return Ok(Fault::PlainThrottle { retry_after });
        }
        if let Some(body) = obj.get("answer") {
            return Ok(Fault::Answer {
                status: 200,
                body: body.to_string(),
            });
        }
        Err(format!(
            "a fault needs status, stall_ms, garbage:true, answer or plain_throttle_secs, got {value}"
        ))
    }
}

/// A running emulator. Clones share it; it stops on [`EntraEmulator::shutdown`] or when the
/// last clone is dropped.
#[derive(Clone)]
pub struct EntraEmulator {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Shared {
    base_url: String,
    signing: SigningKey,
    client: HttpClient,
    state: Mutex<State>,
    issuer_metadata_ttl: Duration,
    fic_propagation: Mutex<Duration>,
    /// Issuer JWKS by issuer URL, with the time they were fetched.
    issuer_metadata: Mutex<HashMap<String, (Value, Instant)>>,
}

struct State {
    /// Per client_id, in registration order, removed ones included until they stop matching.
    fics: BTreeMap<String, Vec<FicEntry>>,
    /// Every identity that ever had a FIC: a managed identity outlives its last FIC.
    identities: std::collections::BTreeSet<String>,
    body_style: BodyStyle,
    faults: VecDeque<Fault>,
    latency: Duration,
    token_lifetime: Duration,
    stats: EntraStats,
}

/// A FIC with the times its addition and removal take effect in Entra.
struct FicEntry {
    fic: Fic,
    /// From when it matches (its addition propagated).
    effective: Instant,
    /// From when it no longer matches (its removal propagated).
    gone: Option<Instant>,
}

impl FicEntry {
    fn listed(&self) -> bool {
        self.gone.is_none()
    }

    fn matches_at(&self, now: Instant) -> bool {
        self.effective <= now && self.gone.is_none_or(|g| now < g)
    }

    fn pending_at(&self, now: Instant) -> bool {
        self.gone.is_none() && now < self.effective
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later call down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EntraEmulator {
    pub async fn start(cfg: EntraEmulatorConfig) -> anyhow::Result<Self> {
        identity_binding_proxy::crypto::install_provider();
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding the Entra emulator to {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let signing = SigningKey::generate(2048)?;
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            signing,
            client: identity_binding_proxy::http::client::client(),
            issuer_metadata_ttl: cfg.issuer_metadata_ttl,
            fic_propagation: Mutex::new(cfg.fic_propagation),
            issuer_metadata: Mutex::default(),
            state: Mutex::new(State {
                fics: BTreeMap::new(),
                identities: Default::default(),
                body_style: cfg.body_style,
                faults: VecDeque::new(),
                latency: cfg.latency,
                token_lifetime: cfg.token_lifetime,
                stats: EntraStats::default(),
            }),
        });
        for fic in cfg.fics {
            // Registered before the emulator "started": long propagated.
            shared
                .add_fic_effective(fic.clone(), Duration::ZERO)
                .map_err(|e| anyhow::anyhow!("configured FIC {fic}: {e}"))?;
        }
        let shutdown = CancellationToken::new();
        let handler_shared = shared.clone();
        let task = tokio::spawn(identity_binding_proxy::http::conn::serve_plain(
            listener,
            shutdown.clone(),
            identity_binding_proxy::serve::limits::Limits::new(
                identity_binding_proxy::serve::limits::LimitsConfig::unbounded(),
            ),
            identity_binding_proxy::http::conn::ConnTimeouts::NONE,
            move |req, _peer| {
                let shared = handler_shared.clone();
                async move { shared.handle(req).await }
            },
        ));
        tracing::info!(url = %shared.base_url, "Entra emulator listening");
        Ok(Self {
            handle: Arc::new(Handle {
                shared,
                shutdown,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The authority host, `http://127.0.0.1:PORT`; token endpoints are under
    /// `/{tenant}/oauth2/v2.0/token`.
    pub fn url(&self) -> String {
        self.handle.shared.base_url.clone()
    }

    pub fn add_fic(&self, fic: Fic) -> Result<(), FicError> {
        self.handle.shared.add_fic(fic).map(|_| ())
    }

    pub fn remove_fic(&self, client_id: &str, name: &str) -> bool {
        self.handle.shared.remove_fic(client_id, name)
    }

    pub fn fics(&self, client_id: &str) -> Vec<Fic> {
        self.handle.shared.fics(client_id)
    }

    pub fn stats(&self) -> EntraStats {
        lock(&self.handle.shared.state).stats.clone()
    }

    pub fn set_latency(&self, d: Duration) {
        lock(&self.handle.shared.state).latency = d;
    }

    pub fn set_token_lifetime(&self, d: Duration) {
        lock(&self.handle.shared.state).token_lifetime = d;
    }

    /// Changes the FIC propagation delay for changes made from now on.
    pub fn set_fic_propagation(&self, d: Duration) {
        *lock(&self.handle.shared.fic_propagation) = d;
    }

    pub fn set_body_style(&self, style: BodyStyle) {
        lock(&self.handle.shared.state).body_style = style;
    }

    /// Queues faults; each token call consumes the oldest one before anything else happens.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.handle.shared.state).faults.extend(faults);
    }

    /// Stops accepting, lets in-flight calls finish (bounded by `serve_plain`), and returns
    /// once the listener is closed.
    pub async fn shutdown(&self) {
        self.handle.shutdown.cancel();
        let task = lock(&self.handle.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Shared {
    fn add_fic(&self, fic: Fic) -> Result<Fic, FicError> {
        let delay = *lock(&self.fic_propagation);
        self.add_fic_effective(fic, delay)
    }

    /// Registers `fic`, matching once `delay` has passed.
    fn add_fic_effective(&self, mut fic: Fic, delay: Duration) -> Result<Fic, FicError> {
        for (field, value) in [
            ("client_id", &fic.client_id),
            ("issuer", &fic.issuer),
            ("subject", &fic.subject),
            ("audience", &fic.audience),
        ] {
            if value.is_empty() {
                return Err(FicError::Empty(field));
            }
        }
        let mut state = lock(&self.state);
        let now = Instant::now();
        let entries = state.fics.entry(fic.client_id.clone()).or_default();
        // A removal that has propagated is forgotten.
        entries.retain(|e| e.gone.is_none_or(|g| now < g));
        let existing: Vec<&Fic> = entries
            .iter()
            .filter(|e| e.listed())
            .map(|e| &e.fic)
            .collect();
        if existing.len() >= MAX_FICS_PER_IDENTITY {
            return Err(FicError::LimitReached {
                client_id: fic.client_id,
                limit: MAX_FICS_PER_IDENTITY,
            });
        }
        if existing
            .iter()
            .any(|f| f.issuer == fic.issuer && f.subject == fic.subject)
        {
            return Err(FicError::Duplicate {
                client_id: fic.client_id,
                issuer: fic.issuer,
                subject: fic.subject,
            });
        }
        if fic.name.is_empty() {
            // Derived from what makes the credential unique, so it is stable across runs.
            let digest = sha256(format!("{}\0{}", fic.issuer, fic.subject).as_bytes());
            fic.name = format!("fic-{}", hex(&digest[..6]));
        }
        if existing.iter().any(|f| f.name == fic.name) {
            return Err(FicError::DuplicateName {
                client_id: fic.client_id,
                name: fic.name,
            });
        }
        entries.push(FicEntry {
            fic: fic.clone(),
            effective: now + delay,
            gone: None,
        });
        state.identities.insert(fic.client_id.clone());
        Ok(fic)
    }

    fn remove_fic(&self, client_id: &str, name: &str) -> bool {
        let mut state = lock(&self.state);
        let Some(list) = state.fics.get_mut(client_id) else {
            return false;
        };
        let gone = Instant::now() + *lock(&self.fic_propagation);
        match list.iter_mut().find(|e| e.listed() && e.fic.name == name) {
            Some(entry) => {
                // Gone from the management view at once; Entra keeps matching it meanwhile.
                entry.gone = Some(gone);
                true
            }
            None => false,
        }
    }

    /// The FICs the management API lists (pending ones included, removed ones not).
    fn fics(&self, client_id: &str) -> Vec<Fic> {
        lock(&self.state)
            .fics
            .get(client_id)
            .map(|list| {
                list.iter()
                    .filter(|e| e.listed())
                    .map(|e| e.fic.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the token endpoint sees of `client_id` now: whether the identity exists, the FICs
    /// that match, and those added but not yet propagated.
    fn fics_in_effect(&self, client_id: &str) -> (bool, Vec<Fic>, Vec<Fic>) {
        let state = lock(&self.state);
        let now = Instant::now();
        let list = state.fics.get(client_id);
        let pick = |f: &dyn Fn(&FicEntry) -> bool| -> Vec<Fic> {
            list.into_iter()
                .flatten()
                .filter(|e| f(e))
                .map(|e| e.fic.clone())
                .collect()
        };
        (
            state.identities.contains(client_id),
            pick(&|e| e.matches_at(now)),
            pick(&|e| e.pending_at(now)),
        )
    }

    fn body_style(&self) -> BodyStyle {
        lock(&self.state).body_style
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();
        match (&method, segs.as_slice()) {
            (_, ["_emulator", rest @ ..]) => {
                let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                self.control(method, &rest, req).await
            }
            (&Method::POST, [tenant, "oauth2", "v2.0", "token"]) => {
                let tenant = tenant.to_string();
                self.token(&tenant, req).await
            }
            (_, [_, "oauth2", "v2.0", "token"]) => {
                // Entra's answer to anything but POST on the token endpoint.
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900561,
                    format!(
                        "The endpoint only accepts POST requests. Received a {method} request."
                    ),
                )
                .into_response(&correlation_id(req.headers()), self.body_style())
            }
            (&Method::GET, [tenant, "v2.0", ".well-known", "openid-configuration"]) => {
                self.discovery(tenant, req.headers())
            }
            (&Method::GET, [tenant, "discovery", "v2.0", "keys"]) => match check_tenant(tenant) {
                Ok(_) => json_value(
                    StatusCode::OK,
                    &json!({ "keys": [self.signing.public().jwk()] }),
                ),
                Err(r) => r.into_response(&correlation_id(req.headers()), self.body_style()),
            },
            _ => identity_binding_proxy::http::response::text(
                StatusCode::NOT_FOUND,
                format!("no route for {path}\n"),
            ),
        }
    }

    fn discovery(&self, tenant: &str, headers: &HeaderMap) -> Response<Body> {
        let tid = match check_tenant(tenant) {
            Ok(tid) => tid,
            Err(r) => return r.into_response(&correlation_id(headers), self.body_style()),
        };
        let base = format!("{}/{tenant}", self.base_url);
        json_value(
            StatusCode::OK,
            &json!({
                "token_endpoint": format!("{base}/oauth2/v2.0/token"),
                "token_endpoint_auth_methods_supported":
                    ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "jwks_uri": format!("{base}/discovery/v2.0/keys"),
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                // Like Entra's v2 document; the app-only tokens it issues are v1 tokens whose
                // `iss` is `access_token_issuer`.
                "issuer": format!("https://login.microsoftonline.com/{tid}/v2.0"),
                "access_token_issuer": access_token_issuer(&tid),
                "request_uri_parameter_supported": false,
                "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
                "cloud_instance_name": "microsoftonline.com",
            }),
        )
    }

    async fn token(self: &Arc<Self>, tenant: &str, req: Request<Incoming>) -> Response<Body> {
        let correlation = correlation_id(req.headers());
        let (fault, latency) = {
            let mut state = lock(&self.state);
            state.stats.token_requests += 1;
            (state.faults.pop_front(), state.latency)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            Some(Fault::Status {
                status,
                retry_after,
            }) => return fault_response(status, retry_after, &correlation, self.body_style()),
            Some(Fault::Stall(d)) => tokio::time::sleep(d).await,
            Some(Fault::Garbage) => {
                let mut resp = identity_binding_proxy::http::response::text(
                    StatusCode::OK,
                    "<html><body>upstream proxy error</body></html>",
                );
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                return resp;
            }
            Some(Fault::Answer { status, body }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                return identity_binding_proxy::http::response::json(status, body);
            }
            Some(Fault::PlainThrottle { retry_after }) => {
                let mut resp = identity_binding_proxy::http::response::text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too Many Requests",
                );
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, retry_after.into());
                return resp;
            }
            None => {}
        }
        let body =
            match identity_binding_proxy::http::body::read_body(req.into_body(), MAX_FORM_BYTES)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    return Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        90023,
                        e.to_string(),
                    )
                    .into_response(&correlation, self.body_style())
                }
            };
        match self.exchange(tenant, &body).await {
            Ok(answer) => {
                let mut resp = json_value(StatusCode::OK, &answer);
                add_request_ids(
                    resp.headers_mut(),
                    &uuid::Uuid::new_v4().to_string(),
                    &correlation,
                );
                resp
            }
            Err(rejection) => {
                tracing::debug!(code = rejection.code, message = %rejection.message, "Entra emulator refused a token request");
                rejection.into_response(&correlation, self.body_style())
            }
        }
    }

    /// The whole client-credentials exchange, in the order Entra checks things: the form,
    /// the client, the assertion's issuer, signature and validity, then the FIC it matches.
    async fn exchange(&self, tenant: &str, body: &[u8]) -> Result<Value, Rejection> {
        let tid = check_tenant(tenant)?;
        let form = parse_form(body);
        let request = ClientCredentials::from_form(&form)?;
        let client_id = request.client_id;
        let (exists, client_fics, pending) = self.fics_in_effect(client_id);
        if !exists {
            // unauthorized_client, AADSTS700016, 400: no such application in the tenant.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                700016,
                format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
            ));
        }
        let jwt = UnverifiedJwt::parse(request.assertion)?;
        let iss = jwt.claim_str("iss").ok_or_else(Rejection::malformed)?;
        let candidates: Vec<&Fic> = client_fics.iter().filter(|f| f.issuer == iss).collect();
        if candidates.is_empty() && pending.iter().any(|f| f.issuer == iss) {
            // A FIC for this issuer was added but has not propagated yet: Entra answers as if
            // no record matched (unauthorized_client, AADSTS70021, 401), and callers retry.
            return Err(no_matching_record(&jwt, iss));
        }
        if candidates.is_empty() {
            // invalid_client, AADSTS700211, 401.
            return Err(Rejection::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700211,
                format!("No matching federated identity record found for presented assertion issuer '{iss}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. {WFI_DOC}"),
            ));
        }
        self.verify_signature(&jwt, iss).await?;
        jwt.check_lifetime()?;
        jwt.check_times(now_secs())?;
        match_fic(&jwt, iss, &candidates)?;
        self.issue(&tid, client_id, request.resource)
    }

    /// Verifies the assertion with the issuer's JWKS: the cached one while its time lasts,
    /// whatever `kid` the assertion names (Entra does not refetch for an unknown key), else a
    /// fresh fetch.
    async fn verify_signature(&self, jwt: &UnverifiedJwt, iss: &str) -> Result<(), Rejection> {
        let jwks = match self.cached_issuer_jwks(iss) {
            Some(jwks) => jwks,
            None => self.issuer_jwks(iss).await?,
        };
        jwt.verify(&jwks, iss)
    }

    /// The issuer's JWKS from an earlier fetch, while `issuer_metadata_ttl` lasts.
    fn cached_issuer_jwks(&self, iss: &str) -> Option<Value> {
        let cache = lock(&self.issuer_metadata);
        let (jwks, fetched) = cache.get(iss)?;
        (fetched.elapsed() < self.issuer_metadata_ttl).then(|| jwks.clone())
    }

    /// Fetches the issuer's discovery document, then its JWKS (remembered for
    /// `issuer_metadata_ttl`).
    async fn issuer_jwks(&self, iss: &str) -> Result<Value, Rejection> {
        lock(&self.state).stats.issuer_metadata_fetches += 1;
        // Kubernetes-style issuers end in '/', and their discovery document sits right below.
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            iss.strip_suffix('/').unwrap_or(iss)
        );
        let fetch = |url: String| async move {
            let parsed = url::Url::parse(&url).map_err(|e| format!("{url}: {e}"))?;
            let allowed = parsed.scheme() == "https"
                || (parsed.scheme() == "http"
                    && identity_binding_proxy::http::client::is_loopback(&parsed));
            if !allowed {
                return Err(format!(
                    "{url}: only https (or http on loopback) is fetched"
                ));
            }
            identity_binding_proxy::http::client::get_json(&self.client, &url, ISSUER_FETCH_TIMEOUT)
                .await
                .map_err(|e| e.to_string())
        };
        let unreachable = |detail: String| {
            tracing::debug!(%detail, "Entra emulator could not fetch issuer metadata");
            // invalid_request, AADSTS50166, 400: Entra could not read the issuer's metadata.
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                50166,
                "Request to External OIDC endpoint failed.",
            )
        };
        let discovery = fetch(discovery_url).await.map_err(unreachable)?;
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| unreachable(format!("{iss}: discovery document has no jwks_uri")))?
            .to_string();
        let jwks = fetch(jwks_uri).await.map_err(unreachable)?;
        if !jwks.get("keys").is_some_and(Value::is_array) {
            return Err(unreachable(format!("{iss}: JWKS has no keys array")));
        }
        if !self.issuer_metadata_ttl.is_zero() {
            lock(&self.issuer_metadata).insert(iss.to_string(), (jwks.clone(), Instant::now()));
        }
        Ok(jwks)
    }

    fn issue(&self, tid: &str, client_id: &str, resource: &str) -> Result<Value, Rejection> {
        let lifetime = lock(&self.state).token_lifetime.as_secs();
        let now = now_secs();
        let uti = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        let oid = stable_guid(&format!("oid\0{tid}\0{client_id}"));
        let claims = json!({
            "aud": resource,
            "iss": access_token_issuer(tid),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime as i64,
            "aio": URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()),
            "appid": client_id,
            "azp": client_id,
            // 2: the client authenticated with a certificate or assertion, not a secret.
            "appidacr": "2",
            "idp": access_token_issuer(tid),
            "idtyp": "app",
            "oid": oid,
            "sub": oid,
            "tid": tid,
            "uti": uti,
            "jti": uti,
            "ver": "1.0",
        });
        let token = self.signing.sign(&claims).map_err(|e| {
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                90033,
                format!("A transient error has occurred. Please try again. ({e})"),
            )
        })?;
        {
            let mut state = lock(&self.state);
            state.stats.tokens_issued += 1;
            *state
                .stats
                .issued_per_client
                .entry(client_id.to_string())
                .or_default() += 1;
        }
        Ok(json!({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }))
    }

    /// `GET stats`, `POST faults` (a JSON array of [`Fault::from_json`] shapes), `POST config`
    /// (`latency_ms`, `token_lifetime_secs`, `error_uri`, `crlf_lines`), `POST fics` (a JSON [`Fic`]; 409 when Entra would
    /// refuse it), `GET fics/{client_id}`, `DELETE fics/{client_id}/{name}`; all under
    /// `/_emulator/`, for tests that run the emulator in another process.
    async fn control(
        &self,
        method: Method,
        rest: &[String],
        req: Request<Incoming>,
    ) -> Response<Body> {
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        match (&method, rest.as_slice()) {
            (&Method::GET, ["stats"]) => json_value(StatusCode::OK, &lock(&self.state).stats),
            (&Method::POST, ["faults"]) => self.control_faults(req).await,
            (&Method::POST, ["config"]) => self.control_config(req).await,
            (&Method::POST, ["fics"]) => self.control_add_fic(req).await,
            (&Method::GET, ["fics", client_id]) => {
                json_value(StatusCode::OK, &self.fics(client_id))
            }
            (&Method::DELETE, ["fics", client_id, name]) => {
                if self.remove_fic(client_id, name) {
                    json_value(StatusCode::OK, &json!({ "removed": name }))
                } else {
                    control_error(
                        StatusCode::NOT_FOUND,
                        format!("identity {client_id} has no federated identity credential named {name}"),
                    )
                }
            }
            _ => control_error(
                StatusCode::NOT_FOUND,
                format!("no control endpoint {method} /_emulator/{}", rest.join("/")),
            ),
        }
    }

    /// `POST faults`: queues one fault or an array of them, all or none.
    async fn control_faults(&self, req: Request<Incoming>) -> Response<Body> {
        let value = match read_json(req).await {
            Ok(v) => v,
            Err(resp) => return *resp,
        };
        let items = match value {
            Value::Array(items) => items,
            single @ Value::Object(_) => vec![single],
            other => {
                return control_error(
                    StatusCode::BAD_REQUEST,
                    format!("expected a JSON array of faults, got {other}"),
                )
            }
        };
        let faults: Result<Vec<Fault>, String> = items.iter().map(Fault::from_json).collect();
        let faults = match faults {
            Ok(faults) => faults,
            Err(e) => return control_error(StatusCode::BAD_REQUEST, e),
        };
        let mut state = lock(&self.state);
        state.faults.extend(faults);
        json_value(StatusCode::OK, &json!({ "queued": state.faults.len() }))
    }

    /// `POST config`: sets the latency and token lifetime given, answers both.
    async fn control_config(&self, req: Request<Incoming>) -> Response<Body> {
        let value = match read_json(req).await {
            Ok(v) => v,
            Err(resp) => return *resp,
        };
        let mut state = lock(&self.state);
        if let Some(ms) = value.get("latency_ms").and_then(Value::as_u64) {
            state.latency = Duration::from_millis(ms);
        }
        if let Some(s) = value.get("token_lifetime_secs").and_then(Value::as_u64) {
            state.token_lifetime = Duration::from_secs(s);
        }
        if let Some(b) = value.get("error_uri").and_then(Value::as_bool) {
            state.body_style.error_uri = b;
        }
        if let Some(b) = value.get("crlf_lines").and_then(Value::as_bool) {
            state.body_style.crlf_lines = b;
        }
        json_value(
            StatusCode::OK,
            &json!({
                "latency_ms": state.latency.as_millis() as u64,
                "token_lifetime_secs": state.token_lifetime.as_secs(),
                "error_uri": state.body_style.error_uri,
                "crlf_lines": state.body_style.crlf_lines,
            }),
        )
    }

    /// `POST fics`: registers a FIC; 409 where Entra would refuse it.
    async fn control_add_fic(&self, req: Request<Incoming>) -> Response<Body> {
        let value = match read_json(req).await {
            Ok(v) => v,
            Err(resp) => return *resp,
        };
        let fic: Fic = match serde_json::from_value(value) {
            Ok(f) => f,
            Err(e) => {
                return control_error(
                    StatusCode::BAD_REQUEST,
                    format!("not a federated identity credential: {e}"),
                )
            }
        };
        match self.add_fic(fic) {
            Ok(added) => json_value(StatusCode::CREATED, &added),
            Err(e @ FicError::Empty(_)) => control_error(StatusCode::BAD_REQUEST, e.to_string()),
            Err(e) => control_error(StatusCode::CONFLICT, e.to_string()),
        }
    }
}

/// The token request's form; Entra treats an empty parameter as a missing one, and the
/// first of repeated ones counts.
fn parse_form(body: &[u8]) -> BTreeMap<String, String> {
    let mut form = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if !v.is_empty() {
            form.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
    }
    form
}

/// Scopes Entra accepts beside `<resource>/.default` in a client-credentials request, and ignores.
const OIDC_SCOPES: [&str; 3] = ["openid", "offline_access", "profile"];

/// A well-formed client-credentials request with a JWT client assertion.
struct ClientCredentials<'a> {
    client_id: &'a str,
    assertion: &'a str,
    /// The scope without its `/.default` suffix.
    resource: &'a str,
}

impl<'a> ClientCredentials<'a> {
    /// Checks the parameters in Entra's order and answers with its refusals.
    fn from_form(form: &'a BTreeMap<String, String>) -> Result<Self, Rejection> {
        let param = |name: &str| form.get(name).map(String::as_str);
        let grant_type = param("grant_type").ok_or_else(|| Rejection::missing("grant_type"))?;
        if grant_type != "client_credentials" {
            // unsupported_grant_type, AADSTS70003, 400: Entra's answer to a grant it does not do.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{grant_type}'."),
            ));
        }
        let client_id = param("client_id").ok_or_else(|| Rejection::missing("client_id"))?;
        let scope = param("scope").ok_or_else(|| Rejection::missing("scope"))?;
        let (assertion_type, assertion) = match (
            param("client_assertion_type"),
            param("client_assertion"),
        ) {
            (None, None) => {
                // invalid_client, AADSTS7000218, 401: a confidential client sent no credential.
                return Err(Rejection::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ));
            }
            (None, Some(_)) => return Err(Rejection::missing("client_assertion_type")),
            (Some(_), None) => return Err(Rejection::missing("client_assertion")),
            (Some(t), Some(a)) => (t, a),
        };
        if assertion_type != JWT_BEARER {
            // invalid_request, AADSTS90023 (Entra's generic InvalidRequest), 400.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90023,
                format!("The provided value for the input parameter 'client_assertion_type' is not valid. Expected '{JWT_BEARER}'."),
            ));
        }
        // Entra ignores the OpenID Connect scopes in a client-credentials request: MSAL for Go
        // adds `openid offline_access profile` to every token request, and Entra serves it.
        let mut scopes = scope
            .split_ascii_whitespace()
            .filter(|s| !OIDC_SCOPES.contains(s));
        let resource = match (scopes.next(), scopes.next()) {
            (Some(only), None) => only.strip_suffix("/.default").filter(|r| !r.is_empty()),
            _ => None,
        };
        let Some(resource) = resource else {
            // invalid_scope, AADSTS1002012, 400: client credentials need `<resource>/.default`.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            ));
        };
        Ok(Self {
            client_id,
            assertion,
            resource,
        })
    }
}

/// One of the issuer's FICs must match both the assertion's subject and one of its
/// audiences; Entra names the part that matches none of them.
fn match_fic(jwt: &UnverifiedJwt, iss: &str, candidates: &[&Fic]) -> Result<(), Rejection> {
    let audiences = jwt.audiences();
    let sub = jwt.claim_str("sub").unwrap_or_default();
    if !candidates
        .iter()
        .any(|f| audiences.contains(&f.audience.as_str()))
    {
        // invalid_client, AADSTS700212, 401.
        return Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700212,
            format!("No matching federated identity record found for presented assertion audience '{}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. {WFI_DOC}", audiences.join(",")),
        ));
    }
    if !candidates.iter().any(|f| f.subject == sub)
        && candidates
            .iter()
            .any(|f| f.subject.eq_ignore_ascii_case(sub))
    {
        // invalid_client, AADSTS7002138, 401: FIC matching became case-sensitive in 2024;
        // Entra says when only the case differs. Words from Azure/login#515 (2025-02-22).
        return Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7002138,
            format!("No matching federated identity record found for presented assertion subject '{sub}'. The subject matches with case-insensitive comparison, but not with case-sensitive comparison. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. See documentation at: {WFI_DOC}. See breaking change notification and remediation at: https://learn.microsoft.com/en-us/entra/identity-platform/reference-breaking-changes#august-2024."),
        ));
    }
    if !candidates.iter().any(|f| f.subject == sub) {
        // invalid_client, AADSTS700213, 401.
        return Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700213,
            format!("No matching federated identity record found for presented assertion subject '{sub}'. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. {WFI_DOC}"),
        ));
    }
    if !candidates
        .iter()
        .any(|f| f.subject == sub && audiences.contains(&f.audience.as_str()))
    {
        // Each part matches some FIC, no FIC matches all.
        return Err(no_matching_record(jwt, iss));
    }
    Ok(())
}

/// unauthorized_client, AADSTS70021, 401: no FIC matches issuer, subject and audience together
/// (also Entra's answer while a new FIC propagates). The words are those of a real answer in
/// external-secrets/external-secrets#2783 (2023).
fn no_matching_record(jwt: &UnverifiedJwt, iss: &str) -> Rejection {
    let sub = jwt.claim_str("sub").unwrap_or_default();
    Rejection::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized_client",
        70021,
        format!("No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{}'. {WFI_DOC}", jwt.audiences().join(",")),
    )
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Box<Response<Body>>> {
    let body = identity_binding_proxy::http::body::read_body(req.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|e| Box::new(control_error(StatusCode::BAD_REQUEST, e.to_string())))?;
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(control_error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        ))
    })
}

fn control_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_value(status, &json!({ "error": message.into() }))
}

/// An Entra refusal: status, OAuth `error`, AADSTS code and the description's text.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    error: &'static str,
    code: u64,
    message: String,
    retry_after: Option<u64>,
}

impl Rejection {
    fn new(status: StatusCode, error: &'static str, code: u64, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// invalid_request, AADSTS900144, 400: a required form parameter is absent.
    fn missing(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    /// invalid_request, AADSTS50027, 400: the assertion is not a JWT Entra can read.
    fn malformed() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            "JWT token is invalid or malformed.",
        )
    }

    /// invalid_client, AADSTS7000272, 401: the assertion's key is not in the issuer's JWKS as
    /// Entra last fetched it. Words from a real answer in Azure/azure-workload-identity#1232.
    fn unknown_key(kid: &str, iss: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000272,
            format!("The certificate with identifier {kid} used to sign the federated credential could not be found in the metadata of identity provider {iss}. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token."),
        )
    }

    /// invalid_client, AADSTS700027, 401: the signature did not verify.
    fn bad_signature(reason: &str, kid: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700027,
            format!("Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key used by client: '{kid}']"),
        )
    }

    fn into_response(self, correlation: &str, style: BodyStyle) -> Response<Body> {
        let mut body = ErrorBody::new(self.error, &[self.code], String::new(), correlation);
        let sep = if style.crlf_lines { "\r\n" } else { " " };
        body.error_description = format!(
            "AADSTS{}: {}{sep}Trace ID: {}{sep}Correlation ID: {}{sep}Timestamp: {}",
            self.code, self.message, body.trace_id, body.correlation_id, body.timestamp
        );
        body.error_uri = style
            .error_uri
            .then(|| format!("https://login.microsoftonline.com/error?code={}", self.code));
        let mut resp = identity_binding_proxy::http::response::json(self.status, body.to_json());
        add_request_ids(resp.headers_mut(), &body.trace_id, correlation);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn fault_response(
    status: u16,
    retry_after: Option<u64>,
    correlation: &str,
    style: BodyStyle,
) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut rejection = if status == StatusCode::TOO_MANY_REQUESTS {
        // temporarily_unavailable, AADSTS90055 (TenantThrottlingError), 429: Entra throttling.
        Rejection::new(
            status,
            "temporarily_unavailable",
            90055,
            "There are too many incoming requests. Please try again later.",
        )
    } else if status.is_server_error() {
        // server_error/temporarily_unavailable, AADSTS90033, 5xx: Entra's transient failure.
        let error = if status == StatusCode::SERVICE_UNAVAILABLE {
            "temporarily_unavailable"
        } else {
            "server_error"
        };
        Rejection::new(
            status,
            error,
            90033,
            "A transient error has occurred. Please try again.",
        )
    } else {
        Rejection::new(status, "invalid_request", 90023, "Invalid request.")
    };
    rejection.retry_after = retry_after;
    rejection.into_response(correlation, style)
}

/// Entra echoes `client-request-id` as the correlation id and names its trace in
/// `x-ms-request-id`; SDKs log both.
fn add_request_ids(headers: &mut HeaderMap, trace_id: &str, correlation: &str) {
    for (name, value) in [
        ("x-ms-request-id", trace_id),
        ("client-request-id", correlation),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    }
}

fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Accepts a tenant GUID or a domain and returns the tenant id tokens carry: the GUID itself,
/// or a GUID derived from the domain so the same domain always maps to the same tenant.
fn check_tenant(tenant: &str) -> Result<String, Rejection> {
    if tenant.len() == 36 {
        if let Ok(id) = uuid::Uuid::try_parse(tenant) {
            return Ok(id.to_string());
        }
    }
    let is_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let labels: Vec<&str> = tenant.split('.').collect();
    if tenant.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| is_label(l))
        && labels
            .last()
            .is_some_and(|tld| tld.chars().any(|c| c.is_ascii_alphabetic()))
    {
        return Ok(stable_guid(&format!(
            "tenant\0{}",
            tenant.to_ascii_lowercase()
        )));
    }
    // invalid_request, AADSTS90002, 400: Entra's answer for a tenant it cannot find.
    Err(Rejection::new(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        90002,
        format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."),
    ))
}

/// The `iss` of the v1 app-only access tokens the emulator issues for tenant id `tid`.
pub fn access_token_issuer(tid: &str) -> String {
    format!("https://sts.windows.net/{tid}/")
}

/// The tenant id (GUID) the emulator puts in tokens for `tenant` (a GUID or a domain), or
/// `None` when Entra would not find such a tenant.
pub fn tenant_id(tenant: &str) -> Option<String> {
    check_tenant(tenant).ok()
}

/// A client assertion, split and decoded but not yet trusted.
struct UnverifiedJwt {
    alg: Algorithm,
    kid: String,
    claims: serde_json::Map<String, Value>,
    signing_input: String,
    signature: String,
}

impl UnverifiedJwt {
    fn parse(token: &str) -> Result<Self, Rejection> {
        let parts: Vec<&str> = token.split('.').collect();
        let [h, p, s] = parts.as_slice() else {
            return Err(Rejection::malformed());
        };
        let decode = |part: &str| -> Option<serde_json::Map<String, Value>> {
            let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
            match serde_json::from_slice(&bytes).ok()? {
                Value::Object(map) => Some(map),
                _ => None,
            }
        };
        let header = decode(h).ok_or_else(Rejection::malformed)?;
        let claims = decode(p).ok_or_else(Rejection::malformed)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(Rejection::malformed)?;
        // An unsigned assertion ("alg":"none", empty signature) is no credential at all.
        if alg.eq_ignore_ascii_case("none") || s.is_empty() {
            return Err(Rejection::malformed());
        }
        let alg = match Algorithm::from_str(alg) {
            Ok(a) if matches!(a.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec) => a,
            // invalid_request, AADSTS5002730, 400: a symmetric or unsupported signature type.
            _ => {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    5002730,
                    "Invalid JWT token. Unsupported key for the signing algorithm.",
                ))
            }
        };
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            alg,
            kid,
            claims,
            signing_input: format!("{h}.{p}"),
            signature: (*s).to_string(),
        })
    }

    fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    fn verify(&self, jwks: &Value, iss: &str) -> Result<(), Rejection> {
        let not_found = || Rejection::unknown_key(&self.kid, iss);
        if self.kid.is_empty() {
            return Err(not_found());
        }
        let jwk = jwks
            .get("keys")
            .and_then(Value::as_array)
            .and_then(|keys| {
                keys.iter()
                    .find(|k| k.get("kid").and_then(Value::as_str) == Some(self.kid.as_str()))
            })
            .ok_or_else(not_found)?;
        let failed = || {
            Rejection::bad_signature(
                "Key was found, but use of the key to verify the signature failed.",
                &self.kid,
            )
        };
        let field = |name: &str| jwk.get(name).and_then(Value::as_str).unwrap_or_default();
        let key = match (field("kty"), self.alg.family()) {
            ("RSA", AlgorithmFamily::Rsa) => {
                DecodingKey::from_rsa_components(field("n"), field("e"))
            }
            ("EC", AlgorithmFamily::Ec) => DecodingKey::from_ec_components(field("x"), field("y")),
            _ => return Err(failed()),
        }
        .map_err(|_| failed())?;
        match jsonwebtoken::crypto::verify(
            &self.signature,
            self.signing_input.as_bytes(),
            &key,
            self.alg,
        ) {
            Ok(true) => Ok(()),
            _ => Err(failed()),
        }
    }

    /// invalid_request, AADSTS70023, 400: no `iat`, or `exp` more than 25 hours after it. Words
    /// from real answers in MicrosoftDocs/azure-docs#86915 and #86916 (2022).
    fn check_lifetime(&self) -> Result<(), Rejection> {
        let num = |name: &str| self.claims.get(name).and_then(Value::as_i64);
        let (iat, exp) = (num("iat"), num("exp"));
        let too_long = match (iat, exp) {
            (None, _) => true,
            (Some(iat), Some(exp)) => exp.saturating_sub(iat) > MAX_ASSERTION_LIFETIME_SECS,
            // No `exp` at all: the time-window check refuses it (AADSTS700024).
            (Some(_), None) => false,
        };
        if !too_long {
            return Ok(());
        }
        Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            70023,
            format!(
                "External OIDC Provider token must have a lifetime of less than or equal to 1.01:00:00. Token issued at {}. Token expires on {}.",
                iat.unwrap_or(0),
                exp.unwrap_or(0)
            ),
        ))
    }

    fn check_times(&self, now: i64) -> Result<(), Rejection> {
        let num = |name: &str| self.claims.get(name).and_then(Value::as_i64);
        let exp = num("exp");
        let nbf = num("nbf");
        let iat = num("iat");
        let expired = exp.is_none_or(|exp| now > exp + ASSERTION_LEEWAY_SECS);
        let early = [nbf, iat]
            .into_iter()
            .flatten()
            .any(|t| t > now + ASSERTION_LEEWAY_SECS);
        if !expired && !early {
            return Ok(());
        }
        // invalid_client, AADSTS700024, 401.
        Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
                entra_instant(now),
                entra_instant(nbf.or(iat).unwrap_or(0)),
                entra_instant(exp.unwrap_or(0)),
            ),
        ))
    }
}

/// Entra's instant format in time-range errors: `2024-10-02T22:05:03.0000000Z`.
fn entra_instant(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A GUID that is always the same for the same seed (object ids, tenant ids from domains).
fn stable_guid(seed: &str) -> String {
    let digest = sha256(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes `%XX` escapes in one path segment (FIC names and client ids in control URLs).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::time::Instant;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
    const SUBJECT: &str = "system:serviceaccount:default:workload";
    const SCOPE: &str = "https://vault.azure.net/.default";

    /// A tiny OIDC issuer for the assertions: discovery plus a JWKS the test can edit.
    struct TestIssuer {
        url: String,
        jwks: Arc<Mutex<Vec<Value>>>,
        paths: Arc<Mutex<Vec<String>>>,
        shutdown: CancellationToken,
    }

    impl Drop for TestIssuer {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    impl TestIssuer {
        async fn start(trailing_slash: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let url = if trailing_slash {
                format!("{base}/")
            } else {
                base.clone()
            };
            let jwks: Arc<Mutex<Vec<Value>>> = Arc::default();
            let paths: Arc<Mutex<Vec<String>>> = Arc::default();
            let shutdown = CancellationToken::new();
            let (j, p, issuer) = (jwks.clone(), paths.clone(), url.clone());
            tokio::spawn(identity_binding_proxy::http::conn::serve_plain(
                listener,
                shutdown.clone(),
                identity_binding_proxy::serve::limits::Limits::new(
                    identity_binding_proxy::serve::limits::LimitsConfig::unbounded(),
                ),
                identity_binding_proxy::http::conn::ConnTimeouts::NONE,
                move |req, _| {
                    let (jwks, paths, issuer, base) =
                        (j.clone(), p.clone(), issuer.clone(), base.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        lock(&paths).push(path.clone());
                        match path.as_str() {
                            "/.well-known/openid-configuration" => json_value(
                                StatusCode::OK,
                                &json!({
                                    "issuer": issuer,
                                    "jwks_uri": format!("{base}/openid/v1/jwks"),
                                }),
                            ),
                            "/openid/v1/jwks" => {
                                json_value(StatusCode::OK, &json!({ "keys": *lock(&jwks) }))
                            }
                            _ => identity_binding_proxy::http::response::text(
                                StatusCode::NOT_FOUND,
                                "no",
                            ),
                        }
                    }
                },
            ));
            Self {
                url,
                jwks,
                paths,
                shutdown,
            }
        }

        fn publish(&self, key: &SigningKey) {
            lock(&self.jwks).push(key.public().jwk());
        }

        fn unpublish(&self, key: &SigningKey) {
            lock(&self.jwks).retain(|k| k["kid"] != key.kid());
        }
    }

    struct Fixture {
        emu: EntraEmulator,
        issuer: TestIssuer,
        key: SigningKey,
    }

    async fn fixture() -> Fixture {
        fixture_with(false).await
    }

    /// Most tests check one answer, not Entra's delays: the issuer documents are fetched for
    /// every exchange and FIC changes apply at once, so a key or FIC change acts on the next
    /// call. The tests of the delays pass them explicitly.
    async fn fixture_with(trailing_slash: bool) -> Fixture {
        fixture_timed(trailing_slash, Duration::ZERO, Duration::ZERO).await
    }

    async fn fixture_caching(trailing_slash: bool, issuer_metadata_ttl: Duration) -> Fixture {
        fixture_timed(trailing_slash, issuer_metadata_ttl, Duration::ZERO).await
    }

    async fn fixture_timed(
        trailing_slash: bool,
        issuer_metadata_ttl: Duration,
        fic_propagation: Duration,
    ) -> Fixture {
        let issuer = TestIssuer::start(trailing_slash).await;
        let key = SigningKey::generate(2048).unwrap();
        issuer.publish(&key);
        let emu = EntraEmulator::start(EntraEmulatorConfig {
            fics: vec![Fic {
                client_id: CLIENT.into(),
                issuer: issuer.url.clone(),
                subject: SUBJECT.into(),
                audience: DEFAULT_FIC_AUDIENCE.into(),
                name: "workload".into(),
            }],
            issuer_metadata_ttl,
            fic_propagation,
            ..Default::default()
        })
        .await
        .unwrap();
        Fixture { emu, issuer, key }
    }

    impl Fixture {
        fn claims(&self) -> Value {
            let now = now_secs();
            json!({
                "iss": self.issuer.url,
                "sub": SUBJECT,
                "aud": DEFAULT_FIC_AUDIENCE,
                "iat": now,
                "nbf": now,
                "exp": now + 600,
                "jti": uuid::Uuid::new_v4().to_string(),
            })
        }

        fn assertion_with(&self, edit: impl FnOnce(&mut Value)) -> String {
            let mut claims = self.claims();
            edit(&mut claims);
            self.key.sign(&claims).unwrap()
        }

        fn assertion(&self) -> String {
            self.assertion_with(|_| {})
        }

        async fn exchange(&self, assertion: &str) -> Answer {
            post_token(
                &self.emu.url(),
                TENANT,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", CLIENT),
                    ("scope", SCOPE),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", assertion),
                ],
            )
            .await
        }
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
        }

        #[track_caller]
        fn assert_entra_error(&self, status: u16, error: &str, code: u64) -> Value {
            let v = self.json();
            assert_eq!(self.status.as_u16(), status, "{v}");
            assert_eq!(v["error"], error, "{v}");
            assert_eq!(v["error_codes"], json!([code]), "{v}");
            let description = v["error_description"].as_str().unwrap();
            assert!(
                description.starts_with(&format!("AADSTS{code}: ")),
                "{description}"
            );
            assert!(
                description.ends_with(&format!(
                    " Trace ID: {} Correlation ID: {} Timestamp: {}",
                    v["trace_id"].as_str().unwrap(),
                    v["correlation_id"].as_str().unwrap(),
                    v["timestamp"].as_str().unwrap()
                )),
                "{description}"
            );
            v
        }
    }

    async fn send(req: Request<Full<Bytes>>) -> Answer {
        let fetched = identity_binding_proxy::http::client::fetch(
            &identity_binding_proxy::http::client::client(),
            req,
            Duration::from_secs(20),
            1 << 20,
        )
        .await
        .unwrap();
        Answer {
            status: fetched.status,
            headers: fetched.headers,
            body: fetched.body,
        }
    }

    async fn post_token(base: &str, tenant: &str, pairs: &[(&str, &str)]) -> Answer {
        let form = identity_binding_proxy::http::form::form_encode(pairs.iter().copied());
        let req = Request::post(format!("{base}/{tenant}/oauth2/v2.0/token"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("client-request-id", "test-correlation")
            .body(Full::new(Bytes::from(form)))
            .unwrap();
        send(req).await
    }

    async fn control(method: Method, url: String, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        send(req).await
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[tokio::test]
    async fn valid_assertion_gets_bearer_token_with_integer_lifetimes_that_verifies_against_emulator_jwks(
    ) {
        let f = fixture().await;
        let answer = f.exchange(&f.assertion()).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.headers["client-request-id"], "test-correlation");
        let v = answer.json();
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"].as_u64(), Some(3599));
        assert_eq!(v["ext_expires_in"].as_u64(), Some(3599));
        assert!(
            v.get("refresh_in").is_none(),
            "client credentials get no refresh_in: {v}"
        );
        let token = v["access_token"].as_str().unwrap();

        // Verify through the published discovery document, as a resource server would.
        let client = identity_binding_proxy::http::client::client();
        let discovery = identity_binding_proxy::http::client::get_json(
            &client,
            &format!(
                "{}/{TENANT}/v2.0/.well-known/openid-configuration",
                f.emu.url()
            ),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            discovery["token_endpoint"],
            format!("{}/{TENANT}/oauth2/v2.0/token", f.emu.url())
        );
        let jwks = identity_binding_proxy::http::client::get_json(
            &client,
            discovery["jwks_uri"].as_str().unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"].as_str() == header.kid.as_deref())
            .unwrap();
        let key = DecodingKey::from_rsa_components(
            jwk["n"].as_str().unwrap(),
            jwk["e"].as_str().unwrap(),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        validation.set_audience(&["https://vault.azure.net"]);
        validation.set_issuer(&[format!("https://sts.windows.net/{TENANT}/")]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(claims["tid"], TENANT);
        assert_eq!(claims["appid"], CLIENT);
        assert_eq!(claims["azp"], CLIENT);
        assert_eq!(claims["idtyp"], "app");
        assert_eq!(claims["oid"], claims["sub"]);
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            3599
        );
        f.emu.shutdown().await;
    }

    #[tokio::test]
    async fn tokens_are_distinct_but_object_id_is_stable_per_client() {
        let f = fixture().await;
        let mut utis = Vec::new();
        let mut oids = Vec::new();
        for _ in 0..2 {
            let v = f.exchange(&f.assertion()).await.json();
            let token = v["access_token"].as_str().unwrap();
            let payload = token.split('.').nth(1).unwrap();
            let claims: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
            utis.push(claims["uti"].clone());
            oids.push(claims["oid"].clone());
        }
        assert_ne!(utis[0], utis[1]);
        assert_eq!(oids[0], oids[1]);
    }

    #[tokio::test]
    async fn token_lifetime_can_be_changed_at_run_time() {
        let f = fixture().await;
        f.emu.set_token_lifetime(Duration::from_secs(600));
        let v = f.exchange(&f.assertion()).await.json();
        assert_eq!(v["expires_in"].as_u64(), Some(600));
        assert!(v.get("refresh_in").is_none());
    }

    #[tokio::test]
    async fn assertion_with_unregistered_issuer_gets_aadsts700211() {
        let f = fixture().await;
        let assertion = f.assertion_with(|c| c["iss"] = json!("https://elsewhere.example/"));
        let answer = f.exchange(&assertion).await;
        let v = answer.assert_entra_error(401, "invalid_client", 700211);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("issuer 'https://elsewhere.example/'"));
        assert_eq!(v["correlation_id"], "test-correlation");
        // Refused before any metadata was fetched.
        assert_eq!(f.emu.stats().issuer_metadata_fetches, 0);
    }

    #[tokio::test]
    async fn issuer_match_is_case_sensitive() {
        let f = fixture().await;
        let upper = f.issuer.url.replace("http://", "HTTP://");
        let answer = f
            .exchange(&f.assertion_with(|c| c["iss"] = json!(upper)))
            .await;
        answer.assert_entra_error(401, "invalid_client", 700211);
    }

    #[tokio::test]
    async fn assertion_with_wrong_audience_gets_aadsts700212() {
        let f = fixture().await;
        let answer = f
            .exchange(&f.assertion_with(|c| c["aud"] = json!("api://SomethingElse")))
            .await;
        let v = answer.assert_entra_error(401, "invalid_client", 700212);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("audience 'api://SomethingElse'"));
    }

    #[tokio::test]
    async fn assertion_with_audience_array_containing_the_fic_audience_is_accepted() {
        let f = fixture().await;
        let answer = f
            .exchange(
                &f.assertion_with(|c| c["aud"] = json!(["api://other", DEFAULT_FIC_AUDIENCE])),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn assertion_with_wrong_subject_gets_aadsts700213() {
        let f = fixture().await;
        let answer = f
            .exchange(
                &f.assertion_with(|c| c["sub"] = json!("system:serviceaccount:default:other")),
            )
            .await;
        let v = answer.assert_entra_error(401, "invalid_client", 700213);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("subject 'system:serviceaccount:default:other'"));
    }

    #[tokio::test]
    async fn subject_and_audience_matching_different_fics_gets_aadsts70021() {
        let f = fixture().await;
        f.emu
            .add_fic(Fic {
                client_id: CLIENT.into(),
                issuer: f.issuer.url.clone(),
                subject: "system:serviceaccount:other:sa".into(),
                audience: "api://custom".into(),
                name: "other".into(),
            })
            .unwrap();
        // Subject of the first FIC, audience of the second.
        let answer = f
            .exchange(&f.assertion_with(|c| c["aud"] = json!("api://custom")))
            .await;
        let v = answer.assert_entra_error(401, "unauthorized_client", 70021);
        let d = v["error_description"].as_str().unwrap();
        assert!(
            d.contains(&format!("Assertion Issuer: '{}'", f.issuer.url)),
            "{d}"
        );
        assert!(
            d.contains(&format!("Assertion Subject: '{SUBJECT}'")),
            "{d}"
        );
    }

    #[tokio::test]
    async fn expired_assertion_gets_aadsts700024() {
        let f = fixture().await;
        let now = now_secs();
        let answer = f
            .exchange(&f.assertion_with(|c| {
                c["iat"] = json!(now - 3600);
                c["nbf"] = json!(now - 3600);
                c["exp"] = json!(now - 600);
            }))
            .await;
        let v = answer.assert_entra_error(401, "invalid_client", 700024);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("Client assertion is not within its valid time range. Current time: "));
    }

    #[tokio::test]
    async fn assertion_not_yet_valid_or_without_exp_gets_aadsts700024() {
        let f = fixture().await;
        let now = now_secs();
        let future = f
            .exchange(&f.assertion_with(|c| c["nbf"] = json!(now + 3600)))
            .await;
        future.assert_entra_error(401, "invalid_client", 700024);
        let no_exp = f
            .exchange(&f.assertion_with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }))
            .await;
        no_exp.assert_entra_error(401, "invalid_client", 700024);
    }

    #[tokio::test]
    async fn assertion_expired_within_the_leeway_is_accepted() {
        let f = fixture().await;
        let answer = f
            .exchange(&f.assertion_with(|c| c["exp"] = json!(now_secs() - 10)))
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn assertion_signed_by_key_missing_from_jwks_gets_aadsts7000272() {
        let f = fixture().await;
        let stranger = SigningKey::generate(2048).unwrap();
        let assertion = stranger.sign(&f.claims()).unwrap();
        let v = f
            .exchange(&assertion)
            .await
            .assert_entra_error(401, "invalid_client", 7000272);
        // The real answer (Azure/azure-workload-identity#1232, 2024-01-14):
        // {"error":"invalid_client","error_description":"AADSTS7000272: The certificate with
        // identifier DFA184AB5E2B3F6529B8CFCE195305014236E297 used to sign the federated
        // credential could not be found in the metadata of identity provider
        // https://oidc.svasys.com. Please validate that your Identity Provider's metadata
        // exposes the key used to sign the incoming token. Trace ID: fe34.. Correlation ID:
        // ba0d.. Timestamp: 2024-01-14 20:29:53Z","error_codes":[7000272],"timestamp":"2024-01-14
        // 20:29:53Z","trace_id":"..","correlation_id":"..",
        // "error_uri":"https://login.microsoftonline.com/error?code=7000272"}
        let d = v["error_description"].as_str().unwrap();
        assert!(
            d.starts_with(&format!(
                "AADSTS7000272: The certificate with identifier {} used to sign the federated \
                 credential could not be found in the metadata of identity provider {}. Please \
                 validate that your Identity Provider's metadata exposes the key used to sign the \
                 incoming token. Trace ID: ",
                stranger.kid(),
                f.issuer.url
            )),
            "{d}"
        );
        assert_eq!(
            v["error_uri"],
            "https://login.microsoftonline.com/error?code=7000272"
        );
    }

    #[tokio::test]
    async fn tampered_assertion_gets_aadsts700027() {
        let f = fixture().await;
        let good = f.assertion();
        let parts: Vec<&str> = good.split('.').collect();
        let mut claims = f.claims();
        claims["sub"] = json!("system:serviceaccount:kube-system:admin");
        let forged = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
        let v = f
            .exchange(&forged)
            .await
            .assert_entra_error(401, "invalid_client", 700027);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("Key was found, but use of the key to verify the signature failed."));
    }

    #[tokio::test]
    async fn without_a_metadata_ttl_a_removed_key_fails_the_next_call_with_aadsts7000272() {
        let f = fixture().await;
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        f.issuer.unpublish(&f.key);
        f.exchange(&f.assertion())
            .await
            .assert_entra_error(401, "invalid_client", 7000272);
        f.issuer.publish(&f.key);
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        assert_eq!(f.emu.stats().issuer_metadata_fetches, 3);
    }

    #[test]
    fn the_default_config_keeps_entras_delays() {
        let cfg = EntraEmulatorConfig::default();
        assert_eq!(cfg.issuer_metadata_ttl, Duration::from_secs(300));
        assert_eq!(cfg.fic_propagation, Duration::from_secs(60));
        assert_eq!(cfg.body_style, BodyStyle::default());
    }

    #[tokio::test]
    async fn within_the_metadata_ttl_a_new_key_is_refused_without_a_refetch_and_a_removed_key_verifies(
    ) {
        // Real time, short: the cache of issuer documents keeps a std Instant.
        let ttl = Duration::from_secs(3);
        let f = fixture_caching(false, ttl).await;
        let fetched_at = Instant::now();
        for _ in 0..3 {
            assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        }
        assert_eq!(f.emu.stats().issuer_metadata_fetches, 1);
        // A key published after Entra's fetch is unknown to Entra until its cache expires,
        // whatever the assertion's `kid` says: no refetch, AADSTS7000272.
        let rotated = SigningKey::generate(2048).unwrap();
        f.issuer.publish(&rotated);
        f.issuer.unpublish(&f.key);
        let old = Fixture {
            key: SigningKey::from_pem(&f.key.private_pem()).unwrap(),
            emu: f.emu.clone(),
            issuer: TestIssuer {
                url: f.issuer.url.clone(),
                jwks: f.issuer.jwks.clone(),
                paths: f.issuer.paths.clone(),
                shutdown: CancellationToken::new(),
            },
        };
        let new = Fixture { key: rotated, ..f };
        new.exchange(&new.assertion())
            .await
            .assert_entra_error(401, "invalid_client", 7000272);
        // Meanwhile the removed key still verifies, from the cached JWKS.
        assert_eq!(old.exchange(&old.assertion()).await.status, StatusCode::OK);
        assert_eq!(new.emu.stats().issuer_metadata_fetches, 1);
        assert!(
            fetched_at.elapsed() < ttl,
            "the test ran slower than the TTL"
        );
        tokio::time::sleep(ttl.saturating_sub(fetched_at.elapsed()) + Duration::from_millis(100))
            .await;
        // Expired: fetched again; the new key verifies and the removed one no longer does.
        assert_eq!(new.exchange(&new.assertion()).await.status, StatusCode::OK);
        assert_eq!(new.emu.stats().issuer_metadata_fetches, 2);
        old.exchange(&old.assertion())
            .await
            .assert_entra_error(401, "invalid_client", 7000272);
    }

    #[tokio::test]
    async fn unknown_client_id_gets_aadsts700016() {
        let f = fixture().await;
        let answer = post_token(
            &f.emu.url(),
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "99999999-0000-0000-0000-000000000000"),
                ("scope", SCOPE),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &f.assertion()),
            ],
        )
        .await;
        let v = answer.assert_entra_error(400, "unauthorized_client", 700016);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("Application with identifier '99999999-0000-0000-0000-000000000000' was not found in the directory"));
    }

    #[tokio::test]
    async fn missing_parameters_get_aadsts900144_naming_the_parameter() {
        let f = fixture().await;
        let assertion = f.assertion();
        let full = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ];
        for missing in [
            "grant_type",
            "client_id",
            "scope",
            "client_assertion_type",
            "client_assertion",
        ] {
            let pairs: Vec<(&str, &str)> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let v = post_token(&f.emu.url(), TENANT, &pairs)
                .await
                .assert_entra_error(400, "invalid_request", 900144);
            assert!(
                v["error_description"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("following parameter: '{missing}'.")),
                "{v}"
            );
        }
        // Neither assertion field: Entra asks for a credential instead.
        let pairs: Vec<(&str, &str)> = full[..3].to_vec();
        post_token(&f.emu.url(), TENANT, &pairs)
            .await
            .assert_entra_error(401, "invalid_client", 7000218);
    }

    #[tokio::test]
    async fn unsupported_grant_type_and_bad_assertion_type_are_refused() {
        let f = fixture().await;
        let assertion = f.assertion();
        post_token(
            &f.emu.url(),
            TENANT,
            &[
                ("grant_type", "password"),
                ("client_id", CLIENT),
                ("scope", SCOPE),
            ],
        )
        .await
        .assert_entra_error(400, "unsupported_grant_type", 70003);
        post_token(
            &f.emu.url(),
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("scope", SCOPE),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
                ),
                ("client_assertion", &assertion),
            ],
        )
        .await
        .assert_entra_error(400, "invalid_request", 90023);
    }

    #[tokio::test]
    async fn scope_without_default_suffix_gets_aadsts1002012() {
        let f = fixture().await;
        let answer = post_token(
            &f.emu.url(),
            TENANT,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("scope", "https://graph.microsoft.com/User.Read"),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &f.assertion()),
            ],
        )
        .await;
        answer.assert_entra_error(400, "invalid_scope", 1002012);
    }

    /// MSAL for Go sends `openid offline_access profile` beside `<resource>/.default` and Entra
    /// serves it (the token is for the resource); two resources are still one too many.
    #[tokio::test]
    async fn oidc_scopes_beside_default_are_ignored_as_entra_does() {
        let f = fixture().await;
        let ask = |scope: &'static str| {
            let assertion = f.assertion();
            let url = f.emu.url();
            async move {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", CLIENT),
                    ("scope", scope),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &assertion),
                ];
                post_token(&url, TENANT, &form).await
            }
        };
        let served = ask("https://vault.azure.net/.default openid offline_access profile").await;
        assert_eq!(served.status, StatusCode::OK, "{:?}", served.body);
        let token = served.json()["access_token"].as_str().unwrap().to_string();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://vault.azure.net");
        ask("https://vault.azure.net/.default https://graph.microsoft.com/.default")
            .await
            .assert_entra_error(400, "invalid_scope", 1002012);
        ask("openid profile")
            .await
            .assert_entra_error(400, "invalid_scope", 1002012);
    }

    #[tokio::test]
    async fn malformed_tenant_gets_aadsts90002_and_domains_are_accepted() {
        let f = fixture().await;
        let assertion = f.assertion();
        let pairs = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ];
        let v = post_token(&f.emu.url(), "not_a_tenant!", &pairs)
            .await
            .assert_entra_error(400, "invalid_request", 90002);
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("Tenant 'not_a_tenant!' not found."));
        let ok = post_token(&f.emu.url(), "contoso.onmicrosoft.com", &pairs).await;
        assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
        assert_eq!(
            tenant_id("contoso.onmicrosoft.com"),
            tenant_id("CONTOSO.onmicrosoft.com")
        );
        assert_eq!(tenant_id(TENANT).as_deref(), Some(TENANT));
    }

    #[tokio::test]
    async fn alg_none_and_garbage_assertions_are_refused_with_aadsts50027() {
        let f = fixture().await;
        let unsigned = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&f.claims())
        );
        f.exchange(&unsigned)
            .await
            .assert_entra_error(400, "invalid_request", 50027);
        f.exchange("not-a-jwt")
            .await
            .assert_entra_error(400, "invalid_request", 50027);
        // Nothing was fetched for either.
        assert_eq!(f.emu.stats().issuer_metadata_fetches, 0);
    }

    #[tokio::test]
    async fn hmac_signed_assertion_is_refused() {
        let f = fixture().await;
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &f.claims(),
            &jsonwebtoken::EncodingKey::from_secret(b"shared").unwrap(),
        )
        .unwrap();
        f.exchange(&hs)
            .await
            .assert_entra_error(400, "invalid_request", 5002730);
    }

    #[tokio::test]
    async fn unreachable_issuer_metadata_gets_aadsts50166() {
        let f = fixture().await;
        // A loopback port nobody listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        f.emu
            .add_fic(Fic {
                client_id: CLIENT.into(),
                issuer: dead.clone(),
                subject: SUBJECT.into(),
                audience: DEFAULT_FIC_AUDIENCE.into(),
                name: "dead".into(),
            })
            .unwrap();
        f.exchange(&f.assertion_with(|c| c["iss"] = json!(dead)))
            .await
            .assert_entra_error(400, "invalid_request", 50166);
        // Plain http off loopback is never fetched.
        let remote = "http://issuer.example.com";
        f.emu
            .add_fic(Fic {
                client_id: CLIENT.into(),
                issuer: remote.into(),
                subject: SUBJECT.into(),
                audience: DEFAULT_FIC_AUDIENCE.into(),
                name: "remote".into(),
            })
            .unwrap();
        f.exchange(&f.assertion_with(|c| c["iss"] = json!(remote)))
            .await
            .assert_entra_error(400, "invalid_request", 50166);
    }

    #[tokio::test]
    async fn issuer_with_trailing_slash_gets_discovery_without_double_slash() {
        let f = fixture_with(true).await;
        assert!(f.issuer.url.ends_with('/'));
        let answer = f.exchange(&f.assertion()).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let paths = lock(&f.issuer.paths).clone();
        assert_eq!(
            paths,
            vec!["/.well-known/openid-configuration", "/openid/v1/jwks"]
        );
    }

    #[tokio::test]
    async fn twenty_first_fic_for_one_identity_is_refused() {
        let emu = EntraEmulator::start(EntraEmulatorConfig::default())
            .await
            .unwrap();
        let fic = |i: usize| Fic {
            client_id: CLIENT.into(),
            issuer: "https://issuer.example".into(),
            subject: format!("system:serviceaccount:ns:sa-{i}"),
            audience: DEFAULT_FIC_AUDIENCE.into(),
            name: String::new(),
        };
        for i in 0..MAX_FICS_PER_IDENTITY {
            emu.add_fic(fic(i)).unwrap();
        }
        let err = emu.add_fic(fic(99)).unwrap_err();
        assert_eq!(
            err,
            FicError::LimitReached {
                client_id: CLIENT.into(),
                limit: 20
            }
        );
        assert!(err.to_string().contains("20"), "{err}");
        // Another identity has its own budget.
        let mut other = fic(0);
        other.client_id = "other-client".into();
        emu.add_fic(other).unwrap();
        // Removing one makes room again; names were generated and are unique.
        let fics = emu.fics(CLIENT);
        assert_eq!(fics.len(), 20);
        let mut names: Vec<_> = fics.iter().map(|f| f.name.clone()).collect();
        names.dedup();
        assert_eq!(names.len(), 20);
        assert!(emu.remove_fic(CLIENT, &fics[3].name));
        assert!(!emu.remove_fic(CLIENT, &fics[3].name));
        emu.add_fic(fic(99)).unwrap();
    }

    #[tokio::test]
    async fn duplicate_issuer_and_subject_or_name_on_one_identity_is_refused() {
        let emu = EntraEmulator::start(EntraEmulatorConfig::default())
            .await
            .unwrap();
        let fic: Fic = "client_id=c,issuer=https://i.example,subject=s,name=a"
            .parse()
            .unwrap();
        emu.add_fic(fic.clone()).unwrap();
        let mut again = fic.clone();
        again.name = "b".into();
        again.audience = "api://other".into();
        assert!(matches!(
            emu.add_fic(again),
            Err(FicError::Duplicate { .. })
        ));
        let mut same_name = fic.clone();
        same_name.subject = "s2".into();
        assert!(matches!(
            emu.add_fic(same_name),
            Err(FicError::DuplicateName { .. })
        ));
        assert!(matches!(
            emu.add_fic(Fic {
                subject: String::new(),
                ..fic
            }),
            Err(FicError::Empty("subject"))
        ));
    }

    #[tokio::test]
    async fn without_propagation_a_removed_last_fic_gets_aadsts700211_as_the_identity_remains() {
        let f = fixture().await;
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        assert!(f.emu.remove_fic(CLIENT, "workload"));
        assert!(f.emu.fics(CLIENT).is_empty());
        // The managed identity outlives its last FIC: not 700016, but no issuer matches.
        f.exchange(&f.assertion())
            .await
            .assert_entra_error(401, "invalid_client", 700211);
    }

    #[tokio::test]
    async fn a_new_fic_answers_aadsts70021_until_it_propagates_and_a_removed_one_matches_meanwhile()
    {
        // Real time, short: the FICs' propagation times are std Instants.
        let delay = Duration::from_secs(3);
        let f = fixture_timed(false, Duration::ZERO, delay).await;
        let added = Instant::now();
        f.emu
            .add_fic(Fic {
                client_id: CLIENT.into(),
                issuer: "https://other.example/issuer".into(),
                subject: SUBJECT.into(),
                audience: DEFAULT_FIC_AUDIENCE.into(),
                name: "other".into(),
            })
            .unwrap();
        let other = f.assertion_with(|c| c["iss"] = json!("https://other.example/issuer"));
        // Listed at once, matched later; meanwhile Entra's answer for "nothing matches".
        assert_eq!(f.emu.fics(CLIENT).len(), 2);
        let v = f
            .exchange(&other)
            .await
            .assert_entra_error(401, "unauthorized_client", 70021);
        assert!(v["error_description"].as_str().unwrap().contains(
            "No matching federated identity record found for presented assertion. Assertion Issuer: 'https://other.example/issuer'."
        ));
        // Removing the propagated FIC: gone from the list, still matching for the delay.
        assert!(f.emu.remove_fic(CLIENT, "workload"));
        assert_eq!(f.emu.fics(CLIENT).len(), 1);
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        assert!(
            added.elapsed() < delay,
            "the test ran slower than the delay"
        );
        tokio::time::sleep(delay + Duration::from_millis(100)).await;
        // The new one now gets past the issuer match (its documents are unreachable here).
        f.exchange(&other)
            .await
            .assert_entra_error(400, "invalid_request", 50166);
        f.exchange(&f.assertion())
            .await
            .assert_entra_error(401, "invalid_client", 700211);
    }

    #[tokio::test]
    async fn subject_differing_only_in_case_gets_aadsts7002138() {
        let f = fixture().await;
        let upper = SUBJECT.to_uppercase();
        let v = f
            .exchange(&f.assertion_with(|c| c["sub"] = json!(upper)))
            .await
            .assert_entra_error(401, "invalid_client", 7002138);
        // The real words (Azure/login#515, 2025-02-22): "AADSTS7002138: No matching federated
        // identity record found for presented assertion subject 'repo:..:environment:Production'.
        // The subject matches with case-insensitive comparison, but not with case-sensitive
        // comparison. Check your federated identity credential Subject, Audience and Issuer
        // against the presented assertion. See documentation at:
        // https://learn.microsoft.com/entra/workload-id/workload-identity-federation. See
        // breaking change notification and remediation at:
        // https://learn.microsoft.com/en-us/entra/identity-platform/reference-breaking-changes#august-2024."
        let d = v["error_description"].as_str().unwrap();
        assert!(d.starts_with(&format!("AADSTS7002138: No matching federated identity record found for presented assertion subject '{upper}'. The subject matches with case-insensitive comparison, but not with case-sensitive comparison. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. See documentation at: https://learn.microsoft.com/entra/workload-id/workload-identity-federation. See breaking change notification and remediation at: https://learn.microsoft.com/en-us/entra/identity-platform/reference-breaking-changes#august-2024.")), "{d}");
    }

    #[tokio::test]
    async fn assertion_without_iat_or_living_over_25_hours_gets_aadsts70023() {
        let f = fixture().await;
        // The real answers (MicrosoftDocs/azure-docs#86915 and #86916, 2022-01-25):
        // {"error":"invalid_request","error_description":"AADSTS70023: External OIDC Provider
        // token must have a lifetime of less than or equal to 1.01:00:00. Token issued at 0.
        // Token expires on 1643129773.\r\nTrace ID: ..","error_codes":[70023],..}
        let no_iat = f.assertion_with(|c| {
            c.as_object_mut().unwrap().remove("iat");
        });
        let exp = f.claims()["exp"].as_i64().unwrap();
        let v = f
            .exchange(&no_iat)
            .await
            .assert_entra_error(400, "invalid_request", 70023);
        assert!(v["error_description"].as_str().unwrap().starts_with(&format!(
            "AADSTS70023: External OIDC Provider token must have a lifetime of less than or equal to 1.01:00:00. Token issued at 0. Token expires on {exp}."
        )));
        let now = now_secs();
        let long = f.assertion_with(|c| c["exp"] = json!(now + 25 * 3600 + 1));
        f.exchange(&long)
            .await
            .assert_entra_error(400, "invalid_request", 70023);
        let longest = f.assertion_with(|c| c["exp"] = json!(now + 25 * 3600));
        // Exactly 25 h is allowed by 70023; what refuses it is nothing else.
        assert_eq!(f.exchange(&longest).await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn bodies_come_with_or_without_error_uri_and_with_crlf_lines() {
        let f = fixture().await;
        let stranger = SigningKey::generate(2048).unwrap();
        let refused = || stranger.sign(&f.claims()).unwrap();
        // Without error_uri, as in the 700211 answer recorded in teleport's Azure plugin
        // tests (2024-07-04): {"error":"invalid_client","error_description":"AADSTS700211: ...
        // Trace ID: 8004.. Correlation ID: bb80.. Timestamp: 2024-07-04 13:48:17Z",
        // "error_codes":[700211],"timestamp":"..","trace_id":"..","correlation_id":".."}
        f.emu.set_body_style(BodyStyle {
            error_uri: false,
            crlf_lines: false,
        });
        let v = f
            .exchange(&refused())
            .await
            .assert_entra_error(401, "invalid_client", 7000272);
        assert!(v.get("error_uri").is_none(), "{v}");
        // Older answers separate the trace lines with \r\n (Azure/azure-workload-identity#616,
        // 2022): "...workload-identity-federation\r\nTrace ID: 30b6..\r\nCorrelation ID: dffc..
        // \r\nTimestamp: 2022-10-27 23:39:22Z".
        let answer = control(
            Method::POST,
            format!("{}/_emulator/config", f.emu.url()),
            Some(json!({ "error_uri": true, "crlf_lines": true })),
        )
        .await;
        assert_eq!(answer.json()["crlf_lines"], true);
        let v = f.exchange(&refused()).await.json();
        let d = v["error_description"].as_str().unwrap();
        assert!(
            d.contains(&format!(
                "\r\nTrace ID: {}\r\nCorrelation ID: {}\r\nTimestamp: {}",
                v["trace_id"].as_str().unwrap(),
                v["correlation_id"].as_str().unwrap(),
                v["timestamp"].as_str().unwrap()
            )),
            "{d}"
        );
        assert_eq!(
            v["error_uri"],
            "https://login.microsoftonline.com/error?code=7000272"
        );
    }

    #[test]
    fn fic_from_str_accepts_urls_and_defaults_audience() {
        let fic: Fic = "client_id=abc,issuer=https://oidc.example.com/tenant/issuer/,subject=system:serviceaccount:ns:sa"
            .parse()
            .unwrap();
        assert_eq!(fic.client_id, "abc");
        assert_eq!(fic.issuer, "https://oidc.example.com/tenant/issuer/");
        assert_eq!(fic.subject, "system:serviceaccount:ns:sa");
        assert_eq!(fic.audience, DEFAULT_FIC_AUDIENCE);
        assert_eq!(fic.name, "");
        let named: Fic =
            " client_id=a , issuer=http://127.0.0.1:8080 , subject=s , audience=api://x , name=n "
                .parse()
                .unwrap();
        assert_eq!(named.audience, "api://x");
        assert_eq!(named.name, "n");
        assert_eq!(named.to_string().parse::<Fic>().unwrap(), named);
    }

    #[test]
    fn fic_from_str_names_missing_and_unknown_keys() {
        let err = "client_id=a,issuer=https://i".parse::<Fic>().unwrap_err();
        assert_eq!(err, FicParseError::MissingKey("subject"));
        assert!(err.to_string().contains("subject="), "{err}");
        let err = "client_id=a,issuer=https://i,subject=s,tenant=t"
            .parse::<Fic>()
            .unwrap_err();
        assert_eq!(err, FicParseError::UnknownKey("tenant".into()));
        assert!(err.to_string().contains("`tenant`"), "{err}");
        assert_eq!(
            "client_id=a,client_id=b,issuer=i,subject=s".parse::<Fic>(),
            Err(FicParseError::DuplicateKey("client_id".into()))
        );
        assert_eq!(
            "client_id=a,issuer,subject=s".parse::<Fic>(),
            Err(FicParseError::NotKeyValue("issuer".into()))
        );
        assert_eq!(
            "client_id=,issuer=i,subject=s".parse::<Fic>(),
            Err(FicParseError::Empty("client_id".into()))
        );
    }

    #[test]
    fn fault_json_shapes_parse_and_bad_ones_are_explained() {
        assert_eq!(
            Fault::from_json(&json!({"status": 503, "retry_after": 1})),
            Ok(Fault::Status {
                status: 503,
                retry_after: Some(1)
            })
        );
        assert_eq!(
            Fault::from_json(&json!({"stall_ms": 500})),
            Ok(Fault::Stall(Duration::from_millis(500)))
        );
        assert_eq!(
            Fault::from_json(&json!({"garbage": true})),
            Ok(Fault::Garbage)
        );
        assert_eq!(
            Fault::from_json(&json!({"plain_throttle_secs": 60})),
            Ok(Fault::PlainThrottle { retry_after: 60 })
        );
        assert!(Fault::from_json(&json!({"plain_throttle_secs": "soon"})).is_err());
        assert!(Fault::from_json(&json!({"status": 200})).is_err());
        assert!(Fault::from_json(&json!({"stal_ms": 5}))
            .unwrap_err()
            .contains("stal_ms"));
        assert!(Fault::from_json(&json!([])).is_err());
    }

    #[tokio::test]
    async fn scripted_503_with_retry_after_is_answered_once_then_success() {
        let f = fixture().await;
        f.emu.push_faults([Fault::Status {
            status: 503,
            retry_after: Some(7),
        }]);
        let first = f.exchange(&f.assertion()).await;
        first.assert_entra_error(503, "temporarily_unavailable", 90033);
        assert_eq!(first.headers[header::RETRY_AFTER], "7");
        let second = f.exchange(&f.assertion()).await;
        assert_eq!(second.status, StatusCode::OK);
        let stats = f.emu.stats();
        assert_eq!(stats.token_requests, 2);
        assert_eq!(stats.tokens_issued, 1);
    }

    #[tokio::test]
    async fn scripted_429_and_500_are_entra_shaped() {
        let f = fixture().await;
        f.emu.push_faults([
            Fault::Status {
                status: 429,
                retry_after: Some(30),
            },
            Fault::Status {
                status: 500,
                retry_after: None,
            },
        ]);
        let throttled = f.exchange(&f.assertion()).await;
        throttled.assert_entra_error(429, "temporarily_unavailable", 90055);
        assert_eq!(throttled.headers[header::RETRY_AFTER], "30");
        let failed = f.exchange(&f.assertion()).await;
        failed.assert_entra_error(500, "server_error", 90033);
        assert!(failed.headers.get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn garbage_fault_answers_200_with_a_body_that_is_not_json() {
        let f = fixture().await;
        f.emu.push_faults([Fault::Garbage]);
        let answer = f.exchange(&f.assertion()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(serde_json::from_slice::<Value>(&answer.body).is_err());
        assert_eq!(f.emu.stats().tokens_issued, 0);
    }

    #[tokio::test]
    async fn stall_fault_and_latency_delay_the_answer() {
        let f = fixture().await;
        // Warm up the connection pool and key material so timing measures only the delay.
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        f.emu
            .push_faults([Fault::Stall(Duration::from_millis(400))]);
        let started = Instant::now();
        let answer = f.exchange(&f.assertion()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(400));

        f.emu.set_latency(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn stats_count_token_requests_issued_tokens_and_metadata_fetches() {
        let f = fixture().await;
        f.exchange(&f.assertion()).await;
        f.exchange(&f.assertion()).await;
        f.exchange(&f.assertion_with(|c| c["sub"] = json!("nope")))
            .await;
        post_token(
            &f.emu.url(),
            TENANT,
            &[("grant_type", "client_credentials")],
        )
        .await;
        let stats = f.emu.stats();
        assert_eq!(stats.token_requests, 4);
        assert_eq!(stats.tokens_issued, 2);
        assert_eq!(stats.issued_per_client.get(CLIENT), Some(&2));
        assert_eq!(stats.issuer_metadata_fetches, 3);
    }

    #[tokio::test]
    async fn get_on_token_endpoint_is_refused_like_entra() {
        let f = fixture().await;
        control(
            Method::GET,
            format!("{}/{TENANT}/oauth2/v2.0/token", f.emu.url()),
            None,
        )
        .await
        .assert_entra_error(400, "invalid_request", 900561);
    }

    #[tokio::test]
    async fn control_endpoints_manage_fics_faults_and_stats_over_http() {
        let f = fixture().await;
        let base = format!("{}/_emulator", f.emu.url());

        // Faults, in order.
        let queued = control(
            Method::POST,
            format!("{base}/faults"),
            Some(json!([{"status": 503, "retry_after": 1}, {"stall_ms": 10}, {"garbage": true}])),
        )
        .await;
        assert_eq!(queued.status, StatusCode::OK);
        assert_eq!(queued.json()["queued"], 3);
        assert_eq!(f.exchange(&f.assertion()).await.status.as_u16(), 503);
        assert_eq!(f.exchange(&f.assertion()).await.status, StatusCode::OK);
        let garbage = f.exchange(&f.assertion()).await;
        assert!(serde_json::from_slice::<Value>(&garbage.body).is_err());
        let bad = control(
            Method::POST,
            format!("{base}/faults"),
            Some(json!([{"nope": 1}])),
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);

        // FICs: add up to the limit, the 21st conflicts with an explanation.
        for i in 1..MAX_FICS_PER_IDENTITY {
            let added = control(
                Method::POST,
                format!("{base}/fics"),
                Some(json!({
                    "client_id": CLIENT,
                    "issuer": f.issuer.url,
                    "subject": format!("system:serviceaccount:ns:sa-{i}"),
                    "name": format!("extra {i}"),
                })),
            )
            .await;
            assert_eq!(added.status, StatusCode::CREATED, "{:?}", added.body);
            assert_eq!(added.json()["audience"], DEFAULT_FIC_AUDIENCE);
        }
        let refused = control(
            Method::POST,
            format!("{base}/fics"),
            Some(json!({"client_id": CLIENT, "issuer": f.issuer.url, "subject": "one-too-many"})),
        )
        .await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert!(refused.json()["error"].as_str().unwrap().contains("20"));

        let listed = control(Method::GET, format!("{base}/fics/{CLIENT}"), None).await;
        assert_eq!(listed.json().as_array().unwrap().len(), 20);
        let removed = control(
            Method::DELETE,
            format!("{base}/fics/{CLIENT}/extra%201"),
            None,
        )
        .await;
        assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
        assert_eq!(f.emu.fics(CLIENT).len(), 19);
        let gone = control(
            Method::DELETE,
            format!("{base}/fics/{CLIENT}/extra%201"),
            None,
        )
        .await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);

        // Run-time knobs.
        let cfg = control(
            Method::POST,
            format!("{base}/config"),
            Some(json!({"token_lifetime_secs": 120})),
        )
        .await;
        assert_eq!(cfg.json()["token_lifetime_secs"], 120);
        assert_eq!(f.exchange(&f.assertion()).await.json()["expires_in"], 120);

        // Stats.
        let stats: EntraStats = serde_json::from_slice(
            &control(Method::GET, format!("{base}/stats"), None)
                .await
                .body,
        )
        .unwrap();
        assert_eq!(stats, f.emu.stats());
        assert_eq!(stats.token_requests, 4);
        assert_eq!(stats.tokens_issued, 2);
    }

    #[tokio::test]
    async fn configured_fics_are_checked_at_start() {
        let fic: Fic = "client_id=c,issuer=https://i,subject=s".parse().unwrap();
        let err = EntraEmulator::start(EntraEmulatorConfig {
            fics: vec![fic.clone(), fic],
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("issuer and subject"), "{err}");
    }

    #[test]
    fn percent_decoding_of_path_segments() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
