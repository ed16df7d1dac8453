//! Where Entra is: the authority host of each sovereign cloud, an authority given by URL, and
//! the Entra settings of one SNI name (`--sni-profile`).

use crate::startup::StartError;

/// The public cloud's authority host (the default).
pub const PUBLIC_CLOUD: &str = "https://login.microsoftonline.com";

/// Authority hosts of the sovereign clouds, by the names operators use.
pub fn cloud_authority(cloud: &str) -> Option<&'static str> {
    match cloud.to_ascii_lowercase().as_str() {
        "public" | "azurepubliccloud" => Some(PUBLIC_CLOUD),
        "usgov" | "azureusgovernment" => Some("https://login.microsoftonline.us"),
        "china" | "azurechinacloud" => Some("https://login.chinacloudapi.cn"),
        _ => None,
    }
}

/// The Entra settings of one SNI name: which cloud its identities live in, and the tenant
/// assumed for requests whose path names none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniProfile {
    pub name: String,
    pub authority: url::Url,
    pub tenant: Option<String>,
}

impl std::str::FromStr for SniProfile {
    type Err = StartError;
    fn from_str(s: &str) -> Result<Self, StartError> {
        let bad = |why: &str| StartError::usage(format!("--sni-profile '{s}': {why}"));
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=cloud=..|authority=..[,tenant=..]"))?;
        let mut authority = None;
        let mut tenant = None;
        for pair in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{pair}' is not key=value")))?;
            match k.trim() {
                "cloud" => {
                    let host = cloud_authority(v.trim()).ok_or_else(|| {
                        bad(&format!("unknown cloud '{v}' (public, usgov or china)"))
                    })?;
                    authority = Some(parse_authority(host)?);
                }
                "authority" => authority = Some(parse_authority(v.trim())?),
                "tenant" => {
                    let t = v.trim().to_ascii_lowercase();
                    if crate::request::token::parse_guid(&t).is_none() && !t.contains('.') {
                        return Err(bad("tenant must be a GUID or a domain"));
                    }
                    tenant = Some(t);
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(Self {
            name: name.trim().to_ascii_lowercase(),
            authority: authority.ok_or_else(|| bad("cloud= or authority= is required"))?,
            tenant,
        })
    }
}

/// An Entra authority host: https, or http on loopback (emulators).
pub fn parse_authority(s: &str) -> Result<url::Url, StartError> {
    let url = url::Url::parse(s)
        .map_err(|e| StartError::usage(format!("--authority-host '{s}' is not a URL: {e}")))?;
    let ok = url.scheme() == "https"
        || (url.scheme() == "http" && crate::http::client::is_loopback(&url));
    if !ok {
        return Err(StartError::usage(format!(
            "--authority-host '{s}' must be https (plain http only for loopback emulators)"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(StartError::usage(format!(
            "--authority-host '{s}' must not have a query or fragment"
        )));
    }
    Ok(url)
}
