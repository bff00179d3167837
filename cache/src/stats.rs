//! What the status page (`/ui`) shows of each upstream, kept as it happens: requests
//! served from the cache and through it, bytes served, the last error, and whether stale
//! content is being served.
//!
//! Cheap on the request path: a served request is two relaxed atomic additions, an
//! upstream answer one relaxed load (and a store only when it changes a flag); only a
//! failed upstream request takes a lock, to keep its error's text. Nothing here
//! allocates per request. Bytes fetched from the upstream are the
//! `berth_upstream_bytes` counter itself ([`crate::upstream::UpstreamClient::bytes_fetched`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::Outcome;

/// The figures of one upstream; lives in its [`crate::upstream::UpstreamClient`].
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Requests served from the store: hits, revalidated and stale tags.
    hits: AtomicU64,
    /// Requests that needed the upstream's content: misses, and joins of another's fetch.
    misses: AtomicU64,
    /// Response body bytes sent to clients for this upstream's repositories.
    bytes_served: AtomicU64,
    /// The latest request berth sent this upstream failed (other than a 404).
    latest_failed: AtomicBool,
    /// A stale tag was served since the upstream last answered a request.
    serving_stale: AtomicBool,
    /// When (ms since the epoch, by the cache's clock) a stale tag was last served; 0:
    /// never.
    last_stale_ms: AtomicU64,
    last_error: Mutex<Option<LastError>>,
}

/// The last error an upstream request ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// How an upstream is doing, as the page shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Its latest request got an answer.
    Ok,
    /// Its latest request failed; the circuit breaker is still closed.
    Failing,
    /// The circuit breaker is open: requests to it fail fast.
    CircuitOpen,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Failing => "failing",
            Health::CircuitOpen => "circuit open",
        }
    }
}

/// One upstream's figures at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub namespace: String,
    pub hits: u64,
    pub misses: u64,
    pub bytes_served: u64,
    pub bytes_fetched: u64,
    pub health: Health,
    pub last_error: Option<LastError>,
    /// A stale tag was served since the upstream last answered.
    pub serving_stale: bool,
    /// When a stale tag was last served (ms since the epoch); 0: never.
    pub last_stale_ms: u64,
}

impl UpstreamStats {
    /// Counts a request served for one of this upstream's repositories: `outcome` is how
    /// (`None` for a request without one, such as a tag list passed through), `bytes` the
    /// body bytes sent.
    pub fn served(&self, outcome: Option<Outcome>, bytes: u64, now_ms: u64) {
        match outcome {
            Some(Outcome::Hit | Outcome::Revalidated) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
            }
            Some(Outcome::Stale) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.last_stale_ms.store(now_ms, Ordering::Relaxed);
                self.serving_stale.store(true, Ordering::Relaxed);
            }
            Some(Outcome::Miss | Outcome::Coalesced) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        if bytes > 0 {
            self.bytes_served.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Records that a request to the upstream got an answer (a success or a 404).
    pub fn answered(&self) {
        // Loads first: the flags are shared by every request to this upstream, and a
        // store would take their cache line away from the other cores each time.
        if self.latest_failed.load(Ordering::Relaxed) {
            self.latest_failed.store(false, Ordering::Relaxed);
        }
        if self.serving_stale.load(Ordering::Relaxed) {
            self.serving_stale.store(false, Ordering::Relaxed);
        }
    }

    /// Records that a request to the upstream failed with `message`.
    pub fn failed(&self, message: String, now_ms: u64) {
        self.latest_failed.store(true, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastError {
            message,
            at_ms: now_ms,
        });
    }

    /// The figures now, with the breaker's word on whether the circuit is open.
    pub fn status(
        &self,
        namespace: &str,
        circuit_open: bool,
        bytes_fetched: u64,
    ) -> UpstreamStatus {
        let health = if circuit_open {
            Health::CircuitOpen
        } else if self.latest_failed.load(Ordering::Relaxed) {
            Health::Failing
        } else {
            Health::Ok
        };
        UpstreamStatus {
            namespace: namespace.to_owned(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
            bytes_fetched,
            health,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            serving_stale: self.serving_stale.load(Ordering::Relaxed),
            last_stale_ms: self.last_stale_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_as_hits_or_misses_and_bytes_add_up() {
        let s = UpstreamStats::default();
        s.served(Some(Outcome::Hit), 10, 1);
        s.served(Some(Outcome::Revalidated), 5, 1);
        s.served(Some(Outcome::Miss), 100, 1);
        s.served(Some(Outcome::Coalesced), 100, 1);
        s.served(None, 7, 1);
        let st = s.status("docker.io", false, 42);
        assert_eq!((st.hits, st.misses), (2, 2));
        assert_eq!(st.bytes_served, 222);
        assert_eq!(st.bytes_fetched, 42);
        assert_eq!(st.health, Health::Ok);
        assert!(!st.serving_stale);
        assert_eq!(st.last_stale_ms, 0);
    }

    #[test]
    fn a_failure_shows_until_the_upstream_answers_and_its_error_stays() {
        let s = UpstreamStats::default();
        s.failed(
            "upstream x is unreachable: connection refused".into(),
            1_000,
        );
        let st = s.status("x", false, 0);
        assert_eq!(st.health, Health::Failing);
        assert_eq!(
            st.last_error,
            Some(LastError {
                message: "upstream x is unreachable: connection refused".into(),
                at_ms: 1_000
            })
        );
        assert_eq!(s.status("x", true, 0).health, Health::CircuitOpen);
        s.answered();
        let st = s.status("x", false, 0);
        assert_eq!(st.health, Health::Ok);
        assert_eq!(
            st.last_error.unwrap().at_ms,
            1_000,
            "the last error is kept"
        );
    }

    #[test]
    fn stale_is_served_until_the_upstream_answers_again() {
        let s = UpstreamStats::default();
        s.served(Some(Outcome::Stale), 3, 5_000);
        let st = s.status("x", false, 0);
        assert!(st.serving_stale);
        assert_eq!(st.last_stale_ms, 5_000);
        assert_eq!(st.hits, 1);
        s.answered();
        let st = s.status("x", false, 0);
        assert!(!st.serving_stale);
        assert_eq!(st.last_stale_ms, 5_000);
    }
}
