//! `[cache]`: the disk budget of pulled-through content.
//!
//! ```toml
//! [cache]
//! max_size = "50GiB"        # pulled-through and pushed blobs together, at most this
//! min_free = "15%"          # or "20GiB": the filesystem keeps at least this free (10%)
//! high_watermark = "90%"    # of max_size: eviction starts above it...
//! low_watermark = "80%"     # ...and stops at or below it
//! max_age = "30d"           # cached content unused this long goes, budget or not
//! keep_recent = "10m"       # content used this recently is never evicted
//! eviction_interval = "30s" # how often usage is checked (and after every fill)
//! metadata_reserve = "64MiB" # space held back for the metadata database
//! scrub_interval = "168h"   # every stored blob is read and checked this often; "0s" off
//! scrub_rate = "16MiB"      # bytes a second the background scrub reads at most
//! ```
//!
//! Only pulled-through content is ever evicted; pushed content stays until it is deleted
//! or collected.

use std::time::Duration;

use toml::Value;

use crate::config::{duration, size, table, Problems};

/// `min_free`: bytes, or a share of the filesystem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    /// A fraction of the filesystem's size, `0.0..1.0`.
    Fraction(f64),
}

impl MinFree {
    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Fraction(f) => (total as f64 * f) as u64,
        }
    }
}

/// `[cache]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// `max_size`: the most bytes the store's blobs may take, pulled through and pushed
    /// together. Default: no limit but `min_free`.
    pub max_size: Option<u64>,
    /// `min_free`: the free space the filesystem keeps. Default `10%`, kubelet's hard
    /// eviction threshold for `nodefs.available`; on a node, set it above the kubelet's
    /// thresholds (the Helm chart sets `15%`, the `imagefs.available` one) so that berth
    /// gives its space back first.
    pub min_free: MinFree,
    /// `high_watermark`: eviction starts when usage passes this share of `max_size`.
    /// Default `90%`.
    pub high_watermark: f64,
    /// `low_watermark`: eviction goes on until usage is at or below this share of
    /// `max_size` (below `min_free`: until that much more than `min_free` is free).
    /// Default `80%`.
    pub low_watermark: f64,
    /// `max_age`: cached content not used for this long is evicted. Default: none.
    pub max_age: Option<Duration>,
    /// `keep_recent`: content used this recently is never evicted, nor the blobs of a
    /// manifest served this recently (a pull in progress keeps its image). Default `10m`.
    pub keep_recent: Duration,
    /// `eviction_interval`: how often usage is checked. Default `30s`.
    pub eviction_interval: Duration,
    /// `metadata_reserve`: disk space berth holds back in a file of its own, given up
    /// when the disk is full so that the metadata database can still write and berth
    /// can start. Default `64MiB`.
    pub metadata_reserve: u64,
    /// `scrub_interval`: how often every stored blob is read again and checked against
    /// its digest, in the background; `"0s"` turns it off. Default `168h` (weekly).
    pub scrub_interval: Duration,
    /// `scrub_rate`: the most bytes a second the background scrub reads. Default `16MiB`.
    pub scrub_rate: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: None,
            min_free: MinFree::Fraction(0.10),
            high_watermark: 0.90,
            low_watermark: 0.80,
            max_age: None,
            keep_recent: Duration::from_secs(600),
            eviction_interval: Duration::from_secs(30),
            metadata_reserve: 64 << 20,
            scrub_interval: Duration::from_secs(7 * 86400),
            scrub_rate: 16 << 20,
        }
    }
}

/// A percentage such as `"90%"`, as a fraction; `max` is the largest allowed.
fn percent(path: &str, v: &Value, max: f64, p: &mut Problems) -> Option<f64> {
    let s = v.as_str().unwrap_or_default();
    let parsed = s
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n > 0.0 && *n <= max);
    if parsed.is_none() {
        p.add(
            path,
            &format!("must be a percentage such as \"90%\", more than 0% and at most {max}%"),
        );
    }
    parsed.map(|n| n / 100.0)
}

pub(crate) fn parse_cache(v: &Value, p: &mut Problems) -> CacheConfig {
    let mut c = CacheConfig::default();
    let Some(t) = table("cache", v, p) else {
        return c;
    };
    for (key, value) in t {
        let path = format!("cache.{key}");
        match key.as_str() {
            "max_size" => c.max_size = size(&path, value, p),
            "min_free" => match value.as_str() {
                Some(s) if s.trim_end().ends_with('%') => {
                    if let Some(f) = percent(&path, value, 90.0, p) {
                        c.min_free = MinFree::Fraction(f);
                    }
                }
                _ => {
                    if let Some(b) = size(&path, value, p) {
                        c.min_free = MinFree::Bytes(b);
                    }
                }
            },
            "high_watermark" => {
                if let Some(f) = percent(&path, value, 100.0, p) {
                    c.high_watermark = f;
                }
            }
            "low_watermark" => {
                if let Some(f) = percent(&path, value, 100.0, p) {
                    c.low_watermark = f;
                }
            }
            "max_age" => c.max_age = duration(&path, value, p),
            "keep_recent" => {
                if let Some(d) = duration(&path, value, p) {
                    c.keep_recent = d;
                }
            }
            "eviction_interval" => match duration(&path, value, p) {
                Some(d) if d.is_zero() => p.add(&path, "must be more than 0s"),
                Some(d) => c.eviction_interval = d,
                None => {}
            },
            "metadata_reserve" => {
                if let Some(b) = size(&path, value, p) {
                    c.metadata_reserve = b;
                }
            }
            "scrub_interval" => {
                if let Some(d) = duration(&path, value, p) {
                    c.scrub_interval = d;
                }
            }
            "scrub_rate" => {
                if let Some(b) = size(&path, value, p) {
                    c.scrub_rate = b;
                }
            }
            _ => p.add(&path, "unknown key"),
        }
    }
    if c.low_watermark >= c.high_watermark {
        p.add(
            "cache.low_watermark",
            &format!(
                "{}% must be below high_watermark ({}%)",
                c.low_watermark * 100.0,
                c.high_watermark * 100.0
            ),
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use crate::Config;

    use super::*;

    #[test]
    fn the_budget_parses_with_its_defaults() {
        let c = Config::parse("[cache]\nmax_size = \"50GiB\"\nmin_free = \"15%\"\n")
            .unwrap()
            .cache;
        assert_eq!(c.max_size, Some(50 << 30));
        assert_eq!(c.min_free, MinFree::Fraction(0.15));
        assert_eq!(c.min_free.bytes(1000), 150);
        assert_eq!((c.high_watermark, c.low_watermark), (0.90, 0.80));
        let c = Config::parse("[cache]\nmin_free = \"2GiB\"\nmax_age = \"30d\"\n")
            .unwrap()
            .cache;
        assert_eq!(c.min_free, MinFree::Bytes(2 << 30));
        assert_eq!(c.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(Config::parse("").unwrap().cache, CacheConfig::default());
    }

    #[test]
    fn mistakes_are_reported_with_their_paths() {
        let errors = Config::parse(
            "[cache]\nmax_size = \"50\"\nmin_free = \"95%\"\nhigh_watermark = \"70%\"\n\
             low_watermark = \"80%\"\nkeep = 1\neviction_interval = \"0s\"\n",
        )
        .unwrap_err()
        .0;
        let has = |s: &str| errors.iter().any(|e| e.starts_with(s));
        assert!(has("cache.max_size: \"50\" has no unit"), "{errors:?}");
        assert!(has("cache.min_free: must be a percentage"), "{errors:?}");
        assert!(has("cache.low_watermark: 80% must be below"), "{errors:?}");
        assert!(has("cache.keep: unknown key"), "{errors:?}");
        assert!(
            has("cache.eviction_interval: must be more than 0s"),
            "{errors:?}"
        );
    }
}
