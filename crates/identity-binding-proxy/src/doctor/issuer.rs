//! The issuer as Entra sees it, the FICs Entra holds, and the clocks. For each bound identity:
//! the published discovery document and JWKS fetched from the public issuer URL (over HTTPS,
//! from where doctor runs), the discovery `issuer` equal to the URL the proxy signs with
//! (case and trailing slash included), the proxy's signing key in the JWKS; the exact
//! (issuer, subject, audience) compared with `az identity federated-credential list`; and the
//! skew between this machine, the apiserver and the issuer host.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;

use crate::doctor::install::Proxy;
use crate::doctor::report::Check;
use crate::doctor::report::{why, Unchecked};
use crate::exchange::bindings::Binding;
use crate::exchange::issuer::{IssuerUrl, FIC_AUDIENCE};
use crate::exchange::keys::RsaPublicKey;

/// Entra's own limit of FICs per managed identity; past 18 there is little room left.
const FIC_LIMIT: usize = 20;
const FIC_WARN: usize = 18;
/// Clock skew beyond which Entra refuses assertions as outside their time window (its
/// tolerance is five minutes).
const MAX_SKEW: Duration = Duration::from_secs(300);
/// Largest issuer document doctor reads.
const DOC_LIMIT: usize = 1 << 20;

/// One identity's issuer as published.
pub struct Published {
    pub client_id: String,
    /// The issuer URL the proxy signs with for this identity.
    pub issuer: String,
    pub doc: Result<Document, Unchecked>,
    /// The issuer host's clock (its Date header) and ours when the answer came.
    pub date: Option<(SystemTime, SystemTime)>,
}

pub struct Document {
    pub issuer: String,
    pub kids: Result<Vec<String>, Unchecked>,
}

/// The client doctor fetches the issuer with: trusting only the CA in `ca_file` when given.
pub fn outbound_client(
    ca_file: Option<&Path>,
) -> Result<crate::http::client::HttpClient, Unchecked> {
    match ca_file {
        Some(file) => client_trusting(file),
        None => Ok(crate::http::client::client()),
    }
}

/// The published documents of every bound identity.
pub async fn fetch_all(
    proxy: &Proxy,
    client: &crate::http::client::HttpClient,
    timeout: Duration,
) -> Result<Vec<Published>, Unchecked> {
    let url = issuer_url(proxy)?;
    let bindings = proxy.bindings.as_ref().map_err(Clone::clone)?;
    let mut out = Vec::new();
    for b in bindings {
        let issuer = url.for_binding(b);
        let (doc, date) = fetch_one(client, &issuer, timeout).await;
        out.push(Published {
            client_id: b.client_id.clone(),
            issuer,
            doc,
            date,
        });
    }
    Ok(out)
}

/// The outbound client, trusting only the CA in `file`.
fn client_trusting(file: &Path) -> Result<crate::http::client::HttpClient, Unchecked> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(file).map_err(|e| why!("{}: {e}", file.display()))? {
        let cert = cert.map_err(|e| why!("{}: {e}", file.display()))?;
        roots
            .add(cert)
            .map_err(|e| why!("{}: {e}", file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Unchecked::from(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

fn issuer_url(proxy: &Proxy) -> Result<IssuerUrl, Unchecked> {
    let raw = proxy
        .setting("IBP_ISSUER_URL")
        .ok_or("the proxy has no IBP_ISSUER_URL")?;
    Ok(IssuerUrl::parse(raw)?)
}

type Dated = Option<(SystemTime, SystemTime)>;

async fn fetch_one(
    client: &crate::http::client::HttpClient,
    issuer: &str,
    timeout: Duration,
) -> (Result<Document, Unchecked>, Dated) {
    let url = format!("{issuer}/.well-known/openid-configuration");
    let req = match http::Request::get(&url).body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return (Err(why!("{url}: {e}")), None),
    };
    let fetched = match crate::http::client::fetch(client, req, timeout, DOC_LIMIT).await {
        Ok(f) => f,
        Err(e) => return (Err(why!("{url}: {e}")), None),
    };
    let date = fetched
        .headers
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .map(|d| (d, SystemTime::now()));
    if !fetched.status.is_success() {
        return (Err(why!("{url} answered {}", fetched.status)), date);
    }
    let discovery: serde_json::Value = match serde_json::from_slice(&fetched.body) {
        Ok(v) => v,
        Err(e) => return (Err(why!("{url} is not JSON: {e}")), date),
    };
    let Some(published) = discovery["issuer"].as_str() else {
        return (Err(why!("{url} has no issuer")), date);
    };
    let kids = match discovery["jwks_uri"].as_str() {
        Some(jwks) => crate::http::client::get_json(client, jwks, timeout)
            .await
            .map(|j| {
                j["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k["kid"].as_str().map(str::to_string))
                    .collect()
            })
            .map_err(Unchecked::from),
        None => Err(why!("{url} has no jwks_uri")),
    };
    let doc = Document {
        issuer: published.to_string(),
        kids,
    };
    (Ok(doc), date)
}

/// The fleet file doctor was given (`--fleet`), if any.
pub type FleetFile<'a> = Option<(&'a Path, &'a crate::cli::fleet::Fleet)>;

pub fn checks(
    proxy: &Proxy,
    published: &Result<Vec<Published>, Unchecked>,
    fleet: FleetFile<'_>,
) -> Vec<Check> {
    let published = match published {
        Ok(p) if p.is_empty() => {
            let why = "no identity is bound: nothing is published for Entra";
            return vec![
                Check::unknown("issuer.discovery", why),
                Check::unknown("issuer.jwks", why),
            ];
        }
        Ok(p) => p,
        Err(e) => {
            return vec![
                Check::unknown("issuer.discovery", e.clone()),
                Check::unknown("issuer.jwks", e.clone()),
            ]
        }
    };
    vec![
        discovery_check(proxy, published, fleet),
        jwks_check(proxy, published, fleet),
    ]
}

/// The command that republishes the issuer documents: from the fleet file when doctor was
/// given one, as a shared issuer must be published (every cluster's keys, or the others'
/// tokens stop verifying).
fn publish_fix(proxy: &Proxy, fleet: FleetFile<'_>) -> String {
    let url = proxy.setting("IBP_ISSUER_URL").unwrap_or("<issuer URL>");
    if let Some((file, _)) = fleet {
        return format!(
            "identity-binding-proxy issuer publish --out site --fleet {} --issuer-url '{url}'\n\
             # then upload site/ to the issuer host, as before",
            file.display()
        );
    }
    format!(
        "identity-binding-proxy issuer publish --out site --bindings bindings.yaml \
         --issuer-url '{url}' --public-key issuer.pub   # bindings.yaml: ConfigMap {}/{}-bindings; \
         issuer.pub: the public half of the proxy's issuer key(s)\n\
         # a shared issuer: pass the public key of EVERY cluster that binds these identities \
         (--public-key a.pub,b.pub), or better the fleet file (--fleet fleet.yaml, and give \
         doctor --fleet): publishing one cluster's key drops the others'\n\
         # then upload site/ to the issuer host, as before",
        proxy.namespace, proxy.name
    )
}

fn discovery_check(proxy: &Proxy, published: &[Published], fleet: FleetFile<'_>) -> Check {
    const ID: &str = "issuer.discovery";
    let mut wrong = Vec::new();
    let mut unreachable = Vec::new();
    for p in published {
        match &p.doc {
            Err(e) => unreachable.push(format!("{}: {e}", p.client_id)),
            Ok(d) if d.issuer != p.issuer => wrong.push(format!(
                "{}: the discovery document says issuer '{}', the proxy signs with '{}' \
                 (Entra compares exactly: case and trailing slash)",
                p.client_id, d.issuer, p.issuer
            )),
            Ok(_) => {}
        }
    }
    if !wrong.is_empty() {
        wrong.extend(unreachable);
        return Check::fail(
            ID,
            format!(
                "{} identity(ies) publish another issuer than the proxy signs with (AADSTS700211)",
                wrong.len()
            ),
            publish_fix(proxy, fleet),
        )
        .with_details(wrong);
    }
    if !unreachable.is_empty() {
        return Check::unknown(
            ID,
            format!(
                "{} issuer(s) could not be fetched from here",
                unreachable.len()
            ),
        )
        .with_details(unreachable);
    }
    Check::pass(ID, format!("the discovery documents of all {} identity(ies) name exactly the issuer the proxy signs with", published.len()))
}

/// The kids of the proxy's issuer keys, in `IBP_ISSUER_KEY` order (the last is the newest).
fn issuer_kids(proxy: &Proxy) -> Result<Vec<String>, Unchecked> {
    let keys = proxy.issuer_keys.as_ref().map_err(Clone::clone)?;
    if keys.is_empty() {
        return Err("the proxy has no issuer key".into());
    }
    keys.iter()
        .map(|pem| {
            RsaPublicKey::from_pem(pem)
                .map(|k| k.kid)
                .map_err(|e| why!("the proxy's issuer key: {e}"))
        })
        .collect()
}

/// What each of the proxy's keys missing from a JWKS means. The newest key signs only once
/// it has been published for the activation delay (until then the previous one signs), so a
/// missing newest key stalls the rotation, a missing key that signs now is refused.
fn missing_keys(kids: &[String], published: &[String]) -> Vec<String> {
    let newest_published = kids.last().is_some_and(|k| published.contains(k));
    let n = kids.len();
    kids.iter()
        .enumerate()
        .filter(|(_, k)| !published.contains(k))
        .map(|(i, k)| {
            let role = if i + 1 == n && n > 1 {
                "pending: the newest key, it signs once published; the rotation cannot complete"
            } else if i + 1 == n || (i + 2 == n && !newest_published) {
                "active: it signs now, Entra cannot verify it (AADSTS7000272)"
            } else {
                "previous: what it signed cannot be verified (AADSTS7000272)"
            };
            format!("{k} ({role})")
        })
        .collect()
}

fn jwks_check(proxy: &Proxy, published: &[Published], fleet: FleetFile<'_>) -> Check {
    const ID: &str = "issuer.jwks";
    let kids = match issuer_kids(proxy) {
        Ok(k) => k,
        Err(e) => return Check::unknown(ID, e),
    };
    let mut missing = Vec::new();
    let mut unreachable = Vec::new();
    for p in published {
        match p.doc.as_ref().map(|d| &d.kids) {
            Err(e) => unreachable.push(format!("{}: {e}", p.client_id)),
            Ok(Err(e)) => unreachable.push(format!("{}: JWKS: {e}", p.client_id)),
            Ok(Ok(have)) => {
                let lacks = missing_keys(&kids, have);
                if !lacks.is_empty() {
                    missing.push(format!(
                        "{}: the published JWKS has kids [{}]; missing {}",
                        p.client_id,
                        have.join(", "),
                        lacks.join(", ")
                    ));
                }
            }
        }
    }
    if !missing.is_empty() {
        missing.extend(unreachable);
        return Check::fail(
            ID,
            format!(
                "the JWKS of {} identity(ies) lacks a key of the proxy ({}): Entra cannot verify \
                 what it signs (AADSTS7000272)",
                missing.len(),
                kids.join(", ")
            ),
            publish_fix(proxy, fleet),
        )
        .with_details(missing);
    }
    if !unreachable.is_empty() {
        return Check::unknown(
            ID,
            format!("{} JWKS could not be fetched from here", unreachable.len()),
        )
        .with_details(unreachable);
    }
    Check::pass(
        ID,
        format!(
            "the JWKS of all {} identity(ies) holds every key of the proxy ({})",
            published.len(),
            kids.join(", ")
        ),
    )
}

// -------------------------------------------------------------------------------- FICs

/// `az identity federated-credential list` output per client id.
pub type FicLists = BTreeMap<String, Vec<serde_json::Value>>;

/// Reads each `CLIENT_ID=FILE` (`-`: standard input, at most once); the client id as the
/// proxy reads it (a GUID, lower-cased).
pub fn read_fic_lists(specs: &[String]) -> Result<FicLists, Unchecked> {
    let mut out = FicLists::new();
    let mut stdin_used = false;
    for spec in specs {
        let (cid, file) = spec
            .split_once('=')
            .ok_or_else(|| why!("--federated-credentials '{spec}': expected CLIENT_ID=FILE"))?;
        let cid = crate::request::token::parse_guid(cid).ok_or_else(|| {
            why!("--federated-credentials '{spec}': '{cid}' is not a client id (a GUID)")
        })?;
        let text = if file == "-" {
            if std::mem::replace(&mut stdin_used, true) {
                return Err("--federated-credentials: standard input can be read once".into());
            }
            std::io::read_to_string(std::io::stdin()).map_err(|e| why!("standard input: {e}"))?
        } else {
            std::fs::read_to_string(file)
                .map_err(|e| why!("--federated-credentials {file}: {e}"))?
        };
        let list: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            format!("--federated-credentials {file}: not the JSON list `az identity federated-credential list` prints: {e}")
        })?;
        out.insert(cid, list);
    }
    Ok(out)
}

/// The client ids of `--federated-credentials` that no binding names: a usage error naming
/// the bound ones (nothing would be compared for them).
pub fn unbound_fic_lists(lists: &FicLists, bindings: &[Binding]) -> Option<String> {
    let unknown: Vec<&str> = lists
        .keys()
        .filter(|cid| !bindings.iter().any(|b| &b.client_id == *cid))
        .map(String::as_str)
        .collect();
    if unknown.is_empty() {
        return None;
    }
    let bound: Vec<&str> = bindings.iter().map(|b| b.client_id.as_str()).collect();
    Some(format!(
        "--federated-credentials names client id(s) {} that the proxy does not bind; \
         the bound client ids are: {}",
        unknown.join(", "),
        if bound.is_empty() {
            "none".to_string()
        } else {
            bound.join(", ")
        }
    ))
}

/// What Entra must hold for one identity.
struct Wanted<'a> {
    issuer: String,
    subject: &'a str,
}

/// The FIC of `list` closest to `want`, and how it differs (empty: it matches).
fn closest<'a>(
    list: &'a [serde_json::Value],
    want: &Wanted<'_>,
) -> Option<(&'a serde_json::Value, Vec<String>)> {
    let differences = |f: &serde_json::Value| {
        let mut d = Vec::new();
        for (field, have, want) in [
            (
                "issuer",
                f["issuer"].as_str().unwrap_or(""),
                want.issuer.as_str(),
            ),
            ("subject", f["subject"].as_str().unwrap_or(""), want.subject),
        ] {
            if have != want {
                let how = if have.eq_ignore_ascii_case(want) {
                    " (differs only in case: AADSTS7002138)"
                } else {
                    ""
                };
                d.push(format!("{field} is '{have}', must be '{want}'{how}"));
            }
        }
        let audiences: Vec<&str> = f["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        if !audiences.contains(&FIC_AUDIENCE) {
            d.push(format!(
                "audiences are [{}], must be [{FIC_AUDIENCE}]",
                audiences.join(", ")
            ));
        }
        d
    };
    list.iter()
        .filter(|f| is_ours(f, want))
        .map(|f| (f, differences(f)))
        .min_by_key(|(_, d)| d.len())
}

/// Whether `fic` is the one meant for `want`, so updating it breaks nothing else: it names
/// exactly the issuer, or differs from issuer and subject only in case (AADSTS7002138). Any
/// other FIC (an AKS OIDC or GitHub one, sharing only the audience) is someone else's.
fn is_ours(fic: &serde_json::Value, want: &Wanted<'_>) -> bool {
    let issuer = fic["issuer"].as_str().unwrap_or("");
    let subject = fic["subject"].as_str().unwrap_or("");
    issuer == want.issuer
        || (issuer.eq_ignore_ascii_case(&want.issuer) && subject.eq_ignore_ascii_case(want.subject))
}

/// A FIC name not yet taken in `list`.
fn new_fic_name(list: &[serde_json::Value]) -> String {
    let taken = |n: &str| list.iter().any(|f| f["name"].as_str() == Some(n));
    let base = "identity-binding-proxy";
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| base.to_string())
}

/// `(resource group, identity name)` from a FIC's resource id.
fn identity_of(fic: &serde_json::Value) -> (String, String) {
    let id = fic["id"].as_str().unwrap_or("");
    let after = |key: &str| {
        let lower = id.to_ascii_lowercase();
        lower
            .find(&format!("/{key}/"))
            .map(|i| {
                id[i + key.len() + 2..]
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_else(|| format!("<{key}>"))
    };
    (after("resourcegroups"), after("userassignedidentities"))
}

fn fic_fix(
    fic: Option<&serde_json::Value>,
    want: &Wanted<'_>,
    list: &[serde_json::Value],
) -> String {
    let (rg, identity) = list
        .first()
        .map(identity_of)
        .unwrap_or(("<resource-group>".into(), "<identity-name>".into()));
    match fic {
        Some(f) => format!(
            "az identity federated-credential update --name {} --identity-name {identity} --resource-group {rg} \
             --issuer '{}' --subject '{}' --audiences {FIC_AUDIENCE}",
            f["name"].as_str().unwrap_or("<name>"),
            want.issuer,
            want.subject
        ),
        None => format!(
            "az identity federated-credential create --name {} --identity-name {identity} \
             --resource-group {rg} --issuer '{}' --subject '{}' --audiences {FIC_AUDIENCE}",
            new_fic_name(list),
            want.issuer,
            want.subject
        ),
    }
}

pub fn fic_check(proxy: &Proxy, lists: &FicLists) -> Check {
    const ID: &str = "fic.match";
    let (url, bindings) = match (issuer_url(proxy), proxy.bindings.as_ref()) {
        (Ok(u), Ok(b)) => (u, b),
        (Err(e), _) => return Check::unknown(ID, e),
        (_, Err(e)) => return Check::unknown(ID, e.clone()),
    };
    let mut details = Vec::new();
    let mut fixes = Vec::new();
    let mut unchecked = Vec::new();
    let mut compared = 0;
    for b in bindings {
        let want = Wanted {
            issuer: url.for_binding(b),
            subject: &b.subject,
        };
        let Some(list) = lists.get(&b.client_id) else {
            unchecked.push(expected_line(b, &want));
            continue;
        };
        compared += 1;
        if list.len() > FIC_WARN {
            details.push(format!(
                "{}: {} of Entra's {FIC_LIMIT} FICs are used",
                b.client_id,
                list.len()
            ));
        }
        match closest(list, &want) {
            Some((_, d)) if d.is_empty() => {}
            Some((f, d)) => {
                details.extend(d.iter().map(|d| {
                    format!(
                        "{}: FIC {}: {d}",
                        b.client_id,
                        f["name"].as_str().unwrap_or("?")
                    )
                }));
                fixes.push(fic_fix(Some(f), &want, list));
            }
            None => {
                details.push(format!("{}: no FIC with issuer '{}', subject '{}', audience {FIC_AUDIENCE} (AADSTS70021)", b.client_id, want.issuer, want.subject));
                fixes.push(fic_fix(None, &want, list));
            }
        }
    }
    if !fixes.is_empty() {
        return Check::fail(
            ID,
            format!(
                "{} identity(ies) lack the exact FIC the proxy presents",
                fixes.len()
            ),
            fixes.join("\n"),
        )
        .with_details(details);
    }
    if compared == 0 {
        return Check::unknown(
            ID,
            "not compared: pass --federated-credentials CLIENT_ID=FILE with the output of \
             `az identity federated-credential list --identity-name <name> --resource-group <group> -o json`",
        )
        .with_details(unchecked);
    }
    details.extend(unchecked.into_iter().map(|u| format!("not compared: {u}")));
    Check::pass(
        ID,
        format!("{compared} identity(ies) hold exactly the FIC the proxy presents"),
    )
    .with_details(details)
}

fn expected_line(b: &Binding, want: &Wanted<'_>) -> String {
    format!(
        "{}: issuer '{}', subject '{}', audience {FIC_AUDIENCE}",
        b.client_id, want.issuer, want.subject
    )
}

// ------------------------------------------------------------------------------- clocks

/// Skew between this machine, the apiserver (its Date header) and the issuer host.
pub async fn clock_check(
    client: &kube::Client,
    published: &Result<Vec<Published>, Unchecked>,
) -> Check {
    const ID: &str = "clock.skew";
    let mut skews = Vec::new();
    match apiserver_date(client).await {
        Ok((theirs, ours)) => skews.push(("the apiserver".to_string(), skew(theirs, ours))),
        Err(e) => return Check::unknown(ID, format!("the apiserver's clock: {e}")),
    }
    if let Ok(published) = published {
        if let Some((theirs, ours)) = published.iter().find_map(|p| p.date) {
            skews.push(("the issuer host".into(), skew(theirs, ours)));
        }
    }
    let details: Vec<String> = skews
        .iter()
        .map(|(who, s)| format!("{who}: {s:+} s from this machine"))
        .collect();
    let worst = skews
        .iter()
        .map(|(_, s)| s.unsigned_abs())
        .max()
        .unwrap_or(0);
    if Duration::from_secs(worst) > MAX_SKEW {
        return Check::fail(
            ID,
            format!("clocks differ by {worst} s, beyond the {} s Entra tolerates", MAX_SKEW.as_secs()),
            "synchronise the clocks with NTP (chrony / systemd-timesyncd) on the nodes and hosts named",
        )
        .with_details(details);
    }
    Check::pass(ID, format!("clocks agree within {worst} s")).with_details(details)
}

/// Whole seconds: the Date header has no finer resolution.
fn skew(theirs: SystemTime, ours: SystemTime) -> i64 {
    match theirs.duration_since(ours) {
        Ok(ahead) => ahead.as_secs() as i64,
        Err(behind) => -(behind.duration().as_secs() as i64),
    }
}

async fn apiserver_date(client: &kube::Client) -> Result<(SystemTime, SystemTime), Unchecked> {
    let req = http::Request::get("/version")
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| Unchecked::from(e.to_string()))?;
    let resp = client
        .send(req)
        .await
        .map_err(|e| Unchecked::from(e.to_string()))?;
    let ours = SystemTime::now();
    resp.headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .map(|d| (d, ours))
        .ok_or_else(|| "no Date header".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fic(issuer: &str, subject: &str, audience: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "ibp", "issuer": issuer, "subject": subject, "audiences": [audience],
            "id": "/subscriptions/s/resourceGroups/My-Group/providers/Microsoft.ManagedIdentity/userAssignedIdentities/my-id/federatedIdentityCredentials/ibp",
        })
    }

    fn want() -> Wanted<'static> {
        Wanted {
            issuer: "https://issuer.example/t/c".into(),
            subject: "my-identity",
        }
    }

    #[test]
    fn the_closest_fic_names_each_differing_field_and_a_case_only_difference() {
        let want = want();
        let exact = [fic(
            "https://issuer.example/t/c",
            "my-identity",
            FIC_AUDIENCE,
        )];
        assert!(closest(&exact, &want).unwrap().1.is_empty());
        let list = [
            fic("https://elsewhere/", "other", "api://x"),
            fic("https://ISSUER.example/t/c", "My-Identity", FIC_AUDIENCE),
        ];
        let (found, diffs) = closest(&list, &want).unwrap();
        assert_eq!(found["subject"], "My-Identity");
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(diffs[0].starts_with("issuer is 'https://ISSUER.example/t/c'"));
        assert!(
            diffs
                .iter()
                .all(|d| d.contains("differs only in case: AADSTS7002138")),
            "{diffs:?}"
        );
        let fix = fic_fix(Some(found), &want, &list);
        assert_eq!(
            fix,
            "az identity federated-credential update --name ibp --identity-name my-id \
             --resource-group My-Group --issuer 'https://issuer.example/t/c' --subject \
             'my-identity' --audiences api://AzureADTokenExchange"
        );
        assert!(fic_fix(None, &want, &[]).starts_with(
            "az identity federated-credential create --name identity-binding-proxy \
             --identity-name <identity-name> --resource-group <resource-group>"
        ));
    }

    #[test]
    fn a_fic_of_another_issuer_is_never_the_one_to_update() {
        let want = want();
        // What an identity typically holds besides ours: an AKS OIDC and a GitHub FIC, with
        // the same audience; and ours with a trailing slash, which is no case difference.
        let mut aks = fic(
            "https://eastus.oic.prod-aks.azure.com/t/x/",
            "system:serviceaccount:apps:web",
            FIC_AUDIENCE,
        );
        aks["name"] = "identity-binding-proxy".into();
        let list = [
            aks,
            fic(
                "https://token.actions.githubusercontent.com",
                "repo:o/r:ref:refs/heads/main",
                FIC_AUDIENCE,
            ),
            fic("https://issuer.example/t/c/", "my-identity", FIC_AUDIENCE),
        ];
        assert!(
            closest(&list, &want).is_none(),
            "nothing here is ours to update"
        );
        let fix = fic_fix(None, &want, &list);
        assert!(
            fix.starts_with(
                "az identity federated-credential create --name identity-binding-proxy-2 "
            ),
            "a new FIC, named apart from the ones there: {fix}"
        );
        // The same issuer exactly: ours, whatever the subject.
        let ours = [fic("https://issuer.example/t/c", "old-subject", "api://x")];
        let (_, diffs) = closest(&ours, &want).unwrap();
        assert_eq!(diffs.len(), 2, "{diffs:?}");
    }

    #[test]
    fn every_missing_key_is_named_with_what_it_does() {
        let kids = ["old".to_string(), "prev".to_string(), "new".to_string()];
        let have = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert!(missing_keys(&kids, &have(&["old", "prev", "new", "x"])).is_empty());
        // The newest not yet published: the previous one signs, the rotation waits.
        let m = missing_keys(&kids, &have(&["old", "prev"]));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("new (pending") && m[0].contains("rotation cannot complete"));
        // Neither: the previous one signs now and is refused.
        let m = missing_keys(&kids, &have(&["old"]));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].starts_with("prev (active") && m[0].contains("AADSTS7000272"),
            "{m:?}"
        );
        // The newest published, an older one dropped: still named.
        let m = missing_keys(&kids, &have(&["prev", "new"]));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("old (previous"), "{m:?}");
        // One key only: it signs.
        let m = missing_keys(&kids[2..], &[]);
        assert!(m[0].starts_with("new (active"), "{m:?}");
    }

    #[test]
    fn fic_lists_name_client_ids_as_the_proxy_reads_them_and_only_bound_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fics.json");
        std::fs::write(&file, "[]").unwrap();
        let cid = "5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90";
        let lists =
            read_fic_lists(&[format!(" {}={}", cid.to_uppercase(), file.display())]).unwrap();
        assert_eq!(lists.keys().collect::<Vec<_>>(), [cid]);
        let e = read_fic_lists(&[format!("5f0e2a7c-typo={}", file.display())]).unwrap_err();
        assert!(e.to_string().contains("not a client id"), "{e}");
        let bound = |c: &str| Binding {
            client_id: c.into(),
            tenant_id: "t".into(),
            subject: "s".into(),
        };
        assert_eq!(unbound_fic_lists(&lists, &[bound(cid)]), None);
        let other = "11111111-2222-3333-4444-555555555555";
        let e = unbound_fic_lists(&lists, &[bound(other)]).unwrap();
        assert!(
            e.contains(cid) && e.contains(&format!("the bound client ids are: {other}")),
            "{e}"
        );
    }

    #[test]
    fn fic_lists_are_named_by_client_id_and_bad_ones_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, "[]").unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"not\": \"a list\"}").unwrap();
        let c1 = "5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90";
        let lists = read_fic_lists(&[format!("{c1}={}", good.display())]).unwrap();
        assert_eq!(lists[c1], Vec::<serde_json::Value>::new());
        let e = read_fic_lists(&[format!("{c1}={}", bad.display())]).unwrap_err();
        assert!(
            e.to_string()
                .contains("az identity federated-credential list"),
            "{e}"
        );
        let e = read_fic_lists(&["no-equals".into()]).unwrap_err();
        assert!(e.to_string().contains("CLIENT_ID=FILE"), "{e}");
    }
}
