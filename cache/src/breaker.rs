//! A circuit breaker per upstream: after [`FAILURE_THRESHOLD`] consecutive requests that
//! found the upstream down, berth stops asking it for a cool-down, so a dead upstream
//! costs one fast failure per request instead of a connect timeout (and retries) each.
//!
//! The states:
//! - closed: every request goes through; a request that found the upstream down adds one
//!   to the count of consecutive failures, any other outcome sets it back to 0. At the
//!   threshold the breaker opens for [`FIRST_COOL_DOWN`];
//! - open: requests are refused without touching the network until the cool-down has
//!   passed; then one request is let through as a probe (half-open) while the others are
//!   still refused. The probe's success closes the breaker; its failure opens it again for
//!   twice the last cool-down, at most [`MAX_COOL_DOWN`]. A probe that ends without an
//!   outcome (its caller went away) lets the next request probe instead.
//!
//! Outcomes of requests let through before the breaker opened are ignored while it is
//! open: only the probe decides. "Down" is the caller's judgement ([`crate::upstream`]:
//! no answer, a timeout, or a 5xx; never a 4xx, which an upstream that is up sends).
//!
//! Times are milliseconds of the cache's [`crate::clock::Clock`], so tests move them; a
//! clock that went back before the breaker opened ends the cool-down (as tag freshness
//! treats a confirmation "in the future").

use std::sync::Mutex;
use std::time::Duration;

/// Consecutive failed requests that open the breaker.
pub const FAILURE_THRESHOLD: u32 = 5;
/// The first cool-down after the breaker opens.
pub const FIRST_COOL_DOWN: Duration = Duration::from_secs(30);
/// The longest cool-down, however many probes failed.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(300);

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        since_ms: u64,
        cool_down: Duration,
        /// A probe request is out.
        probing: bool,
    },
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Why the upstream was last found down.
    last_failure: String,
}

/// The breaker of one upstream. Cheap to consult: one uncontended lock, no I/O.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                last_failure: String::new(),
            }),
        }
    }
}

/// Leave to send one request; report its outcome with [`Breaker::record`]. Dropped
/// without an outcome, a probe's leave passes to the next request.
#[must_use]
#[derive(Debug)]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Ticket<'_> {
    /// Whether this request is the probe of an open breaker.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut inner = self.breaker.lock();
            if let State::Open { probing, .. } = &mut inner.state {
                *probing = false;
            }
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// How long until a probe may go (zero while a probe is out).
    pub retry_in: Duration,
    pub last_failure: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.retry_in.is_zero() {
            write!(
                f,
                "circuit open (a probe request is out); last failure: {}",
                self.last_failure
            )
        } else {
            write!(
                f,
                "circuit open for another {}s after repeated failures; last failure: {}",
                self.retry_in.as_secs_f64().ceil() as u64,
                self.last_failure
            )
        }
    }
}

/// A change of state, for the caller to log and export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened (from closed, or again after a failed probe) for `cool_down`.
    Opened {
        cool_down: Duration,
        after_probe: bool,
    },
    Closed,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request may go to the upstream at `now_ms`: a ticket (the probe, if the
    /// cool-down just ended), or why not.
    pub fn admit(&self, now_ms: u64) -> Result<Ticket<'_>, Refused> {
        let mut inner = self.lock();
        let last_failure = inner.last_failure.clone();
        let probe = match &mut inner.state {
            State::Closed { .. } => false,
            State::Open { probing: true, .. } => {
                return Err(Refused {
                    retry_in: Duration::ZERO,
                    last_failure,
                })
            }
            State::Open {
                since_ms,
                cool_down,
                probing,
            } => {
                let until = since_ms.saturating_add(millis(*cool_down));
                if now_ms >= *since_ms && now_ms < until {
                    return Err(Refused {
                        retry_in: Duration::from_millis(until - now_ms),
                        last_failure,
                    });
                }
                *probing = true;
                true
            }
        };
        Ok(Ticket {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// Records the outcome of the request `ticket` let through: `Some(why)` if it found
    /// the upstream down, `None` if the upstream answered as an upstream that is up does.
    /// Returns the change of state, if any.
    pub fn record(
        &self,
        mut ticket: Ticket<'_>,
        down: Option<&str>,
        now_ms: u64,
    ) -> Option<Transition> {
        ticket.settled = true;
        let mut inner = self.lock();
        if let Some(why) = down {
            inner.last_failure = why.to_owned();
        }
        match (&mut inner.state, ticket.probe) {
            (State::Closed { failures }, _) => match down {
                None => {
                    *failures = 0;
                    None
                }
                Some(_) => {
                    *failures += 1;
                    if *failures < FAILURE_THRESHOLD {
                        return None;
                    }
                    inner.state = State::Open {
                        since_ms: now_ms,
                        cool_down: FIRST_COOL_DOWN,
                        probing: false,
                    };
                    Some(Transition::Opened {
                        cool_down: FIRST_COOL_DOWN,
                        after_probe: false,
                    })
                }
            },
            // A request let through before the breaker opened: only the probe decides.
            (State::Open { .. }, false) => None,
            (State::Open { cool_down, .. }, true) => match down {
                None => {
                    inner.state = State::Closed { failures: 0 };
                    Some(Transition::Closed)
                }
                Some(_) => {
                    let cool_down = (*cool_down * 2).min(MAX_COOL_DOWN);
                    inner.state = State::Open {
                        since_ms: now_ms,
                        cool_down,
                        probing: false,
                    };
                    Some(Transition::Opened {
                        cool_down,
                        after_probe: true,
                    })
                }
            },
        }
    }

    /// Whether the breaker is open (or half-open: a probe is out).
    pub fn is_open(&self) -> bool {
        matches!(self.lock().state, State::Open { .. })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: Option<&str> = Some("connection refused");

    /// Fails `n` requests at `now`.
    fn fail(b: &Breaker, n: u32, now: u64) -> Vec<Option<Transition>> {
        (0..n)
            .map(|_| {
                let t = b.admit(now).expect("admitted");
                b.record(t, DOWN, now)
            })
            .collect()
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures_only() {
        let b = Breaker::default();
        assert!(fail(&b, FAILURE_THRESHOLD - 1, 0)
            .iter()
            .all(Option::is_none));
        // A success in between starts the count again.
        let t = b.admit(0).unwrap();
        assert_eq!(b.record(t, None, 0), None);
        assert!(fail(&b, FAILURE_THRESHOLD - 1, 0)
            .iter()
            .all(Option::is_none));
        assert!(!b.is_open());
        assert_eq!(
            fail(&b, 1, 1_000),
            vec![Some(Transition::Opened {
                cool_down: FIRST_COOL_DOWN,
                after_probe: false
            })]
        );
        assert!(b.is_open());
        let refused = b.admit(1_000).unwrap_err();
        assert_eq!(refused.retry_in, FIRST_COOL_DOWN);
        assert_eq!(refused.last_failure, "connection refused");
        assert!(refused.to_string().starts_with("circuit open"), "{refused}");
        assert_eq!(
            b.admit(30_999).unwrap_err().retry_in,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn after_the_cool_down_one_probe_goes_and_its_success_closes() {
        let b = Breaker::default();
        fail(&b, FAILURE_THRESHOLD, 0);
        let probe = b.admit(30_000).expect("the cool-down is over");
        assert!(probe.is_probe());
        // Only one probe at a time.
        let other = b.admit(30_000).unwrap_err();
        assert_eq!(other.retry_in, Duration::ZERO);
        assert_eq!(b.record(probe, None, 30_100), Some(Transition::Closed));
        assert!(!b.is_open());
        let t = b.admit(30_100).unwrap();
        assert!(!t.is_probe());
        // Closed again: the count starts from zero.
        drop(t);
        assert!(fail(&b, FAILURE_THRESHOLD - 1, 30_200)
            .iter()
            .all(Option::is_none));
    }

    #[test]
    fn a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() {
        let b = Breaker::default();
        fail(&b, FAILURE_THRESHOLD, 0);
        let mut now = 0;
        let mut expected = FIRST_COOL_DOWN;
        for _ in 0..6 {
            now += millis(expected);
            assert!(
                b.admit(now - 1).is_err(),
                "admitted before the cool-down ended"
            );
            let probe = b.admit(now).unwrap();
            expected = (expected * 2).min(MAX_COOL_DOWN);
            assert_eq!(
                b.record(probe, DOWN, now),
                Some(Transition::Opened {
                    cool_down: expected,
                    after_probe: true
                })
            );
            assert_eq!(b.admit(now).unwrap_err().retry_in, expected);
        }
        assert_eq!(expected, MAX_COOL_DOWN);
        // A success closes it, and the next opening starts from the first cool-down.
        now += millis(MAX_COOL_DOWN);
        let probe = b.admit(now).unwrap();
        assert_eq!(b.record(probe, None, now), Some(Transition::Closed));
        fail(&b, FAILURE_THRESHOLD, now);
        assert_eq!(b.admit(now).unwrap_err().retry_in, FIRST_COOL_DOWN);
    }

    #[test]
    fn a_probe_that_ends_without_an_outcome_passes_the_turn() {
        let b = Breaker::default();
        fail(&b, FAILURE_THRESHOLD, 0);
        let probe = b.admit(30_000).unwrap();
        drop(probe);
        let next = b.admit(30_001).expect("the next request probes");
        assert!(next.is_probe());
        assert_eq!(b.record(next, None, 30_002), Some(Transition::Closed));
    }

    #[test]
    fn late_outcomes_of_requests_from_before_the_opening_are_ignored() {
        let b = Breaker::default();
        let early = b.admit(0).unwrap();
        let early_too = b.admit(0).unwrap();
        fail(&b, FAILURE_THRESHOLD, 0);
        assert_eq!(b.record(early, None, 10), None, "only the probe closes it");
        assert_eq!(b.record(early_too, DOWN, 10), None);
        assert!(b.is_open());
        assert_eq!(
            b.admit(10).unwrap_err().retry_in,
            Duration::from_millis(29_990)
        );
    }

    #[test]
    fn a_clock_set_back_ends_the_cool_down() {
        let b = Breaker::default();
        fail(&b, FAILURE_THRESHOLD, 1_000_000);
        assert!(b.admit(1_000_001).is_err());
        assert!(b.admit(5).unwrap().is_probe());
    }
}
