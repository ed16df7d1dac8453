//! Resource bounds for the pods of the node (SPEC §11). Any pod can connect before it is
//! authenticated, so what one peer address may hold is bounded below what the whole process
//! may hold: open connections, requests in flight, and request-body bytes buffered. A peer over
//! its share is refused; every other peer keeps its own share.
//!
//! Counting is by peer IP address: each pod has its own IP (host-network pods share the
//! node's, which is why the per-peer shares are generous).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::ProxyError;

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
}

#[derive(Default, Debug)]
struct Usage {
    connections: AtomicUsize,
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

/// What one peer address holds.
#[derive(Debug)]
pub struct PeerUsage {
    ip: IpAddr,
    usage: Usage,
}

/// Which bound refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The process holds `max_connections`.
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

/// The counters of the whole process and of every peer that holds a connection.
pub struct Limits {
    config: LimitsConfig,
    global: Usage,
    /// One entry per peer address with an open connection: at most `max_connections` entries.
    peers: Mutex<HashMap<IpAddr, Arc<PeerUsage>>>,
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            global: Usage::default(),
            peers: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// A new connection from `ip`, or which bound refuses it.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        if !reserve(&self.global.connections, 1, self.config.max_connections) {
            return Err(Refusal::Global);
        }
        let peer = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let peer = peers.entry(ip).or_insert_with(|| {
                Arc::new(PeerUsage {
                    ip,
                    usage: Usage::default(),
                })
            });
            if !reserve(
                &peer.usage.connections,
                1,
                self.config.max_connections_per_peer,
            ) {
                release(&self.global.connections, 1);
                return Err(Refusal::Peer);
            }
            peer.clone()
        };
        Ok(ConnectionPermit {
            limits: self.clone(),
            peer,
        })
    }

    /// Connections open now, process-wide.
    pub fn connections(&self) -> usize {
        self.global.connections.load(Ordering::Acquire)
    }

    /// Request-body bytes buffered now, process-wide.
    pub fn buffered_bytes(&self) -> usize {
        self.global.bytes.load(Ordering::Acquire)
    }
}

/// An open connection's share; released when dropped.
pub struct ConnectionPermit {
    limits: Arc<Limits>,
    peer: Arc<PeerUsage>,
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

    /// Starts a request on this connection, or refuses it (503) when the peer or the process
    /// already has its most requests in flight.
    pub fn request(&self) -> Result<RequestPermit, ProxyError> {
        let (limits, peer) = (&self.limits, &self.peer);
        if !reserve(&limits.global.in_flight, 1, limits.config.max_in_flight) {
            return Err(busy(format!(
                "The proxy is serving its limit of {} requests at once.",
                limits.config.max_in_flight
            )));
        }
        if !reserve(
            &peer.usage.in_flight,
            1,
            limits.config.max_in_flight_per_peer,
        ) {
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
        release(&self.limits.global.connections, 1);
        let mut peers = self.limits.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Decremented under the table's lock, so a peer's entry goes exactly when its last
        // connection does (and `connect` never counts on an entry that is being removed).
        if self.peer.usage.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            peers.remove(&self.peer.ip);
        }
    }
}

/// One request's share: its place in flight and the body bytes it buffers.
pub struct RequestPermit {
    limits: Arc<Limits>,
    peer: Arc<PeerUsage>,
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
        if !reserve(
            &self.peer.usage.bytes,
            n,
            config.max_buffered_bytes_per_peer,
        ) {
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
        release(&self.peer.usage.in_flight, 1);
        release(&self.limits.global.bytes, self.bytes);
        release(&self.peer.usage.bytes, self.bytes);
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
        let a1 = limits.connect(A).unwrap();
        let _a2 = limits.connect(A).unwrap();
        assert_eq!(limits.connect(A).err(), Some(Refusal::Peer));
        let _b1 = limits.connect(B).unwrap();
        let _b2 = limits.connect(B).unwrap();
        assert_eq!(limits.connect(C).err(), Some(Refusal::Global));
        drop(a1);
        let _c = limits.connect(C).unwrap();
        assert_eq!(limits.connections(), 4);
    }

    #[test]
    fn a_peer_entry_goes_with_its_last_connection() {
        let limits = Limits::new(config());
        let a = limits.connect(A).unwrap();
        drop(a);
        assert!(limits.peers.lock().unwrap().is_empty());
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
