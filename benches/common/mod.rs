//! Fixtures shared by the micro-benchmarks: an in-process kube-apiserver emulator (so the
//! authenticator and authorizer run against real JWKS and RBAC answers), SA tokens, and an
//! ES256 JWKS + signer made here (the kube emulator signs RS256 only).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ibp_emulators::kube::{service_account_uid, KubeEmulator, KubeEmulatorConfig, MintRequest};
use identity_binding_proxy::authn::DEFAULT_TOKEN_AUDIENCE;
use identity_binding_proxy::authn::{Authenticator, AuthnConfig, AuthnMode};
use identity_binding_proxy::cluster::Cluster;
use identity_binding_proxy::metrics::Metrics;

/// The identity the fixture RBAC grants to ServiceAccount demo/demo.
pub const CLIENT_ID: &str = "6f1c2a43-5b7e-4d2b-9a55-2f0e8c1d7a10";
pub const TENANT_ID: &str = "8d2e7c90-1f4a-4b6c-8e3d-5a9b0c7f6e21";
pub const SCOPE: &str = "https://vault.azure.net/.default";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A kube emulator on 127.0.0.1:0 and a `Cluster` client for it.
pub struct Kube {
    pub emulator: KubeEmulator,
    pub cluster: Arc<Cluster>,
    _dir: tempfile::TempDir,
}

impl Kube {
    pub async fn start() -> Self {
        identity_binding_proxy::crypto::install_provider();
        let dir = tempfile::tempdir().unwrap();
        let rbac = dir.path().join("rbac.yaml");
        std::fs::write(&rbac, identity_binding_proxy_dev::dev::demo_rbac(CLIENT_ID)).unwrap();
        let emulator = KubeEmulator::start(KubeEmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: dir.path().join("kube"),
            rbac_file: Some(rbac),
            issuer: None,
        })
        .await
        .unwrap();
        let cluster = Arc::new(
            Cluster::connect(
                Some(&emulator.kubeconfig_path()),
                identity_binding_proxy::cluster::DEFAULT_WATCH_TIMEOUT,
            )
            .await
            .unwrap(),
        );
        Self {
            emulator,
            cluster,
            _dir: dir,
        }
    }

    /// A projected SA token (RS256, the emulator's key) for demo/demo.
    pub fn sa_token(&self) -> String {
        self.emulator
            .mint_token(&MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![DEFAULT_TOKEN_AUDIENCE.into()],
                expires_in_secs: 3600,
                pod_name: Some("demo-pod".into()),
            })
            .unwrap()
    }

    /// An authenticator in `local` mode with the emulator's JWKS loaded.
    pub async fn authenticator(&self) -> Authenticator {
        let authn = Authenticator::new(
            self.cluster.clone(),
            local_config(None),
            Arc::new(Metrics::new()),
        );
        authn.refresh_keys().await.unwrap();
        authn
    }
}

fn local_config(persist_dir: Option<std::path::PathBuf>) -> AuthnConfig {
    AuthnConfig {
        audience: DEFAULT_TOKEN_AUDIENCE.into(),
        mode: AuthnMode::Local,
        review_ttl: Duration::from_secs(120),
        persist_dir,
    }
}

/// An ES256 cluster: a P-256 key, its JWKS, and an authenticator that trusts it. The JWKS
/// reaches the authenticator through its persisted-keys file (the path a restart takes), so
/// no apiserver has to serve an EC key.
pub struct Es256Cluster {
    pub authn: Authenticator,
    pub token: String,
    _dir: tempfile::TempDir,
}

impl Es256Cluster {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = pair.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..65]);
        let issuer = "https://oidc.es256.invalid/bench";
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "es256-bench",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]});
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cluster-jwks.json"),
            serde_json::to_vec(&serde_json::json!({"issuer": issuer, "jwks": jwks.to_string()}))
                .unwrap(),
        )
        .unwrap();
        let authn = Authenticator::new(
            cluster,
            local_config(Some(dir.path().to_path_buf())),
            Arc::new(Metrics::new()),
        );
        assert!(authn.load_persisted(), "ES256 JWKS loads");

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "aud": [DEFAULT_TOKEN_AUDIENCE], "iss": issuer, "sub": "system:serviceaccount:demo:demo",
            "iat": now, "nbf": now, "exp": now + 3600, "jti": uuid::Uuid::new_v4().to_string(),
            "kubernetes.io": {
                "namespace": "demo",
                "serviceaccount": {"name": "demo", "uid": service_account_uid("demo", "demo")},
                "pod": {"name": "demo-pod", "uid": "0a4b1c2d-0000-4000-8000-000000000001"},
            },
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("es256-bench".into());
        let key = jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        Self {
            authn,
            token,
            _dir: dir,
        }
    }
}

/// The form body every SDK sends.
pub fn token_form(assertion: &str, scope: &str) -> String {
    identity_binding_proxy::http::form::form_encode([
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("scope", scope),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", assertion),
        ("client_info", "1"),
    ])
}
