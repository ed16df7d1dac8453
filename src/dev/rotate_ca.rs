//! `dev rotate-ca`: the serving CA of a running `dev` rotated in the order that fails no
//! client, one step per call, each refused unless the one before it is done:
//!
//! 1. `bundle` — a new CA; the published CA file becomes [old, new]. The old CA stays first: it
//!    still signs the served certificate, and .NET trusts only the first certificate.
//! 2. The workloads that read the CA file before (some read it once, at start: the AKS how-to's
//!    sample) are restarted, so they hold both CAs. `leaf` is refused while a process whose
//!    `AZURE_KUBERNETES_CA_FILE` is this CA file and that started before the bundle still runs
//!    (the dev equivalent of "pods started before the bundle was published").
//! 3. `leaf` — the proxy serves a certificate of the new CA; the CA file becomes [new, old].
//! 4. `drop-old` — the CA file becomes [new]; the new CA is the CA.
//!
//! Switching the certificate before step 2 makes a client that read the CA once fail every
//! handshake — and Go prints the URL of the failed request, which for the how-to's sample holds
//! the service-account token in its query.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{DevRotateCaArgs, RotateStep};
use ibp_emulators::pki::DevCa;
use identity_binding_proxy::files::{write_private, write_public};

/// Where the state dir keeps the CA and the rotation, under `tls/`.
const CA_CERT: &str = "tls/ca.crt";
const CA_KEY: &str = "tls/ca.key";
const NEXT_CERT: &str = "tls/ca-next.crt";
const NEXT_KEY: &str = "tls/ca-next.key";
const ROTATION: &str = "tls/rotation.json";
/// The certificate the proxy serves, and its key.
const LEAF_CERT: &str = "tls/tls.crt";
const LEAF_KEY: &str = "tls/tls.key";
/// The proxy polls its certificate files every 500 ms in dev: this is ample.
const SERVE_WAIT: Duration = Duration::from_secs(15);

/// Why a step did not happen. A refusal changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    Refused(String),
    /// The running proxy did not take a step's certificate; the step was undone.
    #[error("{0}")]
    NotServed(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

fn refused(message: impl Into<String>) -> RotateError {
    RotateError::Refused(message.into())
}

/// How far a rotation is (absent: none under way).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Done {
    Bundle,
    Leaf,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy)]
struct Rotation {
    done: Done,
    /// When the bundle was published (Unix seconds).
    bundle_published: u64,
    /// Clock ticks since boot (the unit of `/proc/PID/stat`'s start times) just after the
    /// bundle was written: a process that started by then may hold the old CA alone.
    bundle_ticks: u64,
}

/// The running dev the steps act on.
struct Dev {
    dir: PathBuf,
    info: super::DevInfo,
    pid: Option<u32>,
}

/// Runs one step; returns what to tell the user.
pub fn run(args: &DevRotateCaArgs) -> Result<String, RotateError> {
    let dev = running_dev(&args.state_dir)?;
    let rotation = dev.rotation()?;
    match (args.step, rotation.as_ref()) {
        (RotateStep::Status, r) => Ok(dev.status(r)),
        (RotateStep::Bundle, None) => dev.publish_bundle(),
        (RotateStep::Bundle, r @ Some(_)) => Err(refused(format!(
            "a CA rotation is already under way; {}",
            dev.status(r)
        ))),
        (RotateStep::Leaf, Some(r)) if r.done == Done::Bundle => dev.switch_leaf(r),
        (RotateStep::Leaf, Some(_)) => Err(refused(
            "the proxy already serves the new CA's certificate; next: --step drop-old",
        )),
        (RotateStep::Leaf, None) => Err(refused(format!(
            "no new CA is published yet: the certificate may switch to a new CA only once \
             every client trusts it; first: {}",
            dev.command("bundle")
        ))),
        (RotateStep::DropOld, Some(r)) if r.done == Done::Leaf => dev.drop_old(),
        (RotateStep::DropOld, r) => Err(refused(format!(
            "the proxy does not serve a certificate of the new CA yet: dropping the old CA now \
             would fail every client; {}",
            dev.status(r)
        ))),
    }
}

/// The dev running on `state_dir`, or a refusal saying how to start one.
fn running_dev(state_dir: &Path) -> Result<Dev, RotateError> {
    let dir = super::absolute(state_dir)?;
    let not_running = || {
        refused(format!(
            "no identity-binding-proxy dev is running on {}: the rotation acts on a running \
             dev (start one with: identity-binding-proxy-dev dev --state-dir {})",
            dir.display(),
            dir.display()
        ))
    };
    let pid = match super::StateLock::check(&dir) {
        Ok(()) => return Err(not_running()),
        Err(super::Refusal::InUse { .. }) => lock_holder(&dir),
        Err(other) => return Err(refused(other.to_string())),
    };
    let info = std::fs::read(dir.join("dev.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<super::DevInfo>(&b).ok())
        .ok_or_else(|| refused(format!("the dev on {} is still starting", dir.display())))?;
    if !dir.join(CA_KEY).exists() {
        return Err(refused(format!(
            "the dev on {} keeps no CA key (started by an older version): restart it",
            dir.display()
        )));
    }
    Ok(Dev { dir, info, pid })
}

fn lock_holder(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(super::LOCK_FILE)).ok()?;
    let holder: super::Holder = serde_json::from_str(&text).ok()?;
    Some(holder.pid)
}

impl Dev {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> anyhow::Result<String> {
        let path = self.path(name);
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn ca(&self, cert: &str, key: &str) -> anyhow::Result<DevCa> {
        DevCa::from_pem(&self.read(cert)?, &self.read(key)?)
            .map_err(|e| anyhow::anyhow!("{cert}: {e}"))
    }

    fn rotation(&self) -> Result<Option<Rotation>, RotateError> {
        match std::fs::read(self.path(ROTATION)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                refused(format!(
                    "{}: {e}; remove it and restart dev to start over",
                    self.path(ROTATION).display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RotateError::Failed(e.into())),
        }
    }

    fn record(&self, rotation: &Rotation) -> anyhow::Result<()> {
        write_public(&self.path(ROTATION), &serde_json::to_vec_pretty(rotation)?)?;
        Ok(())
    }

    fn command(&self, step: &str) -> String {
        format!(
            "identity-binding-proxy-dev dev rotate-ca --state-dir {} --step {step}",
            self.dir.display()
        )
    }

    fn status(&self, rotation: Option<&Rotation>) -> String {
        match rotation.map(|r| r.done) {
            None => format!(
                "no CA rotation under way; to start one: {}",
                self.command("bundle")
            ),
            Some(Done::Bundle) => format!(
                "the bundle [old, new] is published; restart the workloads that read {} before \
                 it, then: {}",
                self.info.ca_file.display(),
                self.command("leaf")
            ),
            Some(Done::Leaf) => format!(
                "the proxy serves the new CA's certificate and {} is [new, old]; to finish: {}",
                self.info.ca_file.display(),
                self.command("drop-old")
            ),
        }
    }

    /// Step 1: a new CA, published after the old one.
    fn publish_bundle(&self) -> Result<String, RotateError> {
        let old = self.read(CA_CERT)?;
        let new = DevCa::generate(&format!("identity-binding-proxy dev CA {}", unix_now()))?;
        write_private(&self.path(NEXT_KEY), new.key_pem().as_bytes())
            .map_err(anyhow::Error::from)?;
        write_public(&self.path(NEXT_CERT), new.cert_pem.as_bytes())
            .map_err(anyhow::Error::from)?;
        let bundle = format!("{}{}", old, new.cert_pem);
        write_public(&self.info.ca_file, bundle.as_bytes()).map_err(anyhow::Error::from)?;
        // Taken after the write: a client that started before it, even while this ran, may
        // have read the old file.
        let ticks = processes::now_ticks()?;
        self.record(&Rotation {
            done: Done::Bundle,
            bundle_published: unix_now(),
            bundle_ticks: ticks,
        })?;
        let waiting = self.readers_started_before(ticks)?;
        Ok(format!(
            "published {} = [old CA, new CA] (the old CA first: it still signs the served \
             certificate, and .NET trusts only the first).\n{}\nthen: {}",
            self.info.ca_file.display(),
            restart_advice(&waiting),
            self.command("leaf")
        ))
    }

    /// Processes (other than dev and us) pointed at this CA file that started by `ticks`.
    fn readers_started_before(&self, ticks: u64) -> anyhow::Result<Vec<processes::Reader>> {
        let skip = [Some(std::process::id()), self.pid];
        Ok(processes::ca_readers(&self.info.ca_file)?
            .into_iter()
            .filter(|r| r.start_ticks <= ticks && !skip.contains(&Some(r.pid)))
            .collect())
    }

    /// Step 3: the proxy serves a certificate of the new CA; only once it does, the CA file
    /// becomes [new, old] and the step counts as done. If the proxy does not take the new
    /// certificate, the previous one is put back: the rotation stays at the bundle, and the CA
    /// file [old, new] still fits what is served, so the step can simply be run again.
    fn switch_leaf(&self, rotation: &Rotation) -> Result<String, RotateError> {
        self.refuse_unless_restarted(rotation)?;
        let (old, new) = (self.read(CA_CERT)?, self.ca(NEXT_CERT, NEXT_KEY)?);
        let leaf = new.issue(&[&self.info.sni_name])?;
        let previous = (self.read(LEAF_KEY)?, self.read(LEAF_CERT)?);
        self.write_leaf(&leaf.key_pem, &leaf.cert_pem)?;
        if let Err(not_served) = self.wait_until_served(&new.cert_pem) {
            let outcome = match self.write_leaf(&previous.0, &previous.1) {
                Ok(()) => format!(
                    "the previous certificate is back in place and {} is still [old CA, new CA]; \
                     see dev's log, then: {}",
                    self.info.ca_file.display(),
                    self.command("leaf")
                ),
                Err(e) => format!("putting the previous certificate back failed too: {e:#}"),
            };
            return Err(RotateError::NotServed(format!("{not_served:#}; {outcome}")));
        }
        let bundle = format!("{}{}", new.cert_pem, old);
        write_public(&self.info.ca_file, bundle.as_bytes()).map_err(anyhow::Error::from)?;
        self.record(&Rotation {
            done: Done::Leaf,
            ..*rotation
        })?;
        Ok(format!(
            "the proxy serves a certificate of the new CA; {} = [new CA, old CA].\nnext: {}",
            self.info.ca_file.display(),
            self.command("drop-old")
        ))
    }

    /// Refuses the switch while a process that read the CA file before the bundle runs, or
    /// when the published file no longer holds the new CA.
    fn refuse_unless_restarted(&self, rotation: &Rotation) -> Result<(), RotateError> {
        let waiting = self.readers_started_before(rotation.bundle_ticks)?;
        if !waiting.is_empty() {
            return Err(refused(format!(
                "these processes read {} before the new CA was published and may trust the old \
                 CA alone (a client that reads the CA file once fails every request after the \
                 switch); restart them first:\n{}",
                self.info.ca_file.display(),
                list(&waiting)
            )));
        }
        let new = self.read(NEXT_CERT)?;
        let published = std::fs::read_to_string(&self.info.ca_file).unwrap_or_default();
        if !published.contains(new.trim()) {
            return Err(refused(format!(
                "{} no longer holds the new CA (was it replaced?): publish it again (restart \
                 dev to start over)",
                self.info.ca_file.display()
            )));
        }
        Ok(())
    }

    /// Replaces the serving key and certificate, the key first. The proxy reads the two files
    /// one after the other, so a reload may see the new key with the old certificate; it
    /// refuses such a pair ("do not fit together") and keeps serving what it had, and its next
    /// poll sees the certificate change and loads the matching pair.
    fn write_leaf(&self, key_pem: &str, cert_pem: &str) -> anyhow::Result<()> {
        write_private(&self.path(LEAF_KEY), key_pem.as_bytes())?;
        write_public(&self.path(LEAF_CERT), cert_pem.as_bytes())?;
        Ok(())
    }

    /// Step 4: the old CA leaves the bundle; the new one is the CA from now on.
    fn drop_old(&self) -> Result<String, RotateError> {
        let new = self.ca(NEXT_CERT, NEXT_KEY)?;
        if !served_by(&self.info, &new.cert_pem).unwrap_or(false) {
            return Err(refused(
                "the proxy does not serve a certificate of the new CA (yet): dropping the old \
                 CA now would fail every client; see the proxy's log, then try again",
            ));
        }
        write_public(&self.info.ca_file, new.cert_pem.as_bytes()).map_err(anyhow::Error::from)?;
        write_private(&self.path(CA_KEY), new.key_pem().as_bytes()).map_err(anyhow::Error::from)?;
        write_public(&self.path(CA_CERT), new.cert_pem.as_bytes()).map_err(anyhow::Error::from)?;
        // The record goes first: until it does, the step can be run again (everything above
        // is rewritten from ca-next.*); once it has, the next CA is the CA, and a ca-next.*
        // left behind is overwritten by the next rotation's bundle.
        let record = self.path(ROTATION);
        match std::fs::remove_file(&record) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::anyhow!("removing {}: {e}", record.display()).into());
            }
            _ => {}
        }
        for name in [NEXT_KEY, NEXT_CERT] {
            let _ = std::fs::remove_file(self.path(name));
        }
        Ok(format!(
            "{} = [new CA]: the rotation is complete.",
            self.info.ca_file.display()
        ))
    }

    fn wait_until_served(&self, ca_pem: &str) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + SERVE_WAIT;
        loop {
            let answer = served_by(&self.info, ca_pem);
            if let Ok(true) = answer {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the proxy did not serve the new CA's certificate within {} s ({})",
                    SERVE_WAIT.as_secs(),
                    answer.map_or_else(|e| e.to_string(), |_| "still the old one".into())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn restart_advice(waiting: &[processes::Reader]) -> String {
    if waiting.is_empty() {
        return "next: restart every workload that read the CA file before now (none is running \
                here)"
            .into();
    }
    format!(
        "next: restart the workloads that read the CA file before now (some clients read it \
         once, at start):\n{}",
        list(waiting)
    )
}

fn list(readers: &[processes::Reader]) -> String {
    readers
        .iter()
        .map(|r| format!("  pid {}  {}", r.pid, r.name))
        .collect::<Vec<_>>()
        .join("\n")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether the certificate the proxy serves for its SNI name chains to `ca_pem`. The handshake
/// itself always completes (the answer is recorded, not enforced), so asking fails no handshake
/// in the proxy's metrics.
fn served_by(info: &super::DevInfo, ca_pem: &str) -> anyhow::Result<bool> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let probe = std::sync::Arc::new(Probe {
        inner,
        verified: std::sync::Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.dangerous().set_certificate_verifier(probe.clone());
    let name = ServerName::try_from(info.sni_name.clone())?;
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let addr = info.proxy_url.trim_start_matches("https://");
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let verified = *probe.verified.lock().unwrap_or_else(|e| e.into_inner());
    verified.ok_or_else(|| anyhow::anyhow!("the proxy presented no certificate"))
}

/// Checks the server's certificate against the roots and records the answer, but lets the
/// handshake go on either way.
#[derive(Debug)]
struct Probe {
    inner: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
    verified: std::sync::Mutex<Option<bool>>,
}

impl rustls::client::danger::ServerCertVerifier for Probe {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .is_ok();
        *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The processes on this machine that read a CA file, found as a node's pods would be: by the
/// environment the webhook gives them.
mod processes {
    use std::path::Path;

    pub struct Reader {
        pub pid: u32,
        /// `/proc/PID/comm`: the program's name only, as a command line may carry secrets.
        pub name: String,
        /// Clock ticks since boot when it started.
        pub start_ticks: u64,
    }

    /// Now, in the ticks of the start times: `/proc/uptime` times the clock ticks per second,
    /// rounded up (a process that starts in the same instant counts as started by now).
    pub fn now_ticks() -> anyhow::Result<u64> {
        let uptime = std::fs::read_to_string("/proc/uptime")
            .map_err(|e| anyhow::anyhow!("/proc/uptime: {e} (rotate-ca needs Linux)"))?;
        uptime_ticks(&uptime, clock_ticks_per_second())
            .ok_or_else(|| anyhow::anyhow!("/proc/uptime: unexpected format: {uptime:?}"))
    }

    /// The first field of `/proc/uptime` (seconds, with hundredths) in ticks of `hz`, one
    /// hundredth over: the kernel truncates both it and the start times.
    fn uptime_ticks(uptime: &str, hz: u64) -> Option<u64> {
        let seconds = uptime.split_whitespace().next()?;
        let (whole, hundredths) = seconds.split_once('.')?;
        if hundredths.len() != 2 {
            return None;
        }
        let hundredths = whole.parse::<u64>().ok()? * 100 + hundredths.parse::<u64>().ok()?;
        Some((hundredths + 1) * hz / 100)
    }

    /// The clock ticks per second of the start times: `AT_CLKTCK` of the auxiliary vector
    /// (what `sysconf(_SC_CLK_TCK)` answers), else Linux's `USER_HZ`, 100.
    fn clock_ticks_per_second() -> u64 {
        const AT_CLKTCK: usize = 17;
        const WORD: usize = std::mem::size_of::<usize>();
        let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
        let word = |b: &[u8]| usize::from_ne_bytes(b.try_into().unwrap_or([0; WORD]));
        auxv.chunks_exact(2 * WORD)
            .find(|pair| word(&pair[..WORD]) == AT_CLKTCK)
            .map(|pair| word(&pair[WORD..]) as u64)
            .filter(|hz| *hz > 0)
            .unwrap_or(100)
    }

    /// Field 22 of `/proc/PID/stat`; the command name (field 2) may hold spaces and brackets.
    fn start_ticks(stat: &str) -> Option<u64> {
        let after_name = &stat[stat.rfind(')')? + 1..];
        after_name.split_whitespace().nth(19)?.parse().ok()
    }

    /// Every process we may read whose `AZURE_KUBERNETES_CA_FILE` is `ca_file`.
    pub fn ca_readers(ca_file: &Path) -> anyhow::Result<Vec<Reader>> {
        let want = format!("AZURE_KUBERNETES_CA_FILE={}", ca_file.display());
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let proc = Path::new("/proc").join(pid.to_string());
            // Other users' processes, and processes that ended meanwhile, cannot be read.
            let Ok(environ) = std::fs::read(proc.join("environ")) else {
                continue;
            };
            if !environ.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                continue;
            }
            let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
            let Some(start_ticks) = start_ticks(&stat) else {
                continue;
            };
            let name = std::fs::read(proc.join("comm")).unwrap_or_default();
            found.push(Reader {
                pid,
                name: String::from_utf8_lossy(&name).trim().to_string(),
                start_ticks,
            });
        }
        Ok(found)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn start_ticks_is_read_after_a_command_name_with_spaces_and_brackets() {
            let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                        987654 1000 200";
            assert_eq!(super::start_ticks(stat), Some(987654));
            assert_eq!(super::start_ticks("4242 (short"), None);
        }

        #[test]
        fn uptime_is_read_in_clock_ticks_rounded_up() {
            assert_eq!(
                super::uptime_ticks("12345.67 54321.00\n", 100),
                Some(1234568)
            );
            assert_eq!(super::uptime_ticks("0.00 0.00", 100), Some(1));
            assert_eq!(super::uptime_ticks("2.50 1.00", 1000), Some(2510));
            assert_eq!(super::uptime_ticks("12345 1.00", 100), None);
            assert_eq!(super::uptime_ticks("", 100), None);
        }

        /// A process started now has started by now, in the same ticks: the start time of
        /// a child spawned after reading the clock is at most one tick later.
        #[test]
        fn now_is_in_the_ticks_of_the_start_times() {
            let own = std::fs::read_to_string("/proc/self/stat").unwrap();
            let started = super::start_ticks(&own).unwrap();
            let now = super::now_ticks().unwrap();
            assert!(started <= now, "started {started} after now {now}");
            let hz = super::clock_ticks_per_second();
            let mut child = std::process::Command::new("sleep")
                .arg("1")
                .spawn()
                .unwrap();
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()));
            let _ = child.kill();
            let _ = child.wait();
            let child_started = super::start_ticks(&stat.unwrap()).unwrap();
            assert!(child_started + 1 >= now, "{child_started} vs {now}");
            assert!(
                child_started <= now + hz,
                "{child_started} vs {now} at {hz}/s"
            );
        }
    }
}
