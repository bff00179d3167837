//! Request metrics, registered into a registry the server owns (never a global one).
//! Labels are bounded: route kind, upstream namespace, outcome and status class; never a
//! repository, tag or digest.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use berth_cache::metrics::CacheMetrics;
use berth_cache::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub upstream: String,
    pub outcome: &'static str,
    pub status: &'static str,
}

impl RequestLabels {
    /// `upstream` must be a configured namespace (bounded) or `None`.
    pub fn new(
        route: &'static str,
        upstream: Option<&str>,
        outcome: Option<Outcome>,
        status: u16,
    ) -> Self {
        RequestLabels {
            route,
            upstream: upstream.unwrap_or("none").to_owned(),
            outcome: outcome_label(outcome),
            status: status_class(status),
        }
    }

    /// Whether these are the labels [`RequestLabels::new`] makes of the same values,
    /// without making them.
    fn is(
        &self,
        route: &'static str,
        upstream: Option<&str>,
        outcome: Option<Outcome>,
        status: u16,
    ) -> bool {
        self.route == route
            && self.upstream == upstream.unwrap_or("none")
            && self.outcome == outcome_label(outcome)
            && self.status == status_class(status)
    }
}

fn outcome_label(outcome: Option<Outcome>) -> &'static str {
    outcome.map(Outcome::as_str).unwrap_or("none")
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The metrics of one label set, shared with the families that encode them.
struct Series {
    requests: Counter,
    bytes: Counter,
    duration: Histogram,
}

/// How many series each thread remembers (a node sees a handful of label sets: route
/// kinds, upstreams, outcomes and status classes); the oldest is forgotten first.
const SERIES_PER_THREAD: usize = 64;

thread_local! {
    /// The series this thread counted into lately, by [`Metrics::id`] and labels.
    static SERIES: std::cell::RefCell<Vec<(u64, RequestLabels, Series)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Tells the [`Metrics`] of a process apart (tests make several).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Metrics {
    /// Unique in the process: remembered series belong to one `Metrics`.
    id: u64,
    registry: Registry,
    /// The cache's counters, registered into the same registry.
    pub cache: CacheMetrics,
    requests: Family<RequestLabels, Counter>,
    bytes: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    fills: Gauge<i64, AtomicI64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let requests = Family::<RequestLabels, Counter>::default();
        let bytes = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 4.0, 10))
        });
        let fills = Gauge::<i64, AtomicI64>::default();
        registry.register("requests", "HTTP requests served", requests.clone());
        registry.register(
            "response_body_bytes",
            "Response body bytes sent",
            bytes.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request read to response written",
            duration.clone(),
        );
        registry.register(
            "blob_fills_in_progress",
            "Blob fills from upstreams in progress",
            fills.clone(),
        );
        let cache = CacheMetrics::register(&mut registry);
        Metrics {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            registry,
            cache,
            requests,
            bytes,
            duration,
            fills,
        }
    }

    /// Counts one request, its body bytes and its duration under the labels
    /// [`RequestLabels::new`] makes of `route`, `upstream`, `outcome` and `status`.
    ///
    /// Each thread remembers the series it has counted into, so that a request costs no
    /// label hashing and no lock of the three families (which took about 2,000
    /// instructions per request). Series are never removed from a family, so a
    /// remembered one stays the one the family encodes.
    pub fn observe(
        &self,
        route: &'static str,
        upstream: Option<&str>,
        outcome: Option<Outcome>,
        status: u16,
        bytes: u64,
        elapsed: Duration,
    ) {
        SERIES.with(|series| {
            let mut series = series.borrow_mut();
            let found = series
                .iter()
                .position(|(id, l, _)| *id == self.id && l.is(route, upstream, outcome, status));
            let index = match found {
                Some(i) => i,
                None => {
                    if series.len() == SERIES_PER_THREAD {
                        series.remove(0);
                    }
                    let labels = RequestLabels::new(route, upstream, outcome, status);
                    let s = Series {
                        requests: self.requests.get_or_create(&labels).clone(),
                        bytes: self.bytes.get_or_create(&labels).clone(),
                        duration: self.duration.get_or_create(&labels).clone(),
                    };
                    series.push((self.id, labels, s));
                    series.len() - 1
                }
            };
            let s = &series[index].2;
            s.requests.inc();
            s.bytes.inc_by(bytes);
            s.duration.observe(elapsed.as_secs_f64());
        });
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self, fills_in_progress: usize) -> String {
        self.fills.set(fills_in_progress as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// The exposition in the format the scraper asked for: OpenMetrics if its `Accept`
    /// names it, otherwise the Prometheus text format 0.0.4. Returns (content type, body).
    pub fn render_for(
        &self,
        accept: Option<&str>,
        fills_in_progress: usize,
    ) -> (&'static str, String) {
        let text = self.render(fills_in_progress);
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        } else {
            (
                "text/plain; version=0.0.4; charset=utf-8",
                to_prometheus_text(&text),
            )
        }
    }
}

/// Converts OpenMetrics text to the Prometheus text format: counter families are named
/// with their `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT` and `# EOF` are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let om = "# HELP berth_requests HTTP requests served.\n# TYPE berth_requests counter\n\
berth_requests_total{route=\"base\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP berth_requests_total HTTP requests served.\n# TYPE berth_requests_total counter\n\
berth_requests_total{route=\"base\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }

    #[test]
    fn each_metrics_counts_its_own_requests_into_its_series() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let ms = Duration::from_millis(1);
        for _ in 0..3 {
            a.observe(
                "manifest",
                Some("docker.io"),
                Some(Outcome::Hit),
                200,
                10,
                ms,
            );
        }
        a.observe(
            "manifest",
            Some("docker.io"),
            Some(Outcome::Miss),
            200,
            5,
            ms,
        );
        a.observe("blob", None, None, 404, 0, ms);
        b.observe(
            "manifest",
            Some("docker.io"),
            Some(Outcome::Hit),
            204,
            7,
            ms,
        );
        let (a, b) = (a.render(0), b.render(0));
        let hit = r#"{route="manifest",upstream="docker.io",outcome="hit",status="2xx"}"#;
        assert!(a.contains(&format!("berth_requests_total{hit} 3\n")), "{a}");
        assert!(
            a.contains(&format!("berth_response_body_bytes_total{hit} 30\n")),
            "{a}"
        );
        assert!(a.contains(
            r#"berth_requests_total{route="manifest",upstream="docker.io",outcome="miss",status="2xx"} 1"#
        ), "{a}");
        assert!(a.contains(
            r#"berth_requests_total{route="blob",upstream="none",outcome="none",status="4xx"} 1"#
        ), "{a}");
        assert!(
            a.contains(&format!("berth_request_duration_seconds_count{hit} 3\n")),
            "{a}"
        );
        assert!(b.contains(&format!("berth_requests_total{hit} 1\n")), "{b}");
        assert!(
            b.contains(&format!("berth_response_body_bytes_total{hit} 7\n")),
            "{b}"
        );
    }

    #[test]
    fn openmetrics_is_served_when_asked_for() {
        let m = Metrics::new();
        let (ct, body) = m.render_for(Some("application/openmetrics-text;version=1.0.0"), 0);
        assert!(ct.starts_with("application/openmetrics-text"));
        assert!(body.ends_with("# EOF\n"));
        let (ct, body) = m.render_for(None, 0);
        assert!(ct.starts_with("text/plain"));
        assert!(!body.contains("# EOF"));
    }
}
