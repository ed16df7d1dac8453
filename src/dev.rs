//! `dev`: the whole system on loopback in one process — the kube-apiserver emulator, the Entra
//! emulator, a static host for the published issuer documents, and the proxy itself through
//! the same `server::start` that `serve` uses. It writes everything an app developer needs
//! into the state dir and announces readiness by writing `dev.json` last, atomically.
//!
//! One `dev` per state dir: it holds an exclusive lock on `dev.lock` there for its whole life,
//! and refuses bad input — a state dir in use, a busy port, bad flags — before it writes
//! anything, so a mistaken second start cannot disturb the running one.

mod cluster;
mod rotate_ca;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::{DevArgs, DevTokenArgs, EmulateEntraArgs, EmulateKubeArgs, EmulateStaticArgs};
use ibp_emulators::entra::{EntraEmulator, EntraEmulatorConfig, Fic};
use ibp_emulators::kube::{mint_from_state_dir, KubeEmulator, KubeEmulatorConfig, MintRequest};
use ibp_emulators::pki::DevCa;
use identity_binding_proxy::authn::DEFAULT_TOKEN_AUDIENCE;
use identity_binding_proxy::config::ProxyConfig;
use identity_binding_proxy::exchange::bindings::BindingSet;
use identity_binding_proxy::exchange::issuer::{IssuerUrl, FIC_AUDIENCE};
use identity_binding_proxy::exchange::keys::SigningKey;
use identity_binding_proxy::files::{write_private, write_public};
use identity_binding_proxy::startup::{Kind, StartError};

/// The SNI name the dev proxy serves and clients send.
pub const DEV_SNI_NAME: &str = "identity-binding-proxy.dev.local";
/// Lifetime of the SA tokens dev writes; they are re-minted well before, as kubelet does.
const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const DEV_TOKEN_REFRESH: Duration = Duration::from_secs(3600);
/// The lock file in the state dir; its content names the holder (`{"pid", "proxy_url"}`).
pub const LOCK_FILE: &str = "dev.lock";
/// Why `dev` will not start. Each is found before the state dir is touched; `dev` prints the
/// one line and exits as `serve` does for the same cause ([`StartError`]): 64 for a state dir
/// in use or a bad flag, 69 for a port another process holds.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Another `dev` holds the state dir.
    #[error(
        "{} is in use by a running identity-binding-proxy dev ({holder}); to run a second one \
         beside it, give it its own state dir and free ports: identity-binding-proxy-dev dev \
         --state-dir OTHER_DIR --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0",
        dir.display()
    )]
    InUse { dir: PathBuf, holder: String },
    /// A port the proxy would listen on cannot be bound.
    #[error(
        "cannot listen on {addr} ({flag}): {error}; choose another address with {flag} \
         ({flag} 127.0.0.1:0 takes any free port)"
    )]
    CannotListen {
        flag: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// A flag or a file named by one is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl From<Refusal> for StartError {
    /// The refusal's own line, with the kind `serve` gives the same cause: a port is
    /// classified by [`cannot_listen`](identity_binding_proxy::serve::cannot_listen).
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        let kind = match refusal {
            Refusal::CannotListen { flag, addr, error } => {
                identity_binding_proxy::serve::cannot_listen(addr, flag, error).kind()
            }
            Refusal::InUse { .. } | Refusal::Invalid(_) => Kind::Usage,
        };
        StartError::new(kind, message)
    }
}

/// A failure of `dev`, `dev token` or `emulate` as the process reports it: a [`Refusal`] or a
/// start-up step of the proxy keeps its kind (and exit code); anything else went wrong in the
/// emulators or dev's own state, which are ours (70).
pub fn failure(e: anyhow::Error) -> StartError {
    let e = match e.downcast::<Refusal>() {
        Ok(refusal) => return refusal.into(),
        Err(e) => e,
    };
    match e.downcast::<StartError>() {
        Ok(start) => start,
        Err(e) => StartError::internal(format!("{e:#}")),
    }
}

/// The demo identity, kept stable across runs of one state dir.
#[derive(serde::Serialize, serde::Deserialize)]
struct DemoIdentity {
    tenant_id: String,
    client_id: String,
}

/// What `dev.json` holds: the machine-readable handle on a running dev system.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct DevInfo {
    pub proxy_url: String,
    pub sni_name: String,
    pub ca_file: PathBuf,
    pub tenant_id: String,
    pub client_id: String,
    pub authority_host: String,
    pub token_audience: String,
    pub allowed_token_file: PathBuf,
    pub denied_token_file: PathBuf,
    pub admin_url: String,
    pub kube_url: String,
    pub entra_url: String,
    pub issuer_url: String,
    pub rbac_file: PathBuf,
}

/// A running dev system (used by `dev` and by tests that want it in-process).
pub struct DevSystem {
    pub info: DevInfo,
    pub kube: KubeEmulator,
    pub entra: EntraEmulator,
    pub proxy: identity_binding_proxy::serve::RunningProxy,
    background: CancellationToken,
    /// Held until every part has stopped (dropped last, with the rest of `self`).
    _lock: StateLock,
}

impl DevSystem {
    /// Stops like `serve` does (the proxy first, with its shutdown delay on SIGTERM), then
    /// the emulators the draining requests still need.
    pub async fn stop_gracefully(self, how: identity_binding_proxy::serve::signal::Stop) {
        self.proxy.stop_after(how).await;
        self.background.cancel();
        self.kube.shutdown().await;
        self.entra.shutdown().await;
    }

    pub async fn shutdown(self) {
        self.background.cancel();
        self.proxy.stop().await;
        self.kube.shutdown().await;
        self.entra.shutdown().await;
    }
}

pub async fn run(args: DevArgs) -> Result<(), StartError> {
    match &args.command {
        Some(crate::cli::DevCommand::Token(t)) => return print_token(t).map_err(failure),
        Some(crate::cli::DevCommand::RotateCa(r)) => return rotate_ca(r),
        None => {}
    }
    let system = start(&args).await.map_err(failure)?;
    print_banner(&system.info, &args.state_dir);
    let how = identity_binding_proxy::serve::signal::shutdown_requested().await;
    tracing::info!("stopping dev");
    system.stop_gracefully(how).await;
    Ok(())
}

/// One step of a CA rotation on a running dev: a refusal changed nothing and exits 64; a
/// certificate the running proxy did not take was put back and exits 69.
fn rotate_ca(args: &crate::cli::DevRotateCaArgs) -> Result<(), StartError> {
    match rotate_ca::run(args) {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(rotate_ca::RotateError::Refused(why)) => Err(StartError::usage(why)),
        // The running dev did not do its part: an unavailable dependency, as for serve.
        Err(rotate_ca::RotateError::NotServed(why)) => Err(StartError::unavailable(why)),
        Err(rotate_ca::RotateError::Failed(e)) => Err(failure(e)),
    }
}

fn print_token(t: &DevTokenArgs) -> anyhow::Result<()> {
    let token = mint_from_state_dir(
        &t.state_dir.join("kube"),
        &MintRequest {
            namespace: t.namespace.clone(),
            service_account: t.service_account.clone(),
            audiences: vec![t.audience.clone()],
            expires_in_secs: t.expires_in,
            pod_name: None,
        },
    )
    .with_context(|| {
        format!(
            "no dev kube emulator state in {} (run `dev` once first)",
            t.state_dir.display()
        )
    })?;
    println!("{token}");
    Ok(())
}

/// Starts every part, waits for the proxy to be ready, and writes the state dir. Refuses
/// ([`Refusal`], which [`failure`] turns into the process's exit) before writing anything when the state dir is in use, a port is taken or a
/// flag is wrong.
pub async fn start(args: &DevArgs) -> anyhow::Result<DevSystem> {
    let dir = absolute(&args.state_dir)?;
    let reserved = preflight(args, &dir).await?;
    // Nothing was written until here.
    let lock = prepare_state_dir(&dir).await?;
    let identity = demo_identity(&dir)?;
    let rbac_file = rbac_file(args, &dir, &identity)?;
    let kube = KubeEmulator::start(KubeEmulatorConfig {
        listen: loopback(0),
        state_dir: dir.join("kube"),
        rbac_file: Some(rbac_file.clone()),
        issuer: None,
    })
    .await
    .context("starting the kube-apiserver emulator")?;
    let ca = serving_certificate(&dir)?;
    let background = CancellationToken::new();
    let (issuer_url, bindings) = start_issuer(&dir, &identity, &background).await?;
    // Entra, with ONE FIC per bound identity. Shortened on purpose: dev (and the tests built
    // on it, which add FICs and change keys and expect the next call to see it) applies FIC
    // changes and issuer key changes at once, where Entra takes minutes.
    let entra = EntraEmulator::start(EntraEmulatorConfig {
        listen: loopback(0),
        latency: Duration::from_millis(args.entra_latency_ms),
        token_lifetime: Duration::from_secs(args.entra_token_lifetime_secs),
        issuer_metadata_ttl: Duration::ZERO,
        fic_propagation: Duration::ZERO,
        ..Default::default()
    })
    .await
    .context("starting the Entra emulator")?;
    register_fics(&entra, &bindings, &issuer_url)?;
    let upstreams = (&kube, issuer_url.template(), entra.url());
    let proxy = start_proxy(args, &dir, upstreams, reserved).await?;
    let tokens = (
        dir.join("tokens/allowed.jwt"),
        dir.join("tokens/denied.jwt"),
    );
    write_tokens(&kube, &tokens.0, &tokens.1)?;
    spawn_token_refresh(&kube, tokens.clone(), &background);
    write_public(&dir.join("ca.crt"), ca.cert_pem.as_bytes())?;
    let info = DevInfo {
        proxy_url: format!("https://{}", proxy.addr),
        sni_name: DEV_SNI_NAME.into(),
        ca_file: dir.join("ca.crt"),
        tenant_id: identity.tenant_id.clone(),
        client_id: identity.client_id.clone(),
        authority_host: entra.url(),
        token_audience: DEFAULT_TOKEN_AUDIENCE.into(),
        allowed_token_file: tokens.0,
        denied_token_file: tokens.1,
        admin_url: format!("http://{}", proxy.admin_addr),
        kube_url: kube.url(),
        entra_url: entra.url(),
        issuer_url: issuer_url.template().to_string(),
        rbac_file,
    };
    write_public(&dir.join("env"), env_file(&info).as_bytes())?;
    // What `doctor` reads of a cluster, and the FIC as `az` lists it.
    kube.set_objects(cluster::objects(&dir, &info, proxy.admin_addr)?);
    let fics = cluster::fic_list(&entra.fics(&identity.client_id));
    write_public(&dir.join("fics.json"), &serde_json::to_vec_pretty(&fics)?)?;
    lock.record(Some(&info.proxy_url))?;
    write_public(&dir.join("dev.json"), &serde_json::to_vec_pretty(&info)?)?;
    Ok(DevSystem {
        info,
        kube,
        entra,
        proxy,
        background,
        _lock: lock,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Everything checked before anything is written, in the order a person fixes it (another
/// dev here says more than its ports): the lock, the flags, the ports (kept reserved), RBAC.
async fn preflight(
    args: &DevArgs,
    dir: &Path,
) -> anyhow::Result<identity_binding_proxy::serve::Listeners> {
    StateLock::check(dir)?;
    // The proxy's configuration with stand-ins for what only exists once the emulators run,
    // for its flags (`--` ones included) and the addresses they choose.
    let planned = proxy_config(
        args,
        dir,
        &dir.join("kube/kubeconfig"),
        "http://127.0.0.1/{tenant}/{client_id}",
        "http://127.0.0.1",
    )
    .map_err(Refusal::Invalid)?;
    let reserved = reserve_ports(&planned).await?;
    if let Some(rbac) = &args.rbac {
        check_rbac(rbac)?;
    }
    Ok(reserved)
}

/// The state dir and its parts, private, locked for this process.
async fn prepare_state_dir(dir: &Path) -> anyhow::Result<StateLock> {
    create_private_dir(dir)?;
    let lock = StateLock::acquire(dir).await?;
    for sub in ["tokens", "tls", "kube", "proxy"] {
        create_private_dir(&dir.join(sub))?;
    }
    // A stale dev.json would claim readiness before we are ready.
    let _ = std::fs::remove_file(dir.join("dev.json"));
    Ok(lock)
}

/// `--rbac`, or the demo RBAC in the state dir (written once; edits are kept).
fn rbac_file(args: &DevArgs, dir: &Path, identity: &DemoIdentity) -> anyhow::Result<PathBuf> {
    if let Some(f) = &args.rbac {
        return absolute(f);
    }
    let f = dir.join("rbac.yaml");
    if !f.exists() {
        write_public(&f, demo_rbac(&identity.client_id).as_bytes())?;
    }
    Ok(f)
}

/// A fresh CA and the serving certificate for the SNI name, written to `tls/` (the CA's key
/// too, for `dev rotate-ca`; a rotation a previous run left half done is over).
fn serving_certificate(dir: &Path) -> anyhow::Result<DevCa> {
    let ca = DevCa::generate("identity-binding-proxy dev CA")?;
    let serving = ca.issue(&[DEV_SNI_NAME])?;
    for stale in ["tls/rotation.json", "tls/ca-next.crt", "tls/ca-next.key"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    write_private(&dir.join("tls/ca.key"), ca.key_pem().as_bytes())?;
    write_public(&dir.join("tls/ca.crt"), ca.cert_pem.as_bytes())?;
    write_public(&dir.join("tls/tls.crt"), serving.cert_pem.as_bytes())?;
    write_private(&dir.join("tls/tls.key"), serving.key_pem.as_bytes())?;
    Ok(ca)
}

/// Our issuer: a key kept across runs, its documents published for the bindings (written
/// once; edits are kept) on a loopback static host that runs until `stop`.
async fn start_issuer(
    dir: &Path,
    identity: &DemoIdentity,
    stop: &CancellationToken,
) -> anyhow::Result<(IssuerUrl, BindingSet)> {
    let issuer_key_file = dir.join("issuer.key");
    let issuer_key = if issuer_key_file.exists() {
        SigningKey::from_pem(&std::fs::read_to_string(&issuer_key_file)?)?
    } else {
        let k = SigningKey::generate(2048)?;
        write_private(&issuer_key_file, k.private_pem().as_bytes())?;
        k
    };
    let docs = dir.join("issuer-docs");
    let _ = std::fs::remove_dir_all(&docs);
    std::fs::create_dir_all(&docs)?;
    let host = ibp_emulators::static_host::start(loopback(0), docs.clone(), stop.clone()).await?;
    let issuer_url = IssuerUrl::parse(&format!("http://{host}/{{tenant}}/{{client_id}}"))
        .map_err(anyhow::Error::msg)?;
    let bindings_file = dir.join("bindings.yaml");
    if !bindings_file.exists() {
        let yaml = format!(
            "# Identities this dev cluster may serve (hot reloaded).\nbindings:\n  - clientId: {}\n    tenantId: {}\n",
            identity.client_id, identity.tenant_id
        );
        write_public(&bindings_file, yaml.as_bytes())?;
    }
    let bindings = identity_binding_proxy::exchange::bindings::load(&bindings_file)
        .map_err(anyhow::Error::msg)?;
    let publics = [issuer_key.public().clone()];
    identity_binding_proxy::cli::issuer::publish(&docs, &publics, &bindings, &issuer_url)
        .map_err(anyhow::Error::msg)?;
    Ok((issuer_url, bindings))
}

/// The proxy, through the same start-up as `serve`, on the ports reserved by the preflight;
/// returns once it is ready.
async fn start_proxy(
    args: &DevArgs,
    dir: &Path,
    (kube, issuer_url, entra_url): (&KubeEmulator, &str, String),
    reserved: identity_binding_proxy::serve::Listeners,
) -> anyhow::Result<identity_binding_proxy::serve::RunningProxy> {
    let kubeconfig = kube.kubeconfig_path();
    let mut config =
        proxy_config(args, dir, &kubeconfig, issuer_url, &entra_url).map_err(anyhow::Error::msg)?;
    // Edits in the state dir should show at once when someone is trying things out.
    config.reload_period = Duration::from_millis(500);
    config.refresh_tick = Duration::from_millis(250);
    let proxy = identity_binding_proxy::serve::start_on(config, reserved).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !proxy.readiness.is_ready() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the proxy did not become ready within 30 s (JWKS not loaded from the kube emulator)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(proxy)
}

/// Re-mints the dev tokens before they expire, as kubelet does for projected tokens.
fn spawn_token_refresh(
    kube: &KubeEmulator,
    (allowed, denied): (PathBuf, PathBuf),
    stop: &CancellationToken,
) {
    let (kube, stop) = (kube.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(DEV_TOKEN_REFRESH) => {}
            }
            if let Err(e) = write_tokens(&kube, &allowed, &denied) {
                tracing::warn!(error = %e, "re-minting dev tokens failed");
            }
        }
    });
}

/// The dev proxy's configuration: dev's wiring, then the `serve` flags given after `--`.
fn proxy_config(
    args: &DevArgs,
    dir: &Path,
    kubeconfig: &Path,
    issuer_url: &str,
    authority_host: &str,
) -> Result<ProxyConfig, String> {
    let mut flags: Vec<String> = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!(
            "--tls={DEV_SNI_NAME}={},{}",
            dir.join("tls/tls.crt").display(),
            dir.join("tls/tls.key").display()
        ),
        format!("--default-sni={DEV_SNI_NAME}"),
        format!("--issuer-key={}", dir.join("issuer.key").display()),
        format!("--issuer-url={issuer_url}"),
        format!("--bindings={}", dir.join("bindings.yaml").display()),
        format!("--authority-host={authority_host}"),
        format!("--listen={}", args.listen),
        format!("--admin-listen={}", args.admin_listen),
        format!("--tokenreview-ttl-secs={}", args.tokenreview_ttl_secs),
        format!("--authz-allowed-ttl-secs={}", args.authz_allowed_ttl_secs),
        format!("--authz-denied-ttl-secs={}", args.authz_denied_ttl_secs),
        format!("--cache-capacity={}", args.cache_capacity.max(1)),
        format!(
            "--cache-min-remaining-secs={}",
            args.cache_min_remaining_secs
        ),
        "--drain-timeout-secs=10".to_string(),
        "--shutdown-delay-secs=1".to_string(),
        format!("--state-dir={}", dir.join("proxy").display()),
    ];
    flags.extend(args.proxy_flags.iter().cloned());
    ProxyConfig::from_flags(&flags).map_err(|e| {
        // clap's message goes on with usage lines; the first says what is wrong.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid flags").trim();
        let first = first.strip_prefix("error: ").unwrap_or(first);
        if args.proxy_flags.is_empty() {
            first.to_string()
        } else {
            format!("{first} (in the serve flags after `--`)")
        }
    })
}

/// Binds the proxy's ports, so a taken one is refused before anything is written; the proxy
/// then serves on these very sockets.
async fn reserve_ports(
    config: &ProxyConfig,
) -> Result<identity_binding_proxy::serve::Listeners, Refusal> {
    let bind = |flag: &'static str, addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| Refusal::CannotListen { flag, addr, error })
    };
    Ok(identity_binding_proxy::serve::Listeners {
        proxy: bind("--listen", config.server.listen).await?,
        admin: bind("--admin-listen", config.admin.listen).await?,
    })
}

/// A `--rbac` file the kube emulator would refuse is refused here, before anything is written
/// (a missing one is allowed: the emulator starts with no RBAC objects and watches for it).
fn check_rbac(file: &Path) -> Result<(), Refusal> {
    let text = match std::fs::read(file) {
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| Refusal::Invalid(format!("--rbac {}: not UTF-8", file.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Refusal::Invalid(format!("--rbac {}: {e}", file.display()))),
    };
    ibp_emulators::rbac::RbacPolicy::parse(&text)
        .map(|_| ())
        .map_err(|e| Refusal::Invalid(format!("--rbac {}: {e}", file.display())))
}

/// Creates `dir` (and missing parents) owner-only: it holds keys and tokens. An existing
/// directory keeps its mode: it is the user's choice, and the secrets in it are 0600 anyway.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// `dev`'s hold on its state dir: an exclusive `flock` on `dev.lock`. The kernel releases it
/// when the process ends, however it ends (SIGKILL included), so a crash leaves no stale lock
/// and the file itself stays (removing it would let two processes lock two different files).
struct StateLock {
    file: std::fs::File,
}

/// What `dev.lock` says about its holder.
#[derive(serde::Serialize, serde::Deserialize)]
struct Holder {
    pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proxy_url: Option<String>,
}

impl StateLock {
    /// Refuses when a running `dev` holds `dir`. Creates nothing: the state dir of a
    /// first `dev` appears only once its ports and flags are known to be good.
    fn check(dir: &Path) -> Result<(), Refusal> {
        let path = dir.join(LOCK_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Refusal::Invalid(format!("{}: {e}", path.display()))),
        };
        // Shared: it conflicts with the holder's exclusive lock only, and is released when
        // `file` closes on return.
        match file.try_lock_shared() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => Err(Self::in_use(dir, file)),
            Err(std::fs::TryLockError::Error(e)) => Err(Refusal::Invalid(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// Takes `dir` for this process and records its pid.
    async fn acquire(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(LOCK_FILE);
        // Not truncated: until the lock is ours, the content is the holder's.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(identity_binding_proxy::files::PRIVATE)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Another `dev` running `check` holds a shared lock for a moment: a few tries, 200 ms
        // in all, tell that from a running holder.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Self::in_use(dir, file).into())
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    anyhow::bail!("cannot lock {}: {e}", path.display())
                }
            }
        }
        let lock = Self { file };
        lock.record(None)?;
        Ok(lock)
    }

    /// Writes who holds the lock. In place, not through a rename: the lock belongs to this
    /// file's inode, and a new inode would be unlocked.
    fn record(&self, proxy_url: Option<&str>) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let holder = Holder {
            pid: std::process::id(),
            proxy_url: proxy_url.map(str::to_string),
        };
        let mut bytes = serde_json::to_vec(&holder)?;
        bytes.push(b'\n');
        self.file.set_len(0)?;
        self.file.write_all_at(&bytes, 0)?;
        Ok(())
    }

    fn in_use(dir: &Path, mut file: std::fs::File) -> Refusal {
        use std::io::Read;
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let holder = match serde_json::from_str::<Holder>(&text) {
            Ok(Holder {
                pid,
                proxy_url: Some(url),
            }) => format!("pid {pid}, proxy {url}"),
            Ok(Holder {
                pid,
                proxy_url: None,
            }) => format!("pid {pid}, still starting"),
            Err(_) => "starting".to_string(),
        };
        Refusal::InUse {
            dir: dir.to_path_buf(),
            holder,
        }
    }
}

fn register_fics(
    entra: &EntraEmulator,
    bindings: &BindingSet,
    url: &IssuerUrl,
) -> anyhow::Result<()> {
    for b in bindings.iter() {
        entra
            .add_fic(Fic {
                client_id: b.client_id.clone(),
                issuer: url.for_binding(b),
                subject: b.subject.clone(),
                audience: FIC_AUDIENCE.into(),
                name: "identity-binding-proxy".into(),
            })
            .map_err(|e| anyhow::anyhow!("registering the FIC of {}: {e}", b.client_id))?;
    }
    Ok(())
}

fn write_tokens(kube: &KubeEmulator, allowed: &Path, denied: &Path) -> anyhow::Result<()> {
    for (file, sa) in [(allowed, "demo"), (denied, "intruder")] {
        let token = kube.mint_token(&MintRequest {
            namespace: "demo".into(),
            service_account: sa.into(),
            audiences: vec![DEFAULT_TOKEN_AUDIENCE.into()],
            expires_in_secs: DEV_TOKEN_LIFETIME.as_secs() as i64,
            pod_name: Some(format!("{sa}-pod")),
        })?;
        write_private(file, token.as_bytes())?;
    }
    Ok(())
}

fn demo_identity(dir: &Path) -> anyhow::Result<DemoIdentity> {
    let file = dir.join("identity.json");
    if let Ok(bytes) = std::fs::read(&file) {
        if let Ok(id) = serde_json::from_slice::<DemoIdentity>(&bytes) {
            return Ok(id);
        }
    }
    let id = DemoIdentity {
        tenant_id: uuid::Uuid::new_v4().to_string(),
        client_id: uuid::Uuid::new_v4().to_string(),
    };
    write_public(&file, &serde_json::to_vec_pretty(&id)?)?;
    Ok(id)
}

/// The demo RBAC: ServiceAccount demo/demo may use the demo identity; demo/intruder may not.
pub fn demo_rbac(client_id: &str) -> String {
    format!(
        r#"# Demo RBAC of `identity-binding-proxy dev` (watched: edits apply live).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: use-demo-identity
rules:
  - apiGroups: ["cid.wi.aks.azure.com"]
    resources: ["{client_id}"]
    verbs: ["use-managed-identity"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: demo-uses-demo-identity
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: use-demo-identity
subjects:
  - kind: ServiceAccount
    name: demo
    namespace: demo
---
# What the proxy itself may do, as the chart grants it (`doctor` checks it).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: identity-binding-proxy
rules:
  - apiGroups: ["authentication.k8s.io"]
    resources: ["tokenreviews"]
    verbs: ["create"]
  - apiGroups: ["authorization.k8s.io"]
    resources: ["subjectaccessreviews"]
    verbs: ["create"]
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["clusterroles", "clusterrolebindings", "roles", "rolebindings"]
    verbs: ["get", "list", "watch"]
  - nonResourceURLs: ["/openid/v1/jwks", "/.well-known/openid-configuration"]
    verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: identity-binding-proxy
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: identity-binding-proxy
subjects:
  - kind: ServiceAccount
    name: identity-binding-proxy
    namespace: identity-binding-proxy
"#
    )
}

fn env_file(info: &DevInfo) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    format!(
        "# Source this file to point an Azure SDK (proxy mode) at identity-binding-proxy dev.\n\
         export AZURE_KUBERNETES_TOKEN_PROXY={}\n\
         export AZURE_KUBERNETES_SNI_NAME={}\n\
         export AZURE_KUBERNETES_CA_FILE={}\n\
         export AZURE_CLIENT_ID={}\n\
         export AZURE_TENANT_ID={}\n\
         export AZURE_AUTHORITY_HOST={}\n\
         export AZURE_FEDERATED_TOKEN_FILE={}\n",
        shell_quote(&info.proxy_url),
        shell_quote(&info.sni_name),
        q(&info.ca_file),
        info.client_id,
        info.tenant_id,
        shell_quote("https://login.microsoftonline.com/"),
        q(&info.allowed_token_file),
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn print_banner(info: &DevInfo, state_dir: &Path) {
    println!(
        "\nidentity-binding-proxy dev is ready.\n\n\
         \x20 proxy        {}  (SNI {})\n\
         \x20 admin        {}/metrics\n\
         \x20 kube         {}\n\
         \x20 entra        {}\n\
         \x20 identity     client {}  tenant {}\n\
         \x20 rbac         {}  (edit it: changes apply live)\n\n\
         Point an app at it:\n\n\
         \x20 source {}/env\n\n\
         Then e.g. Python (azure-identity >= 1.27.0):\n\
         \x20 python -c 'from azure.identity import WorkloadIdentityCredential as W; print(W(enable_azure_proxy=True).get_token(\"https://management.azure.com/.default\").token[:20])'\n\n\
         More service-account tokens:  identity-binding-proxy-dev dev token --state-dir {} --namespace NS --service-account SA\n",
        info.proxy_url,
        info.sni_name,
        info.admin_url,
        info.kube_url,
        info.entra_url,
        info.client_id,
        info.tenant_id,
        info.rbac_file.display(),
        state_dir.display(),
        state_dir.display(),
    );
}

/// `p` made absolute, without `.` components (paths land in env files users read).
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect())
}

pub async fn emulate_kube(args: EmulateKubeArgs) -> anyhow::Result<()> {
    let kube = KubeEmulator::start(KubeEmulatorConfig {
        listen: args.listen,
        state_dir: absolute(&args.state_dir)?,
        rbac_file: args.rbac.map(|f| absolute(&f)).transpose()?,
        issuer: args.issuer,
    })
    .await?;
    println!(
        "kube-apiserver emulator on {}\n  issuer      {}\n  kubeconfig  {}",
        kube.url(),
        kube.issuer(),
        kube.kubeconfig_path().display()
    );
    let _ = identity_binding_proxy::serve::signal::shutdown_requested().await;
    kube.shutdown().await;
    Ok(())
}

pub async fn emulate_entra(args: EmulateEntraArgs) -> anyhow::Result<()> {
    let mut fics = Vec::new();
    for f in &args.fic {
        fics.push(
            f.parse::<Fic>()
                .map_err(|e| anyhow::anyhow!("--fic '{f}': {e}"))?,
        );
    }
    let entra = EntraEmulator::start(EntraEmulatorConfig {
        listen: args.listen,
        token_lifetime: Duration::from_secs(args.token_lifetime_secs),
        latency: Duration::from_millis(args.latency_ms),
        fics,
        issuer_metadata_ttl: Duration::from_secs(args.issuer_metadata_ttl_secs),
        fic_propagation: Duration::from_secs(args.fic_propagation_secs),
        ..Default::default()
    })
    .await?;
    println!("Entra emulator on {}", entra.url());
    let _ = identity_binding_proxy::serve::signal::shutdown_requested().await;
    entra.shutdown().await;
    Ok(())
}

pub async fn emulate_static(args: EmulateStaticArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        anyhow::bail!("the static host is a test double: listen on a loopback address only");
    }
    let stop = CancellationToken::new();
    let addr =
        ibp_emulators::static_host::start(args.listen, absolute(&args.dir)?, stop.clone()).await?;
    println!(
        "static host on http://{addr} serving {}",
        args.dir.display()
    );
    let _ = identity_binding_proxy::serve::signal::shutdown_requested().await;
    stop.cancel();
    Ok(())
}
