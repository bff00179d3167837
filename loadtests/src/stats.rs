//! Counting: requests by kind, errors by kind, bytes, latencies, and the nearest-rank
//! percentiles computed from them.
//!
//! Every worker owns one [`Stats`] (behind an uncontended lock) and records one
//! [`Sample`] per request; at the end of a run the workers' stats are merged with
//! [`Stats::merge`]. Latencies are kept exactly, as microseconds in a `Vec<u32>` per
//! series, and sorted once when the report is built.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// What a request fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A manifest (or index) addressed by tag.
    TagManifest,
    /// A manifest (or index) addressed by digest.
    Manifest,
    /// A blob (config or layer), addressed by digest.
    Blob,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::TagManifest, Kind::Manifest, Kind::Blob];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TagManifest => "tag_manifest",
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A latency series: one per request kind, plus the time to first byte of blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    TagManifest,
    Manifest,
    Blob,
    /// From sending a blob request to receiving the first body byte (or the end of an
    /// empty body).
    Ttfb,
}

impl Series {
    pub const ALL: [Series; 4] = [
        Series::TagManifest,
        Series::Manifest,
        Series::Blob,
        Series::Ttfb,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Series::TagManifest => "tag_manifest",
            Series::Manifest => "manifest",
            Series::Blob => "blob",
            Series::Ttfb => "ttfb",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<Kind> for Series {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::TagManifest => Series::TagManifest,
            Kind::Manifest => Series::Manifest,
            Kind::Blob => Series::Blob,
        }
    }
}

/// Why a request, or a pull, failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The registry answered 4xx.
    Status4xx,
    /// The registry answered 5xx.
    Status5xx,
    /// The registry answered 1xx or 3xx where 2xx was expected.
    StatusOther,
    /// The connection could not be made (refused, reset before the response, …).
    Connect,
    /// The connect or read timeout passed.
    Timeout,
    /// The body ended early or its transfer failed.
    Body,
    /// Any other failure of the HTTP client.
    Request,
    /// The body's digest is not the digest it was fetched by (or the
    /// `Docker-Content-Digest` the registry sent with a tag).
    DigestMismatch,
    /// A digest uses an algorithm this harness cannot compute, or is malformed.
    DigestUnsupported,
    /// A manifest or index could not be parsed (or is too large, or is an index where a
    /// platform manifest was expected).
    ManifestInvalid,
    /// The index has no manifest for the requested platform.
    PlatformNotFound,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Status4xx => "status_4xx",
            ErrorKind::Status5xx => "status_5xx",
            ErrorKind::StatusOther => "status_other",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Body => "body",
            ErrorKind::Request => "request",
            ErrorKind::DigestMismatch => "digest_mismatch",
            ErrorKind::DigestUnsupported => "digest_unsupported",
            ErrorKind::ManifestInvalid => "manifest_invalid",
            ErrorKind::PlatformNotFound => "platform_not_found",
        }
    }

    /// The error kind for an unexpected HTTP status.
    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            400..=499 => ErrorKind::Status4xx,
            500..=599 => ErrorKind::Status5xx,
            _ => ErrorKind::StatusOther,
        }
    }
}

/// One finished request.
#[derive(Clone, Debug)]
pub struct Sample {
    pub kind: Kind,
    /// Body bytes received, whether or not the request succeeded.
    pub bytes: u64,
    pub result: Result<(), ErrorKind>,
    /// Whether the body was checked against a digest (and matched, if `result` is Ok).
    pub verified: bool,
    /// From sending the request to the end of the body.
    pub latency: Duration,
    /// Time to first body byte; recorded for successful blob requests.
    pub ttfb: Option<Duration>,
}

impl Sample {
    pub fn new(kind: Kind) -> Self {
        Sample {
            kind,
            bytes: 0,
            result: Ok(()),
            verified: false,
            latency: Duration::ZERO,
            ttfb: None,
        }
    }
}

/// Requests of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

/// Units of work (pulls, blob GETs, manifest GETs, cold clients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Units {
    pub ok: u64,
    pub failed: u64,
    /// Units still in flight when the run's hard deadline passed; neither ok nor failed.
    pub cancelled: u64,
}

/// Everything counted during a run (or by one worker).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    requests: [Counts; 3],
    errors: BTreeMap<ErrorKind, u64>,
    /// Body bytes received.
    pub bytes: u64,
    /// Bodies verified against a digest.
    pub verified: u64,
    latencies: [Vec<u32>; 4],
    pub units: Units,
}

/// Microseconds, saturating at `u32::MAX` (about 71 minutes).
pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Stats {
    pub fn record(&mut self, sample: &Sample) {
        let counts = &mut self.requests[sample.kind.index()];
        self.bytes += sample.bytes;
        if sample.verified {
            self.verified += 1;
        }
        match sample.result {
            Ok(()) => {
                counts.ok += 1;
                self.latencies[Series::from(sample.kind).index()].push(micros(sample.latency));
                if let Some(ttfb) = sample.ttfb {
                    self.latencies[Series::Ttfb.index()].push(micros(ttfb));
                }
            }
            Err(kind) => {
                counts.failed += 1;
                self.error(kind);
            }
        }
    }

    /// Counts an error that is not a failed request (an unusable manifest, say).
    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn requests(&self, kind: Kind) -> Counts {
        self.requests[kind.index()]
    }

    pub fn requests_total(&self) -> Counts {
        self.requests.iter().fold(Counts::default(), |a, c| Counts {
            ok: a.ok + c.ok,
            failed: a.failed + c.failed,
        })
    }

    pub fn errors(&self) -> &BTreeMap<ErrorKind, u64> {
        &self.errors
    }

    pub fn error_count(&self, kind: ErrorKind) -> u64 {
        self.errors.get(&kind).copied().unwrap_or(0)
    }

    pub fn latencies(&self, series: Series) -> &[u32] {
        &self.latencies[series.index()]
    }

    pub fn merge(&mut self, other: Stats) {
        for (mine, theirs) in self.requests.iter_mut().zip(other.requests) {
            mine.ok += theirs.ok;
            mine.failed += theirs.failed;
        }
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.bytes += other.bytes;
        self.verified += other.verified;
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            mine.extend(theirs);
        }
        self.units.ok += other.units.ok;
        self.units.failed += other.units.failed;
        self.units.cancelled += other.units.cancelled;
    }

    /// Whether anything failed: a request, a unit or a check.
    pub fn has_failures(&self) -> bool {
        self.requests_total().failed > 0 || self.units.failed > 0 || !self.errors.is_empty()
    }
}

/// A worker's stats, recorded into from the futures of one task (and locked only by
/// them, so the lock is never contended).
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Stats>);

impl Recorder {
    pub fn record(&self, sample: &Sample) {
        self.lock().record(sample);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.lock().error(kind);
    }

    pub fn unit(&self, outcome: UnitOutcome) {
        let mut stats = self.lock();
        match outcome {
            UnitOutcome::Ok => stats.units.ok += 1,
            UnitOutcome::Failed => stats.units.failed += 1,
            UnitOutcome::Cancelled => stats.units.cancelled += 1,
        }
    }

    pub fn into_stats(self) -> Stats {
        self.0.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Stats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitOutcome {
    Ok,
    Failed,
    Cancelled,
}

/// Nearest-rank percentiles of a latency series, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

/// The nearest-rank percentile `per_mille`/1000 of sorted values: the smallest value
/// such that at least that fraction of the values are at most it. `sorted` must be
/// non-empty and ascending.
pub fn percentile(sorted: &[u32], per_mille: u64) -> u32 {
    assert!(!sorted.is_empty(), "percentile of no values");
    let n = sorted.len() as u64;
    let rank = (per_mille * n).div_ceil(1000).clamp(1, n);
    sorted[(rank - 1) as usize]
}

/// Sorts `values` and computes p50, p90, p99 and max; `None` if there are none.
pub fn percentiles(values: &mut [u32]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some(Percentiles {
        count: values.len(),
        p50: percentile(values, 500),
        p90: percentile(values, 900),
        p99: percentile(values, 990),
        max: values[values.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_a_hundred() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!(
            p,
            Percentiles {
                count: 100,
                p50: 50,
                p90: 90,
                p99: 99,
                max: 100
            }
        );
    }

    #[test]
    fn percentiles_of_a_thousand_shuffled() {
        // 1..=1000 in a scrambled order (7 is coprime to 1000).
        let mut v: Vec<u32> = (0..1000u32).map(|i| (i * 7) % 1000 + 1).collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (500, 900, 990, 1000));
    }

    #[test]
    fn percentiles_of_small_sets() {
        assert_eq!(percentiles(&mut []), None);
        let p = percentiles(&mut [42]).unwrap();
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), (1, 42, 42, 42, 42));
        // Ten values: p50 is the 5th, p90 the 9th, p99 the 10th.
        let mut v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000];
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50, 90, 1000, 1000));
        // A skewed set: one outlier shows in max and p99 only when it is >1% of values.
        let mut v = vec![5u32; 199];
        v.push(9_000);
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (5, 5, 5, 9_000));
        let mut v = vec![5u32; 99];
        v.push(9_000);
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p99, p.max), (5, 9_000));
        let mut v = vec![5u32; 98];
        v.extend([9_000, 9_000]);
        assert_eq!(percentiles(&mut v).unwrap().p99, 9_000);
    }

    #[test]
    fn records_and_merges() {
        let mut a = Stats::default();
        let ok = |kind, bytes, ms| Sample {
            kind,
            bytes,
            result: Ok(()),
            verified: true,
            latency: Duration::from_millis(ms),
            ttfb: (kind == Kind::Blob).then(|| Duration::from_millis(1)),
        };
        a.record(&ok(Kind::TagManifest, 100, 2));
        a.record(&ok(Kind::Blob, 1000, 5));
        a.record(&Sample {
            result: Err(ErrorKind::DigestMismatch),
            ..ok(Kind::Blob, 10, 9)
        });
        a.units.ok += 1;
        let mut b = Stats::default();
        b.record(&ok(Kind::Manifest, 50, 3));
        b.record(&Sample {
            result: Err(ErrorKind::Status5xx),
            verified: false,
            ..ok(Kind::Manifest, 7, 1)
        });
        b.error(ErrorKind::PlatformNotFound);
        b.units.failed += 1;
        a.merge(b);

        assert_eq!(a.requests(Kind::TagManifest), Counts { ok: 1, failed: 0 });
        assert_eq!(a.requests(Kind::Manifest), Counts { ok: 1, failed: 1 });
        assert_eq!(a.requests(Kind::Blob), Counts { ok: 1, failed: 1 });
        assert_eq!(a.requests_total(), Counts { ok: 3, failed: 2 });
        assert_eq!(a.bytes, 100 + 1000 + 10 + 50 + 7);
        assert_eq!(a.verified, 4);
        assert_eq!(a.error_count(ErrorKind::DigestMismatch), 1);
        assert_eq!(a.error_count(ErrorKind::Status5xx), 1);
        assert_eq!(a.error_count(ErrorKind::PlatformNotFound), 1);
        assert_eq!(a.error_count(ErrorKind::Timeout), 0);
        // Only successful requests have latencies; ttfb only for blobs.
        assert_eq!(a.latencies(Series::TagManifest), &[2000]);
        assert_eq!(a.latencies(Series::Manifest), &[3000]);
        assert_eq!(a.latencies(Series::Blob), &[5000]);
        assert_eq!(a.latencies(Series::Ttfb), &[1000]);
        assert_eq!(
            a.units,
            Units {
                ok: 1,
                failed: 1,
                cancelled: 0
            }
        );
        assert!(a.has_failures());
        assert!(!Stats::default().has_failures());
    }

    #[test]
    fn status_classes() {
        assert_eq!(ErrorKind::from_status(404), ErrorKind::Status4xx);
        assert_eq!(ErrorKind::from_status(429), ErrorKind::Status4xx);
        assert_eq!(ErrorKind::from_status(502), ErrorKind::Status5xx);
        assert_eq!(ErrorKind::from_status(307), ErrorKind::StatusOther);
    }
}
