//! TLS as the clients see it: the serving certificate holds each SNI name as an exact DNS SAN
//! (Java matches exactly); it chains to the FIRST certificate of the published CA bundle (the
//! only one .NET trusts); how many days it has left; and the CA bundle each workload namespace
//! projects into its pods is the proxy's.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::doctor::install::{Proxy, Workload};
use crate::doctor::report::Check;
use crate::doctor::report::Unchecked;

/// Fewer days than this left on the serving certificate is a failure: cert-manager renews a
/// month ahead by default, so a certificate this close to its end is not being renewed.
const MIN_DAYS_LEFT: i64 = 7;

pub async fn checks(
    client: &kube::Client,
    proxy: &Proxy,
    workloads: &Result<Vec<Workload>, Unchecked>,
    ca_name: Option<&str>,
) -> Vec<Check> {
    let mut certs = Vec::new();
    for (name, pem) in &proxy.certs {
        match pem {
            Ok(pem) => match CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(chain) if !chain.is_empty() => certs.push((name.as_str(), chain)),
                _ => certs.push((name.as_str(), Vec::new())),
            },
            Err(_) => certs.push((name.as_str(), Vec::new())),
        }
    }
    let unreadable: Vec<String> = proxy
        .certs
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    if proxy.certs.is_empty() || !unreadable.is_empty() {
        let why = if proxy.certs.is_empty() {
            "the proxy container has no IBP_TLS".to_string()
        } else {
            format!(
                "serving certificate not readable: {}",
                unreadable.join("; ")
            )
        };
        return ["tls.sni-san", "tls.chain", "tls.expiry"]
            .into_iter()
            .map(|id| Check::unknown(id, why.clone()))
            .chain([ca_bundles_check(client, proxy, workloads, ca_name).await])
            .collect();
    }
    vec![
        san_check(&certs),
        chain_check(proxy, &certs),
        expiry_check(&certs),
        ca_bundles_check(client, proxy, workloads, ca_name).await,
    ]
}

type Served<'a> = (&'a str, Vec<CertificateDer<'static>>);

fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

fn san_check(certs: &[Served<'_>]) -> Check {
    const ID: &str = "tls.sni-san";
    let mut wrong = Vec::new();
    for (name, chain) in certs {
        let names = chain.first().map(dns_names).unwrap_or_default();
        if !names.iter().any(|n| n == name) {
            wrong.push(format!(
                "the certificate for SNI {name} has DNS SANs [{}]",
                names.join(", ")
            ));
        }
    }
    if wrong.is_empty() {
        return Check::pass(
            ID,
            format!(
                "each served certificate holds its SNI name as a DNS SAN ({} checked)",
                certs.len()
            ),
        );
    }
    let names: Vec<&str> = certs.iter().map(|(n, _)| *n).collect();
    Check::fail(
        ID,
        "a serving certificate lacks its SNI name as an exact DNS SAN: clients refuse the handshake",
        format!(
            "reissue the serving certificate with DNS name(s) {} (cert-manager: spec.dnsNames of the chart's Certificate; \
             helm value tls.sniName), then the proxy reloads it",
            names.join(", ")
        ),
    )
    .with_details(wrong)
}

/// Chains to the FIRST certificate of the published bundle. Name and time are the other
/// checks': only a broken chain fails here.
fn chain_check(proxy: &Proxy, certs: &[Served<'_>]) -> Check {
    const ID: &str = "tls.chain";
    let bundle = match &proxy.ca_bundle {
        Ok(b) => b,
        Err(e) => return Check::fail(ID, format!("no published CA bundle: {e}"), ca_fix(proxy)),
    };
    let Some(Ok(first)) = CertificateDer::pem_slice_iter(bundle.as_bytes()).next() else {
        return Check::fail(
            ID,
            format!(
                "ConfigMap {}/{} holds no certificate in ca.crt",
                proxy.namespace,
                proxy.ca_configmap()
            ),
            ca_fix(proxy),
        );
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Err(e) = roots.add(first) {
        return Check::fail(
            ID,
            format!("the first certificate of the CA bundle is not a usable CA: {e}"),
            ca_fix(proxy),
        );
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = match rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider,
    )
    .build()
    {
        Ok(v) => v,
        Err(e) => return Check::unknown(ID, format!("building a verifier: {e}")),
    };
    let mut broken = Vec::new();
    for (name, chain) in certs {
        let Ok(server) = ServerName::try_from(name.to_string()) else {
            broken.push(format!("{name} is not a DNS name"));
            continue;
        };
        let Some((leaf, rest)) = chain.split_first() else {
            broken.push(format!("the certificate for {name} does not parse"));
            continue;
        };
        if let Err(e) = verifier.verify_server_cert(leaf, rest, &server, &[], UnixTime::now()) {
            use rustls::CertificateError as E;
            match e {
                rustls::Error::InvalidCertificate(
                    E::NotValidForName
                    | E::NotValidForNameContext { .. }
                    | E::Expired
                    | E::ExpiredContext { .. },
                ) => {}
                e => broken.push(format!("the certificate for {name}: {e}")),
            }
        }
    }
    if broken.is_empty() {
        return Check::pass(
            ID,
            "the serving certificate chains to the first certificate of the published CA bundle",
        );
    }
    Check::fail(ID, "the serving certificate does not chain to the FIRST certificate of the published CA bundle (.NET trusts only that one)", ca_fix(proxy))
        .with_details(broken)
}

fn ca_fix(proxy: &Proxy) -> String {
    format!(
        "put the CA that signs the serving certificate FIRST in ca.crt of ConfigMap {ns}/{cm} \
         (helm value caBundle), then copy it to every workload namespace",
        ns = proxy.namespace,
        cm = proxy.ca_configmap()
    )
}

fn expiry_check(certs: &[Served<'_>]) -> Check {
    const ID: &str = "tls.expiry";
    let now = UnixTime::now().as_secs() as i64;
    let mut days = Vec::new();
    for (name, chain) in certs {
        let Some(Ok((_, cert))) = chain
            .first()
            .map(|d| x509_parser::parse_x509_certificate(d))
        else {
            return Check::unknown(ID, format!("the certificate for {name} does not parse"));
        };
        days.push((
            *name,
            (cert.validity().not_after.timestamp() - now).div_euclid(86_400),
        ));
    }
    let details: Vec<String> = days
        .iter()
        .map(|(n, d)| format!("{n}: {d} day(s) left"))
        .collect();
    let least = days.iter().map(|(_, d)| *d).min().unwrap_or_default();
    if least >= MIN_DAYS_LEFT {
        return Check::pass(
            ID,
            format!("the serving certificate has {least} day(s) left"),
        )
        .with_details(details);
    }
    Check::fail(
        ID,
        format!("the serving certificate has {least} day(s) left: it is not being renewed"),
        "renew the serving certificate (cert-manager: kubectl describe certificate -n <ns>; cmctl renew)",
    )
    .with_details(details)
}

/// Each namespace with opted-in pods projects the proxy's CA bundle, from the ConfigMap the
/// webhook names (a namespace without it is `webhook.ca-configmaps`'s to report).
async fn ca_bundles_check(
    client: &kube::Client,
    proxy: &Proxy,
    workloads: &Result<Vec<Workload>, Unchecked>,
    ca_name: Option<&str>,
) -> Check {
    const ID: &str = "tls.ca-bundles";
    let Some(ca_name) = ca_name else {
        return Check::pass(
            ID,
            "the webhook injects the CA itself (inline or from a ClusterTrustBundle): no \
             namespace ConfigMap to compare",
        );
    };
    let (Ok(bundle), Ok(workloads)) = (&proxy.ca_bundle, workloads) else {
        return Check::unknown(ID, "no CA bundle or no pods to compare");
    };
    if CertificateDer::pem_slice_iter(bundle.as_bytes())
        .next()
        .is_none()
    {
        // Copying an empty bundle over the namespaces' would only break them: tls.chain says
        // what to fill in first.
        return Check::unknown(
            ID,
            format!(
                "the proxy's {} holds no certificate to compare with",
                proxy.ca_configmap()
            ),
        );
    }
    let namespaces: BTreeSet<&str> = workloads.iter().map(|w| w.namespace.as_str()).collect();
    let mut stale = Vec::new();
    let mut unreadable = Vec::new();
    for ns in namespaces.iter().filter(|ns| **ns != proxy.namespace) {
        match namespace_bundle(client, ns, ca_name).await {
            Ok(Some(theirs)) if theirs.trim() == bundle.trim() => {}
            Ok(Some(_)) => stale.push(*ns),
            Ok(None) => {}
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    bundles_verdict(proxy, ca_name, &stale, unreadable)
}

/// `ca.crt` of ConfigMap `ns/name` (empty when it has none); `None` when there is no such
/// ConfigMap.
async fn namespace_bundle(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Option<String>, Unchecked> {
    let cm = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| Unchecked::from(format!("reading ConfigMap {ns}/{name}: {e}")))?;
    Ok(cm.map(|cm| {
        cm.data
            .and_then(|mut d| d.remove("ca.crt"))
            .unwrap_or_default()
    }))
}

fn bundles_verdict(proxy: &Proxy, ca_name: &str, stale: &[&str], unreadable: Vec<String>) -> Check {
    const ID: &str = "tls.ca-bundles";
    if !stale.is_empty() {
        let mut details: Vec<String> = stale.iter().map(|ns| format!("namespace {ns}")).collect();
        details.extend(unreadable);
        return Check::fail(
            ID,
            format!(
                "{} namespace(s) trust another CA bundle than the proxy's",
                stale.len()
            ),
            proxy.copy_ca_bundle(ca_name, stale),
        )
        .with_details(details);
    }
    if !unreadable.is_empty() {
        return Check::unknown(
            ID,
            format!(
                "{} namespace(s)' {ca_name} could not be read",
                unreadable.len()
            ),
        )
        .with_details(unreadable);
    }
    Check::pass(
        ID,
        format!("every workload namespace's {ca_name} holds the proxy's CA bundle"),
    )
}
