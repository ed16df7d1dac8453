//! Many clusters, one FIC: three clusters (each with its own service-account issuer and its
//! own proxy issuer key) get tokens for the same managed identity through ONE federated
//! identity credential, whose issuer publishes all three public keys. Removing one cluster's
//! key cuts off that cluster only, once Entra's cache of the issuer's keys expires; rotating a
//! cluster's key never interrupts its tokens, because a new key signs only after Entra can know
//! it. Entra's emulator keeps Entra's cache here, shortened to seconds. Published
//! from a fleet file, each identity trusts only the keys of the clusters that bind it: a
//! cluster's key mints nothing for an identity only another cluster binds.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{serve_default, token_form, Client};
use ibp_emulators::entra::{EntraEmulator, EntraEmulatorConfig, Fic, FicError};
use ibp_emulators::kube::{KubeEmulator, KubeEmulatorConfig, MintRequest};
use ibp_emulators::pki::DevCa;
use identity_binding_proxy::cli::fleet;
use identity_binding_proxy::cli::issuer;
use identity_binding_proxy::config::ProxyConfig;
use identity_binding_proxy::exchange::activation::ActivationConfig;
use identity_binding_proxy::exchange::bindings::BindingSet;
use identity_binding_proxy::exchange::issuer::{IssuerUrl, FIC_AUDIENCE};
use identity_binding_proxy::exchange::keys::{RsaPublicKey, SigningKey};
use identity_binding_proxy::serve::{self, RunningProxy};
use tokio_util::sync::CancellationToken;

const SNI: &str = "proxy.cluster.internal";
const CLIENT_ID: &str = "7d1f9c4e-0b3a-4c55-9e2d-3f6a8b1c2d4e";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn rbac(client_id: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: use-identity\nrules:\n  - apiGroups: [\"cid.wi.aks.azure.com\"]\n    resources: [\"{client_id}\"]\n    verbs: [\"use-managed-identity\"]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: worker-uses-identity\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: use-identity\nsubjects:\n  - kind: ServiceAccount\n    name: worker\n    namespace: apps\n"
    )
}

/// One cluster: its apiserver, its proxy with its own issuer key, and a client for it.
struct Cluster {
    kube: KubeEmulator,
    proxy: RunningProxy,
    client: Client,
    /// `--issuer-key previous.key,current.key`: a rotation writes the new key into the current
    /// one, then, once it signs, into the previous one too.
    previous_key: PathBuf,
    current_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(
        n: usize,
        ca: &DevCa,
        entra: &EntraEmulator,
        issuer_url: &IssuerUrl,
        bindings: &Path,
        key: &SigningKey,
    ) -> Self {
        Self::start_with(n, ca, entra, issuer_url, bindings, key, None).await
    }

    /// With `activation`, the proxy's key activation timing instead of the default.
    async fn start_with(
        n: usize,
        ca: &DevCa,
        entra: &EntraEmulator,
        issuer_url: &IssuerUrl,
        bindings: &Path,
        key: &SigningKey,
        activation: Option<ActivationConfig>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rbac_file = dir.path().join("rbac.yaml");
        std::fs::write(&rbac_file, rbac(CLIENT_ID)).unwrap();
        let kube = KubeEmulator::start(KubeEmulatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.path().join("kube"),
            rbac_file: Some(rbac_file),
            issuer: Some(format!("https://oidc.cluster-{n}.example/issuer")),
        })
        .await
        .unwrap();
        let serving = ca.issue(&[SNI]).unwrap();
        let (cert, tls_key, previous_key, current_key) = (
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            dir.path().join("previous.key"),
            dir.path().join("current.key"),
        );
        std::fs::write(&cert, serving.cert_pem).unwrap();
        std::fs::write(&tls_key, serving.key_pem).unwrap();
        std::fs::write(&previous_key, key.private_pem()).unwrap();
        std::fs::write(&current_key, key.private_pem()).unwrap();
        let mut config = ProxyConfig::from_flags([
            format!("--kubeconfig={}", kube.kubeconfig_path().display()),
            format!("--tls={SNI}={},{}", cert.display(), tls_key.display()),
            format!(
                "--issuer-key={},{}",
                previous_key.display(),
                current_key.display()
            ),
            format!("--issuer-url={}", issuer_url.template()),
            format!("--bindings={}", bindings.display()),
            format!("--authority-host={}", entra.url()),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            // The rotation test's traffic is one caller sending `claims` (past the cache) as
            // fast as it can, far above a workload's budget.
            "--caller-claims-budget=1000000".into(),
        ])
        .unwrap();
        config.reload_period = Duration::from_millis(100);
        if let Some(activation) = activation {
            config.key_activation = activation;
        }
        let proxy = serve::start(config).await.unwrap();
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                proxy.readiness.is_ready()
            })
            .await
        );
        let client = Client::new(proxy.addr, SNI, ca.cert_pem.as_bytes(), &[b"http/1.1"]);
        Self {
            kube,
            proxy,
            client,
            previous_key,
            current_key,
            _dir: dir,
        }
    }

    fn sa_token(&self) -> String {
        self.kube
            .mint_token(&MintRequest {
                namespace: "apps".into(),
                service_account: "worker".into(),
                audiences: vec![serve_default("token-audience")],
                expires_in_secs: 3600,
                pod_name: Some("worker-0".into()),
            })
            .unwrap()
    }

    async fn request(&self, scope: &str) -> common::Reply {
        let token = self.sa_token();
        let mut form = token_form(CLIENT_ID, &token);
        form[2] = ("scope", scope);
        self.client
            .post_form(&format!("/{TENANT}/oauth2/v2.0/token"), &form)
            .await
    }

    async fn shutdown(self) {
        self.proxy.stop().await;
        self.kube.shutdown().await;
    }
}

/// The issuer side: a static host serving what `issuer publish` writes.
struct IssuerSite {
    docs: tempfile::TempDir,
    url: IssuerUrl,
    bindings_file: PathBuf,
    stop: CancellationToken,
}

impl IssuerSite {
    async fn start() -> Self {
        let docs = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let addr = ibp_emulators::static_host::start(
            "127.0.0.1:0".parse().unwrap(),
            docs.path().to_path_buf(),
            stop.clone(),
        )
        .await
        .unwrap();
        let url = IssuerUrl::parse(&format!("http://{addr}/{{tenant}}/{{client_id}}")).unwrap();
        let bindings_file = docs.path().join("bindings.yaml");
        std::fs::write(
            &bindings_file,
            format!("bindings:\n  - clientId: {CLIENT_ID}\n    tenantId: {TENANT}\n"),
        )
        .unwrap();
        Self {
            docs,
            url,
            bindings_file,
            stop,
        }
    }

    fn bindings(&self) -> BindingSet {
        identity_binding_proxy::exchange::bindings::load(&self.bindings_file).unwrap()
    }

    /// Publishes exactly these public keys in the issuer's JWKS.
    fn publish(&self, keys: &[RsaPublicKey]) {
        issuer::publish(self.docs.path(), keys, &self.bindings(), &self.url).unwrap();
    }

    fn one_fic(&self) -> Fic {
        let binding = self.bindings().get(CLIENT_ID).unwrap().clone();
        Fic {
            client_id: CLIENT_ID.into(),
            issuer: self.url.for_binding(&binding),
            subject: binding.subject,
            audience: FIC_AUDIENCE.into(),
            name: "identity-binding-proxy".into(),
        }
    }
}

/// The issuer site, an Entra emulator holding the site's ONE FIC, and a CA for the clusters.
/// Entra's cache of the issuer's documents lasts `metadata_ttl` (seconds here, minutes in
/// Entra); the FIC is added before any traffic, so it applies at once (its propagation delay
/// is the emulator's own tests' subject).
async fn one_fic_world(
    ca_name: &str,
    metadata_ttl: Duration,
) -> (IssuerSite, EntraEmulator, DevCa) {
    identity_binding_proxy::crypto::install_provider();
    let site = IssuerSite::start().await;
    let entra = EntraEmulator::start(EntraEmulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        issuer_metadata_ttl: metadata_ttl,
        fic_propagation: Duration::ZERO,
        ..Default::default()
    })
    .await
    .unwrap();
    entra.add_fic(site.one_fic()).unwrap();
    let ca = DevCa::generate(ca_name).unwrap();
    (site, entra, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_share_one_fic_and_removing_a_key_cuts_off_only_that_cluster() {
    let ttl = Duration::from_secs(3);
    let (site, entra, ca) = one_fic_world("multi-cluster test CA", ttl).await;
    let keys: Vec<SigningKey> = (0..3)
        .map(|_| SigningKey::generate(2048).unwrap())
        .collect();
    site.publish(&keys.iter().map(|k| k.public().clone()).collect::<Vec<_>>());
    let mut clusters = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        clusters
            .push(Cluster::start(n + 1, &ca, &entra, &site.url, &site.bindings_file, key).await);
    }

    // Different clusters really are different: each one's SA tokens are refused by the others.
    let foreign = clusters[0].sa_token();
    let r = clusters[1].client.post_token(CLIENT_ID, &foreign).await;
    assert_eq!(r.status, 401, "{}", r.json);

    for (n, c) in clusters.iter().enumerate() {
        let r = c.request("https://vault.azure.net/.default").await;
        assert_eq!(r.status, 200, "cluster {}: {}", n + 1, r.json);
        assert_eq!(
            common::jwt_claims(r.json["access_token"].as_str().unwrap())["appid"],
            CLIENT_ID
        );
    }
    assert_eq!(entra.stats().tokens_issued, 3);
    assert_eq!(
        entra.fics(CLIENT_ID).len(),
        1,
        "one FIC served all three clusters"
    );

    // Cluster 2 is compromised: its key leaves the published JWKS. Entra still has the JWKS
    // it fetched for the first exchange: until that expires, cluster 2 still mints.
    let fetched = std::time::Instant::now();
    site.publish(&[keys[0].public().clone(), keys[2].public().clone()]);
    let still = clusters[1]
        .request("https://graph.microsoft.com/.default")
        .await;
    assert!(
        fetched.elapsed() < ttl,
        "the test ran slower than the cache"
    );
    assert_eq!(
        still.status, 200,
        "within Entra's cache a removed key still mints: {}",
        still.json
    );
    tokio::time::sleep(ttl).await;
    let cut = clusters[1]
        .request("https://storage.azure.com/.default")
        .await;
    assert_eq!(cut.status, 401, "{}", cut.json);
    assert_eq!(
        cut.json["error_codes"][0], 7000272,
        "Entra's own code passes through: {}",
        cut.json
    );
    assert!(
        cut.error_description().starts_with("AADSTS7000272"),
        "{}",
        cut.json
    );
    assert!(cut.json.get("access_token").is_none());
    for n in [0, 2] {
        let r = clusters[n]
            .request("https://storage.azure.com/.default")
            .await;
        assert_eq!(r.status, 200, "cluster {} goes on: {}", n + 1, r.json);
    }

    // Why one FIC matters: classic workload identity needs one per (cluster, namespace, SA),
    // and Entra stops at 20 per identity.
    for i in 2..=20 {
        entra
            .add_fic(Fic {
                client_id: CLIENT_ID.into(),
                issuer: format!("https://oidc.classic-{i}.example/issuer"),
                subject: "system:serviceaccount:apps:worker".into(),
                audience: FIC_AUDIENCE.into(),
                name: format!("classic-{i}"),
            })
            .unwrap();
    }
    let refused = entra.add_fic(Fic {
        client_id: CLIENT_ID.into(),
        issuer: "https://oidc.classic-21.example/issuer".into(),
        subject: "system:serviceaccount:apps:worker".into(),
        audience: FIC_AUDIENCE.into(),
        name: "classic-21".into(),
    });
    assert!(
        matches!(refused, Err(FicError::LimitReached { .. })),
        "{refused:?}"
    );

    for c in clusters {
        c.shutdown().await;
    }
    entra.shutdown().await;
    site.stop.cancel();
}

/// Requests that reach Entra on every call (a CAE `claims` challenge bypasses the token cache),
/// as fast as one caller sends them, until `stop`: (successes, failure bodies).
fn continuous_traffic(
    cluster: &Cluster,
    ca: &DevCa,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let (client, token) = (
        Client::new(
            cluster.proxy.addr,
            SNI,
            ca.cert_pem.as_bytes(),
            &[b"http/1.1"],
        ),
        cluster.sa_token(),
    );
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.is_cancelled() {
            let mut form = token_form(CLIENT_ID, &token);
            form.push(("claims", "{\"access_token\":{}}"));
            let r = client.post_form("/", &form).await;
            if r.status == 200 {
                ok += 1
            } else {
                failed.push(r.json.to_string())
            }
        }
        (ok, failed)
    })
}

/// Entra's cache of the issuer's keys in these tests, and the proxy's activation delay that
/// covers it (seconds here; minutes in Entra, 15 minutes by default in the proxy).
const ROTATION_TTL: Duration = Duration::from_secs(2);
const ROTATION_DELAY: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_flowing_while_the_signing_key_rotates() {
    let (site, entra, ca) = one_fic_world("rotation test CA", ROTATION_TTL).await;
    let (old, new) = (
        SigningKey::generate(2048).unwrap(),
        SigningKey::generate(2048).unwrap(),
    );
    site.publish(&[old.public().clone()]);
    let activation = ActivationConfig {
        delay: ROTATION_DELAY,
        check_period: Duration::from_millis(200),
    };
    let cluster = Cluster::start_with(
        1,
        &ca,
        &entra,
        &site.url,
        &site.bindings_file,
        &old,
        Some(activation),
    )
    .await;
    let stop_traffic = CancellationToken::new();
    let traffic = continuous_traffic(&cluster, &ca, stop_traffic.clone());

    // The documented procedure: 1. load the new key as the current one and publish it beside
    // the old one; the old key signs on until the new one has been published for the delay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&cluster.current_key, new.private_pem()).unwrap();
    let published = std::time::Instant::now();
    site.publish(&[old.public().clone(), new.public().clone()]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.proxy.app.issuer.signing_kid(),
        old.kid(),
        "a key published a second ago does not sign"
    );
    let metrics = String::from_utf8(cluster.proxy.app.metrics.render()).unwrap();
    assert!(
        metrics.contains(&format!(
            "identity_binding_proxy_issuer_signing_key{{kid=\"{}\"}} 1",
            old.kid()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "identity_binding_proxy_issuer_key_activation_timestamp_seconds{{kid=\"{}\"}}",
            new.kid()
        )),
        "{metrics}"
    );
    let rolled = common::eventually(Duration::from_secs(10), || async {
        cluster.proxy.app.issuer.signing_kid() == new.kid()
    })
    .await;
    let switched_after = published.elapsed();
    assert!(rolled, "the new key signs once its delay is over");
    assert!(
        switched_after >= ROTATION_DELAY,
        "the new key signed {switched_after:?} after it was published"
    );
    // 2. Once it signs, unpublish and unload the old key.
    site.publish(&[new.public().clone()]);
    std::fs::write(&cluster.previous_key, new.private_pem()).unwrap();
    // Traffic goes on past Entra's cache of the two-key JWKS.
    tokio::time::sleep(ROTATION_TTL + Duration::from_secs(1)).await;

    stop_traffic.cancel();
    let (ok, failed) = traffic.await.unwrap();
    eprintln!(
        "rotation under traffic: {ok} exchanges, {} failed, new key signed {switched_after:?} after publication",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed during the rotation: {failed:?}",
        failed.len()
    );
    assert!(ok > 10, "traffic flowed ({ok} requests)");
    let r = cluster
        .request("https://management.azure.com/.default")
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    cluster.shutdown().await;
    entra.shutdown().await;
    site.stop.cancel();
}

/// Why the delay exists: signing with a new key at once (activation off) is refused by Entra
/// while its cache holds the JWKS without that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_with_a_key_at_once_is_refused_until_entras_cache_expires() {
    let (site, entra, ca) = one_fic_world("rotation control CA", ROTATION_TTL).await;
    let (old, new) = (
        SigningKey::generate(2048).unwrap(),
        SigningKey::generate(2048).unwrap(),
    );
    site.publish(&[old.public().clone()]);
    let at_once = ActivationConfig {
        delay: Duration::ZERO,
        check_period: Duration::from_millis(200),
    };
    let cluster = Cluster::start_with(
        1,
        &ca,
        &entra,
        &site.url,
        &site.bindings_file,
        &old,
        Some(at_once),
    )
    .await;
    let stop_traffic = CancellationToken::new();
    let traffic = continuous_traffic(&cluster, &ca, stop_traffic.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    site.publish(&[old.public().clone(), new.public().clone()]);
    std::fs::write(&cluster.current_key, new.private_pem()).unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            cluster.proxy.app.issuer.signing_kid() == new.kid()
        })
        .await
    );
    tokio::time::sleep(ROTATION_TTL + Duration::from_secs(1)).await;
    stop_traffic.cancel();
    let (ok, failed) = traffic.await.unwrap();
    eprintln!(
        "rotation without activation delay: {ok} exchanges, {} failed",
        failed.len()
    );
    assert!(
        !failed.is_empty() && failed.iter().all(|f| f.contains("7000272")),
        "Entra refuses the unknown key: {failed:?}"
    );
    assert!(ok > 0, "and accepts it once its cache expired");
    cluster.shutdown().await;
    entra.shutdown().await;
    site.stop.cancel();
}

/// An identity bound in both clusters of the fleet test (never asked for: its published keys
/// are what is checked).
const SHARED_CLIENT_ID: &str = "5c3e8a2b-6d4f-4e1a-9b7c-0a2d4f6e8b1c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_per_identity_key_sets_a_cluster_cannot_mint_for_an_identity_only_another_binds() {
    // No metadata cache: the published key sets are what is checked, not Entra's timing.
    let (site, entra, ca) = one_fic_world("fleet test CA", Duration::ZERO).await;
    let (key_a, key_b) = (
        SigningKey::generate(2048).unwrap(),
        SigningKey::generate(2048).unwrap(),
    );
    // The fleet as its operators declare it: cluster A binds CLIENT_ID and the shared
    // identity, cluster B only the shared identity.
    let dir = tempfile::tempdir().unwrap();
    let bindings = |clients: &[&str]| {
        let mut text = String::from("bindings:\n");
        for c in clients {
            text.push_str(&format!("  - clientId: {c}\n    tenantId: {TENANT}\n"));
        }
        text
    };
    for (file, text) in [
        ("a.pub", key_a.public().to_pem()),
        ("b.pub", key_b.public().to_pem()),
        ("a.yaml", bindings(&[CLIENT_ID, SHARED_CLIENT_ID])),
        ("b.yaml", bindings(&[SHARED_CLIENT_ID])),
        // What cluster B's proxy really runs with: a bindings file that also lists CLIENT_ID
        // (a compromised or misconfigured cluster).
        ("b-dishonest.yaml", bindings(&[CLIENT_ID, SHARED_CLIENT_ID])),
        (
            "fleet.yaml",
            "clusters:\n  - name: a\n    publicKeys: [a.pub]\n    bindings: a.yaml\n  - name: b\n    publicKeys: [b.pub]\n    bindings: b.yaml\n".into(),
        ),
    ] {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let fleet = fleet::load(&dir.path().join("fleet.yaml")).unwrap();
    issuer::publish_fleet(site.docs.path(), &fleet, &site.url).unwrap();
    let published = |client: &str| -> Vec<String> {
        let jwks: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                site.docs
                    .path()
                    .join(format!("{TENANT}/{client}/openid/v1/jwks")),
            )
            .unwrap(),
        )
        .unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(published(CLIENT_ID), [key_a.kid()]);
    assert_eq!(published(SHARED_CLIENT_ID), [key_a.kid(), key_b.kid()]);

    let a = Cluster::start(
        1,
        &ca,
        &entra,
        &site.url,
        &dir.path().join("a.yaml"),
        &key_a,
    )
    .await;
    let b = Cluster::start(
        2,
        &ca,
        &entra,
        &site.url,
        &dir.path().join("b-dishonest.yaml"),
        &key_b,
    )
    .await;

    let r = a.request("https://vault.azure.net/.default").await;
    assert_eq!(r.status, 200, "cluster A binds the identity: {}", r.json);
    assert_eq!(
        common::jwt_claims(r.json["access_token"].as_str().unwrap())["appid"],
        CLIENT_ID
    );

    // Cluster B signs a well-formed assertion for the identity's one FIC (right issuer URL,
    // subject and audience), but with a key the identity's JWKS does not hold.
    let refused = b.request("https://vault.azure.net/.default").await;
    assert_eq!(refused.status, 401, "{}", refused.json);
    assert_eq!(
        refused.json["error_codes"][0], 7000272,
        "Entra's own code passes through: {}",
        refused.json
    );
    assert!(
        refused.error_description().starts_with("AADSTS7000272"),
        "{}",
        refused.json
    );
    assert!(
        refused.error_description().contains(key_b.kid()),
        "Entra names the key it did not find: {}",
        refused.json
    );
    assert!(refused.json.get("access_token").is_none());
    assert_eq!(entra.stats().tokens_issued, 1, "only cluster A got a token");

    // The same request succeeds once B's key is published for every identity, as a publish
    // without a fleet file does: the key sets alone stopped it.
    site.publish(&[key_a.public().clone(), key_b.public().clone()]);
    let r = b.request("https://storage.azure.com/.default").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(entra.stats().tokens_issued, 2);

    a.shutdown().await;
    b.shutdown().await;
    entra.shutdown().await;
    site.stop.cancel();
}
