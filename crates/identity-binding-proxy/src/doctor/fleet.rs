//! Per-identity key sets, given the fleet file (`--fleet`, as `issuer publish --fleet` reads
//! it): each identity's published JWKS holds only the keys of the clusters that bind it, so a
//! key stolen from one cluster mints for no identity only other clusters bind.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cli::fleet::Fleet;
use crate::doctor::install::Proxy;
use crate::doctor::issuer::Published;
use crate::doctor::report::Check;
use crate::doctor::report::Unchecked;

const ID: &str = "issuer.key-sets";

/// `None` without a fleet file: which clusters bind what is known only from it.
pub fn check(
    proxy: &Proxy,
    fleet: Option<(&Path, &Fleet)>,
    published: &Result<Vec<Published>, Unchecked>,
) -> Option<Check> {
    let (file, fleet) = fleet?;
    let (identities, published) = match (fleet.identities(), published) {
        (Ok(i), Ok(p)) => (i, p),
        (Err(e), _) => return Some(Check::unknown(ID, e.to_string())),
        (_, Err(e)) => return Some(Check::unknown(ID, e.clone())),
    };
    // Which cluster each key belongs to.
    let owner: BTreeMap<&str, &str> = fleet
        .clusters
        .iter()
        .flat_map(|c| {
            c.keys
                .iter()
                .map(move |k| (k.kid.as_str(), c.name.as_str()))
        })
        .collect();
    let mut extra = Vec::new();
    let mut unreachable = 0;
    for p in published {
        let Some(kids) = p.doc.as_ref().ok().and_then(|d| d.kids.as_ref().ok()) else {
            unreachable += 1;
            continue;
        };
        let allowed: Vec<&str> = identities
            .iter()
            .filter(|i| i.binding.client_id == p.client_id)
            .flat_map(|i| i.keys.iter().map(|k| k.kid.as_str()))
            .collect();
        for kid in kids.iter().filter(|k| !allowed.contains(&k.as_str())) {
            let whose = owner.get(kid.as_str()).map_or_else(
                || "a key of no cluster in the fleet file".to_string(),
                |c| format!("a key of cluster '{c}', which does not bind it"),
            );
            extra.push(format!("{}: JWKS holds {kid}, {whose}", p.client_id));
        }
    }
    if !extra.is_empty() {
        return Some(
            Check::fail(
                ID,
                format!("{} key(s) could mint for identities their cluster does not bind", extra.len()),
                format!(
                    "identity-binding-proxy issuer publish --out site --fleet {} --issuer-url '{}'   \
                     # then upload site/ to the issuer host",
                    file.display(),
                    proxy.setting("IBP_ISSUER_URL").unwrap_or("<issuer URL>")
                ),
            )
            .with_details(extra),
        );
    }
    if unreachable == published.len() && unreachable > 0 {
        return Some(Check::unknown(ID, "no JWKS could be fetched from here"));
    }
    Some(Check::pass(
        ID,
        format!(
            "each identity's JWKS holds only keys of the clusters that bind it ({} checked)",
            published.len() - unreachable
        ),
    ))
}
