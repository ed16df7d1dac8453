//! `issuer keygen | publish | fic`: the operator's commands around the proxy's issuer — a new
//! key pair, the discovery documents and JWKS a static host publishes, and the `az` commands
//! that create each identity's federated identity credential. The runtime signer is
//! [`crate::exchange::issuer`].

use crate::cli::fleet::Fleet;
use crate::cli::IssuerCommand;
use crate::exchange::bindings::BindingSet;
use crate::exchange::issuer::{IssuerUrl, FIC_AUDIENCE};
use crate::exchange::keys::{RsaPublicKey, SigningKey};
use crate::startup::StartError;
use std::path::{Path, PathBuf};

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
) -> Result<Vec<PathBuf>, StartError> {
    if keys.is_empty() {
        return Err(StartError::usage(
            "no public keys to publish (--public-key)",
        ));
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
pub fn publish_fleet(
    out: &Path,
    fleet: &Fleet,
    url: &IssuerUrl,
) -> Result<Vec<PathBuf>, StartError> {
    if !url.template().contains("{client_id}") {
        return Err(StartError::usage(format!(
            "issuer URL '{}' has no {{client_id}}: per-identity key sets need one issuer path \
             per identity, e.g. https://issuer.example.com/{{tenant}}/{{client_id}}",
            url.template()
        )));
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
fn public_jwks(keys: &[RsaPublicKey]) -> Result<Vec<u8>, StartError> {
    let jwks = serde_json::to_vec_pretty(&jwks_document(keys))
        .map_err(|e| StartError::internal("cannot serialize the JWKS").because(e))?;
    if contains_private_material(&jwks) {
        // Built from public keys only: this is a bug, never the operator's input.
        return Err(StartError::internal(
            "refusing to publish: the JWKS would contain private key material",
        ));
    }
    Ok(jwks)
}

/// Writes one issuer's discovery document and JWKS under its URL's path.
fn write_issuer(out: &Path, issuer: &str, jwks: &[u8]) -> Result<Vec<PathBuf>, StartError> {
    let parsed = url::Url::parse(issuer)
        .map_err(|e| StartError::usage(format!("issuer URL {issuer}")).because(e))?;
    let mut dir = out.to_path_buf();
    for seg in parsed
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        if seg == ".." || seg == "." {
            return Err(StartError::usage(format!(
                "issuer URL {issuer} has a '..' path segment"
            )));
        }
        dir.push(seg);
    }
    let discovery = serde_json::to_vec_pretty(&discovery_document(issuer))
        .map_err(|e| StartError::internal("cannot serialize the discovery document").because(e))?;
    let mut written = Vec::new();
    for (rel, body) in [
        (".well-known/openid-configuration", &discovery[..]),
        ("openid/v1/jwks", jwks),
    ] {
        let file = dir.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| cannot_write(parent, e))?;
        }
        // Replaced whole: a host serving this directory never hands out half a JWKS while it
        // is being republished.
        crate::files::write_public(&file, body).map_err(|e| cannot_write(&file, e))?;
        written.push(file);
    }
    Ok(written)
}

/// A file or directory under `--out` that cannot be written: the path or its permissions are
/// the operator's to fix.
fn cannot_write(path: &Path, e: std::io::Error) -> StartError {
    StartError::usage(format!("cannot write {} (check --out)", path.display())).because(e)
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
pub fn run(cmd: IssuerCommand) -> Result<(), StartError> {
    match cmd {
        IssuerCommand::Keygen(a) => keygen(&a.out, a.bits),
        IssuerCommand::Publish(a) => {
            let url = IssuerUrl::parse(&a.issuer_url)?;
            let written = match (&a.fleet, &a.bindings) {
                (Some(fleet), _) => publish_fleet(&a.out, &crate::cli::fleet::load(fleet)?, &url)?,
                (None, Some(bindings)) => {
                    let set = crate::exchange::bindings::load(bindings)?;
                    let publics = a
                        .public_keys
                        .iter()
                        .map(|p| {
                            let bad = |e: &dyn std::fmt::Display| {
                                StartError::usage(format!("--public-key {}: {e}", p.display()))
                            };
                            let pem = std::fs::read_to_string(p).map_err(|e| bad(&e))?;
                            RsaPublicKey::from_pem(&pem).map_err(|e| bad(&e))
                        })
                        .collect::<Result<Vec<_>, StartError>>()?;
                    let written = publish(&a.out, &publics, &set, &url)?;
                    eprintln!("{SHARED_KEYS_WARNING}");
                    written
                }
                (None, None) => return Err(StartError::usage("--fleet or --bindings is required")),
            };
            for f in written {
                println!("{}", f.display());
            }
            Ok(())
        }
        IssuerCommand::Fic(a) => {
            let url = IssuerUrl::parse(&a.issuer_url)?;
            let set = crate::exchange::bindings::load(&a.bindings)?;
            for line in fic_commands(&set, &url) {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// A new key pair: `out` (private, 0600) and `out.pub`. A key is never overwritten, not even
/// by a second `keygen` racing this one: the one it would replace may already be published.
fn keygen(out: &Path, bits: usize) -> Result<(), StartError> {
    let public = out.with_extension("pub");
    let exists = |path: &Path| {
        StartError::usage(format!(
            "{} exists already: remove it first or choose another --out",
            path.display()
        ))
    };
    // Early, before the key is generated; `create` below is what guarantees it.
    if let Some(taken) = [out, &public].into_iter().find(|p| p.exists()) {
        return Err(exists(taken));
    }
    let key = SigningKey::generate(bits).map_err(|e| match e {
        crate::exchange::keys::KeyError::UnsupportedSize(_) => {
            StartError::usage(format!("--bits {bits}: {e}"))
        }
        e => StartError::internal("cannot generate the key pair").because(e),
    })?;
    use crate::files::{create, PRIVATE, PUBLIC};
    create(out, key.private_pem().as_bytes(), PRIVATE).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => exists(out),
        _ => cannot_write(out, e),
    })?;
    create(&public, key.public().to_pem().as_bytes(), PUBLIC)
        .map_err(|e| cannot_write(&public, e))?;
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
        let cluster =
            |name: &str, key: &SigningKey, clients: &[&str]| crate::cli::fleet::FleetCluster {
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
            .unwrap_err()
            .to_string();
            assert!(e.contains("has no {client_id}"), "{e}");
        }
        assert!(!dir.path().join("refused").exists());
    }
}
