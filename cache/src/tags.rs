//! Tag freshness: the one mutable lookup, and the policy that governs it.
//!
//! Digests never change, so anything fetched by digest is served locally forever. A tag is
//! served from the cache while it was confirmed with the upstream within its upstream's
//! TTL. After that, one upstream `HEAD` revalidates it:
//! - the upstream names the same digest: the tag is confirmed again;
//! - it names another digest (or none): the manifest is fetched anew;
//! - it says the tag does not exist: the tag is forgotten and the client told so;
//! - it cannot be reached, times out or fails (or its circuit breaker is open and the
//!   request fails without reaching it, see [`crate::breaker`]): the cached manifest is
//!   served, marked stale, and for [`REVALIDATION_BACKOFF`] (or the TTL, if shorter) the tag is served
//!   stale without asking again, so a hung upstream costs one timeout, not one per request.
//!
//! A tag confirmed "in the future" (the clock was set back) is revalidated.
//!
//! Every time here is read from the [`crate::clock::Clock`] the cache was given, so tests
//! move it instead of waiting for it.

use std::time::Duration;

use berth_store::TagRecord;

/// What to do with a cached tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Confirmed within the TTL: serve it.
    Fresh,
    /// Older than the TTL: ask the upstream first.
    Revalidate,
}

/// Decides whether `record` may be served without asking the upstream at `now_ms`.
pub fn freshness(record: &TagRecord, now_ms: u64, ttl: Duration) -> Freshness {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if record.confirmed_at_ms > now_ms.saturating_add(ttl_ms) {
        return Freshness::Revalidate;
    }
    let age = now_ms.saturating_sub(record.confirmed_at_ms);
    if age < ttl_ms {
        Freshness::Fresh
    } else {
        Freshness::Revalidate
    }
}

/// How long a tag whose revalidation failed is served stale without asking again (at
/// most its TTL).
pub const REVALIDATION_BACKOFF: Duration = Duration::from_secs(30);

/// Whether a tag whose revalidation failed at `failed_at_ms` is still served stale
/// without asking the upstream at `now_ms`: for [`REVALIDATION_BACKOFF`], or its `ttl`
/// if that is shorter. A failure "in the future" (the clock was set back) has ended.
pub fn in_backoff(failed_at_ms: u64, now_ms: u64, ttl: Duration) -> bool {
    let window = u64::try_from(REVALIDATION_BACKOFF.min(ttl).as_millis()).unwrap_or(u64::MAX);
    failed_at_ms <= now_ms && now_ms - failed_at_ms < window
}

/// The `Warning` header value sent with a tag served after a failed revalidation.
pub const STALE_WARNING: &str = "110 berth \"Response is Stale\"";

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::oci::Digest;

    #[test]
    fn within_the_ttl_is_fresh() {
        let r = TagRecord {
            digest: Digest::sha256_of(b"x"),
            confirmed_at_ms: 1_000,
        };
        let ttl = Duration::from_secs(5);
        assert_eq!(freshness(&r, 1_000, ttl), Freshness::Fresh);
        assert_eq!(freshness(&r, 5_999, ttl), Freshness::Fresh);
        assert_eq!(freshness(&r, 6_000, ttl), Freshness::Revalidate);
        // A clock that went backwards does not make a tag stale.
        assert_eq!(freshness(&r, 10, ttl), Freshness::Fresh);
        assert_eq!(freshness(&r, 1_000, Duration::ZERO), Freshness::Revalidate);
        // Confirmed further ahead than the TTL: the clock was wrong then; ask again.
        let ahead = TagRecord {
            confirmed_at_ms: 1_000_000,
            ..r
        };
        assert_eq!(freshness(&ahead, 1_000, ttl), Freshness::Revalidate);
    }

    #[test]
    fn a_failed_revalidation_backs_off_for_at_most_the_ttl() {
        let long = Duration::from_secs(3600);
        assert!(in_backoff(1_000, 1_000, long));
        assert!(in_backoff(1_000, 30_999, long));
        assert!(!in_backoff(1_000, 31_000, long), "30 s at most");
        let short = Duration::from_secs(2);
        assert!(in_backoff(1_000, 2_999, short));
        assert!(!in_backoff(1_000, 3_000, short), "no longer than the TTL");
        assert!(
            !in_backoff(1_000, 5, long),
            "the clock went back: ask again"
        );
        assert!(!in_backoff(1_000, 1_000, Duration::ZERO));
    }
}
