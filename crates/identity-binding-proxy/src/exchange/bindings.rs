//! Which managed identities this cluster may serve. The bindings file (YAML, hot reloaded)
//! lists `clientId`, `tenantId` and optionally `subject`; a request for any other client-id
//! is refused with 403 before anything is sent to Entra.
//!
//! ```yaml
//! bindings:
//!   - clientId: 00000000-0000-0000-0000-000000000001
//!     tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47
//!     subject: my-identity        # optional, default: the client-id
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::request::error::{codes, ProxyError};

use crate::request::token::parse_guid;
use crate::startup::StartError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub client_id: String,
    pub tenant_id: String,
    /// The `sub` of our assertion, and of the FIC on the identity.
    pub subject: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBinding {
    client_id: String,
    tenant_id: String,
    #[serde(default)]
    subject: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawFile {
    Wrapped { bindings: Vec<RawBinding> },
    List(Vec<RawBinding>),
}

/// A parsed, validated bindings file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindingSet {
    by_client: HashMap<String, Binding>,
}

impl BindingSet {
    pub fn parse(yaml: &str) -> Result<Self, StartError> {
        if yaml.trim().is_empty() {
            return Ok(Self::default());
        }
        let raw: RawFile = serde_norway::from_str(yaml).map_err(|e| {
            StartError::usage(format!(
                "expected a list of {{clientId, tenantId, subject?}} under 'bindings': {e}"
            ))
        })?;
        let list = match raw {
            RawFile::Wrapped { bindings } | RawFile::List(bindings) => bindings,
        };
        let mut by_client = HashMap::new();
        for (i, b) in list.into_iter().enumerate() {
            let client_id = parse_guid(&b.client_id).ok_or_else(|| {
                StartError::usage(format!(
                    "binding {i}: clientId '{}' is not a GUID",
                    b.client_id
                ))
            })?;
            let tenant_id = b.tenant_id.trim().to_ascii_lowercase();
            if parse_guid(&tenant_id).is_none() && !is_domain(&tenant_id) {
                return Err(StartError::usage(format!(
                    "binding {i}: tenantId '{}' is neither a GUID nor a domain",
                    b.tenant_id
                )));
            }
            let subject = b.subject.unwrap_or_else(|| client_id.clone());
            if subject.is_empty() || subject.len() > 600 {
                return Err(StartError::usage(format!(
                    "binding {i}: subject must be 1..600 characters"
                )));
            }
            let binding = Binding {
                client_id: client_id.clone(),
                tenant_id,
                subject,
            };
            if by_client.insert(client_id.clone(), binding).is_some() {
                return Err(StartError::usage(format!(
                    "binding {i}: clientId {client_id} is listed twice"
                )));
            }
        }
        Ok(Self { by_client })
    }

    pub fn get(&self, client_id: &str) -> Option<&Binding> {
        self.by_client.get(client_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Binding> {
        let mut all: Vec<&Binding> = self.by_client.values().collect();
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        all.into_iter()
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}

/// A DNS name such as `contoso.onmicrosoft.com` (the other form of a tenant id).
pub fn is_domain(s: &str) -> bool {
    s.contains('.')
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

pub fn load(path: &Path) -> Result<BindingSet, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::usage(format!("cannot read bindings file {}: {e}", path.display()))
    })?;
    BindingSet::parse(&text)
        .map_err(|e| StartError::usage(format!("bindings file {}: {e}", path.display())))
}

/// The live bindings, reloaded when the file changes. A broken edit keeps the last good set.
pub struct Bindings {
    path: PathBuf,
    current: ArcSwap<BindingSet>,
    /// Bumped after every reload is in service.
    generation: AtomicU64,
}

impl Bindings {
    pub fn open(path: &Path) -> Result<Self, StartError> {
        let set = load(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(0),
        })
    }

    pub fn current(&self) -> Arc<BindingSet> {
        self.current.load_full()
    }

    /// Changes whenever the bindings were reloaded: whatever was resolved under an older
    /// generation must be resolved again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `set` in service, then says so through the generation (in this order: a
    /// resolution read under the new generation cannot predate the new set).
    pub fn replace(&self, set: BindingSet) {
        self.current.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The binding of `client_id`, if it agrees with every tenant the request names (each
    /// given with whose it is, for the error): an identity not bound here, or bound in another
    /// tenant, is refused with what to change.
    pub fn resolve(
        &self,
        client_id: &str,
        tenants: &[(Option<&str>, &str)],
    ) -> Result<Binding, ProxyError> {
        let set = self.current.load();
        let binding = set.get(client_id).ok_or_else(|| {
            ProxyError::Unbound(format!(
                "Managed identity '{client_id}' is not bound to this cluster: add {{clientId: \
                 {client_id}, tenantId: <tenant>}} to the proxy's bindings file (and its \
                 federated identity credential to the identity) before workloads can use it."
            ))
        })?;
        for (tenant, whose) in tenants {
            let Some(tenant) = tenant else { continue };
            if !tenant.eq_ignore_ascii_case(&binding.tenant_id) {
                let (id, bound) = (&binding.client_id, &binding.tenant_id);
                return Err(ProxyError::InvalidRequest {
                    code: codes::TENANT_MISMATCH,
                    description: format!(
                        "Tenant '{}' (from {whose}) is not this identity's: managed identity \
                         '{id}' is bound to tenant '{bound}'. Set AZURE_TENANT_ID to '{bound}' \
                         (or use the SNI name of that tenant's profile).",
                        crate::request::token::printable(tenant, 100),
                    ),
                });
            }
        }
        Ok(binding.clone())
    }

    /// Polls the file (ConfigMap volumes change by symlink swap, which inotify on the file
    /// itself misses; a cheap poll sees every kind of update).
    pub fn watch(
        self: Arc<Self>,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let path = self.path.clone();
        crate::files::watch_contents(vec![path], period, stop, move || match load(&self.path) {
            Ok(set) => {
                tracing::info!(bindings = set.len(), "bindings reloaded");
                self.replace(set);
            }
            Err(e) => {
                tracing::error!(error = %e, "bindings not reloaded; keeping the previous set")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrapped_and_plain_lists_with_default_subject() {
        let y = "bindings:\n- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: contoso.onmicrosoft.com\n";
        let set = BindingSet::parse(y).unwrap();
        let b = set.get("11111111-2222-3333-4444-555555555555").unwrap();
        assert_eq!(b.subject, b.client_id);
        let y = "- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47\n  subject: shared\n";
        assert_eq!(
            BindingSet::parse(y)
                .unwrap()
                .get("11111111-2222-3333-4444-555555555555")
                .unwrap()
                .subject,
            "shared"
        );
    }

    #[test]
    fn refuses_bad_ids_duplicates_and_unknown_fields() {
        assert!(BindingSet::parse("- clientId: nope\n  tenantId: a.b\n").is_err());
        assert!(BindingSet::parse(
            "- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: ../x\n"
        )
        .is_err());
        let dup = "- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: a.b\n- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: a.b\n";
        assert!(BindingSet::parse(dup)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(BindingSet::parse("- clientId: 11111111-2222-3333-4444-555555555555\n  tenantId: a.b\n  clientSecret: x\n").is_err());
    }
}
