//! What the request path learnt about one service-account token, found with ONE lookup by the
//! token's SHA-256: the caller it authenticated as, until when that holds, and for each
//! (client id, canonical scope, SNI name, path tenant) it was allowed, the token-cache entry it
//! was served from.
//!
//! Nothing here is an authority of its own. Each fact is tagged with the generation of what it
//! was derived from — the cluster's keys (`Authenticator::generation`), the RBAC decisions
//! (`Authorizer::generation`), the bindings (`Bindings::generation`) — and with its deadline
//! (the token's expiry, the TokenReview answer's). A fact whose generation moved on, whose
//! deadline passed, or whose token-cache entry was replaced is not used: the request takes the
//! full path (authenticate, authorize, resolve, look up), which learns the fact again. So a
//! revocation takes effect through the memo exactly when it does without it.
//!
//! The one fact without a deadline of its own here is an authorization decision's TTL (the
//! bound on staleness when the RBAC watch is broken): a grant is therefore re-checked through
//! the full path at least every [`GRANT_RECHECK`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::authn::Caller;
use crate::exchange::cache::{CacheKey, Entry};
use crate::expiry::{Lifetime, OwnLifetime};

/// Longest a grant is used before the full path checks it again (its decision may have
/// reached its TTL in the authorizer meanwhile).
pub const GRANT_RECHECK: Duration = Duration::from_secs(1);

/// Grants kept per token: SDKs ask for one or two scopes; more only cost the full path.
const MAX_GRANTS: usize = 8;

/// The generations a fact was derived under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generations {
    pub authz: u64,
    pub bindings: u64,
}

/// The memo: one entry per distinct live token.
pub struct Memo {
    tokens: moka::sync::Cache<[u8; 32], Arc<Known>>,
}

/// What is known about one token.
pub struct Known {
    pub caller: Arc<Caller>,
    /// `Authenticator::generation` when the caller was authenticated.
    authn_generation: u64,
    /// The token's expiry or the TokenReview answer's, whichever is first.
    until: Instant,
    grants: ArcSwap<Vec<Arc<Grant>>>,
}

/// One allowed request shape of a token, and the entry it was served from.
pub struct Grant {
    /// Holds the client id and the canonical scope the request named.
    pub key: CacheKey,
    sni: Option<Box<str>>,
    path_tenant: Option<Box<str>>,
    pub generations: Generations,
    until: Instant,
    pub entry: Arc<Entry>,
}

/// The shape of a request, as grants are matched.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub client_id: &'a str,
    pub scope: &'a str,
    pub sni: Option<&'a str>,
    pub path_tenant: Option<&'a str>,
}

impl Lifetime for Arc<Known> {
    fn lifetime(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}

impl Memo {
    pub fn new(capacity: u64) -> Self {
        Self {
            tokens: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(OwnLifetime)
                .build(),
        }
    }

    /// What is known about the token whose SHA-256 is `digest`, if it still holds under
    /// `authn_generation`.
    pub fn recall(&self, digest: &[u8; 32], authn_generation: u64) -> Option<Arc<Known>> {
        let known = self.tokens.get(digest)?;
        known.holds(authn_generation).then_some(known)
    }

    /// Remembers that the token `digest` authenticated as `caller` under `authn_generation`,
    /// until `until` (nothing is remembered past it).
    pub fn learn(
        &self,
        digest: [u8; 32],
        caller: Arc<Caller>,
        authn_generation: u64,
        until: Instant,
    ) -> Arc<Known> {
        let known = Arc::new(Known {
            caller,
            authn_generation,
            until,
            grants: ArcSwap::from_pointee(Vec::new()),
        });
        if Instant::now() < until {
            self.tokens.insert(digest, known.clone());
        }
        known
    }

    /// Tokens remembered now.
    pub fn len(&self) -> u64 {
        self.tokens.run_pending_tasks();
        self.tokens.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Known {
    /// Whether the caller still holds: the same keys, and before the deadline.
    fn holds(&self, authn_generation: u64) -> bool {
        self.authn_generation == authn_generation && Instant::now() < self.until
    }

    /// The grant for `ask`, if it holds under `now` generations and its deadline.
    pub fn grant(&self, ask: &Ask<'_>, now: Generations) -> Option<Arc<Grant>> {
        let grants = self.grants.load();
        let grant = grants.iter().find(|g| g.answers(ask))?;
        (grant.generations == now && Instant::now() < grant.until).then(|| grant.clone())
    }

    /// Remembers that `ask` was allowed under `generations`, resolved to `key` and served
    /// from `entry`.
    pub fn learn_grant(
        &self,
        ask: &Ask<'_>,
        generations: Generations,
        key: CacheKey,
        entry: Arc<Entry>,
    ) {
        let grant = Arc::new(Grant {
            key,
            sni: ask.sni.map(Into::into),
            path_tenant: ask.path_tenant.map(Into::into),
            generations,
            until: (Instant::now() + GRANT_RECHECK).min(self.until),
            entry,
        });
        self.grants.rcu(|grants| {
            let mut next: Vec<Arc<Grant>> =
                grants.iter().filter(|g| !g.answers(ask)).cloned().collect();
            if next.len() >= MAX_GRANTS {
                next.remove(0);
            }
            next.push(grant.clone());
            next
        });
    }
}

impl Grant {
    fn answers(&self, ask: &Ask<'_>) -> bool {
        *self.key.client_id == *ask.client_id
            && *self.key.scopes == *ask.scope
            && self.sni.as_deref() == ask.sni
            && self.path_tenant.as_deref() == ask.path_tenant
    }
}

/// Longest token a connection keeps (a service-account token is about 1 KiB): a longer one is
/// hashed and looked up each time.
const LAST_TOKEN_MAX: usize = 4096;

/// The token a connection's peer presented last, and what is known about it. A kept-alive
/// connection sends the same token with every request: it is hashed and looked up in the
/// [`Memo`] once, then recognised by comparing bytes. It holds only a token this connection's
/// own peer sent and that authenticated, and it vouches for nothing on its own: the same
/// [`Known`] is checked against the keys' generation and its deadline at every use.
#[derive(Default)]
pub struct LastToken(Mutex<Option<(Box<str>, Arc<Known>)>>);

impl LastToken {
    /// What is known about `token`, when it is this connection's last one and still holds
    /// under `authn_generation`. A busy slot (h2's concurrent streams) is a miss.
    pub fn recall(&self, token: &str, authn_generation: u64) -> Option<Arc<Known>> {
        let last = self.0.try_lock().ok()?;
        let (kept, known) = last.as_ref()?;
        (**kept == *token && known.holds(authn_generation)).then(|| known.clone())
    }

    /// Keeps `token` (authenticated as `known`) as this connection's last one.
    pub fn keep(&self, token: &str, known: &Arc<Known>) {
        if token.len() > LAST_TOKEN_MAX {
            return;
        }
        if let Ok(mut last) = self.0.try_lock() {
            match last.as_mut() {
                Some((kept, was)) if **kept == *token => *was = known.clone(),
                _ => *last = Some((token.into(), known.clone())),
            }
        }
    }
}
