//! The fleet file of `issuer publish --fleet`: every cluster that shares the issuer host, with
//! its public key(s) and its bindings file. From it each identity gets a JWKS holding only the
//! keys of the clusters that bind it, so a key stolen from one cluster mints for no identity
//! that only other clusters bind.
//!
//! ```yaml
//! clusters:
//!   - name: east
//!     publicKeys: [east.pub]            # paths relative to the fleet file
//!     bindings: east-bindings.yaml
//!   - name: west
//!     publicKeys: [west.pub, west-next.pub]
//!     bindings: west-bindings.yaml
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::exchange::bindings::{Binding, BindingSet};
use crate::exchange::keys::RsaPublicKey;
use crate::startup::StartError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    clusters: Vec<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCluster {
    name: String,
    public_keys: Vec<PathBuf>,
    bindings: PathBuf,
}

/// One cluster of the fleet: the keys its proxies sign with and the identities it serves.
#[derive(Clone, Debug)]
pub struct FleetCluster {
    pub name: String,
    pub keys: Vec<RsaPublicKey>,
    pub bindings: BindingSet,
}

/// One identity and the keys Entra may trust for it: those of every cluster that binds it.
#[derive(Clone, Debug)]
pub struct IdentityKeys {
    pub binding: Binding,
    /// The clusters that bind this identity, in fleet-file order.
    pub clusters: Vec<String>,
    pub keys: Vec<RsaPublicKey>,
}

/// A parsed, validated fleet file.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub clusters: Vec<FleetCluster>,
}

/// Reads the fleet file, its key files and its bindings files (paths relative to the fleet
/// file). The error is one line naming the file and what is wrong with it.
pub fn load(path: &Path) -> Result<Fleet, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::usage(format!("cannot read fleet file {}: {e}", path.display()))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|e| StartError::usage(format!("fleet file {}: {e}", path.display())))
}

/// The YAML of a fleet file; the one place that knows which YAML crate reads it.
fn parse_yaml(text: &str) -> Result<RawFleet, StartError> {
    serde_norway::from_str(text).map_err(|e| {
        let e = e.to_string().replace('\n', " ");
        StartError::usage(format!(
            "expected 'clusters:', a list of {{name, publicKeys, bindings}}: {e}"
        ))
    })
}

/// Parses a fleet file whose relative paths are relative to `base`.
pub fn parse(text: &str, base: &Path) -> Result<Fleet, StartError> {
    let raw = parse_yaml(text)?;
    if raw.clusters.is_empty() {
        return Err(StartError::usage("it lists no clusters"));
    }
    let mut clusters: Vec<FleetCluster> = Vec::with_capacity(raw.clusters.len());
    // Which cluster listed each key first: a key in two clusters would let either mint for the
    // other's identities.
    let mut key_owner: HashMap<String, String> = HashMap::new();
    for (i, c) in raw.clusters.into_iter().enumerate() {
        let name = c.name.trim().to_string();
        if name.is_empty() {
            return Err(StartError::usage(format!("cluster {i} has an empty name")));
        }
        if clusters.iter().any(|other| other.name == name) {
            return Err(StartError::usage(format!(
                "cluster name '{name}' is listed twice"
            )));
        }
        if c.public_keys.is_empty() {
            return Err(StartError::usage(format!(
                "cluster '{name}' has no publicKeys"
            )));
        }
        let mut keys = Vec::with_capacity(c.public_keys.len());
        for file in &c.public_keys {
            let file = base.join(file);
            let pem = std::fs::read_to_string(&file).map_err(|e| {
                StartError::usage(format!(
                    "cluster '{name}': cannot read public key {}: {e}",
                    file.display()
                ))
            })?;
            let key = RsaPublicKey::from_pem(&pem).map_err(|e| {
                StartError::usage(format!(
                    "cluster '{name}': public key {}: {e}",
                    file.display()
                ))
            })?;
            if let Some(owner) = key_owner.get(&key.kid) {
                if *owner != name {
                    return Err(StartError::usage(format!(
                        "cluster '{name}': public key {} (kid {}) is also cluster '{owner}''s: \
                         each cluster needs its own key pair",
                        file.display(),
                        key.kid
                    )));
                }
                continue;
            }
            key_owner.insert(key.kid.clone(), name.clone());
            keys.push(key);
        }
        let bindings = crate::exchange::bindings::load(&base.join(&c.bindings))
            .map_err(|e| StartError::usage(format!("cluster '{name}': {e}")))?;
        clusters.push(FleetCluster {
            name,
            keys,
            bindings,
        });
    }
    let fleet = Fleet { clusters };
    fleet.identities()?;
    Ok(fleet)
}

impl Fleet {
    /// Every identity some cluster binds, with the keys of exactly the clusters that bind it,
    /// sorted by client-id. One identity has one FIC, so every cluster binding it must agree on
    /// its tenant and subject.
    pub fn identities(&self) -> Result<Vec<IdentityKeys>, StartError> {
        let mut by_client: BTreeMap<&str, IdentityKeys> = BTreeMap::new();
        for cluster in &self.clusters {
            for b in cluster.bindings.iter() {
                let Some(identity) = by_client.get_mut(b.client_id.as_str()) else {
                    by_client.insert(
                        &b.client_id,
                        IdentityKeys {
                            binding: b.clone(),
                            clusters: vec![cluster.name.clone()],
                            keys: cluster.keys.clone(),
                        },
                    );
                    continue;
                };
                let first = &identity.clusters[0];
                if identity.binding.tenant_id != b.tenant_id {
                    return Err(StartError::usage(format!(
                        "clientId {} is bound in tenant {} by cluster '{first}' but in tenant {} \
                         by cluster '{}': one identity lives in one tenant",
                        b.client_id, identity.binding.tenant_id, b.tenant_id, cluster.name
                    )));
                }
                if identity.binding.subject != b.subject {
                    return Err(StartError::usage(format!(
                        "clientId {} has subject '{}' in cluster '{first}' but '{}' in cluster \
                         '{}': its one FIC has one subject",
                        b.client_id, identity.binding.subject, b.subject, cluster.name
                    )));
                }
                identity.clusters.push(cluster.name.clone());
                identity.keys.extend(cluster.keys.iter().cloned());
            }
        }
        Ok(by_client.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::keys::SigningKey;

    const X: &str = "11111111-1111-1111-1111-111111111111";
    const Y: &str = "22222222-2222-2222-2222-222222222222";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    /// A directory with `a.pub`, `b.pub`, `b-next.pub` and bindings files: `a.yaml` binds X
    /// and Y, `b.yaml` binds Y only.
    struct Dir {
        dir: tempfile::TempDir,
        a: SigningKey,
        b: SigningKey,
        b_next: SigningKey,
    }

    fn dir() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, b_next) = (
            SigningKey::generate(2048).unwrap(),
            SigningKey::generate(2048).unwrap(),
            SigningKey::generate(2048).unwrap(),
        );
        for (file, key) in [("a.pub", &a), ("b.pub", &b), ("b-next.pub", &b_next)] {
            std::fs::write(dir.path().join(file), key.public().to_pem()).unwrap();
        }
        write_bindings(dir.path(), "a.yaml", &[(X, TENANT), (Y, TENANT)]);
        write_bindings(dir.path(), "b.yaml", &[(Y, TENANT)]);
        Dir { dir, a, b, b_next }
    }

    fn write_bindings(dir: &Path, file: &str, bindings: &[(&str, &str)]) {
        let mut text = String::from("bindings:\n");
        for (client, tenant) in bindings {
            text.push_str(&format!("  - clientId: {client}\n    tenantId: {tenant}\n"));
        }
        std::fs::write(dir.join(file), text).unwrap();
    }

    const TWO_CLUSTERS: &str = "clusters:\n  - name: a\n    publicKeys: [a.pub]\n    bindings: a.yaml\n  - name: b\n    publicKeys: [b.pub, b-next.pub]\n    bindings: b.yaml\n";

    fn kids(keys: &[RsaPublicKey]) -> Vec<&str> {
        keys.iter().map(|k| k.kid.as_str()).collect()
    }

    #[test]
    fn each_identity_gets_the_keys_of_exactly_the_clusters_that_bind_it() {
        let d = dir();
        let file = d.dir.path().join("fleet.yaml");
        std::fs::write(&file, TWO_CLUSTERS).unwrap();
        let fleet = load(&file).unwrap();
        assert_eq!(fleet.clusters.len(), 2);
        let ids = fleet.identities().unwrap();
        assert_eq!(ids.len(), 2);
        let (x, y) = (&ids[0], &ids[1]);
        assert_eq!(x.binding.client_id, X);
        assert_eq!(x.clusters, ["a"]);
        assert_eq!(kids(&x.keys), [d.a.kid()], "bound only in a: only a's key");
        assert_eq!(y.binding.client_id, Y);
        assert_eq!(y.clusters, ["a", "b"]);
        assert_eq!(
            kids(&y.keys),
            [d.a.kid(), d.b.kid(), d.b_next.kid()],
            "bound in both: both clusters' keys, the next key included"
        );
    }

    fn error(d: &Dir, fleet: &str) -> String {
        let file = d.dir.path().join("fleet.yaml");
        std::fs::write(&file, fleet).unwrap();
        let e = load(&file).unwrap_err();
        assert_eq!(e.exit_code(), 64, "a bad fleet file is a usage error: {e}");
        let e = e.to_string();
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        assert!(
            e.starts_with(&format!("fleet file {}: ", file.display())),
            "{e}"
        );
        e
    }

    #[test]
    fn a_broken_fleet_file_is_one_line_naming_the_file_and_the_fault() {
        let d = dir();
        let e = error(
            &d,
            "clusters:\n  - name: a\n    publicKey: [a.pub]\n    bindings: a.yaml\n",
        );
        assert!(e.contains("unknown field `publicKey`"), "{e}");
        let e = error(&d, "clusters: []\n");
        assert!(e.contains("no clusters"), "{e}");
        let e = error(&d, "clusters:\n  - name: a\n    publicKeys: [a.pub]\n    bindings: a.yaml\n  - name: a\n    publicKeys: [b.pub]\n    bindings: b.yaml\n");
        assert!(e.contains("'a' is listed twice"), "{e}");
        let e = error(
            &d,
            "clusters:\n  - name: a\n    publicKeys: [gone.pub]\n    bindings: a.yaml\n",
        );
        assert!(e.contains("cluster 'a': cannot read public key"), "{e}");
        assert!(e.contains("gone.pub"), "{e}");
        let e = error(
            &d,
            "clusters:\n  - name: a\n    publicKeys: []\n    bindings: a.yaml\n",
        );
        assert!(e.contains("cluster 'a' has no publicKeys"), "{e}");
        let e = error(
            &d,
            "clusters:\n  - name: a\n    publicKeys: [a.pub]\n    bindings: gone.yaml\n",
        );
        assert!(e.contains("cluster 'a': cannot read bindings file"), "{e}");
        let e = error(&d, "clusters:\n  - name: a\n    publicKeys: [a.pub]\n    bindings: a.yaml\n  - name: b\n    publicKeys: [a.pub]\n    bindings: b.yaml\n");
        assert!(e.contains("also cluster 'a''s"), "{e}");
    }

    #[test]
    fn one_identity_in_two_tenants_or_with_two_subjects_is_refused() {
        let d = dir();
        write_bindings(d.dir.path(), "b.yaml", &[(Y, "contoso.onmicrosoft.com")]);
        let e = error(&d, TWO_CLUSTERS);
        assert!(e.contains(&format!("clientId {Y} is bound in tenant {TENANT} by cluster 'a' but in tenant contoso.onmicrosoft.com by cluster 'b'")), "{e}");
        std::fs::write(
            d.dir.path().join("b.yaml"),
            format!("- clientId: {Y}\n  tenantId: {TENANT}\n  subject: other\n"),
        )
        .unwrap();
        let e = error(&d, TWO_CLUSTERS);
        assert!(e.contains("subject"), "{e}");
    }
}
