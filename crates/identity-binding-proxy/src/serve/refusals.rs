//! Refusals before authentication, counted and summarized: a connection over a limit, a
//! failed or timed-out TLS handshake, a malformed or unauthenticated request. Any pod of the
//! node can cause them as fast as it can connect, so they are never logged one line each
//! (SPEC §9): each is counted in `identity_binding_proxy_refusals_total{reason}`, the first
//! of a peer in an interval is logged in full by its caller (so a real client's failed
//! handshake shows at once, with its peer and reason), and the rest of the interval becomes
//! one summary line per peer: how many, by reason, the first and the last.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::IntCounterVec;

/// How often a peer's refusals are summarized: at most one line per peer per 10 s, about
/// 6 lines (under 3 KiB) a minute for a peer refused without pause, against the 64 KiB a
/// minute SPEC §9 allows a pod.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Peers followed one by one. Beyond them (a flood from many addresses, IPv6 ones say) the
/// refusals are summarized together, so the table stays bounded.
const MAX_PEERS: usize = 4096;
/// Distinct reasons kept per peer in one interval: every reason counted ([`reasons`]), so
/// none is counted under another; anything else is counted as [`OTHER`].
static MAX_REASONS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| reasons().count());
/// The reason of a refusal past [`MAX_REASONS`] (no caller passes one outside [`reasons`]).
const OTHER: &str = "other";

/// Every reason counted: the connection limits, the handshake failures, and the outcomes of
/// requests refused before authentication.
pub fn reasons() -> impl Iterator<Item = &'static str> {
    let limits = crate::serve::limits::Refusal::ALL.map(crate::serve::limits::Refusal::label);
    let outcomes = crate::request::error::OUTCOMES
        .iter()
        .filter(|o| **o != "success");
    limits
        .into_iter()
        .chain(crate::serve::handshake::HANDSHAKE_FAILURES)
        .chain(outcomes.copied())
}

/// One peer's refusals since its last line.
#[derive(Debug, Default)]
struct Tally {
    /// Counts by reason, in the order the reasons first came.
    counts: Vec<(&'static str, u64)>,
    first: &'static str,
    last: &'static str,
    /// Refusals counted and not yet in any line.
    unlogged: u64,
}

impl Tally {
    fn add(&mut self, reason: &'static str) {
        if self.counts.is_empty() {
            self.first = reason;
        }
        self.last = reason;
        let key = match self.counts.iter().any(|(r, _)| *r == reason) {
            false if self.counts.len() >= *MAX_REASONS => OTHER,
            _ => reason,
        };
        match self.counts.iter_mut().find(|(r, _)| *r == key) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((key, 1)),
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    /// `reason=count` pairs, comma-separated: one field, whatever the reasons.
    fn by_reason(&self) -> String {
        let mut out = String::new();
        for (reason, n) in &self.counts {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(reason);
            out.push('=');
            out.push_str(itoa::Buffer::new().format(*n));
        }
        out
    }
}

/// Which peers are refused, how often, and why, since their last line.
pub struct Refusals {
    /// The refusals counter (`reason` label), when the process exports metrics.
    counter: Option<IntCounterVec>,
    peers: Mutex<Peers>,
}

#[derive(Default)]
struct Peers {
    by_ip: HashMap<IpAddr, Tally>,
    /// Refusals of peers beyond [`MAX_PEERS`], together.
    others: Tally,
}

impl Refusals {
    /// A table whose summaries are written every `interval` by a task of the current runtime
    /// (it ends with the table; what is pending then is written as it goes).
    pub fn start(counter: Option<IntCounterVec>, interval: Duration) -> Arc<Self> {
        let refusals = Arc::new(Self {
            counter,
            peers: Mutex::new(Peers::default()),
        });
        tokio::spawn(summarize_every(Arc::downgrade(&refusals), interval));
        refusals
    }

    /// Counts one refusal of `peer` for `reason` (a bounded label). True when the caller
    /// should log this one in full: the first of its peer since the peer's last line.
    pub fn record(&self, peer: IpAddr, reason: &'static str) -> bool {
        if let Some(counter) = &self.counter {
            counter.with_label_values(&[reason]).inc();
        }
        let mut guard = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peers = &mut *guard;
        if let Some(tally) = peers.by_ip.get_mut(&peer) {
            tally.add(reason);
            tally.unlogged += 1;
            return false;
        }
        if peers.by_ip.len() >= MAX_PEERS {
            peers.others.add(reason);
            peers.others.unlogged += 1;
            return false;
        }
        let mut tally = Tally::default();
        tally.add(reason);
        peers.by_ip.insert(peer, tally);
        true
    }

    /// A connection closed at once for a limit: counted, and logged when first of its peer.
    pub fn connection(&self, peer: SocketAddr, refusal: crate::serve::limits::Refusal) {
        if self.record(peer.ip(), refusal.label()) {
            tracing::warn!(%peer, reason = refusal.label(), "connection limit reached; closing new connection");
        }
    }

    /// A failed TLS handshake: counted, and logged when first of its peer, with what failed
    /// (a client that does not trust our CA says so in its alert).
    pub fn handshake(&self, peer: SocketAddr, error: &crate::serve::handshake::HandshakeError) {
        if self.record(peer.ip(), error.reason()) {
            tracing::warn!(%peer, reason = error.reason(), %error, "TLS handshake refused");
        }
    }

    /// Writes one summary line for each peer refused since its last line, and forgets the
    /// peers that were not: their next refusal is logged in full again.
    pub fn summarize(&self) {
        let (due, others) = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let mut due = Vec::new();
            peers.by_ip.retain(|ip, tally| {
                if tally.unlogged == 0 {
                    return false;
                }
                due.push((*ip, std::mem::take(tally)));
                true
            });
            (due, std::mem::take(&mut peers.others))
        };
        for (peer, tally) in due {
            log_summary(Some(peer), &tally);
        }
        if others.unlogged > 0 {
            log_summary(None, &others);
        }
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        self.summarize();
    }
}

fn log_summary(peer: Option<IpAddr>, tally: &Tally) {
    let peer = peer.map_or_else(|| "others".to_string(), |ip| ip.to_string());
    tracing::warn!(
        peer = peer.as_str(),
        refused = tally.total(),
        by_reason = %tally.by_reason(),
        first_reason = tally.first,
        last_reason = tally.last,
        "refusals from this peer since its last line"
    );
}

async fn summarize_every(refusals: Weak<Refusals>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match refusals.upgrade() {
            Some(refusals) => refusals.summarize(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::testlog::Capture;

    fn lines(capture: &Capture) -> Vec<serde_json::Value> {
        capture
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn a_peer_refused_without_pause_gets_one_line_per_interval_with_counts_and_reasons() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let metrics = Arc::new(Metrics::new());
        let refusals = Refusals::start(Some(metrics.log.refusals.clone()), Duration::from_secs(10));
        tokio::task::yield_now().await;

        // The first of each peer is for its caller to log; the rest are counted.
        assert!(refusals.record(A, "tls_error"));
        assert!(refusals.record(B, "timeout"));
        for _ in 0..999 {
            assert!(!refusals.record(A, "peer_connection_limit"));
        }
        assert!(!refusals.record(A, "timeout"));
        // Six intervals: A stays refused; B was refused once only.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(10)).await;
            tokio::task::yield_now().await;
            for _ in 0..100 {
                refusals.record(A, "tls_error");
            }
        }
        let logged = lines(&capture);
        assert!(logged.iter().all(|l| l["peer"] == "10.0.0.1"), "{logged:?}");
        assert_eq!(logged.len(), 6, "one line an interval: {logged:?}");
        let first = &logged[0];
        assert_eq!(first["refused"], 1001, "{first}");
        assert_eq!(
            first["by_reason"], "tls_error=1,peer_connection_limit=999,timeout=1",
            "{first}"
        );
        assert_eq!(first["first_reason"], "tls_error");
        assert_eq!(first["last_reason"], "timeout");
        assert_eq!(logged[1]["by_reason"], "tls_error=100");
        let counted = metrics
            .log
            .refusals
            .with_label_values(&["peer_connection_limit"])
            .get();
        assert_eq!(counted, 999);

        // A peer with nothing since its last line is forgotten: its next refusal is logged
        // in full again.
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert!(refusals.record(A, "closed"));
        // What is pending when the table goes is written.
        refusals.record(A, "closed");
        drop(refusals);
        let last = lines(&capture).pop().unwrap();
        assert_eq!(last["by_reason"], "closed=2", "{last}");
    }

    #[test]
    fn every_reason_is_counted_under_its_own_name_and_anything_else_as_other() {
        let mut tally = Tally::default();
        for reason in reasons() {
            tally.add(reason);
            tally.add(reason);
        }
        tally.add("not-a-reason");
        tally.add("nor-this");
        for reason in reasons() {
            assert!(tally.counts.contains(&(reason, 2)), "{reason}: {tally:?}");
        }
        assert!(tally.counts.contains(&(OTHER, 2)), "{tally:?}");
        assert_eq!(tally.counts.len(), reasons().count() + 1);
    }

    #[test]
    fn peers_beyond_the_table_are_summarized_together() {
        let refusals = Refusals {
            counter: None,
            peers: Mutex::new(Peers::default()),
        };
        for i in 0..MAX_PEERS as u32 + 10 {
            refusals.record(IpAddr::V4(i.into()), "tls_error");
        }
        let peers = refusals.peers.lock().unwrap();
        assert_eq!(peers.by_ip.len(), MAX_PEERS);
        assert_eq!(peers.others.total(), 10);
    }
}
