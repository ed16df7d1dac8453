//! Issuer key activation: which loaded key signs our assertions. Entra reads an issuer's JWKS
//! when it first needs it and then reuses it for minutes without refetching for an unknown
//! `kid` (AADSTS7000272), so an assertion signed with a key published moments ago is refused
//! on every node. A new key therefore signs only after it has been in the PUBLISHED JWKS of
//! every identity this proxy serves (fetched at the issuer URL, as Entra fetches it) for the
//! activation delay; until then the previous key keeps signing. Beside the request path: the
//! issuer asks only "which key", answered here in the background.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::exchange::bindings::{BindingSet, Bindings};
use crate::exchange::issuer::Issuer;
use crate::http::client::{FetchError, HttpClient};
use crate::metrics::Metrics;

/// Entra does not publish how long it caches an issuer's metadata; refusals of new keys are
/// reported for "minutes". Fifteen minutes is three times the five the emulator assumes, and a
/// rotation is rare enough that waiting costs nothing.
pub const DEFAULT_DELAY: Duration = Duration::from_secs(900);
/// How often the published documents are read: a small part of the delay.
pub const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(30);
/// Time allowed for each fetch of a discovery document or JWKS.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// When a new key may sign. A zero delay turns activation off: the newest key signs at once.
#[derive(Clone, Debug)]
pub struct ActivationConfig {
    pub delay: Duration,
    pub check_period: Duration,
}

/// Since when each `kid` has been in the published JWKS of every served identity.
#[derive(Debug, Default)]
pub struct Visibility {
    since: HashMap<String, Instant>,
}

impl Visibility {
    /// Records one reading: keys seen in every JWKS keep (or start) their time; the others
    /// lose it, so a key must be visible without a gap.
    pub fn observe(&mut self, visible: &HashSet<String>, now: Instant) {
        self.since.retain(|kid, _| visible.contains(kid));
        for kid in visible {
            self.since.entry(kid.clone()).or_insert(now);
        }
    }

    fn since(&self, kid: &str) -> Option<Instant> {
        self.since.get(kid).copied()
    }
}

/// Which key signs, and the next one waiting for its activation.
#[derive(Debug, PartialEq, Eq)]
pub struct Choice {
    pub signer: String,
    pub next: Option<(String, Instant)>,
}

/// The signing key among `loaded` (oldest first): the newest key visible for `delay`; else the
/// previous signer while it is still published; else the oldest published key (the one Entra
/// most likely knows); else the previous signer, else the oldest loaded.
pub fn choose(
    loaded: &[String],
    vis: &Visibility,
    previous: Option<&str>,
    now: Instant,
    delay: Duration,
) -> Option<Choice> {
    let active = |kid: &String| {
        vis.since(kid)
            .is_some_and(|t| now.saturating_duration_since(t) >= delay)
    };
    let is_loaded = |kid: &str| loaded.iter().any(|k| k == kid);
    let signer = loaded
        .iter()
        .rev()
        .find(|k| active(k))
        .or_else(|| {
            previous
                .filter(|p| is_loaded(p) && vis.since(p).is_some())
                .and_then(|p| loaded.iter().find(|k| *k == p))
        })
        .or_else(|| loaded.iter().find(|k| vis.since(k).is_some()))
        .or_else(|| previous.and_then(|p| loaded.iter().find(|k| *k == p)))
        .or_else(|| loaded.first())?
        .clone();
    let position = loaded.iter().position(|k| *k == signer).unwrap_or(0);
    let next = loaded[position + 1..]
        .iter()
        .rev()
        .find_map(|k| vis.since(k).map(|t| (k.clone(), t + delay)));
    Some(Choice { signer, next })
}

/// Reads the published documents every `check_period` (and when the next key is due) and
/// tells the issuer which key signs, until `stop`.
pub async fn run(
    issuer: Arc<Issuer>,
    bindings: Arc<Bindings>,
    metrics: Arc<Metrics>,
    config: ActivationConfig,
    stop: CancellationToken,
) {
    let client = crate::http::client::client();
    let mut vis = Visibility::default();
    let mut previous: Option<String> = None;
    let mut announced: Option<Choice> = None;
    loop {
        let loaded = issuer.loaded_kids();
        // With one key there is nothing to choose: the published documents are read (from
        // every node, for every identity) only while a rotation is under way.
        let rotating = loaded.iter().any(|k| *k != loaded[0]);
        if rotating {
            match published_kids(&client, &issuer, &bindings.current()).await {
                Ok(Some(visible)) => vis.observe(&visible, Instant::now()),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "the published issuer documents could not be read; the signing key stays as it is"
                ),
            }
        } else {
            vis = Visibility::default();
        }
        let now = Instant::now();
        let choice = choose(&loaded, &vis, previous.as_deref(), now, config.delay);
        let mut wait = config.check_period;
        if let Some(choice) = choice {
            issuer.choose_signer(&choice.signer);
            if let Some((_, at)) = &choice.next {
                wait = wait.min(at.saturating_duration_since(now) + Duration::from_millis(10));
            }
            if announced.as_ref() != Some(&choice) {
                announce(&metrics, &choice, now);
                announced = Some(Choice {
                    signer: choice.signer.clone(),
                    next: choice.next.clone(),
                });
            }
            previous = Some(choice.signer);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The metrics and the log line saying which key signs and when the next one activates.
fn announce(metrics: &Metrics, choice: &Choice, now: Instant) {
    metrics.issuer_signing_key.reset();
    metrics
        .issuer_signing_key
        .with_label_values(&[&choice.signer])
        .set(1);
    metrics.issuer_key_activation.reset();
    let unix = |at: Instant| {
        let wall = SystemTime::now() + at.saturating_duration_since(now);
        wall.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64
    };
    match &choice.next {
        Some((kid, at)) => {
            metrics
                .issuer_key_activation
                .with_label_values(&[kid])
                .set(unix(*at));
            tracing::info!(
                signing = %choice.signer,
                next = %kid,
                activates_in_secs = at.saturating_duration_since(now).as_secs(),
                "issuer key: the previous key signs until the next one has been published long enough for Entra to know it"
            );
        }
        None => tracing::info!(signing = %choice.signer, "issuer key: signing"),
    }
}

/// The `kid`s in the published JWKS of every served identity (`None` with no identity bound).
async fn published_kids(
    client: &HttpClient,
    issuer: &Issuer,
    bindings: &BindingSet,
) -> Result<Option<HashSet<String>>, FetchError> {
    let mut urls: Vec<String> = bindings
        .iter()
        .map(|b| issuer.url().for_binding(b))
        .collect();
    urls.sort();
    urls.dedup();
    let mut common: Option<HashSet<String>> = None;
    for url in urls {
        let kids = jwks_kids(client, &url).await?;
        common = Some(match common {
            None => kids,
            Some(c) => c.intersection(&kids).cloned().collect(),
        });
    }
    Ok(common)
}

/// The `kid`s an issuer publishes, read the way Entra reads them: discovery, then `jwks_uri`.
async fn jwks_kids(client: &HttpClient, issuer: &str) -> Result<HashSet<String>, FetchError> {
    let discovery = crate::http::client::get_json(
        client,
        &format!("{issuer}/.well-known/openid-configuration"),
        FETCH_TIMEOUT,
    )
    .await?;
    let jwks_uri = discovery
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| FetchError::Unexpected {
            url: issuer.to_string(),
            what: "the discovery document has no jwks_uri".into(),
        })?;
    let jwks = crate::http::client::get_json(client, jwks_uri, FETCH_TIMEOUT).await?;
    let keys =
        jwks.get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| FetchError::Unexpected {
                url: jwks_uri.to_string(),
                what: "the JWKS has no keys array".into(),
            })?;
    Ok(keys
        .iter()
        .filter_map(|k| k.get("kid").and_then(Value::as_str))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn seen(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const DELAY: Duration = Duration::from_secs(900);

    #[test]
    fn a_new_key_signs_only_after_being_published_for_the_delay() {
        let t0 = Instant::now();
        let loaded = kids(&["old", "new"]);
        let mut vis = Visibility::default();
        vis.observe(&seen(&["old"]), t0);
        let c = choose(&kids(&["old"]), &vis, None, t0, DELAY).unwrap();
        assert_eq!(c.signer, "old");
        // The new key is loaded and published: the old one signs until the delay is over.
        let t1 = t0 + DELAY + Duration::from_secs(60);
        vis.observe(&seen(&["old", "new"]), t1);
        let c = choose(&loaded, &vis, Some("old"), t1, DELAY).unwrap();
        assert_eq!(c.signer, "old");
        assert_eq!(c.next, Some(("new".into(), t1 + DELAY)));
        let c = choose(&loaded, &vis, Some("old"), t1 + DELAY, DELAY).unwrap();
        assert_eq!((c.signer.as_str(), c.next), ("new", None));
    }

    #[test]
    fn a_loaded_key_not_yet_published_never_signs_and_a_gap_restarts_its_wait() {
        let t0 = Instant::now();
        let loaded = kids(&["old", "new"]);
        let mut vis = Visibility::default();
        vis.observe(&seen(&["old"]), t0);
        let later = t0 + DELAY * 3;
        let c = choose(&loaded, &vis, Some("old"), later, DELAY).unwrap();
        assert_eq!((c.signer.as_str(), c.next), ("old", None));
        vis.observe(&seen(&["old", "new"]), later);
        vis.observe(&seen(&["old"]), later + DELAY / 2);
        vis.observe(&seen(&["old", "new"]), later + DELAY);
        let c = choose(&loaded, &vis, Some("old"), later + DELAY + DELAY / 2, DELAY).unwrap();
        assert_eq!(c.signer, "old", "visible again only half a delay ago");
    }

    #[test]
    fn at_start_the_oldest_published_key_signs() {
        let t0 = Instant::now();
        let loaded = kids(&["old", "new"]);
        // Nothing read yet: the first key loaded (the previous one in a rotation).
        let c = choose(&loaded, &Visibility::default(), None, t0, DELAY).unwrap();
        assert_eq!(c.signer, "old");
        // Both published, for an unknown time: the older one.
        let mut vis = Visibility::default();
        vis.observe(&seen(&["old", "new"]), t0);
        assert_eq!(
            choose(&loaded, &vis, None, t0, DELAY).unwrap().signer,
            "old"
        );
        // Only the new one published: the only one Entra can know.
        let mut vis = Visibility::default();
        vis.observe(&seen(&["new"]), t0);
        assert_eq!(
            choose(&loaded, &vis, None, t0, DELAY).unwrap().signer,
            "new"
        );
        assert!(choose(&[], &vis, None, t0, DELAY).is_none());
    }

    #[test]
    fn a_previous_signer_no_longer_published_gives_way_to_a_published_key() {
        let t0 = Instant::now();
        let loaded = kids(&["old", "new"]);
        let mut vis = Visibility::default();
        vis.observe(&seen(&["new"]), t0);
        let c = choose(&loaded, &vis, Some("old"), t0, DELAY).unwrap();
        assert_eq!(c.signer, "new");
        // Nothing published at all (e.g. the host is misconfigured): the previous one stays.
        let c = choose(&loaded, &Visibility::default(), Some("new"), t0, DELAY).unwrap();
        assert_eq!(c.signer, "new");
    }
}
