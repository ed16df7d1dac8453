//! Step 1 of a token request: TLS, routed by the SNI name the client sent.
//!
//! Each `--tls NAME=CERT,KEY` gives one SNI name its certificate. We read the ClientHello
//! ourselves before choosing a configuration, so an unknown name is refused with the
//! `unrecognized_name` alert (RFC 6066) instead of a generic handshake failure, and no
//! certificate is ever presented for a name we do not serve. The Host header plays no part:
//! SDKs disagree about what they put there.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::StartHandshake;

use crate::metrics::Metrics;
use crate::serve::handshake::HandshakeError;
use crate::startup::StartError;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// NAME=CERT.pem,KEY.pem: the certificate served for SNI name NAME. Repeatable (in the
    /// environment, separate entries with ';').
    #[arg(long, env = "IBP_TLS", value_delimiter = ';', required = true)]
    pub tls: Vec<TlsEntry>,
    /// SNI name used for clients that send no SNI at all (else they are refused).
    #[arg(long, env = "IBP_DEFAULT_SNI")]
    pub default_sni: Option<String>,
    /// Deadline for a TLS handshake.
    #[arg(long, env = "IBP_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
}

/// The serving certificates, by SNI name.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub entries: Vec<TlsEntry>,
    /// The name a client that sends no SNI is served under (else it is refused).
    pub default_name: Option<String>,
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    /// The `--tls`, `--default-sni` and `--handshake-timeout-secs` flags, as configured.
    pub fn from_args(a: &TlsArgs) -> Self {
        TlsConfig {
            entries: a.tls.clone(),
            default_name: a.default_sni.clone(),
            handshake_timeout: Duration::from_secs(a.handshake_timeout_secs.max(1)),
        }
    }
}

/// A TLS alert record: fatal (2), unrecognized_name (112), sent as TLS 1.2 record version as
/// every TLS 1.3 stack does for alerts before the handshake.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsEntry {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl std::str::FromStr for TlsEntry {
    type Err = StartError;
    fn from_str(s: &str) -> Result<Self, StartError> {
        let (name, files) = s.split_once('=').ok_or_else(|| {
            StartError::usage(format!("--tls '{s}': expected NAME=CERT.pem,KEY.pem"))
        })?;
        let (cert, key) = files.split_once(',').ok_or_else(|| {
            StartError::usage(format!("--tls '{s}': expected NAME=CERT.pem,KEY.pem"))
        })?;
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains('*') {
            return Err(StartError::usage(format!(
                "--tls '{s}': the SNI name must be an exact DNS name (no wildcards)"
            )));
        }
        Ok(Self {
            name,
            cert: PathBuf::from(cert.trim()),
            key: PathBuf::from(key.trim()),
        })
    }
}

/// The `notAfter` of the first (leaf) certificate, as Unix seconds.
fn leaf_expiry(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A loaded serving configuration and its leaf certificate's expiry.
struct Loaded {
    config: Arc<ServerConfig>,
    expiry: Option<i64>,
}

fn load_config(entry: &TlsEntry) -> Result<Loaded, StartError> {
    let cert_pem = std::fs::read(&entry.cert).map_err(|e| {
        StartError::usage(format!(
            "{}: cannot read certificate {}: {e}",
            entry.name,
            entry.cert.display()
        ))
    })?;
    let key_pem = std::fs::read(&entry.key).map_err(|e| {
        StartError::usage(format!(
            "{}: cannot read key {}: {e}",
            entry.name,
            entry.key.display()
        ))
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            StartError::usage(format!(
                "{}: {} is not valid PEM: {e}",
                entry.name,
                entry.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(StartError::usage(format!(
            "{}: {} holds no certificate",
            entry.name,
            entry.cert.display()
        )));
    }
    let leaf_der = certs.first().map(|c| c.as_ref().to_vec());
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => StartError::usage(format!(
            "{}: {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
            entry.name,
            entry.key.display()
        )),
        e => StartError::usage(format!(
            "{}: {} is not valid PEM: {e}",
            entry.name,
            entry.key.display()
        )),
    })?;
    let provider = crate::crypto::provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::internal("the crypto provider offers no TLS version").because(e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            StartError::usage(format!(
                "{}: certificate and key do not fit together: {e}",
                entry.name
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        expiry: leaf_der.as_deref().and_then(leaf_expiry),
    })
}

/// Exports a certificate's expiry under its SNI name (a configured name: bounded).
fn record_expiry(metrics: &Metrics, name: &str, expiry: Option<i64>) {
    if let Some(t) = expiry {
        metrics.certificate_expiry.with_label_values(&[name]).set(t);
    }
}

/// The serving configurations by SNI name, hot-swappable.
pub struct SniRouter {
    entries: Vec<TlsEntry>,
    configs: ArcSwap<HashMap<String, Arc<ServerConfig>>>,
    default_name: Option<String>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl SniRouter {
    pub fn load(config: TlsConfig, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let TlsConfig {
            entries,
            default_name,
            handshake_timeout,
        } = config;
        if entries.is_empty() {
            return Err(StartError::usage(
                "at least one --tls NAME=CERT,KEY is needed",
            ));
        }
        let default_name = default_name.map(|n| n.to_ascii_lowercase());
        if let Some(d) = &default_name {
            if !entries.iter().any(|e| &e.name == d) {
                return Err(StartError::usage(format!(
                    "--default-sni '{d}' is not one of the --tls names"
                )));
            }
        }
        let mut configs = HashMap::new();
        for entry in &entries {
            let loaded = load_config(entry)?;
            record_expiry(&metrics, &entry.name, loaded.expiry);
            if configs.insert(entry.name.clone(), loaded.config).is_some() {
                return Err(StartError::usage(format!(
                    "--tls name '{}' is given twice",
                    entry.name
                )));
            }
        }
        Ok(Self {
            entries,
            configs: ArcSwap::from_pointee(configs),
            default_name,
            handshake_timeout,
            metrics,
        })
    }

    /// Re-reads every certificate; an entry that fails keeps its previous configuration.
    pub fn reload(&self) -> Vec<StartError> {
        let mut configs = (*self.configs.load_full()).clone();
        let mut errors = Vec::new();
        for entry in &self.entries {
            match load_config(entry) {
                Ok(loaded) => {
                    record_expiry(&self.metrics, &entry.name, loaded.expiry);
                    configs.insert(entry.name.clone(), loaded.config);
                    self.metrics
                        .certificate_reloads
                        .with_label_values(&["ok"])
                        .inc();
                }
                Err(e) => {
                    self.metrics
                        .certificate_reloads
                        .with_label_values(&["error"])
                        .inc();
                    errors.push(e);
                }
            }
        }
        self.configs.store(Arc::new(configs));
        errors
    }

    /// Polls the certificate files and reloads when any changes (mounted Secrets change by a
    /// symlink swap, which a poll of the contents always sees).
    pub fn watch(
        self: Arc<Self>,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let files = self
            .entries
            .iter()
            .flat_map(|e| [e.cert.clone(), e.key.clone()])
            .collect();
        crate::files::watch_contents(files, period, stop, move || {
            let errors = self.reload();
            if errors.is_empty() {
                tracing::info!("serving certificates reloaded");
            }
            for e in errors {
                tracing::error!(error = %e, "certificate not reloaded; the previous one keeps serving");
            }
        })
    }

    /// The name a connection is served under: the SNI name it sent, or the default name when
    /// it sent none (the handshake refused anything else).
    pub fn served_name(&self, sni: Option<&str>) -> Option<String> {
        sni.map(str::to_ascii_lowercase)
            .or_else(|| self.default_name.clone())
    }

    /// Accepts one TLS connection, choosing the configuration by SNI.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let result = tokio::time::timeout(self.handshake_timeout, self.handshake(tcp)).await;
        let result = result.unwrap_or(Err(HandshakeError::Timeout));
        if let Err(e) = &result {
            self.metrics
                .tls_handshake_failures
                .with_label_values(&[e.reason()])
                .inc();
        }
        result
    }

    async fn handshake(&self, mut tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let mut acceptor = Acceptor::default();
        let mut buf = vec![0u8; 16 * 1024];
        let accepted = loop {
            let n = tcp
                .read(&mut buf)
                .await
                .map_err(|_| HandshakeError::Closed)?;
            if n == 0 {
                return Err(HandshakeError::Closed);
            }
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                match acceptor.read_tls(&mut rd) {
                    Ok(0) => return Err(HandshakeError::Tls("ClientHello too large".into())),
                    Ok(_) => {}
                    Err(e) => return Err(HandshakeError::Tls(e.to_string())),
                }
            }
            match acceptor.accept() {
                Ok(None) => continue,
                Ok(Some(accepted)) => break accepted,
                Err((e, mut alert)) => {
                    let mut out = Vec::new();
                    let _ = alert.write_all(&mut out);
                    let _ = tcp.write_all(&out).await;
                    return Err(HandshakeError::Tls(e.to_string()));
                }
            }
        };
        let name = accepted
            .client_hello()
            .server_name()
            .map(|n| n.to_ascii_lowercase());
        let config = {
            let configs = self.configs.load();
            match name.as_deref().or(self.default_name.as_deref()) {
                Some(n) => configs.get(n).cloned(),
                None => None,
            }
        };
        let Some(config) = config else {
            let _ = tcp.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            let _ = tcp.shutdown().await;
            return Err(if name.is_some() {
                HandshakeError::UnknownName
            } else {
                HandshakeError::NoName
            });
        };
        StartHandshake::from_parts(accepted, tcp)
            .into_stream(config)
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::handshake::HANDSHAKE_FAILURES;

    #[test]
    fn every_handshake_failure_reason_has_its_series() {
        let every = [
            HandshakeError::UnknownName,
            HandshakeError::NoName,
            HandshakeError::Tls("x".into()),
            HandshakeError::Timeout,
            HandshakeError::Closed,
        ];
        for e in every {
            assert!(HANDSHAKE_FAILURES.contains(&e.reason()), "{}", e.reason());
        }
    }

    /// Writes `cert` and `key` as the files of an entry named `proxy.test`, and loads it.
    fn load(cert: &str, key: &str) -> Result<Loaded, StartError> {
        let dir = tempfile::tempdir().unwrap();
        let entry = TlsEntry {
            name: "proxy.test".into(),
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        std::fs::write(&entry.cert, cert).unwrap();
        std::fs::write(&entry.key, key).unwrap();
        load_config(&entry)
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn a_certificate_and_its_key_load_with_the_leaf_expiry() {
        let (cert, key) = self_signed();
        let loaded = load(&cert, &key).unwrap();
        assert!(loaded.expiry.is_some_and(|t| t > 0));
    }

    #[test]
    fn bad_pem_files_are_refused_naming_the_file_and_what_is_wrong() {
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let err = |cert: &str, key: &str| {
            let e = load(cert, key).err().expect("refused");
            assert_eq!(e.exit_code(), 64, "a bad PEM file is a usage error: {e}");
            e.to_string()
        };

        let e = err("", &key);
        assert!(e.contains("tls.crt holds no certificate"), "{e}");
        let e = err(&key, &key);
        assert!(e.contains("tls.crt holds no certificate"), "{e}");
        let broken = "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        let e = err(broken, &key);
        assert!(
            e.starts_with("proxy.test: ") && e.contains("tls.crt is not valid PEM"),
            "{e}"
        );

        let e = err(&cert, &cert);
        assert!(e.contains("tls.key holds no private key"), "{e}");
        let e = err(&cert, "");
        assert!(e.contains("tls.key holds no private key"), "{e}");
        let broken = "-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n";
        let e = err(&cert, broken);
        assert!(e.contains("tls.key is not valid PEM"), "{e}");

        let e = err(&cert, &other_key);
        assert!(e.contains("certificate and key do not fit together"), "{e}");
    }

    #[test]
    fn tls_entries_parse() {
        let e: TlsEntry = "Proxy.Example=/c.pem,/k.pem".parse().unwrap();
        assert_eq!(e.name, "proxy.example");
        assert_eq!(e.key, PathBuf::from("/k.pem"));
        assert!("x=/c.pem".parse::<TlsEntry>().is_err());
        assert!("*.x=/c,/k".parse::<TlsEntry>().is_err());
    }
}
