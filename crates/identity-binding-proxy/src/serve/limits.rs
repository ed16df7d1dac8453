//! Resource bounds for the pods of the node (SPEC §11). Any pod can connect before it is
//! authenticated, so what one peer address may hold is bounded below what the whole process
//! may hold: open connections, requests in flight, and request-body bytes buffered. A peer over
//! its share is refused; every other peer keeps its own share.
//!
//! Counting is by peer IP address: each pod has its own IP (host-network pods share the
//! node's, which is why the per-peer shares are generous).
//!
//! # Fair shares under the process-wide cap
//!
//! When the process holds `max_connections`, a peer holding fewer than its fair share (the cap
//! divided by the peers holding connections, itself included) still gets in: one connection of
//! a peer holding at least two more than it is told to close (evicted) to make room. Which one:
//! first a connection that never sent a request (a TLS handshake or a first request head still
//! pending after a second), then one idle that never carried an authenticated request, then one
//! idle longest, then one with unauthenticated requests in flight (first one that never carried
//! an authenticated request), then one just opened; within each, the largest holder's oldest;
//! never one with an authenticated caller's request in flight. Protection is per request, not
//! per connection: a connection whose authenticated requests have all finished is ranked like
//! any other, so a pod cannot authenticate once and then hold its connections with requests it
//! never completes. An evicted connection closes gracefully: requests in flight finish within the
//! request deadline (one may be authenticated after its connection was chosen); until it has,
//! the cap is passed by at most a sixteenth, and by one more for each peer that had none.
//! So peers that together fill the cap, each under its own per-peer limit, cannot lock a new pod
//! out: as long as fewer peers hold connections than the cap, some peer holds two or more.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::request::error::ProxyError;

/// The bounds, process-wide and per peer address.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_in_flight: usize,
    pub max_in_flight_per_peer: usize,
    pub max_buffered_bytes: usize,
    pub max_buffered_bytes_per_peer: usize,
}

impl LimitsConfig {
    /// No bound at all: for in-process callers (benchmarks) and the emulators.
    pub fn unbounded() -> Self {
        Self {
            max_connections: usize::MAX,
            max_connections_per_peer: usize::MAX,
            max_in_flight: usize::MAX,
            max_in_flight_per_peer: usize::MAX,
            max_buffered_bytes: usize::MAX,
            max_buffered_bytes_per_peer: usize::MAX,
        }
    }

    /// Connections told to close that may still be open: a new peer is let in over the cap by
    /// at most this many while they finish (a sixteenth of the cap, so 256 of 4096; at least 4).
    fn max_evicting(&self) -> usize {
        (self.max_connections / 16).max(4)
    }
}

/// Requests in flight and body bytes buffered, process-wide or by one peer.
#[derive(Default, Debug)]
struct Usage {
    in_flight: AtomicUsize,
    bytes: AtomicUsize,
}

/// Adds `n` to `counter` unless that would pass `max`.
fn reserve(counter: &AtomicUsize, n: usize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            v.checked_add(n).filter(|sum| *sum <= max)
        })
        .is_ok()
}

fn release(counter: &AtomicUsize, n: usize) {
    counter.fetch_sub(n, Ordering::AcqRel);
}

/// Which bound refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The process holds `max_connections`, and no connection could make room.
    Global,
    /// This peer holds `max_connections_per_peer`.
    Peer,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::Global, Refusal::Peer];

    /// Bounded label for the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Global => "connection_limit",
            Refusal::Peer => "peer_connection_limit",
        }
    }
}

/// What kind of connection was evicted to make room for a peer under its fair share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// It never sent a request: a handshake or a first request head still pending.
    NoRequest,
    /// No request in flight.
    Idle,
    /// Requests in flight, none of them from an authenticated caller yet.
    Unauthenticated,
}

impl Eviction {
    pub const ALL: [Eviction; 3] = [
        Eviction::NoRequest,
        Eviction::Idle,
        Eviction::Unauthenticated,
    ];

    /// Bounded label for the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Eviction::NoRequest => "no_request",
            Eviction::Idle => "idle",
            Eviction::Unauthenticated => "unauthenticated_in_flight",
        }
    }
}

/// What one connection is doing: read by its deadlines (`http::serve_connection`) and by the
/// choice of a connection to evict.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request finished.
    last_done_ms: AtomicU64,
    /// Its requests in flight whose caller passed authentication: while any is, it is never
    /// evicted.
    authenticated_in_flight: AtomicUsize,
    /// A request on it ever passed authentication (only a hint for the ranking).
    ever_authenticated: AtomicBool,
    /// Cancelled when the connection is evicted: it closes gracefully at once.
    evicted: CancellationToken,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            authenticated_in_flight: AtomicUsize::new(0),
            ever_authenticated: AtomicBool::new(false),
            evicted: CancellationToken::new(),
        }
    }

    /// A request starts; it ends when the guard and all its clones drop.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(Arc::new(RequestMark {
            activity: self.clone(),
            authenticated: AtomicBool::new(false),
        }))
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Whether any request was ever started on it.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire) > 0
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When its last request finished (when it opened, before any).
    pub fn idle_since(&self) -> Instant {
        let ms = self.last_done_ms.load(Ordering::Acquire);
        self.opened + std::time::Duration::from_millis(ms)
    }

    /// Completes when the connection is evicted.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }

    /// How eagerly it is evicted (lower first), and since when it is in that state; `None`
    /// for a connection an authenticated caller is waiting on.
    fn eviction(&self) -> Option<(Eviction, u8, Instant)> {
        if self.authenticated_in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ever = u8::from(self.ever_authenticated.load(Ordering::Acquire));
        match (self.started(), self.in_flight() > 0) {
            (false, _) if self.opened.elapsed() >= FRESH => {
                Some((Eviction::NoRequest, 0, self.opened))
            }
            // Still getting its first request through: a new peer's own connection.
            (false, _) => Some((Eviction::NoRequest, 5, self.opened)),
            (true, false) => Some((Eviction::Idle, 1 + ever, self.idle_since())),
            (true, true) => Some((Eviction::Unauthenticated, 3 + ever, self.opened)),
        }
    }
}

/// A connection younger than this without a request is left to finish its handshake and send
/// its first request (on a node, both take milliseconds) before anything else is evicted:
/// otherwise the connection a new peer was just let in with could be the next to go.
const FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// One request on a connection, in flight until the last clone drops. The connection driver
/// puts a clone in the request's extensions, so the handler can mark it authenticated.
#[derive(Clone)]
pub struct ActivityGuard(Arc<RequestMark>);

impl ActivityGuard {
    /// The request's caller passed authentication: until the request ends, its connection is
    /// never evicted.
    pub fn authenticated(&self) {
        let mark = &self.0;
        if !mark.authenticated.swap(true, Ordering::AcqRel) {
            let activity = &mark.activity;
            activity.ever_authenticated.store(true, Ordering::Release);
            activity
                .authenticated_in_flight
                .fetch_add(1, Ordering::AcqRel);
        }
    }
}

struct RequestMark {
    activity: Arc<Activity>,
    authenticated: AtomicBool,
}

impl Drop for RequestMark {
    fn drop(&mut self) {
        let activity = &self.activity;
        if self.authenticated.load(Ordering::Acquire) {
            activity
                .authenticated_in_flight
                .fetch_sub(1, Ordering::AcqRel);
        }
        let ms = activity.opened.elapsed().as_millis() as u64;
        activity.last_done_ms.store(ms, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one peer address holds.
struct Peer {
    usage: Arc<Usage>,
    /// Its open connections that were not evicted, by id.
    live: HashMap<u64, Arc<Activity>>,
    /// Its evicted connections still open.
    evicting: usize,
}

/// Every open connection, by peer.
#[derive(Default)]
struct Table {
    peers: HashMap<IpAddr, Peer>,
    /// Open connections (evicted ones included until they close).
    open: usize,
    /// Evicted connections still open.
    evicting: usize,
    next_id: u64,
}

/// A connection chosen to make room.
struct Victim {
    ip: IpAddr,
    id: u64,
    why: Eviction,
}

impl Table {
    /// The connection to evict so that `ip` gets its fair share, if `ip` is under it and one
    /// may be evicted.
    fn victim(&self, ip: IpAddr, max_connections: usize) -> Option<Victim> {
        let mine = self.peers.get(&ip).map_or(0, |p| p.live.len());
        let active = self.peers.values().filter(|p| !p.live.is_empty()).count();
        let active = active + usize::from(mine == 0);
        if mine >= max_connections.div_ceil(active.max(1)) {
            return None;
        }
        let mut best = None;
        // Only from a peer that keeps at least as many as `ip` will hold: no churn between
        // equals.
        for (peer_ip, peer) in self.peers.iter().filter(|(_, p)| p.live.len() > mine + 1) {
            for (id, activity) in &peer.live {
                let Some((why, rank, since)) = activity.eviction() else {
                    continue;
                };
                let key = (rank, Reverse(peer.live.len()), since);
                if best.as_ref().is_none_or(|(k, _)| key < *k) {
                    let victim = Victim {
                        ip: *peer_ip,
                        id: *id,
                        why,
                    };
                    best = Some((key, victim));
                }
            }
        }
        best.map(|(_, victim)| victim)
    }

    /// Tells `victim` to close; its place is counted as evicting until it does.
    fn evict(&mut self, victim: &Victim) {
        if let Some(peer) = self.peers.get_mut(&victim.ip) {
            if let Some(activity) = peer.live.remove(&victim.id) {
                activity.evicted.cancel();
                peer.evicting += 1;
                self.evicting += 1;
            }
        }
    }
}

/// The counters of the whole process and of every peer that holds a connection.
pub struct Limits {
    config: LimitsConfig,
    global: Usage,
    /// One entry per peer address with an open connection: at most `max_connections` entries
    /// (plus the evicting ones).
    table: Mutex<Table>,
    /// Evictions by reason, when counted: `(counter, port label)`.
    evictions: Option<(prometheus::IntCounterVec, &'static str)>,
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Self::build(config, None)
    }

    /// The same, counting evictions in `counter` (labels: port, reason) under `port`.
    pub fn counted(
        config: LimitsConfig,
        counter: prometheus::IntCounterVec,
        port: &'static str,
    ) -> Arc<Self> {
        Self::build(config, Some((counter, port)))
    }

    fn build(
        config: LimitsConfig,
        evictions: Option<(prometheus::IntCounterVec, &'static str)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            global: Usage::default(),
            table: Mutex::new(Table::default()),
            evictions,
        })
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection from `ip`, or which bound refuses it. At the process-wide cap, a peer
    /// under its fair share gets in by evicting another peer's connection (see the module).
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let mut table = self.table();
        let held = table
            .peers
            .get(&ip)
            .map_or(0, |p| p.live.len() + p.evicting);
        let over_share = held >= self.config.max_connections_per_peer;
        if table.open >= self.config.max_connections {
            // A peer without a connection is let in whatever is still closing (so the
            // overshoot is at most one per peer beyond `max_evicting`).
            if over_share || (held > 0 && table.evicting >= self.config.max_evicting()) {
                return Err(Refusal::Global);
            }
            let victim = table
                .victim(ip, self.config.max_connections)
                .ok_or(Refusal::Global)?;
            table.evict(&victim);
            tracing::debug!(peer = %ip, evicted = %victim.ip, reason = victim.why.label(),
                "connection cap reached; a connection of the largest holder makes room");
            if let Some((counter, port)) = &self.evictions {
                counter.with_label_values(&[port, victim.why.label()]).inc();
            }
        } else if over_share {
            return Err(Refusal::Peer);
        }
        table.open += 1;
        table.next_id += 1;
        let id = table.next_id;
        let activity = Arc::new(Activity::new());
        let peer = table.peers.entry(ip).or_insert_with(|| Peer {
            usage: Arc::default(),
            live: HashMap::new(),
            evicting: 0,
        });
        peer.live.insert(id, activity.clone());
        Ok(ConnectionPermit {
            limits: self.clone(),
            usage: peer.usage.clone(),
            ip,
            id,
            activity,
        })
    }

    /// Connections open now, process-wide.
    pub fn connections(&self) -> usize {
        self.table().open
    }

    /// Request-body bytes buffered now, process-wide.
    pub fn buffered_bytes(&self) -> usize {
        self.global.bytes.load(Ordering::Acquire)
    }
}

/// An open connection's share; released when dropped.
pub struct ConnectionPermit {
    limits: Arc<Limits>,
    usage: Arc<Usage>,
    ip: IpAddr,
    id: u64,
    activity: Arc<Activity>,
}

impl ConnectionPermit {
    /// A permit for an in-process caller that did not come through an accept loop
    /// (benchmarks, tests): counted like any connection.
    pub fn detached(ip: IpAddr) -> Self {
        let limits = Limits::new(LimitsConfig::unbounded());
        match limits.connect(ip) {
            Ok(permit) => permit,
            Err(_) => unreachable!("an unbounded limit refuses nothing"),
        }
    }

    /// What the connection is doing (its deadlines and eviction read it).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Starts a request on this connection, or refuses it (503) when the peer or the process
    /// already has its most requests in flight.
    pub fn request(&self) -> Result<RequestPermit, ProxyError> {
        let (limits, peer) = (&self.limits, &self.usage);
        if !reserve(&limits.global.in_flight, 1, limits.config.max_in_flight) {
            return Err(busy(format!(
                "The proxy is serving its limit of {} requests at once.",
                limits.config.max_in_flight
            )));
        }
        if !reserve(&peer.in_flight, 1, limits.config.max_in_flight_per_peer) {
            release(&limits.global.in_flight, 1);
            return Err(busy(format!(
                "This pod already has {} token requests in flight.",
                limits.config.max_in_flight_per_peer
            )));
        }
        Ok(RequestPermit {
            limits: limits.clone(),
            peer: peer.clone(),
            bytes: 0,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut table = self.limits.table();
        table.open -= 1;
        // Evicted is decided under the table's lock, so the connection is counted exactly
        // once: as live or as evicting.
        let evicted = self.activity.evicted.is_cancelled();
        let Some(peer) = table.peers.get_mut(&self.ip) else {
            return;
        };
        if evicted {
            peer.evicting -= 1;
        } else {
            peer.live.remove(&self.id);
        }
        let gone = peer.live.is_empty() && peer.evicting == 0;
        if gone {
            table.peers.remove(&self.ip);
        }
        if evicted {
            table.evicting -= 1;
        }
    }
}

/// One request's share: its place in flight and the body bytes it buffers.
pub struct RequestPermit {
    limits: Arc<Limits>,
    peer: Arc<Usage>,
    bytes: usize,
}

impl RequestPermit {
    /// Accounts `n` more buffered body bytes, or refuses (503) when the peer or the process
    /// would pass its budget.
    pub fn buffer(&mut self, n: usize) -> Result<(), ProxyError> {
        let config = &self.limits.config;
        if !reserve(&self.limits.global.bytes, n, config.max_buffered_bytes) {
            return Err(busy(
                "The proxy is buffering its limit of request bytes.".into(),
            ));
        }
        if !reserve(&self.peer.bytes, n, config.max_buffered_bytes_per_peer) {
            release(&self.limits.global.bytes, n);
            return Err(busy(
                "This pod's unfinished requests hold its limit of buffered bytes.".into(),
            ));
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        release(&self.limits.global.in_flight, 1);
        release(&self.peer.in_flight, 1);
        release(&self.limits.global.bytes, self.bytes);
        release(&self.peer.bytes, self.bytes);
    }
}

fn busy(why: String) -> ProxyError {
    ProxyError::Unavailable {
        retry_after: 1,
        description: format!("{why} Retry shortly."),
    }
}

/// What a caller spends from its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    /// A cache miss that starts a call to Entra.
    Miss,
    /// A request with `claims`, which always goes to Entra.
    Claims,
    /// An authorization decision not in the cache, which asks the apiserver: bounded so that
    /// requests for made-up client ids cannot turn into a stream of SubjectAccessReviews.
    /// Spent alike for bound and unbound identities, so the bound reveals nothing.
    Review,
}

impl Spend {
    pub const ALL: [Spend; 3] = [Spend::Miss, Spend::Claims, Spend::Review];

    /// Bounded label for the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Spend::Miss => "miss",
            Spend::Claims => "claims",
            Spend::Review => "review",
        }
    }
}

/// One caller's spending in the current minute.
struct Window {
    start: tokio::time::Instant,
    misses: u32,
    claims: u32,
    reviews: u32,
}

/// The window of the per-caller budgets.
const BUDGET_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Callers remembered at once. A caller forgotten (least recently seen) starts a fresh
/// window: only possible when this many other callers spent within its minute.
const BUDGET_CALLERS: usize = 16_384;

/// Per-caller (namespace/service account) budgets of Entra calls per minute: one workload
/// cannot spend the node's share of Entra, whatever it sends.
pub struct CallerBudgets {
    misses_per_minute: u32,
    claims_per_minute: u32,
    windows: Mutex<lru::LruCache<Box<str>, Window>>,
}

impl CallerBudgets {
    pub fn new(misses_per_minute: u32, claims_per_minute: u32) -> Self {
        let callers =
            std::num::NonZeroUsize::new(BUDGET_CALLERS).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            misses_per_minute,
            claims_per_minute,
            windows: Mutex::new(lru::LruCache::new(callers)),
        }
    }

    /// Spends one `what` of `caller`'s budget, or refuses with 429 and the seconds until the
    /// caller's window starts afresh.
    pub fn spend(&self, caller: &str, what: Spend) -> Result<(), ProxyError> {
        let now = tokio::time::Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let window = match windows.get_mut(caller) {
            Some(w) if now.duration_since(w.start) < BUDGET_WINDOW => w,
            _ => {
                windows.put(
                    caller.into(),
                    Window {
                        start: now,
                        misses: 0,
                        claims: 0,
                        reviews: 0,
                    },
                );
                windows
                    .get_mut(caller)
                    .ok_or_else(|| ProxyError::Internal("budget window vanished".into()))?
            }
        };
        let (spent, limit, flag, what_text) = match what {
            Spend::Miss => (
                &mut window.misses,
                self.misses_per_minute,
                "--caller-miss-budget",
                "token requests that missed the cache",
            ),
            Spend::Claims => (
                &mut window.claims,
                self.claims_per_minute,
                "--caller-claims-budget",
                "token requests with claims",
            ),
            Spend::Review => (
                &mut window.reviews,
                self.misses_per_minute,
                "--caller-miss-budget",
                "requests that needed a new authorization decision",
            ),
        };
        if *spent >= limit {
            let retry_after = BUDGET_WINDOW
                .saturating_sub(now.duration_since(window.start))
                .as_secs()
                .max(1);
            return Err(ProxyError::OverBudget {
                retry_after,
                description: format!(
                    "'{caller}' sent {limit} {what_text} within a minute, its limit on this \
                     node (the proxy's {flag}). Retry after {retry_after} s; this usually \
                     means many distinct scopes or client ids: request one \
                     '<resource>/.default' per resource, for the identities you are granted."
                ),
            });
        }
        *spent += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            max_connections: 4,
            max_connections_per_peer: 2,
            max_in_flight: 3,
            max_in_flight_per_peer: 2,
            max_buffered_bytes: 100,
            max_buffered_bytes_per_peer: 60,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[test]
    fn one_peer_cannot_take_the_connections_of_another() {
        let limits = Limits::new(config());
        let _a1 = limits.connect(A).unwrap();
        let _a2 = limits.connect(A).unwrap();
        assert_eq!(limits.connect(A).err(), Some(Refusal::Peer));
        let _b1 = limits.connect(B).unwrap();
        let _b2 = limits.connect(B).unwrap();
        assert_eq!(limits.connections(), 4);
        // At the cap C, under its fair share of three peers (4 / 3, rounded up: 2), gets in
        // by making room; then no one holds two more than C, and C's second is refused.
        let c = limits.connect(C).unwrap();
        assert_eq!(limits.connect(C).err(), Some(Refusal::Global));
        drop(c);
        assert_eq!(limits.connections(), 4);
    }

    fn peer(ip: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, ip))
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_a_new_peer_evicts_the_largest_holders_most_idle_connection() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 6,
            max_connections_per_peer: 4,
            ..LimitsConfig::unbounded()
        });
        let served = |c: &ConnectionPermit| c.activity().begin().authenticated();
        // A holds four: one serving an authenticated caller, one that never sent a request,
        // one idle since an authenticated request, one idle that was only ever refused.
        let busy = limits.connect(A).unwrap();
        let request = busy.activity().begin();
        request.authenticated();
        let never = limits.connect(A).unwrap();
        let idle = limits.connect(A).unwrap();
        served(&idle);
        let junk = limits.connect(A).unwrap();
        drop(junk.activity().begin());
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        // B holds two, idle since an authenticated request more recent than A's.
        let b = [limits.connect(B).unwrap(), limits.connect(B).unwrap()];
        b.iter().for_each(served);
        tokio::time::advance(std::time::Duration::from_secs(2)).await;

        let c1 = limits.connect(C).unwrap();
        assert!(never.activity().evicted.is_cancelled(), "no request first");
        let c2 = limits.connect(C).unwrap();
        assert!(
            junk.activity().evicted.is_cancelled(),
            "then never authenticated"
        );
        let d = limits.connect(peer(4)).unwrap();
        assert!(idle.activity().evicted.is_cancelled(), "then idle longest");
        // Of B's idle ones and C's just opened ones, B's go first.
        let e = limits.connect(peer(5)).unwrap();
        assert!(b.iter().any(|c| c.activity().evicted.is_cancelled()));
        assert!(![&c1, &c2, &busy]
            .iter()
            .any(|c| c.activity().evicted.is_cancelled()));
        // Last, a connection just opened: F, without any, gets in even while four close.
        let f = limits.connect(peer(6)).unwrap();
        assert!([&c1, &c2]
            .iter()
            .any(|c| c.activity().evicted.is_cancelled()));
        assert_eq!(limits.connections(), 11);
        drop((never, junk, idle));
        assert_eq!(limits.connections(), 8);
        drop((busy, b, c1, c2, d, e, f));
        assert!(limits.table().peers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_still_closing_bound_a_peer_that_holds_some_but_not_a_new_one() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 64,
            max_connections_per_peer: 64,
            ..LimitsConfig::unbounded()
        });
        let _a: Vec<_> = (0..64).map(|_| limits.connect(A).unwrap()).collect();
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        // 64 / 16 = 4 evicted connections may still be closing.
        let _b: Vec<_> = (0..4).map(|_| limits.connect(B).unwrap()).collect();
        assert_eq!(limits.connect(B).err(), Some(Refusal::Global));
        let _c = limits.connect(C).unwrap();
        assert_eq!(limits.connections(), 69);
    }

    #[test]
    fn an_authenticated_request_in_flight_is_never_evicted() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 2,
            max_connections_per_peer: 2,
            ..LimitsConfig::unbounded()
        });
        let conns = [limits.connect(A).unwrap(), limits.connect(A).unwrap()];
        let requests = conns.each_ref().map(|c| {
            let request = c.activity().begin();
            request.authenticated();
            request
        });
        assert_eq!(limits.connect(B).err(), Some(Refusal::Global));
        // Protected while the request is in flight, not after.
        drop(requests);
        assert!(limits.connect(B).is_ok());
    }

    /// A pod that authenticated once on each connection, then keeps a request it never
    /// finishes (a slow body) in flight on each, does not hold the cap against a new pod.
    #[tokio::test(start_paused = true)]
    async fn authenticated_once_then_unauthenticated_in_flight_is_evicted() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 4,
            max_connections_per_peer: 4,
            ..LimitsConfig::unbounded()
        });
        let a: Vec<_> = (0..4).map(|_| limits.connect(A).unwrap()).collect();
        let _slow: Vec<_> = a
            .iter()
            .map(|c| {
                c.activity().begin().authenticated();
                c.activity().begin()
            })
            .collect();
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        let _b = limits.connect(B).expect("B gets in at once");
        let evicted = a.iter().filter(|c| c.activity().evicted.is_cancelled());
        assert_eq!(evicted.count(), 1);
    }

    #[test]
    fn peers_that_hold_equal_shares_do_not_evict_each_other() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 4,
            max_connections_per_peer: 4,
            ..LimitsConfig::unbounded()
        });
        let _held = [A, A, B, B].map(|ip| limits.connect(ip).unwrap());
        // A and B hold 2 of 4 each, their fair share: neither makes room for itself.
        assert_eq!(limits.connect(A).err(), Some(Refusal::Global));
        assert_eq!(limits.connect(B).err(), Some(Refusal::Global));

        // B holds 2 of 5, under its fair share (3), but A holds only one more: taking one of
        // A's would leave the two swapping places.
        let limits = Limits::new(LimitsConfig {
            max_connections: 5,
            max_connections_per_peer: 5,
            ..LimitsConfig::unbounded()
        });
        let _held = [A, A, A, B, B].map(|ip| limits.connect(ip).unwrap());
        assert_eq!(limits.connect(B).err(), Some(Refusal::Global));
    }

    #[test]
    fn a_peer_entry_goes_with_its_last_connection() {
        let limits = Limits::new(config());
        let a = limits.connect(A).unwrap();
        drop(a);
        assert!(limits.table().peers.is_empty());
        assert_eq!(limits.connections(), 0);
    }

    #[test]
    fn requests_and_bytes_are_bounded_per_peer_and_process_and_released() {
        let limits = Limits::new(config());
        let a = limits.connect(A).unwrap();
        let b = limits.connect(B).unwrap();
        let mut r1 = a.request().unwrap();
        let r2 = a.request().unwrap();
        assert_eq!(a.request().err().unwrap().status(), 503);
        let mut r3 = b.request().unwrap();
        assert!(b.request().is_err(), "process-wide bound of 3");
        r1.buffer(50).unwrap();
        assert!(r1.buffer(20).is_err(), "per-peer 60");
        r3.buffer(50).unwrap();
        assert!(r3.buffer(1).is_err(), "process-wide 100");
        assert_eq!(limits.buffered_bytes(), 100);
        drop((r1, r2, r3));
        assert_eq!(limits.buffered_bytes(), 0);
        assert!(a.request().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn caller_budgets_refill_each_minute_and_are_kept_apart() {
        let budgets = CallerBudgets::new(2, 1);
        budgets.spend("a", Spend::Miss).unwrap();
        budgets.spend("a", Spend::Miss).unwrap();
        let err = budgets.spend("a", Spend::Miss).unwrap_err();
        assert_eq!((err.status().as_u16(), err.retry_after()), (429, Some(60)));
        assert!(err.to_string().contains("--caller-miss-budget"), "{err}");
        budgets.spend("a", Spend::Claims).unwrap();
        assert!(budgets.spend("a", Spend::Claims).is_err());
        budgets.spend("b", Spend::Miss).unwrap();
        tokio::time::advance(std::time::Duration::from_secs(45)).await;
        assert_eq!(
            budgets.spend("a", Spend::Miss).unwrap_err().retry_after(),
            Some(15)
        );
        tokio::time::advance(std::time::Duration::from_secs(15)).await;
        budgets.spend("a", Spend::Miss).unwrap();
    }
}
