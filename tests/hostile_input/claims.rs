//! Audience, issuer, cluster, claims.

use ibp_emulators::kube::{KubeEmulator, KubeEmulatorConfig, MintRequest};
use serde_json::json;

use super::common::mint_sa;
use super::{form, on_shared_dev, refused, Cases, Expect};

/// `s` with the case of every ASCII letter swapped.
fn swap_case(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_uppercase() {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

#[test]
fn tokens_for_another_audience_issuer_cluster_or_subject_are_refused() {
    on_shared_dev("audience, issuer, cluster, claims", |ctx| async move {
        let forge = ctx.forge;
        let sys = ctx.sys;
        let aud = ctx.aud.as_str();
        let mut cases = Cases::default();
        let claims = forge.claims("demo");
        cases.add(
            "wrong audience",
            form(ctx.assertion(&mint_sa(
                sys,
                "demo",
                "demo",
                &["https://kubernetes.default.svc"],
                3600,
            ))),
            refused(401, "invalid_client", aud),
        );
        let other_case = swap_case(aud);
        assert!(other_case != aud && other_case.eq_ignore_ascii_case(aud));
        cases.add(
            "audience in a different case",
            form(ctx.assertion(&mint_sa(sys, "demo", "demo", &[&other_case], 3600))),
            refused(401, "invalid_client", aud),
        );
        let mut wrong_iss = claims.clone();
        wrong_iss["iss"] = json!("https://evil.example/issuer");
        cases.add(
            "wrong issuer under the cluster key",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &wrong_iss))),
            refused(401, "invalid_client", "https://evil.example/issuer"),
        );
        let other_dir = tempfile::tempdir().unwrap();
        let other = KubeEmulator::start(KubeEmulatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: other_dir.path().to_path_buf(),
            rbac_file: None,
            issuer: Some("https://other-cluster.example/issuer".into()),
        })
        .await
        .unwrap();
        let foreign = other
            .mint_token(&MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![aud.into()],
                expires_in_secs: 3600,
                pod_name: None,
            })
            .unwrap();
        other.shutdown().await;
        cases.add(
            "token of another cluster",
            form(ctx.assertion(&foreign)),
            refused(401, "invalid_client", "another cluster"),
        );
        let mut no_kube = claims.clone();
        no_kube.as_object_mut().unwrap().remove("kubernetes.io");
        cases.add(
            "no kubernetes.io claim",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &no_kube))),
            refused(401, "invalid_client", "'kubernetes.io'"),
        );
        let mut sub_mismatch = claims.clone();
        sub_mismatch["sub"] = json!("system:serviceaccount:kube-system:admin");
        cases.add(
            "sub disagrees with the kubernetes.io claim",
            form(ctx.assertion(&forge.sign_rs256(forge.header(), &sub_mismatch))),
            refused(401, "invalid_client", "subject does not match"),
        );
        let deleted = mint_sa(sys, "demo", "ghost", &[aud], 3600);
        sys.kube.delete_service_account("demo", "ghost");
        cases.add(
            "token of a deleted service account",
            form(ctx.assertion(&deleted)),
            refused(401, "invalid_client", "did not accept"),
        );
        cases.add(
            "positive control: audience list with ours not first",
            form(ctx.assertion(&mint_sa(
                sys,
                "demo",
                "demo",
                &["https://kubernetes.default.svc", aud],
                3600,
            ))),
            Expect::Served,
        );
        ctx.run(8, cases).await;
    });
}
