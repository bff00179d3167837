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
            outcome: outcome.map(Outcome::as_str).unwrap_or("none"),
            status: match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
        }
    }
}

pub struct Metrics {
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
            registry,
            cache,
            requests,
            bytes,
            duration,
            fills,
        }
    }

    pub fn observe(&self, labels: &RequestLabels, bytes: u64, elapsed: Duration) {
        self.requests.get_or_create(labels).inc();
        self.bytes.get_or_create(labels).inc_by(bytes);
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
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
