//! The report of a run: machine-readable (serde, written as JSON) and as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::accesslog::LogTotals;
use crate::metrics::UpstreamDelta;
use crate::run::{Config, Mode};
use crate::stats::{percentiles, Counts, Kind, Percentiles, Series, Stats};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `pull`, `blob`, `manifests` or `cold`.
    pub mode: &'static str,
    /// The URL the mode starts from (the tag's manifest, or the blob).
    pub target: String,
    pub concurrency: usize,
    pub limits: Limits,
    /// Wall time of the run, from the first request to the last response.
    pub duration_s: f64,
    pub units: UnitsReport,
    /// Successful pulls per second (`pull` mode only).
    pub pulls_per_s: Option<f64>,
    /// Successful units per second.
    pub units_per_s: f64,
    pub requests: RequestsByKind,
    pub requests_total: Counts,
    /// All requests (ok or not) per second.
    pub requests_per_s: f64,
    /// Errors by kind: failed requests, and failed checks of successful ones.
    pub errors: BTreeMap<&'static str, u64>,
    /// Body bytes received.
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub mib_per_s: f64,
    /// Response bodies checked against a digest.
    pub digests_verified: u64,
    /// Latency percentiles of successful requests, in microseconds; null when none.
    pub latency_us: LatencyByKind,
    /// What the registry asked its upstream for during the run (null unless
    /// `--upstream-log` or `--metrics` was given).
    pub upstream: Option<UpstreamReport>,
    /// Per-client results of a `cold` run.
    pub cold: Option<ColdReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// The most units a run may start (null for `cold`, whose count is its clients).
    pub count: Option<u64>,
    pub duration_s: f64,
    pub grace_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct UnitsReport {
    /// What a unit is: `pull`, `blob_get`, `manifest_get` or `client`.
    pub name: &'static str,
    pub ok: u64,
    pub failed: u64,
    pub cancelled: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestsByKind {
    pub tag_manifest: Counts,
    pub manifest: Counts,
    pub blob: Counts,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyByKind {
    pub tag_manifest: Option<Percentiles>,
    pub manifest: Option<Percentiles>,
    pub blob: Option<Percentiles>,
    /// Time to the first body byte of blobs.
    pub ttfb: Option<Percentiles>,
}

impl LatencyByKind {
    pub fn get(&self, series: Series) -> Option<&Percentiles> {
        match series {
            Series::TagManifest => self.tag_manifest.as_ref(),
            Series::Manifest => self.manifest.as_ref(),
            Series::Blob => self.blob.as_ref(),
            Series::Ttfb => self.ttfb.as_ref(),
        }
    }
}

/// Upstream requests and bytes during the run, and the amplification.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamReport {
    /// From the access log if one was given, otherwise from berth's counters; null if
    /// neither could tell.
    pub requests: Option<u64>,
    pub bytes: Option<u64>,
    /// `access_log` or `metrics`: where `requests` and `bytes` come from.
    pub source: Option<&'static str>,
    /// Upstream requests per client request, and upstream bytes per client byte.
    pub amplification: Amplification,
    pub access_log: Option<LogTotals>,
    /// The change of `berth_upstream_requests_total` and `berth_upstream_bytes_total`
    /// (each null if berth does not expose it).
    pub metrics: Option<UpstreamDelta>,
    /// Problems reading the log or the metrics.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Amplification {
    pub requests: Option<f64>,
    pub bytes: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdReport {
    pub clients: Vec<ColdClient>,
    /// When the first client had its whole blob (null if none did).
    pub first_finished_ms: Option<f64>,
    /// When the last client finished (successfully or not).
    pub all_finished_ms: f64,
}

/// One client of a cold run; times are from the moment the first client was released.
#[derive(Clone, Debug, Serialize)]
pub struct ColdClient {
    pub client: usize,
    pub ok: bool,
    pub error: Option<&'static str>,
    pub bytes: u64,
    pub start_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub total_ms: f64,
}

fn per_s(n: f64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n / s
    } else {
        0.0
    }
}

fn ratio(num: Option<u64>, den: u64) -> Option<f64> {
    match (num, den) {
        (Some(n), d) if d > 0 => Some(n as f64 / d as f64),
        _ => None,
    }
}

impl Report {
    pub fn build(
        config: &Config,
        stats: Stats,
        elapsed: Duration,
        upstream: Option<UpstreamReport>,
        cold: Option<ColdReport>,
    ) -> Report {
        let mut stats = stats;
        let lat = |series: Series| {
            let mut v = stats.latencies(series).to_vec();
            percentiles(&mut v)
        };
        let latency_us = LatencyByKind {
            tag_manifest: lat(Series::TagManifest),
            manifest: lat(Series::Manifest),
            blob: lat(Series::Blob),
            ttfb: lat(Series::Ttfb),
        };
        let requests_total = stats.requests_total();
        let bytes = stats.bytes;
        let upstream = upstream.map(|mut up| {
            if let Some(log) = &up.access_log {
                up.requests = Some(log.requests);
                up.bytes = Some(log.bytes);
                up.source = Some("access_log");
            } else if let Some(m) = &up.metrics {
                up.requests = m.requests;
                up.bytes = m.bytes;
                up.source = Some("metrics");
            }
            up.amplification = Amplification {
                requests: ratio(up.requests, requests_total.total()),
                bytes: ratio(up.bytes, bytes),
            };
            up
        });
        let (concurrency, count) = match &config.mode {
            Mode::Cold { clients, .. } => (*clients, None),
            _ => (config.concurrency, Some(config.count)),
        };
        let units = std::mem::take(&mut stats.units);
        Report {
            mode: config.mode.name(),
            target: config.target_url(),
            concurrency,
            limits: Limits {
                count,
                duration_s: config.duration.as_secs_f64(),
                grace_s: config.grace.as_secs_f64(),
            },
            duration_s: elapsed.as_secs_f64(),
            units: UnitsReport {
                name: config.mode.unit_name(),
                ok: units.ok,
                failed: units.failed,
                cancelled: units.cancelled,
            },
            pulls_per_s: matches!(config.mode, Mode::Pull { .. })
                .then(|| per_s(units.ok as f64, elapsed)),
            units_per_s: per_s(units.ok as f64, elapsed),
            requests: RequestsByKind {
                tag_manifest: stats.requests(Kind::TagManifest),
                manifest: stats.requests(Kind::Manifest),
                blob: stats.requests(Kind::Blob),
            },
            requests_total,
            requests_per_s: per_s(requests_total.total() as f64, elapsed),
            errors: stats
                .errors()
                .iter()
                .map(|(k, n)| (k.as_str(), *n))
                .collect(),
            bytes,
            bytes_per_s: per_s(bytes as f64, elapsed),
            mib_per_s: per_s(bytes as f64, elapsed) / (1024.0 * 1024.0),
            digests_verified: stats.verified,
            latency_us,
            upstream,
            cold,
        }
    }

    /// Whether anything failed: a request, a unit, or a check of a response.
    pub fn has_failures(&self) -> bool {
        self.requests_total.failed > 0 || self.units.failed > 0 || !self.errors.is_empty()
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The report as a human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "berth-load {}  {}\nconcurrency {}  duration {:.2} s",
            self.mode, self.target, self.concurrency, self.duration_s
        );
        let _ = writeln!(
            t,
            "{:<13} ok {}  failed {}  cancelled {}  ({:.2}/s ok)",
            format!("{}s", self.units.name),
            self.units.ok,
            self.units.failed,
            self.units.cancelled,
            self.units_per_s
        );
        let _ = writeln!(
            t,
            "{:<13} {} ok  {} failed  ({:.1}/s)  {} digests verified",
            "requests",
            self.requests_total.ok,
            self.requests_total.failed,
            self.requests_per_s,
            self.digests_verified
        );
        let _ = writeln!(
            t,
            "{:<13} {} ({})  {:.2} MiB/s",
            "bytes",
            self.bytes,
            human_bytes(self.bytes),
            self.mib_per_s
        );
        let _ = writeln!(
            t,
            "\n{:<13} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "kind", "ok", "failed", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for series in Series::ALL {
            let counts = match series {
                Series::TagManifest => Some(self.requests.tag_manifest),
                Series::Manifest => Some(self.requests.manifest),
                Series::Blob => Some(self.requests.blob),
                Series::Ttfb => None,
            };
            let p = self.latency_us.get(series);
            if counts.is_some_and(|c| c.total() == 0) || (counts.is_none() && p.is_none()) {
                continue;
            }
            let (ok, failed) = match counts {
                Some(c) => (c.ok.to_string(), c.failed.to_string()),
                None => (String::new(), String::new()),
            };
            let ms = |f: fn(&Percentiles) -> u32| {
                p.map_or("-".to_owned(), |p| format!("{:.3}", f(p) as f64 / 1000.0))
            };
            let _ = writeln!(
                t,
                "{:<13} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}",
                series.as_str(),
                ok,
                failed,
                ms(|p| p.p50),
                ms(|p| p.p90),
                ms(|p| p.p99),
                ms(|p| p.max)
            );
        }
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(t, "\n{:<13} {}", "errors", list.join("  "));
        }
        if let Some(up) = &self.upstream {
            let show = |v: Option<u64>| v.map_or("null".to_owned(), |v| v.to_string());
            let _ = writeln!(
                t,
                "\n{:<13} requests {}  bytes {}  (from {})",
                "upstream",
                show(up.requests),
                show(up.bytes),
                up.source.unwrap_or("nothing")
            );
            let amp = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.4}"));
            let _ = writeln!(
                t,
                "{:<13} {} upstream requests per request, {} upstream bytes per byte",
                "amplification",
                amp(up.amplification.requests),
                amp(up.amplification.bytes)
            );
            if let (Some(m), Some("access_log")) = (&up.metrics, up.source) {
                let _ = writeln!(
                    t,
                    "{:<13} requests {}  bytes {}",
                    "berth metrics",
                    show(m.requests),
                    show(m.bytes)
                );
            }
            for note in &up.notes {
                let _ = writeln!(t, "{:<13} {note}", "note");
            }
        }
        if let Some(cold) = &self.cold {
            let _ = writeln!(
                t,
                "\n{:<8} {:>6} {:>12} {:>12} {:>12}  error",
                "client", "ok", "start ms", "ttfb ms", "total ms"
            );
            for c in &cold.clients {
                let _ = writeln!(
                    t,
                    "{:<8} {:>6} {:>12.3} {:>12} {:>12.3}  {}",
                    c.client,
                    c.ok,
                    c.start_ms,
                    c.ttfb_ms.map_or("-".to_owned(), |v| format!("{v:.3}")),
                    c.total_ms,
                    c.error.unwrap_or("")
                );
            }
            let _ = writeln!(
                t,
                "first finished {}  all finished {:.3} ms",
                cold.first_finished_ms
                    .map_or("-".to_owned(), |v| format!("{v:.3} ms")),
                cold.all_finished_ms
            );
        }
        t
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::run::{Config, Mode, Reference, Target};
    use crate::stats::{ErrorKind, Sample};

    #[test]
    fn builds_rates_and_amplification() {
        let config = Config::new(
            Target::new("http://127.0.0.1:5000", None).unwrap(),
            Mode::Manifests {
                repo: "library/app".into(),
                reference: Reference::Tag("latest".into()),
                verify: true,
            },
        );
        let mut stats = Stats::default();
        for i in 1..=10u64 {
            let mut s = Sample::new(Kind::TagManifest);
            s.bytes = 100;
            s.latency = Duration::from_micros(i * 1000);
            stats.record(&s);
            stats.units.ok += 1;
        }
        let mut bad = Sample::new(Kind::TagManifest);
        bad.result = Err(ErrorKind::Status5xx);
        stats.record(&bad);
        stats.units.failed += 1;
        let up = UpstreamReport {
            metrics: Some(UpstreamDelta {
                requests: Some(2),
                bytes: None,
            }),
            ..Default::default()
        };
        let r = Report::build(&config, stats, Duration::from_secs(2), Some(up), None);
        assert_eq!(r.mode, "manifests");
        assert_eq!(
            r.target,
            "http://127.0.0.1:5000/v2/library/app/manifests/latest"
        );
        assert_eq!(r.requests_total, Counts { ok: 10, failed: 1 });
        assert_eq!(r.requests_per_s, 5.5);
        assert_eq!(r.units_per_s, 5.0);
        assert_eq!(r.pulls_per_s, None);
        assert_eq!(r.bytes, 1000);
        assert_eq!(r.bytes_per_s, 500.0);
        assert_eq!(r.errors.get("status_5xx"), Some(&1));
        let p = r.latency_us.tag_manifest.unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (5000, 9000, 10000, 10000));
        assert!(r.latency_us.blob.is_none());
        let up = r.upstream.as_ref().unwrap();
        assert_eq!(up.source, Some("metrics"));
        assert_eq!((up.requests, up.bytes), (Some(2), None));
        assert_eq!(up.amplification.requests, Some(2.0 / 11.0));
        assert_eq!(up.amplification.bytes, None);
        assert!(r.has_failures());

        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["errors"]["status_5xx"], 1);
        assert_eq!(json["latency_us"]["tag_manifest"]["p90"], 9000);
        assert!(json["latency_us"]["blob"].is_null());
        assert!(json["upstream"]["bytes"].is_null());
        assert!(json["cold"].is_null());
        let table = r.table();
        assert!(table.contains("tag_manifest"), "{table}");
        assert!(table.contains("status_5xx 1"), "{table}");
        assert!(!table.contains("\nblob"), "{table}");
    }

    #[test]
    fn no_upstream_is_null() {
        let config = Config::new(
            Target::new("http://127.0.0.1:5000", None).unwrap(),
            Mode::Blob {
                repo: "r".into(),
                digest: Digest::sha256_of(b""),
                verify: true,
            },
        );
        let r = Report::build(&config, Stats::default(), Duration::ZERO, None, None);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(json["upstream"].is_null());
        assert_eq!(json["bytes_per_s"], 0.0);
        assert!(!r.has_failures());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
    }
}
